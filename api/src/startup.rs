//! Build, then run: `Application::build` binds the listener (port 0 in tests) and exposes the
//! port; `run_until_stopped` serves until the shutdown token fires, then drains for at most
//! `api.shutdown_timeout_secs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use poem::{EndpointExt, Route};
use poem_openapi::OpenApiService;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{PanicAsInternal, normalize_error};
use crate::middleware::{BodyLimit, RequestContext, RouteTable};
use crate::models::ModelCatalog;
use crate::routes::actions::ActionsApi;
use crate::routes::auth::AuthApi;
use crate::routes::budget::BudgetApi;
use crate::routes::chat::ChatApi;
use crate::routes::conversations::ConversationsApi;
use crate::routes::documents::DocumentsApi;
use crate::routes::health::HealthApi;
use crate::routes::metrics::MetricsApi;
use crate::routes::model_settings::ModelSettingsApi;
use crate::routes::orgs::OrgsApi;
use crate::routes::projects::ProjectsApi;
use crate::routes::tasks::TasksApi;
use crate::routes::teams::TeamsApi;
use crate::state::AppState;

pub struct Application {
    state: AppState,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
}

impl Application {
    /// Connect (lazily) to PostgreSQL and Redis and bind the listening socket.
    pub async fn build(settings: config::Settings) -> anyhow::Result<Self> {
        let jwt = crate::auth::JwtKeys::from_settings(&settings)?;
        let dummy_hash = crate::password::dummy_hash()
            .await
            .map_err(|e| anyhow::anyhow!("cannot compute the dummy password hash: {e:?}"))?;
        let db = store::pool(&settings.database)?;
        let redis = Arc::new(jobs::RedisHandle::new(&settings.redis)?);
        let bus = jobs::Bus::new(redis.clone(), &settings.queues);
        let hub = jobs::events::EventHub::new(redis.clone());
        let publisher = jobs::events::EventPublisher::new(redis.clone(), &settings.events);
        let models = Arc::new(ModelCatalog::new(
            llm::LlmClient::new(&settings.litellm)?,
            Duration::from_secs(settings.api.models_cache_secs),
        ));
        let listener = tokio::net::TcpListener::bind(settings.api_addr()).await?;
        let addr = listener.local_addr()?;
        let streams = Arc::new(crate::sse::StreamLimits::new(&settings.api));
        let hasher = Arc::new(crate::password::Hasher::from_settings(&settings.auth));
        let trusted_proxies = Arc::new(settings.api.trusted_proxy_nets());
        let state = AppState {
            settings: Arc::new(settings),
            db,
            redis,
            metrics: jobs::telemetry::prometheus(),
            jwt: Arc::new(jwt),
            dummy_hash: Arc::new(dummy_hash),
            hasher,
            trusted_proxies,
            bus,
            hub,
            publisher,
            models,
            streams,
            shutdown: CancellationToken::new(),
        };
        Ok(Self {
            state,
            listener,
            addr,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serve until `shutdown` is cancelled. The event hub runs as a task owned here; open SSE
    /// streams and JSON-mode waits end when `shutdown` fires, so the drain does not wait for them.
    pub async fn run_until_stopped(mut self, shutdown: CancellationToken) -> std::io::Result<()> {
        let api = &self.state.settings.api;
        let limits = crate::server::ServerLimits {
            max_header_bytes: api.max_header_bytes,
            header_read_timeout: Duration::from_secs(api.header_read_timeout_secs),
            drain: Duration::from_secs(api.shutdown_timeout_secs),
        };
        // A child: cancelled with `shutdown`, and by us when the server stops on its own.
        let stop = shutdown.child_token();
        self.state.shutdown = stop.clone();
        let tasks = TaskTracker::new();
        tasks.spawn(self.state.hub.clone().run(stop.clone()));
        // this process's partition count joins the record the workers read by (once Redis
        // answers; the API serves meanwhile)
        let bus = self.state.bus.clone();
        let recording = stop.clone();
        tasks.spawn(async move {
            let mut pause = Duration::from_millis(200);
            while let Err(e) = bus.record_partitions().await {
                tracing::warn!(error = %e, "cannot record the queue partitions yet; retrying");
                tokio::select! {
                    _ = recording.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        });
        tasks.close();
        let app = routes(self.state.clone());
        tracing::info!(addr = %self.addr, "api listening");
        let served = crate::server::serve(self.listener, app, limits, stop.clone()).await;
        stop.cancel();
        tasks.wait().await;
        served
    }
}

/// Every route of the API, with the error normaliser and body limits around them.
pub fn routes(state: AppState) -> impl poem::Endpoint {
    let api = OpenApiService::new(
        (
            HealthApi {
                state: state.clone(),
            },
            MetricsApi {
                handle: state.metrics.clone(),
                bus: state.bus.clone(),
            },
            AuthApi {
                state: state.clone(),
            },
            OrgsApi {
                state: state.clone(),
            },
            TeamsApi {
                state: state.clone(),
            },
            ProjectsApi {
                state: state.clone(),
            },
            TasksApi {
                state: state.clone(),
            },
            DocumentsApi {
                state: state.clone(),
            },
            ConversationsApi {
                state: state.clone(),
            },
            ChatApi {
                state: state.clone(),
            },
            ModelSettingsApi {
                state: state.clone(),
            },
            BudgetApi {
                state: state.clone(),
            },
            ActionsApi {
                state: state.clone(),
            },
        ),
        "Switchboard API",
        env!("CARGO_PKG_VERSION"),
    );
    let raw_spec = api.spec();
    let route_labels = Arc::new(route_table(&raw_spec));
    let document = crate::openapi::finish(&raw_spec).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot finish the OpenAPI document; serving it as generated");
        raw_spec
    });
    let spec = poem::endpoint::make_sync(move |_| {
        poem::Response::builder()
            .content_type("application/json; charset=utf-8")
            .body(document.clone())
    });
    let docs = api.swagger_ui();
    let limits = BodyLimit {
        default_limit: state.settings.api.max_body_bytes,
        upload_limit: state.settings.api.max_upload_bytes,
        is_upload: |path| path.ends_with("/documents"),
    };
    let cors = crate::cors::Cors::new(state.settings.api.cors_origins());
    Route::new()
        .nest("/", api)
        .at("/openapi.json", spec)
        .nest("/docs", docs)
        .nest("/console", crate::console::routes())
        .with(limits)
        .data(state)
        .catch_all_error(normalize_error)
        .with(poem::middleware::CatchPanic::new().with_handler(PanicAsInternal))
        .with(cors)
        .with(RequestContext {
            routes: route_labels,
        })
}

/// The path templates of the OpenAPI document, plus the routes served outside it.
fn route_table(spec: &str) -> RouteTable {
    let doc: serde_json::Value = serde_json::from_str(spec).unwrap_or_default();
    let mut paths: Vec<String> = doc
        .get("paths")
        .and_then(|p| p.as_object())
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    paths.extend(["/openapi.json", "/docs"].map(String::from));
    paths.extend(crate::console::PATHS.map(String::from));
    RouteTable::new(paths.iter().map(String::as_str))
}
