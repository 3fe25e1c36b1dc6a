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

    pub fn is_retryable(&self) -> bool {
        matches!(self, JobError::Retryable { .. })
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
}
