//! Worker and scheduler runtime: connections, readiness and shutdown shared by both binaries.
//!
//! - [`handlers`]: the job handlers (one module per kind) and the registry; a handler is the
//!   entry of its job and reaches only into the parts below, never into another handler:
//! - [`model`]: the model caller (cooldowns, model choice, streamed and plain calls, fallback,
//!   rate-limit decisions, model metrics), shared by chat, summarize and remember;
//! - [`tools`]: the assistant's tools — registry, tool rounds, proposals, and `execute_action`;
//! - [`ledger`]: a run's hold on its response (fence, lease, fenced publishes);
//! - [`follow_ups`]: the memory jobs a chat turn enqueues;
//! - [`ops`]: the operator commands of `worker` (queues, dead letters, probes);
//! - [`scheduler`]: the periodic jobs under a leader lease;
//! - [`reconciler`]: the ledger's reconciler (lost work re-enqueued from PostgreSQL, proposals
//!   expired), run by the scheduler's leader;
//! - [`metrics_server`]: the `/metrics` listener of worker and scheduler processes.

pub mod follow_ups;
pub mod handlers;
pub mod ledger;
pub mod metrics_server;
pub mod model;
pub mod ops;
pub mod reconciler;
pub mod scheduler;
pub mod tools;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

/// Connections every worker-side process holds.
pub struct Runtime {
    pub settings: config::Settings,
    pub db: sqlx::PgPool,
    pub redis: Arc<jobs::RedisHandle>,
    pub bus: jobs::Bus,
}

impl Runtime {
    /// Connect to PostgreSQL and Redis, waiting up to `wait` for them to come up, so that a
    /// process started together with its services does not crash-loop.
    pub async fn connect(settings: config::Settings, wait: Duration) -> anyhow::Result<Self> {
        let db = store::pool(&settings.database)?;
        let redis = Arc::new(jobs::RedisHandle::new(&settings.redis).context("invalid REDIS_URL")?);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let pg = store::ping(&db).await;
            let rd = redis.ping().await;
            match (&pg, &rd) {
                (Ok(()), Ok(())) => break,
                _ if tokio::time::Instant::now() >= deadline => {
                    pg.context("PostgreSQL is unreachable")?;
                    rd.context("Redis is unreachable")?;
                }
                _ => {
                    tracing::warn!(
                        postgres = pg.is_ok(),
                        redis = rd.is_ok(),
                        "waiting for services"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let bus = jobs::Bus::new(redis.clone(), &settings.queues);
        // read (and count, and reconcile) every partition a larger setting ever created
        if let Err(e) = bus.record_partitions().await {
            tracing::warn!(error = %e, "cannot record the queue partitions; reading this process's own");
        }
        Ok(Self {
            settings,
            db,
            redis,
            bus,
        })
    }
}

/// Load settings and install tracing; a bad setting exits with code 2 and a message naming it.
pub fn load_settings(process: &str) -> Result<config::Settings, std::process::ExitCode> {
    match config::Settings::load() {
        Ok(s) => {
            jobs::telemetry::init_tracing(&s.log);
            Ok(s)
        }
        Err(e) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("{process}: {e}");
            }
            Err(std::process::ExitCode::from(2))
        }
    }
}
