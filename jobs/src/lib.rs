//! The contract between the API and the workers: job types, the Redis Streams bus, Redis
//! connections and the tracing set-up that carries one trace across both.
//!
//! - [`kinds`]: the job kinds (one file each) and the [`Job`] enum;
//! - [`envelope`]: the [`Envelope`] a job travels in;
//! - [`queue`]: queues and the Redis key layout;
//! - [`bus`]: enqueue, the atomic ack / retry / dead-letter steps, reclaim, operator views;
//! - [`worker`]: the handler [`Registry`] and the consuming [`Worker`];
//! - [`lease`]: the scheduler's leader lease.

pub mod backoff;
pub mod bus;
pub mod envelope;
pub mod error;
pub mod events;
pub mod kinds;
pub mod lease;
pub mod metrics;
pub mod queue;
pub mod redis_conn;
mod scripts;
pub mod telemetry;
pub mod worker;

pub use bus::{Bus, DeadLetter, DeadReason, QueueStats};
pub use envelope::Envelope;
pub use error::{BusError, JobError};
pub use kinds::{Job, JobKind};
pub use queue::{Part, Queue};
pub use redis_conn::{RedisConn, RedisHandle};
pub use worker::{JobContext, Registry, RunReport, Worker, WorkerOptions};
