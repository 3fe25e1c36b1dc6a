//! The one client of the LiteLLM proxy (OpenAI-compatible HTTP).
//!
//! - [`LlmClient::models`]: the names the proxy serves (model settings are checked against it).
//! - [`LlmClient::chat_stream`]: a streamed chat completion as a stream of [`ChatEvent`]s, with
//!   a first-event timeout (`MODEL_TIMEOUT_SECS`: no token by then = failed) and an idle timeout
//!   between chunks. Parsing is lenient about what it does not need (unknown fields, comments,
//!   keep-alives, chunks without choices) and strict about what it does (a chunk that is not
//!   JSON is a malformed stream; a stream that ends without `[DONE]` or a finish reason is cut).
//! - [`LlmClient::embed`]: embeddings, requested base64-encoded (4× smaller on the wire);
//!   [`LlmClient::embed_or_fail`] checks what came back, for callers that fall back without a
//!   vector; [`estimate_tokens`] is the one token estimate of prompt budgets.
//!
//! Failures are classified ([`LlmError::is_rate_limited`], [`LlmError::retry_after`]) so that
//! the caller can re-queue on 429 and fall back on anything else. Generation parameters come
//! only from [`GenerationParams`], which the caller builds from configuration.

mod chat;
mod embed;
mod error;

use std::time::Duration;

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use chat::{ChatEvent, ChatStream, Completion, ToolCall, Usage, collect};
pub use embed::{EmbedFailure, Expect, estimate_tokens};
pub use error::LlmError;

/// A chat message in OpenAI format (`content` may be absent on assistant tool-call turns).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Some(content.into()),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Fixed by configuration (`[chat]` in config/default.toml), never by a client.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationParams {
    pub temperature: f64,
    pub max_tokens: u32,
}

impl From<&config::ChatSettings> for GenerationParams {
    fn from(c: &config::ChatSettings) -> Self {
        Self {
            temperature: c.temperature,
            max_tokens: c.max_tokens,
        }
    }
}

/// One streamed chat request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    /// OpenAI `tools` (function definitions); empty for none.
    pub tools: Vec<Value>,
    pub params: GenerationParams,
}

/// Timeouts of one model call.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// No first event (token, tool call) within this → [`LlmError::Timeout`].
    pub first_event: Duration,
    /// No chunk at all for this long after the first → [`LlmError::Timeout`].
    pub idle: Duration,
}

impl Timeouts {
    pub fn from_settings(c: &config::ChatSettings) -> Self {
        let t = Duration::from_secs(c.model_timeout_secs);
        Self {
            first_event: t,
            idle: t,
        }
    }
}

#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    base: String,
    key: Option<SecretString>,
}

impl std::fmt::Debug for LlmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl LlmClient {
    pub fn new(settings: &config::LitellmSettings) -> Result<Self, LlmError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| LlmError::Connection(e.to_string()))?;
        Ok(Self {
            http,
            base: settings.base_url.trim_end_matches('/').to_owned(),
            key: settings.api_key.clone(),
        })
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.post(format!("{}{}", self.base, path));
        match &self.key {
            Some(k) => rb.bearer_auth(k.expose_secret()),
            None => rb,
        }
    }

    /// The model names the proxy serves (`GET /v1/models`), including its wildcard routes
    /// (e.g. `fake/*`; LiteLLM lists them with `return_wildcard_routes=true`, otherwise only the
    /// names it expands them to from its own catalogue). See [`matches_route`].
    pub async fn models(&self) -> Result<Vec<String>, LlmError> {
        let mut rb = self
            .http
            .get(format!(
                "{}/v1/models?return_wildcard_routes=true",
                self.base
            ))
            .timeout(Duration::from_secs(10));
        if let Some(k) = &self.key {
            rb = rb.bearer_auth(k.expose_secret());
        }
        let resp = rb.send().await.map_err(LlmError::from_reqwest)?;
        let resp = error::check_status(resp).await?;
        let v: Value = resp
            .json()
            .await
            .map_err(|e| LlmError::Malformed(e.to_string()))?;
        Ok(v.get("data")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Start a streamed chat completion. Errors before the response headers (connection,
    /// HTTP status) come back here; errors inside the stream come from the stream.
    pub async fn chat_stream(
        &self,
        req: &ChatRequest,
        timeouts: Timeouts,
    ) -> Result<ChatStream, LlmError> {
        let mut body = json!({
            "model": req.model,
            "messages": req.messages,
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": req.params.temperature,
            "max_tokens": req.params.max_tokens,
        });
        if !req.tools.is_empty() {
            body["tools"] = Value::Array(req.tools.clone());
        }
        let send = self.post("/v1/chat/completions").json(&body).send();
        let resp = tokio::time::timeout(timeouts.first_event, send)
            .await
            .map_err(|_| LlmError::Timeout("no response headers before the model timeout".into()))?
            .map_err(LlmError::from_reqwest)?;
        let resp = error::check_status(resp).await?;
        Ok(chat::stream(resp, timeouts))
    }

    /// Embed `inputs` with `model`; one vector per input, in order, and what the request cost.
    pub async fn embed(&self, model: &str, inputs: &[String]) -> Result<Embeddings, LlmError> {
        let resp = self
            .post("/v1/embeddings")
            .timeout(Duration::from_secs(120))
            .json(&json!({"model": model, "input": inputs, "encoding_format": "base64"}))
            .send()
            .await
            .map_err(LlmError::from_reqwest)?;
        let resp = error::check_status(resp).await?;
        let v: Value = resp
            .json()
            .await
            .map_err(|e| LlmError::Malformed(e.to_string()))?;
        let data = v
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| LlmError::Malformed("embeddings response without data".into()))?;
        let mut out: Vec<(usize, Vec<f32>)> = Vec::with_capacity(data.len());
        for (pos, item) in data.iter().enumerate() {
            let index = item
                .get("index")
                .and_then(Value::as_u64)
                .map(|i| i as usize)
                .unwrap_or(pos);
            let vector = match item.get("embedding") {
                Some(Value::String(b64)) => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|e| {
                            LlmError::Malformed(format!("embedding is not base64: {e}"))
                        })?;
                    if bytes.len() % 4 != 0 {
                        return Err(LlmError::Malformed(
                            "embedding byte length is not a multiple of 4".into(),
                        ));
                    }
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                }
                Some(Value::Array(a)) => {
                    a.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect()
                }
                _ => return Err(LlmError::Malformed("embedding missing".into())),
            };
            out.push((index, vector));
        }
        if out.len() != inputs.len() {
            return Err(LlmError::Malformed(format!(
                "{} embeddings for {} inputs",
                out.len(),
                inputs.len()
            )));
        }
        out.sort_by_key(|(i, _)| *i);
        Ok(Embeddings {
            vectors: out.into_iter().map(|(_, v)| v).collect(),
            tokens: embed::embedding_tokens(&v, inputs),
        })
    }
}

/// What an embeddings request returned.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// One vector per input, in order.
    pub vectors: Vec<Vec<f32>>,
    /// The prompt tokens the request cost: the upstream's `usage.prompt_tokens` when above 0,
    /// else estimated ([`embed::estimate_tokens`] of each input). Counted against the org's
    /// budget.
    pub tokens: u64,
}

/// Whether `name` is served by the proxy's `route`: equal to it, or — for a wildcard route
/// such as `fake/*` — matching it with each `*` standing for one or more characters. A name
/// that contains `*` itself is never a model.
pub fn matches_route(route: &str, name: &str) -> bool {
    if name.contains('*') {
        return false;
    }
    if !route.contains('*') {
        return route == name;
    }
    let parts: Vec<&str> = route.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    let literal: usize = parts.iter().map(|p| p.len()).sum();
    let stars = parts.len() - 1;
    if name.len() < literal + stars || !name.starts_with(first) || !name.ends_with(last) {
        return false;
    }
    // the middle parts in order, each after at least one character for the star before it
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        let Some(c) = rest.chars().next() else {
            return false;
        };
        let skip = &rest[c.len_utf8()..];
        let Some(at) = skip.find(part) else {
            return false;
        };
        rest = &skip[at + part.len()..];
    }
    !rest.is_empty()
}

#[cfg(test)]
mod route_tests {
    use super::matches_route;

    #[test]
    fn wildcard_routes_match_names_under_them() {
        assert!(matches_route("local-chat", "local-chat"));
        assert!(!matches_route("local-chat", "local-chat-2"));
        assert!(matches_route("fake/*", "fake/anything-at-all"));
        assert!(matches_route("fake/*", "fake/a/b"));
        assert!(!matches_route("fake/*", "fake/"));
        assert!(!matches_route("fake/*", "fakeish"));
        assert!(!matches_route("fake/*", "nonexistent-model-x"));
        assert!(!matches_route("fake/*", "fake/*"));
        assert!(matches_route("a/*/b-*", "a/x/b-y"));
        assert!(!matches_route("a/*/b-*", "a//b-y"));
        assert!(!matches_route("a/*/b-*", "a/x/b-"));
        assert!(matches_route("*", "x"));
    }
}
