use std::sync::Arc;

use jobs::RedisHandle;
use sqlx::PgPool;

use crate::auth::JwtKeys;

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
}
