//! The public shape of a stored message (API.md "Conversations"): ONE serializer for the
//! messages listing (`GET /v1/conversations/{id}/messages`), the JSON-mode answer
//! (`{message, actions}`) and `message.completed`'s `message` — live (worker), replayed (the
//! same bytes) and rebuilt from Postgres past the retention window (API). The API's OpenAPI
//! `MessageView` is built from [`PublicMessage`] and a test checks both serialize alike.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::conversations::Message;
use crate::types::{MessageId, ResponseId};

/// Token counts of an assistant message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicUsage {
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub total_tokens: Option<i32>,
}

/// A source of the workspace data an answer was given (retrieval; `messages.citations`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicCitation {
    /// `document`, `project`, `task` or `message`.
    pub source_kind: String,
    pub source_id: Uuid,
    pub title: String,
    /// The chunk of the source (0-based).
    pub chunk: i32,
}

/// A message as clients see it (internal columns — sequence, latency, tool plumbing — stay
/// internal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublicMessage {
    pub id: MessageId,
    pub role: String,
    pub content: String,
    /// The model that wrote it (assistant messages).
    pub model: Option<String>,
    /// RFC 3339 as every other time of the API (`+00:00`, as poem-openapi writes it; serde's
    /// default would write `Z`).
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    /// The response it answers (assistant messages).
    pub response_id: Option<ResponseId>,
    pub usage: Option<PublicUsage>,
    /// The sources of the workspace data the answer was given (assistant messages; else empty).
    pub citations: Vec<PublicCitation>,
}

fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339())
}

impl From<Message> for PublicMessage {
    fn from(m: Message) -> Self {
        let usage =
            (m.prompt_tokens.is_some() || m.completion_tokens.is_some()).then(|| PublicUsage {
                prompt_tokens: m.prompt_tokens,
                completion_tokens: m.completion_tokens,
                total_tokens: match (m.prompt_tokens, m.completion_tokens) {
                    (Some(p), Some(c)) => p.checked_add(c),
                    _ => None,
                },
            });
        Self {
            id: m.id.into(),
            role: m.role,
            content: m.content,
            model: m.model,
            created_at: m.created_at,
            response_id: m.response_id.map(ResponseId::from),
            usage,
            citations: serde_json::from_value(m.citations).unwrap_or_default(),
        }
    }
}

/// The fields of `message.completed` for a stored answer: `(message, model, usage)`.
pub struct Completed {
    pub message: Value,
    pub model: String,
    pub usage: Value,
}

impl PublicMessage {
    /// `message.completed`'s fields: the message, its model, its usage (the message's own).
    pub fn completed(&self) -> Completed {
        Completed {
            message: serde_json::to_value(self).unwrap_or(Value::Null),
            model: self.model.clone().unwrap_or_default(),
            usage: serde_json::to_value(&self.usage).unwrap_or(Value::Null),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn message(prompt: Option<i32>, completion: Option<i32>) -> Message {
        Message {
            id: MessageId::new_v7().into(),
            conversation_id: crate::ConversationId::new_v7().into(),
            seq: 2,
            role: "assistant".into(),
            content: "hi".into(),
            response_id: Some(ResponseId::new_v7().into()),
            model: Some("m".into()),
            prompt_tokens: prompt,
            completion_tokens: completion,
            latency_ms: Some(5),
            tool_calls: None,
            tool_call_id: None,
            citations: serde_json::json!([]),
            created_at: Utc::now(),
        }
    }

    #[test]
    fn the_public_fields_and_nothing_internal() {
        let p = PublicMessage::from(message(Some(3), Some(4)));
        let v = serde_json::to_value(&p).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "citations",
                "content",
                "created_at",
                "id",
                "model",
                "response_id",
                "role",
                "usage"
            ]
        );
        assert_eq!(v["usage"]["total_tokens"], 7);
        let c = p.completed();
        assert_eq!(c.message, v);
        assert_eq!(c.model, "m");
        assert_eq!(c.usage, v["usage"]);
        assert!(PublicMessage::from(message(None, None)).usage.is_none());
    }
}
