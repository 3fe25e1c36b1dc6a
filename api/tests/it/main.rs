//! API integration tests: the app spawned on port 0 against real PostgreSQL and Redis.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod actions;
mod auth;
mod bad_input;
mod browser;
mod budget;
mod chat_api;
mod chat_helpers;
mod console;
mod conversations;
mod documents;
mod e2e;
mod fairness;
mod helpers;
mod hostile_auth;
mod hostile_index;
mod idempotency;
mod memory;
mod model_settings;
mod observability;
mod openapi_conformance;
mod ops;
mod provenance;
mod retrieval;
mod server;
mod tenancy;
mod usage;
mod visibility_model;
mod webdriver;

/// A connection to the test's Redis, a single node or the cluster (`REDIS_CLUSTER`).
pub async fn redis_conn(redis: &testkit::TestRedis) -> jobs::RedisConn {
    jobs::RedisHandle::new(&redis.settings())
        .unwrap()
        .conn()
        .await
        .unwrap()
}
