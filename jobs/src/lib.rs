//! The contract between the API and the workers: job types, the Redis Streams bus, Redis
//! connections and the tracing set-up that carries one trace across both.

pub mod events;
pub mod redis_conn;
pub mod telemetry;

pub use redis_conn::RedisHandle;
