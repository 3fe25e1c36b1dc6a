//! The envelope every job travels in: identity, attempt, timing and trace around the job.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::kinds::Job;

/// `{id, kind, attempt, enqueued_at, not_before?, trace?, payload}` — `kind` and `payload` come
/// from the flattened, adjacently tagged [`Job`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// UUID v7: time-ordered; the idempotency key of every handler. Kept across retries and
    /// dead-letter replays.
    pub id: Uuid,
    /// 1 for the first run; each retry (backoff or reclaim after a lost worker) adds one.
    pub attempt: u32,
    pub enqueued_at: DateTime<Utc>,
    /// Not to run before this time (retries, delayed enqueues).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    /// W3C `traceparent` of the span that enqueued the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    #[serde(flatten)]
    pub job: Job,
}

impl Envelope {
    /// A new envelope for a first attempt, due now.
    pub fn new(job: impl Into<Job>) -> Self {
        Self {
            id: Uuid::now_v7(),
            attempt: 1,
            enqueued_at: Utc::now(),
            not_before: None,
            trace: None,
            job: job.into(),
        }
    }

    pub fn with_trace(mut self, traceparent: Option<String>) -> Self {
        self.trace = traceparent;
        self
    }

    /// The trace id of the envelope's W3C `traceparent`, if it carries one.
    pub fn trace_id(&self) -> Option<&str> {
        let tp = self.trace.as_deref()?;
        let mut parts = tp.split('-');
        let (_version, trace_id) = (parts.next()?, parts.next()?);
        (trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()))
            .then_some(trace_id)
    }

    pub fn with_not_before(mut self, at: DateTime<Utc>) -> Self {
        self.not_before = Some(at);
        self
    }

    /// When the job became due: `not_before`, else `enqueued_at` (pickup latency starts here).
    pub fn due_at(&self) -> DateTime<Utc> {
        self.not_before
            .map_or(self.enqueued_at, |nb| nb.max(self.enqueued_at))
    }

    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::{Index, IndexReason, Probe};

    #[test]
    fn round_trips_with_kind_and_payload_at_the_top() {
        let env = Envelope::new(Probe::new("k")).with_trace(Some("00-abc-def-01".into()));
        let json = env.to_json().unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["kind"], "probe");
        assert_eq!(v["payload"]["key"], "k");
        assert_eq!(v["attempt"], 1);
        assert_eq!(v["trace"], "00-abc-def-01");
        assert!(v.get("not_before").is_none());
        assert_eq!(Envelope::from_json(&json).unwrap(), env);
        assert_eq!(env.id.get_version_num(), 7);

        let idx = Envelope::new(Index {
            reason: IndexReason::Scheduled { tick: 9 },
        });
        let back = Envelope::from_json(&idx.to_json().unwrap()).unwrap();
        assert_eq!(back, idx);
        assert_eq!(back.job.name(), "index");
    }

    /// Typed ids are transparent: a job queued before they existed parses, and the same job
    /// serialises to the same bytes.
    #[test]
    fn payload_ids_are_bare_uuids_on_the_wire() {
        let json = r#"{"id":"0190b0a0-0000-7000-8000-000000000000","attempt":1,"enqueued_at":"2026-01-01T00:00:00Z","kind":"chat","payload":{"conversation_id":"0190b0a0-0000-7000-8000-000000000001","message_id":"0190b0a0-0000-7000-8000-000000000002","response_id":"0190b0a0-0000-7000-8000-000000000003","user_id":"0190b0a0-0000-7000-8000-000000000004","org_id":"0190b0a0-0000-7000-8000-000000000005"}}"#;
        let env = Envelope::from_json(json).unwrap();
        let Job::Chat(chat) = &env.job else {
            panic!("not a chat job: {env:?}");
        };
        assert_eq!(
            chat.response_id.to_string(),
            "0190b0a0-0000-7000-8000-000000000003"
        );
        assert_eq!(env.to_json().unwrap(), json);

        let json = r#"{"id":"0190b0a0-0000-7000-8000-000000000000","attempt":2,"enqueued_at":"2026-01-01T00:00:00Z","kind":"execute_action","payload":{"action_id":"0190b0a0-0000-7000-8000-000000000006"}}"#;
        assert_eq!(Envelope::from_json(json).unwrap().to_json().unwrap(), json);
    }

    #[test]
    fn unknown_kinds_are_rejected() {
        let json = r#"{"id":"0190b0a0-0000-7000-8000-000000000000","attempt":1,
            "enqueued_at":"2026-01-01T00:00:00Z","kind":"nope","payload":{}}"#;
        assert!(Envelope::from_json(json).is_err());
    }
}
