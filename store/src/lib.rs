//! PostgreSQL access shared by the API and the workers.
//!
//! Query functions take `&mut PgConnection` (or a pool where a single statement suffices) so
//! that the caller owns the transaction. Nothing here knows about HTTP or Redis.

pub mod actions;
pub mod assistant;
pub mod budgets;
pub mod conversations;
pub mod documents;
pub mod embeddings;
mod error;
pub mod index;
pub mod memory;
pub mod outbox;
pub mod probe;
pub mod projects;
pub mod provenance;
pub mod public;
pub mod responses;
pub mod retrieval;
pub mod tasks;
pub mod tenancy;
pub mod usage;

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub use error::StoreError;
/// The typed ids and closed sets (the `types` crate), also under `store::types`.
pub mod types {
    pub use ::types::*;
}

pub use self::types::{
    ActionId, ActionStatus, ConversationId, DocumentId, DocumentStatus, ErrorCode, JobId, MemoryId,
    MessageId, OrgId, ProjectId, ResponseId, ResponseStatus, Role, TaskId, TaskStatus, TeamId,
    UnknownValue, UserId, Visibility,
};

/// The schema migrations in `migrations/`, embedded at compile time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// A connection pool for the configured database. Connecting is lazy: a process starts even
/// when PostgreSQL is down, and `/readyz` reports it.
pub fn pool(settings: &config::DatabaseSettings) -> Result<PgPool, StoreError> {
    let options: PgConnectOptions = settings
        .url
        .expose_secret()
        .parse::<PgConnectOptions>()
        .map_err(StoreError::Config)?
        .log_statements(log::LevelFilter::Trace)
        .log_slow_statements(log::LevelFilter::Warn, Duration::from_millis(500));
    // No ping before handing out a pooled connection: it cost one extra round trip per
    // acquire (a chat turn acquires several times before its first token). A connection that
    // died while idle (PostgreSQL restarted) fails its next statement instead — the request
    // answers 503 or the job is retried — and is then discarded (sqlx tests it on release).
    Ok(PgPoolOptions::new()
        .test_before_acquire(false)
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(settings.acquire_timeout_secs))
        .connect_lazy_with(options))
}

/// Apply pending migrations (idempotent; serialised by sqlx's advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Migrations, then the HNSW index for the configured embedding dimension.
pub async fn migrate_with_vector_index(pool: &PgPool, dim: u32) -> Result<(), StoreError> {
    migrate(pool).await?;
    embeddings::ensure_vector_index(pool, dim).await
}

/// A cheap round trip used by readiness checks.
pub async fn ping(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}
