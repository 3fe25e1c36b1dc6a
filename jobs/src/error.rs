//! Errors: what a handler tells the bus ([`JobError`]) and what the bus itself can fail with
//! ([`BusError`]).

use std::fmt::Display;
use std::time::Duration;

/// A handler's failure. The bus retries only when [`JobError::is_retryable`].
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Worth another attempt (a dependency is down, a rate limit, a timeout). `retry_after`
    /// (e.g. an upstream `Retry-After`) replaces the computed backoff.
    #[error("{error}")]
    Retryable {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Will never succeed (bad payload, a row that is gone): straight to the dead letters.
    #[error("{error}")]
    Permanent { error: String },
    /// Not a failure: the job must wait (a model's rate limit or cooldown, another run still
    /// holding the work) and comes back after `after`, without using up an attempt. The handler
    /// bounds how long it waits (e.g. `RATE_LIMIT_MAX_WAIT_SECS`).
    #[error("{reason}")]
    Wait { reason: String, after: Duration },
}

impl JobError {
    pub fn retryable(error: impl Display) -> Self {
        JobError::Retryable {
            error: error.to_string(),
            retry_after: None,
        }
    }

    pub fn retry_after(error: impl Display, after: Duration) -> Self {
        JobError::Retryable {
            error: error.to_string(),
            retry_after: Some(after),
        }
    }

    pub fn permanent(error: impl Display) -> Self {
        JobError::Permanent {
            error: error.to_string(),
        }
    }

    pub fn wait(reason: impl Display, after: Duration) -> Self {
        JobError::Wait {
            reason: reason.to_string(),
            after,
        }
    }

    /// The job runs again later (a retry, or a wait).
    pub fn is_retryable(&self) -> bool {
        matches!(self, JobError::Retryable { .. } | JobError::Wait { .. })
    }

    /// A wait: the next run keeps the attempt number.
    pub fn is_wait(&self) -> bool {
        matches!(self, JobError::Wait { .. })
    }
}

/// A failure of the bus itself (Redis, a malformed entry).
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cannot encode a job envelope: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("a blocking read got no reply in time; reconnecting")]
    Stalled,
    #[error("the queues did not empty within {0:?}")]
    Timeout(Duration),
    /// The apalis workers of a process ended although nobody asked them to stop.
    #[error("the {0} ended before a shutdown was asked for")]
    Ended(&'static str),
    /// A job bound for a partition above 0 while this process's partition count could not be
    /// recorded: workers might not read it (`Bus::record_partitions`).
    #[error("cannot record the queue partitions: {0}")]
    Unrecorded(String),
}
