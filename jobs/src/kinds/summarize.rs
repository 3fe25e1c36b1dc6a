//! `summarize`: fold a conversation's older messages into its running summary. Handler: a
//! later issue.

use serde::{Deserialize, Serialize};
use types::ConversationId;

use super::{Job, JobKind, job_variant};
use crate::queue::Queue;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summarize {
    pub conversation_id: ConversationId,
}

impl JobKind for Summarize {
    const NAME: &'static str = "summarize";
    const QUEUE: Queue = Queue::Memory;
    fn into_job(self) -> Job {
        Job::Summarize(self)
    }
    fn from_job(job: Job) -> Option<Self> {
        match job {
            Job::Summarize(j) => Some(j),
            _ => None,
        }
    }
}
job_variant!(Summarize);
