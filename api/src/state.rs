use std::sync::Arc;

use jobs::RedisHandle;
use jobs::events::{EventHub, EventPublisher};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::auth::JwtKeys;
use crate::models::ModelCatalog;

/// What every endpoint shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<config::Settings>,
    pub db: PgPool,
    pub redis: Arc<RedisHandle>,
    /// Renders this process's Prometheus metrics.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub jwt: Arc<JwtKeys>,
    /// argon2 hash of a random password, verified against for unknown emails at login.
    pub dummy_hash: Arc<String>,
    /// Password hashing, bounded (`auth.password_hash_concurrency` / `_queue`).
    pub hasher: Arc<crate::password::Hasher>,
    /// `TRUSTED_PROXIES`, parsed: peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Arc<Vec<config::IpNet>>,
    /// The job bus (chat turns are enqueued here).
    pub bus: jobs::Bus,
    /// The one event hub of this process (SSE relay, JSON-mode waits).
    pub hub: EventHub,
    /// Publishes the API's own response events (`message.created`).
    pub publisher: EventPublisher,
    /// The names the LiteLLM proxy serves, cached briefly.
    pub models: Arc<ModelCatalog>,
    /// Per-user cap on open SSE streams in this process.
    pub streams: Arc<crate::sse::StreamLimits>,
    /// Cancelled when the server shuts down: open SSE streams and JSON waits end.
    pub shutdown: CancellationToken,
}
