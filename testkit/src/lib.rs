//! Test equipment shared by every crate's integration tests (a dev-dependency only).
//!
//! - [`TestDb`]: a fresh PostgreSQL database per test, cloned from a migrated template.
//! - [`TestRedis`]: a unique Redis key prefix per test, cleaned up on drop.
//! - [`fake_upstream`]: a scripted OpenAI-compatible upstream, in-process or shared behind the
//!   real LiteLLM proxy.
//! - [`retrieval`]: tenants, projects and indexed chunks for retrieval tests and benches.
//! - [`turns`]: answers stored the way a chat run stores them.
//! - [`test_settings`]: `config::Settings` pointing at all of the above.
//!
//! The services come from the environment that scripts/test sets up (`scripts/services env`);
//! a test that needs one and does not find it fails with a message saying how to get it.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

pub mod cluster;
pub mod db;
pub mod env;
pub mod fake_upstream;
pub mod redis_prefix;
pub mod retrieval;
pub mod turns;

pub use db::TestDb;
pub use fake_upstream::{Behaviour, FakeClient, FakeUpstream};
pub use redis_prefix::TestRedis;

/// A model name unique to this test, e.g. `primary-1a2b3c4d`, so that tests sharing the fake
/// upstream never see each other's scripts or requests.
pub fn unique_model(label: &str) -> String {
    format!(
        "{label}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The name LiteLLM routes to the shared fake upstream for `model` (`fake/<model>`).
pub fn via_litellm(model: &str) -> String {
    format!("fake/{model}")
}

/// JWT secret used by test settings.
pub const TEST_JWT_SECRET: &str = "test-secret-0123456789abcdef0123456789";

/// Settings for a test: the defaults, with the test's database and Redis prefix, the shared
/// LiteLLM proxy when the environment names one, port 0 for the API, and `extra` overrides
/// (environment variable names, as in production).
pub fn test_settings(db: &TestDb, redis: &TestRedis, extra: &[(&str, &str)]) -> config::Settings {
    let mut vars: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    // QUEUE_PARTITIONS: scripts/test's cluster pass runs every test with partitioned queues
    for name in ["LITELLM_BASE_URL", "LITELLM_API_KEY", "QUEUE_PARTITIONS"] {
        if let Ok(v) = std::env::var(name) {
            vars.insert(name.into(), v);
        }
    }
    vars.insert("DATABASE_URL".into(), db.url.clone());
    vars.insert("DATABASE_MAX_CONNECTIONS".into(), "8".into());
    vars.insert("REDIS_URL".into(), redis.url.clone());
    vars.insert("REDIS_PREFIX".into(), redis.prefix.clone());
    vars.insert("REDIS_CLUSTER".into(), redis.cluster_env().into());
    vars.insert("JWT_SECRET".into(), TEST_JWT_SECRET.into());
    vars.insert("API_ADDR".into(), "127.0.0.1:0".into());
    vars.insert("LOG_FILTER".into(), "warn".into());
    for (k, v) in extra {
        vars.insert((*k).into(), (*v).into());
    }
    config::Settings::load_from(None, |k| vars.get(k).cloned()).expect("test settings are valid")
}
