//! The request body of a turn (`POST /v1/conversations/{id}/messages`): the message, refused
//! when it names a generation parameter, and its `Idempotency-Key` with what the key stands
//! for.

use poem_openapi::Object;
use serde::Deserialize;
use serde::de::Error as _;
use serde_json::Value;
use uuid::Uuid;

use crate::error::ApiError;

/// Generation parameters are fixed by the system configuration (`[chat]`): a body naming one
/// is refused with a 400 that names it.
pub(super) const FIXED_PARAMS: &[&str] = &[
    "model",
    "fallback_model",
    "models",
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "max_completion_tokens",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "stop",
    "seed",
    "n",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "parallel_tool_calls",
    "system",
    "system_prompt",
    "reasoning_effort",
];

/// Longest message a user may post, in characters.
pub(super) const CONTENT_MAX: usize = 32 * 1024;

/// A user message.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub(super) struct NewMessage {
    /// The message text (at most 32768 characters).
    pub(super) content: String,
    /// `true`: answer with `text/event-stream` (also chosen by `Accept: text/event-stream`).
    #[oai(nullable)]
    pub(super) stream: Option<bool>,
}

impl<'de> Deserialize<'de> for NewMessage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            content: String,
            #[serde(default)]
            stream: Option<bool>,
        }
        let map = serde_json::Map::<String, Value>::deserialize(d)?;
        if let Some(k) = map.keys().find(|k| FIXED_PARAMS.contains(&k.as_str())) {
            return Err(D::Error::custom(format!(
                "{k}: generation parameters are fixed by the system configuration"
            )));
        }
        let f: Fields = serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." || path.is_empty() {
                D::Error::custom(inner)
            } else {
                D::Error::custom(format!("{path}: {inner}"))
            }
        })?;
        Ok(Self {
            content: f.content,
            stream: f.stream,
        })
    }
}

/// Longest `Idempotency-Key` accepted, in characters.
const IDEMPOTENCY_KEY_MAX: usize = 255;

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters.
pub(super) fn idempotency_key(raw: Option<&str>) -> Result<Option<&str>, ApiError> {
    let Some(key) = raw else { return Ok(None) };
    if key.is_empty()
        || key.len() > IDEMPOTENCY_KEY_MAX
        || !key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(ApiError::invalid(format!(
            "Idempotency-Key: 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters"
        )));
    }
    Ok(Some(key))
}

/// What an idempotency key stands for: the conversation and the content it was sent with.
pub(super) fn request_hash(conversation_id: Uuid, content: &str) -> Vec<u8> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(conversation_id.as_bytes());
    h.update(content.as_bytes());
    h.finalize().to_vec()
}
