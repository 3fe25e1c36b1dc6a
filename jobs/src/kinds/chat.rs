//! `chat`: answer one user message (prompt → LiteLLM → streamed tokens). Handler: a later issue.

use serde::{Deserialize, Serialize};
use types::{ConversationId, MessageId, OrgId, ResponseId, UserId};

use super::{Job, JobKind, job_variant};
use crate::queue::Queue;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chat {
    pub conversation_id: ConversationId,
    /// The user message being answered.
    pub message_id: MessageId,
    /// The response the streamed events belong to.
    pub response_id: ResponseId,
    pub user_id: UserId,
    pub org_id: OrgId,
}

impl JobKind for Chat {
    const NAME: &'static str = "chat";
    const QUEUE: Queue = Queue::Chat;
    fn into_job(self) -> Job {
        Job::Chat(self)
    }
    fn from_job(job: Job) -> Option<Self> {
        match job {
            Job::Chat(j) => Some(j),
            _ => None,
        }
    }
}
job_variant!(Chat);
