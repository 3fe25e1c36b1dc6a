//! `remember`: extract memory entries from a finished exchange. Handler: a later issue.

use serde::{Deserialize, Serialize};
use types::{ConversationId, MessageId, OrgId, UserId};

use super::{Job, JobKind, job_variant};
use crate::queue::Queue;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remember {
    pub conversation_id: ConversationId,
    /// The assistant message that closed the exchange to learn from.
    pub message_id: MessageId,
    pub user_id: UserId,
    pub org_id: OrgId,
}

impl JobKind for Remember {
    const NAME: &'static str = "remember";
    const QUEUE: Queue = Queue::Memory;
    fn into_job(self) -> Job {
        Job::Remember(self)
    }
    fn from_job(job: Job) -> Option<Self> {
        match job {
            Job::Remember(j) => Some(j),
            _ => None,
        }
    }
}
job_variant!(Remember);
