//! Response events: how a worker's answer reaches SSE clients through Redis.
//!
//! A worker [`EventPublisher::publish`]es each event of a response (`token`, `message.completed`,
//! ...). One Lua script appends it to the response's capped replay stream (its entry id becomes
//! the event id, the SSE `id:`), refreshes the stream's retention TTL, and `PUBLISH`es it — in
//! one atomic step, so the live copy and the replayable copy always carry the same id.
//!
//! Each API process runs one [`EventHub`]: a single pattern subscription for all responses,
//! fanned out in-process to the SSE streams that listen (not one Redis connection per client).
//! [`EventHub::events`] registers the listener first, then replays from the replay stream after
//! the client's `Last-Event-ID`, then follows live events, skipping ids it already sent: nothing
//! lost or repeated across the hand-over, after a reconnect of the hub, or when a slow client's
//! buffer overflowed (it re-reads the replay stream). The stream ends after a terminal event
//! (`message.completed`, `error`) or when the hub shuts down.

mod hub;
mod publish;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

pub use hub::EventHub;
pub use publish::{EventPublisher, Published};

/// `queued` reasons.
pub const QUEUED_BACKLOG: &str = "backlog";
pub const QUEUED_RATE_LIMITED: &str = "rate_limited";

/// The events of one response, as clients see them (the `SseEvent` schema of
/// `api/src/openapi.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", content = "data")]
pub enum ResponseEvent {
    #[serde(rename = "message.created")]
    MessageCreated { message_id: Uuid, response_id: Uuid },
    #[serde(rename = "token")]
    Token { text: String },
    #[serde(rename = "action.proposed")]
    ActionProposed { action: Value },
    #[serde(rename = "message.completed")]
    MessageCompleted {
        message: Value,
        model: String,
        usage: Value,
    },
    /// The turn waits: behind other orgs' turns (`backlog`, its 1-based `position` among the
    /// waiting turns) or for the model's rate limit (`rate_limited`, until `retry_at`).
    #[serde(rename = "queued")]
    Queued {
        position: u64,
        reason: String,
        retry_at: Option<chrono::DateTime<chrono::Utc>>,
    },
    #[serde(rename = "response.restarted")]
    ResponseRestarted { reason: String },
    #[serde(rename = "error")]
    Error { code: String, message: String },
}

impl ResponseEvent {
    /// `message.completed` from a stored answer's public fields (`store::public::Outcome`).
    pub fn completed(message: Value, model: String, usage: Value) -> Self {
        ResponseEvent::MessageCompleted {
            message,
            model,
            usage,
        }
    }

    /// `queued` behind a backlog, at `position` (1: next).
    pub fn queued_backlog(position: u64) -> Self {
        ResponseEvent::Queued {
            position,
            reason: QUEUED_BACKLOG.to_owned(),
            retry_at: None,
        }
    }

    /// `error` with its code and message.
    pub fn error(code: String, message: String) -> Self {
        ResponseEvent::Error { code, message }
    }

    /// The SSE `event:` name.
    pub fn name(&self) -> &'static str {
        match self {
            ResponseEvent::MessageCreated { .. } => "message.created",
            ResponseEvent::Token { .. } => "token",
            ResponseEvent::ActionProposed { .. } => "action.proposed",
            ResponseEvent::MessageCompleted { .. } => "message.completed",
            ResponseEvent::Queued { .. } => "queued",
            ResponseEvent::ResponseRestarted { .. } => "response.restarted",
            ResponseEvent::Error { .. } => "error",
        }
    }

    /// The SSE `data:` payload (the event's fields).
    pub fn data(&self) -> Value {
        serde_json::to_value(self)
            .ok()
            .and_then(|mut v| v.get_mut("data").map(Value::take))
            .unwrap_or(Value::Null)
    }

    /// The last event of a response.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            ResponseEvent::MessageCompleted { .. } | ResponseEvent::Error { .. }
        )
    }
}

/// A Redis stream entry id (`<ms>-<seq>`), ordered numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub ms: u64,
    pub seq: u64,
}

impl EventId {
    pub fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.trim().split_once('-')?;
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// An event with its id.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub id: EventId,
    pub event: ResponseEvent,
}

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("bad event payload: {0}")]
    Payload(String),
    /// Cluster mode: the hub could not subscribe the response's shard channel in time.
    #[error("cannot subscribe to the response's events: {0}")]
    Subscribe(&'static str),
}

/// Key and channel names of the response events (all under `REDIS_PREFIX`).
#[derive(Debug, Clone)]
pub struct EventKeys {
    prefix: String,
}

impl EventKeys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }
    /// The capped replay stream of one response (its own hash slot).
    pub fn replay(&self, response_id: Uuid) -> String {
        format!("{}:{{resp:{response_id}}}:events", self.prefix)
    }
    /// The fence of one response, beside its replay stream (same slot): a hash with `run`, the
    /// run allowed to publish, and `done`, the id of its terminal event once published.
    pub fn fence(&self, response_id: Uuid) -> String {
        format!("{}:{{resp:{response_id}}}:fence", self.prefix)
    }
    /// The live channel of one response on a single node (the hub's pattern covers it).
    pub fn channel(&self, response_id: Uuid) -> String {
        format!("{}:events:{response_id}", self.prefix)
    }
    /// The live shard channel of one response in cluster mode (`SPUBLISH`/`SSUBSCRIBE`): same
    /// hash tag as its replay stream and fence, so the publish script touches one slot, and
    /// the node that stores the stream is the one that carries its messages.
    pub fn shard_channel(&self, response_id: Uuid) -> String {
        format!("{}:{{resp:{response_id}}}:live", self.prefix)
    }
    fn response_of_shard(&self, channel: &str) -> Option<Uuid> {
        channel
            .strip_prefix(&format!("{}:{{resp:", self.prefix))
            .and_then(|s| s.strip_suffix("}:live"))
            .and_then(|s| Uuid::parse_str(s).ok())
    }
    /// The pattern the hub subscribes to.
    pub fn pattern(&self) -> String {
        format!("{}:events:*", self.prefix)
    }
    fn response_of(&self, channel: &str) -> Option<Uuid> {
        channel
            .strip_prefix(&format!("{}:events:", self.prefix))
            .and_then(|s| Uuid::parse_str(s).ok())
    }
}
