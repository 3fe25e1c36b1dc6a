//! Queues and the Redis keys of the bus.
//!
//! Every key of one queue carries the same Redis Cluster hash tag, `{q:<queue>}`, so the Lua
//! scripts that touch a queue's stream, delayed set and dead letters together stay in one slot:
//!
//! | key                          | type       | holds                                        |
//! |------------------------------|------------|----------------------------------------------|
//! | `<prefix>:{q:chat}`          | stream     | jobs ready to run; consumer group `workers`  |
//! | `<prefix>:{q:chat}:delayed`  | sorted set | envelopes waiting, score = due time (ms)     |
//! | `<prefix>:{q:chat}:dead`     | stream     | dead letters: envelope + last error          |
//! | `<prefix>:{q:chat}:jobs`     | hash       | job id → enqueued ms: every job not yet acked |
//! |                              |            | or dead (the reconciler's "job exists" test) |
//! | `<prefix>:{q:index}:tick:<n>`| string     | scheduler: interval `n` already fired        |

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The consumer group every worker joins (one per queue stream).
pub const GROUP: &str = "workers";

/// One stream per queue, so interactive chat never waits behind batch work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Queue {
    Chat,
    Memory,
    Index,
    Actions,
}

impl Queue {
    pub const ALL: [Queue; 4] = [Queue::Chat, Queue::Memory, Queue::Index, Queue::Actions];

    pub fn as_str(self) -> &'static str {
        match self {
            Queue::Chat => "chat",
            Queue::Memory => "memory",
            Queue::Index => "index",
            Queue::Actions => "actions",
        }
    }

    /// Its position in [`Queue::ALL`].
    pub fn index(self) -> usize {
        match self {
            Queue::Chat => 0,
            Queue::Memory => 1,
            Queue::Index => 2,
            Queue::Actions => 3,
        }
    }

    /// This queue's retry and visibility settings.
    pub fn settings(self, queues: &config::QueuesSettings) -> &config::QueueSettings {
        match self {
            Queue::Chat => &queues.chat,
            Queue::Memory => &queues.memory,
            Queue::Index => &queues.index,
            Queue::Actions => &queues.actions,
        }
    }
}

impl fmt::Display for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown queue {0:?} (expected chat, memory, index or actions)")]
pub struct UnknownQueue(pub String);

impl FromStr for Queue {
    type Err = UnknownQueue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Queue::ALL
            .into_iter()
            .find(|q| q.as_str() == s.trim())
            .ok_or_else(|| UnknownQueue(s.to_owned()))
    }
}

/// One stream of a queue: partition `index` of `queue` (`queues.partitions`). Partition 0 keeps
/// the queue's own keys (`{q:chat}`), so a single partition is the layout of an unpartitioned
/// bus; partition `i > 0` has the hash tag `{q:chat:i}`, a slot (and so a cluster shard) of its
/// own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Part {
    pub queue: Queue,
    pub index: u16,
}

impl Part {
    pub fn new(queue: Queue, index: u16) -> Self {
        Self { queue, index }
    }

    /// The partitions `0..n` of `queue`.
    pub fn all(queue: Queue, n: u16) -> impl Iterator<Item = Part> {
        (0..n.max(1)).map(move |i| Part::new(queue, i))
    }
}

/// A queue names its partition 0 (what an unpartitioned caller means).
impl From<Queue> for Part {
    fn from(queue: Queue) -> Self {
        Part::new(queue, 0)
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            0 => f.write_str(self.queue.as_str()),
            i => write!(f, "{}:{i}", self.queue.as_str()),
        }
    }
}

/// The partition of a job whose partition key hashes to `hash`, among `n`.
pub fn partition_index(hash: u64, n: u16) -> u16 {
    u16::try_from(hash % u64::from(n.max(1))).unwrap_or(0)
}

/// The keys of one queue partition under a prefix.
#[derive(Debug, Clone)]
pub struct QueueKeys {
    pub stream: String,
    pub delayed: String,
    pub dead: String,
    /// The job markers: set by every enqueue (in the same step), cleared at ack or dead letter.
    pub marks: String,
    /// Fair admission (`[queues.<name>] fair`): the orgs with jobs waiting, scored by the
    /// virtual finish tag of their next job (a sorted set); the virtual time (the tag last
    /// admitted); the orgs' weights (a hash, 1 when absent); and the prefix of each org's list
    /// of waiting envelopes (`<fair_lists><org>`). All in the queue's hash tag.
    pub fair: String,
    pub fair_vt: String,
    pub fair_weights: String,
    pub fair_lists: String,
    /// The orgs' own concurrency caps (a hash; the queue's `org_concurrency` when absent, 0:
    /// none), and the prefix of each capped org's set of admitted jobs not yet settled
    /// (`<fair_runs><org>`: job ids scored by admission time, ms).
    pub fair_caps: String,
    pub fair_runs: String,
    /// Job id → the run set it is in, for the ack and dead-letter steps to take it out.
    pub fair_run_orgs: String,
    tick_base: String,
}

impl QueueKeys {
    pub fn new(prefix: &str, part: impl Into<Part>) -> Self {
        let base = format!("{prefix}:{{q:{}}}", part.into());
        Self {
            delayed: format!("{base}:delayed"),
            dead: format!("{base}:dead"),
            marks: format!("{base}:jobs"),
            fair: format!("{base}:fair"),
            fair_vt: format!("{base}:fair:vt"),
            fair_weights: format!("{base}:fair:w"),
            fair_lists: format!("{base}:fair:o:"),
            fair_caps: format!("{base}:fair:cap"),
            fair_runs: format!("{base}:fair:r:"),
            fair_run_orgs: format!("{base}:fair:ro"),
            tick_base: format!("{base}:tick"),
            stream: base,
        }
    }

    /// The record of the most partitions queue `q` ever had (a string, its own slot): workers
    /// read that many, so jobs enqueued under a larger setting stay reachable.
    pub fn partitions_record(prefix: &str, q: Queue) -> String {
        format!("{prefix}:bus:partitions:{}", q.as_str())
    }

    /// The marker of a fired scheduler tick `name`/`n` (same slot as the stream it feeds).
    pub fn tick(&self, name: &str, n: u64) -> String {
        format!("{}:{name}:{n}", self.tick_base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag_per_queue() {
        let k = QueueKeys::new("sb", Queue::Chat);
        assert_eq!(k.stream, "sb:{q:chat}");
        assert_eq!(k.delayed, "sb:{q:chat}:delayed");
        assert_eq!(k.dead, "sb:{q:chat}:dead");
        assert_eq!(k.marks, "sb:{q:chat}:jobs");
        assert_eq!(k.tick("index", 7), "sb:{q:chat}:tick:index:7");
    }

    #[test]
    fn partition_zero_keeps_the_queues_keys_and_others_get_a_tag_of_their_own() {
        assert_eq!(
            QueueKeys::new("sb", Part::new(Queue::Chat, 0)).stream,
            "sb:{q:chat}"
        );
        let k = QueueKeys::new("sb", Part::new(Queue::Chat, 2));
        assert_eq!(k.stream, "sb:{q:chat:2}");
        assert_eq!(k.marks, "sb:{q:chat:2}:jobs");
        assert_eq!(Part::all(Queue::Memory, 3).count(), 3);
        assert_eq!(Part::all(Queue::Memory, 0).count(), 1);
        assert!((0..1000).all(|h| partition_index(h, 3) < 3));
        assert_eq!(partition_index(7, 1), 0);
    }

    #[test]
    fn queue_names_parse() {
        assert_eq!("index".parse::<Queue>().unwrap(), Queue::Index);
        assert!("nope".parse::<Queue>().is_err());
    }
}
