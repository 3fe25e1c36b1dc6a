//! `execute_action`: run a confirmed write-tool proposal exactly once. Handler: a later issue.

use serde::{Deserialize, Serialize};
use types::ActionId;

use super::{Job, JobKind, job_variant};
use crate::queue::Queue;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecuteAction {
    pub action_id: ActionId,
}

impl JobKind for ExecuteAction {
    const NAME: &'static str = "execute_action";
    const QUEUE: Queue = Queue::Actions;
    fn into_job(self) -> Job {
        Job::ExecuteAction(self)
    }
    fn from_job(job: Job) -> Option<Self> {
        match job {
            Job::ExecuteAction(j) => Some(j),
            _ => None,
        }
    }
}
job_variant!(ExecuteAction);
