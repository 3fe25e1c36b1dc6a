//! The public shape of a stored message (docs/architecture/chat.md, "API side"): ONE serializer for the
//! messages listing (`GET /v1/conversations/{id}/messages`), the JSON-mode answer
//! (`{message, actions}`) and `message.completed`'s `message` — live (worker), replayed (the
//! same bytes) and rebuilt from Postgres past the retention window (API). The API's OpenAPI
//! `MessageView` is built from [`PublicMessage`] and a test checks both serialize alike.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::conversations::Message;
use crate::types::{ErrorCode, MessageId, ResponseId};

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
#[derive(Debug, Clone, PartialEq)]
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

/// The `error` event's code and message of a failed response that stored none (the failure
/// paths always store both; this only keeps an old or hand-edited row answerable).
pub const UNAVAILABLE_CODE: ErrorCode = ErrorCode::ModelUnavailable;
pub const UNAVAILABLE_MESSAGE: &str =
    "The assistant is unavailable right now. Please try again in a few minutes.";

/// What the terminal event of a finished response says, read from its stored rows.
///
/// This is the ONE builder of that event, for both sides: the worker (a redelivered job finds
/// its response finished; the dead-letter hook ends a turn) and the API (a retried request, a
/// replay past the events' retention window, a terminal event a run died before publishing).
/// It lives here because both reach `store`, and `jobs` and `store` never depend on each other:
/// the event itself is made by [`Outcome::event`] with the constructors of
/// `jobs::events::ResponseEvent` (`completed`, `error`), which the callers pass in.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `message.completed` for the stored answer.
    Completed(Completed),
    /// `error` with the stored code and message.
    Failed { code: ErrorCode, message: String },
    /// Completed, but the answer is not stored (any more): each caller says so its own way.
    AnswerMissing,
}

impl Outcome {
    /// The outcome of `response` as stored; `None` while it is unfinished.
    pub async fn of(
        conn: &mut sqlx::PgConnection,
        response: &crate::conversations::Response,
    ) -> Result<Option<Self>, crate::StoreError> {
        use crate::ResponseStatus;
        Ok(Some(match response.status {
            ResponseStatus::Completed => {
                match crate::conversations::answer_of(conn, response.id).await? {
                    Some(m) => Outcome::Completed(PublicMessage::from(m).completed()),
                    None => Outcome::AnswerMissing,
                }
            }
            ResponseStatus::Failed => Outcome::Failed {
                code: response
                    .error_code
                    .as_deref()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(UNAVAILABLE_CODE),
                message: response
                    .error_message
                    .clone()
                    .unwrap_or_else(|| UNAVAILABLE_MESSAGE.to_owned()),
            },
            ResponseStatus::Queued | ResponseStatus::Running => return Ok(None),
        }))
    }

    /// The terminal event, made by `completed(message, model, usage)` or `error(code,
    /// message)`; `None` for [`Outcome::AnswerMissing`].
    pub fn event<E>(
        self,
        completed: impl FnOnce(Value, String, Value) -> E,
        error: impl FnOnce(ErrorCode, String) -> E,
    ) -> Option<E> {
        match self {
            Outcome::Completed(c) => Some(completed(c.message, c.model, c.usage)),
            Outcome::Failed { code, message } => Some(error(code, message)),
            Outcome::AnswerMissing => None,
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
