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

/// The keys of one queue under a prefix.
#[derive(Debug, Clone)]
pub struct QueueKeys {
    pub stream: String,
    pub delayed: String,
    pub dead: String,
    /// The job markers: set by every enqueue (in the same step), cleared at ack or dead letter.
    pub marks: String,
    tick_base: String,
}

impl QueueKeys {
    pub fn new(prefix: &str, queue: Queue) -> Self {
        let base = format!("{prefix}:{{q:{}}}", queue.as_str());
        Self {
            delayed: format!("{base}:delayed"),
            dead: format!("{base}:dead"),
            marks: format!("{base}:jobs"),
            tick_base: format!("{base}:tick"),
            stream: base,
        }
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
    fn queue_names_parse() {
        assert_eq!("index".parse::<Queue>().unwrap(), Queue::Index);
        assert!("nope".parse::<Queue>().is_err());
    }
}
