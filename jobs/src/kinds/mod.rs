//! The job kinds: one file per kind. A kind is a type with a name, its payload and its queue
//! ([`JobKind`]); [`Job`] is the serde-tagged enum of all of them that travels in an envelope.

mod chat;
mod execute_action;
mod index;
mod probe;
mod remember;
mod summarize;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::queue::Queue;

pub use chat::Chat;
pub use execute_action::ExecuteAction;
pub use index::{Index, IndexReason};
pub use probe::Probe;
pub use remember::Remember;
pub use summarize::Summarize;

/// A kind of job: its name on the wire, the queue it runs on, and how it sits in [`Job`].
pub trait JobKind: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The `kind` tag in the envelope (bounded: also a metrics label).
    const NAME: &'static str;
    /// The queue jobs of this kind run on.
    const QUEUE: Queue;

    /// The queue of this job (the kind's queue unless the payload chooses, like `probe`).
    fn queue(&self) -> Queue {
        Self::QUEUE
    }

    fn into_job(self) -> Job;
    fn from_job(job: Job) -> Option<Self>;
}

/// Every job, tagged by kind: `{"kind": "probe", "payload": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "payload", rename_all = "snake_case")]
pub enum Job {
    Chat(Chat),
    Summarize(Summarize),
    Remember(Remember),
    Index(Index),
    ExecuteAction(ExecuteAction),
    Probe(Probe),
}

impl Job {
    pub fn name(&self) -> &'static str {
        match self {
            Job::Chat(_) => Chat::NAME,
            Job::Summarize(_) => Summarize::NAME,
            Job::Remember(_) => Remember::NAME,
            Job::Index(_) => Index::NAME,
            Job::ExecuteAction(_) => ExecuteAction::NAME,
            Job::Probe(_) => Probe::NAME,
        }
    }

    pub fn queue(&self) -> Queue {
        match self {
            Job::Chat(j) => j.queue(),
            Job::Summarize(j) => j.queue(),
            Job::Remember(j) => j.queue(),
            Job::Index(j) => j.queue(),
            Job::ExecuteAction(j) => j.queue(),
            Job::Probe(j) => j.queue(),
        }
    }
}

impl Job {
    /// What decides the job's partition (`crate::queue::Part`), hashed: the org for a chat turn
    /// or a memory write (so an org's work stays in one slot), the record otherwise; `None`
    /// (the job's own id decides) for work of no particular record.
    pub fn partition_hash(&self) -> Option<u64> {
        let bytes: &[u8] = match self {
            Job::Chat(j) => j.org_id.as_uuid().as_bytes(),
            Job::Remember(j) => j.org_id.as_uuid().as_bytes(),
            Job::Summarize(j) => j.conversation_id.as_uuid().as_bytes(),
            Job::ExecuteAction(j) => j.action_id.as_uuid().as_bytes(),
            Job::Probe(j) => j.key.as_bytes(),
            Job::Index(_) => return None,
        };
        Some(fnv1a(bytes))
    }

    /// Whose turn this job is, for a queue that admits fairly (`[queues.<name>] fair`): the org
    /// of a chat turn (or a probe's key, for the bus's own tests); `None`: first come, first
    /// served.
    pub fn fair_key(&self) -> Option<String> {
        match self {
            Job::Chat(j) => Some(j.org_id.as_uuid().to_string()),
            Job::Probe(j) => Some(j.key.clone()),
            _ => None,
        }
    }
}

/// FNV-1a, 64 bits: stable across processes and builds (std's hasher is seeded per process).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Implements the `Job` conversions of a kind (the name and queue are written by hand).
macro_rules! job_variant {
    ($kind:ident) => {
        impl From<$kind> for $crate::kinds::Job {
            fn from(k: $kind) -> Self {
                $crate::kinds::Job::$kind(k)
            }
        }
    };
}
pub(crate) use job_variant;
