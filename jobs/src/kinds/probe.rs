//! `probe`: a diagnostic job that exercises the bus (tests, the benchmark, operators checking a
//! pool of workers). Its handler (in `workers`) fails the first `fail_times` runs of the job with
//! a retryable error, sleeps `sleep_ms`, then records its effect in PostgreSQL, idempotently by
//! job id.

use serde::{Deserialize, Serialize};

use super::{Job, JobKind, job_variant};
use crate::queue::Queue;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// A free label the effect is recorded under (tests use one per test).
    pub key: String,
    #[serde(default)]
    pub sleep_ms: u64,
    /// The first `fail_times` runs of this job fail with a retryable error.
    #[serde(default)]
    pub fail_times: u32,
    /// The queue to exercise; `actions` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<Queue>,
}

impl Probe {
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            sleep_ms: 0,
            fail_times: 0,
            queue: None,
        }
    }
}

impl JobKind for Probe {
    const NAME: &'static str = "probe";
    const QUEUE: Queue = Queue::Actions;
    fn queue(&self) -> Queue {
        self.queue.unwrap_or(Self::QUEUE)
    }
    fn into_job(self) -> Job {
        Job::Probe(self)
    }
    fn from_job(job: Job) -> Option<Self> {
        match job {
            Job::Probe(j) => Some(j),
            _ => None,
        }
    }
}
job_variant!(Probe);
