//! `index`: re-index what the outbox recorded since the last run (chunk, embed, upsert). The
//! scheduler enqueues one per `INDEX_INTERVAL_SECS`; document uploads request one (at most one
//! per 10 s); `worker index` enqueues one. Handler: `workers::handlers::index`.

use serde::{Deserialize, Serialize};

use super::{Job, JobKind, job_variant};
use crate::queue::Queue;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub reason: IndexReason,
}

/// Why an index run was asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum IndexReason {
    /// The scheduler's periodic run for interval number `tick` (unix time / interval).
    Scheduled { tick: u64 },
    /// Asked for outside the schedule (a document upload that wants to be seen soon, or an
    /// operator's `worker index`).
    Requested,
}

impl JobKind for Index {
    const NAME: &'static str = "index";
    const QUEUE: Queue = Queue::Index;
    fn into_job(self) -> Job {
        Job::Index(self)
    }
    fn from_job(job: Job) -> Option<Self> {
        match job {
            Job::Index(j) => Some(j),
            _ => None,
        }
    }
}
job_variant!(Index);
