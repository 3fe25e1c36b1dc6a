//! Job handlers, one module per kind, and the registry a worker runs with: `probe`, `chat`,
//! `index` (handlers/index), the memory queue's `summarize` and `remember` (handlers/memory)
//! and the actions queue's `execute_action` (`crate::tools::execute`, next to the tools whose
//! proposals it executes). No handler reaches into another's module: what they share are the
//! crate's parts (`crate::model`, `crate::tools`, `crate::ledger`, `crate::follow_ups`).

pub mod chat;
pub mod index;
pub mod memory;
pub mod probe;

use std::time::Duration;

use jobs::kinds::Probe;
use jobs::{JobError, Registry};

/// How long a job waits before trying again when PostgreSQL or Redis is unreachable (plus up to
/// as much again of jitter): not a failure of the job, so no attempt is used up.
const INFRA_WAIT: Duration = Duration::from_millis(1000);

fn infra_wait(what: &str, e: &dyn std::fmt::Display) -> JobError {
    let jitter = Duration::from_millis(rand::random_range(0..=INFRA_WAIT.as_millis() as u64));
    JobError::wait(format!("{what} unreachable: {e}"), INFRA_WAIT + jitter)
}

/// A database failure of a handler, as the error classifies itself: a wait while PostgreSQL
/// is unreachable (a restart, a failover: the job comes back without using up an attempt), a
/// retry when [`store::StoreError::is_retryable`], the dead letters otherwise.
pub(crate) fn db_error(e: impl Into<store::StoreError>) -> JobError {
    let e: store::StoreError = e.into();
    if e.is_unavailable() {
        return infra_wait("database", &e);
    }
    let detail = match &e {
        store::StoreError::Database(inner) => inner.to_string(),
        other => other.to_string(),
    };
    if e.is_retryable() {
        JobError::retryable(format!("database: {detail}"))
    } else {
        JobError::permanent(format!("database: {detail}"))
    }
}

/// A Redis failure of a handler: a wait when the connection is down, a retry otherwise.
pub(crate) fn redis_error(e: impl Into<RedisFailure>) -> JobError {
    let RedisFailure { unreachable, text } = e.into();
    if unreachable {
        return infra_wait("redis", &text);
    }
    JobError::retryable(format!("redis: {text}"))
}

/// A Redis error from the client or from the events publisher.
pub(crate) struct RedisFailure {
    unreachable: bool,
    text: String,
}

impl From<redis::RedisError> for RedisFailure {
    fn from(e: redis::RedisError) -> Self {
        Self {
            unreachable: e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout(),
            text: e.to_string(),
        }
    }
}

impl From<jobs::events::EventsError> for RedisFailure {
    fn from(e: jobs::events::EventsError) -> Self {
        match e {
            jobs::events::EventsError::Redis(r) => r.into(),
            other => Self {
                unreachable: false,
                text: other.to_string(),
            },
        }
    }
}

/// The handlers that need only the database (`probe`).
pub fn registry(db: sqlx::PgPool) -> Registry {
    let mut r = Registry::new();
    r.register::<Probe, _, _>(move |ctx, job| probe::run(db.clone(), ctx, job));
    r
}

/// Every handler this build has: what the `worker` binary runs.
pub fn worker_registry(rt: &crate::Runtime) -> Result<Registry, llm::LlmError> {
    let mut r = registry(rt.db.clone());
    chat::ChatHandler::new(rt.db.clone(), rt.redis.clone(), &rt.settings)?.register(&mut r);
    index::Indexer::new(rt.db.clone(), &rt.settings)?.register(&mut r);
    memory::MemoryHandlers::new(rt.db.clone(), rt.redis.clone(), &rt.settings)?.register(&mut r);
    crate::tools::ActionsHandler::new(rt.db.clone(), rt.bus.clone()).register(&mut r);
    Ok(r)
}
