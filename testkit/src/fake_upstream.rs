//! A scripted, OpenAI-compatible upstream: the test equipment behind the real LiteLLM proxy.
//!
//! Each model name has a queue of [`Behaviour`]s; a request for that model takes the next one
//! (or the model's default, or an echo reply when nothing is scripted). Every request is
//! recorded so a test can assert what the model was sent and how many calls it saw.
//!
//! Tests script it through a small HTTP control API (`/_control/...`) with [`FakeClient`], so
//! the same code drives an in-process instance ([`FakeUpstream::start`]) and the shared
//! `fake-upstream` process that scripts/test runs behind LiteLLM (`fake/<model>` routes).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use poem::http::StatusCode;
use poem::listener::TcpAcceptor;
use poem::web::{Data, Json, Query};
use poem::{Body, EndpointExt, IntoResponse, Response, Route, Server, get, handler, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// What the fake does with one request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Behaviour {
    /// Answer with `text`, streamed as `tokens` (or split into words) when the request streams.
    Reply {
        text: String,
        #[serde(default)]
        tokens: Option<Vec<String>>,
        #[serde(default)]
        first_token_delay_ms: u64,
        #[serde(default)]
        token_delay_ms: u64,
    },
    /// Answer `echo: <the last user message>`, streamed word by word like `Reply` (chaos runs:
    /// every turn's answer differs, so a mixed-up or repeated stream shows).
    Echo {
        #[serde(default)]
        first_token_delay_ms: u64,
        #[serde(default)]
        token_delay_ms: u64,
    },
    /// Answer with tool calls (`arguments` is the JSON text the model "wrote").
    ToolCalls { calls: Vec<ToolCall> },
    /// Answer with an HTTP error status (429 with `Retry-After`, 500, ...).
    Status {
        code: u16,
        #[serde(default)]
        retry_after_secs: Option<u64>,
        #[serde(default)]
        message: Option<String>,
    },
    /// Accept the request and never answer.
    Hang,
    /// Stream the first `after_tokens` tokens of `text`, then cut the connection.
    Cut { text: String, after_tokens: usize },
    /// Stream a chunk that is not valid JSON.
    Malformed,
    /// A 200 stream with no content at all, just `[DONE]`.
    Empty,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl Behaviour {
    pub fn reply(text: impl Into<String>) -> Self {
        Behaviour::Reply {
            text: text.into(),
            tokens: None,
            first_token_delay_ms: 0,
            token_delay_ms: 0,
        }
    }

    pub fn reply_tokens(tokens: &[&str]) -> Self {
        Behaviour::Reply {
            text: tokens.concat(),
            tokens: Some(tokens.iter().map(|t| t.to_string()).collect()),
            first_token_delay_ms: 0,
            token_delay_ms: 0,
        }
    }

    pub fn status(code: u16) -> Self {
        Behaviour::Status {
            code,
            retry_after_secs: None,
            message: None,
        }
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Behaviour::Status {
            code: 429,
            retry_after_secs: Some(retry_after_secs),
            message: None,
        }
    }
}

/// One request the fake received.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recorded {
    pub path: String,
    pub model: String,
    pub body: Value,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

#[derive(Default)]
struct State {
    queues: HashMap<String, VecDeque<Behaviour>>,
    defaults: HashMap<String, Behaviour>,
    log: Vec<Recorded>,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// An in-process fake upstream; stops when dropped.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeUpstream {
    /// Start on 127.0.0.1 with an OS-chosen port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(
            "127.0.0.1:0"
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0))),
        )
        .await
    }

    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let acceptor = TcpAcceptor::from_tokio(listener)?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(
                    app(),
                    async {
                        let _ = rx.await;
                    },
                    Some(Duration::from_millis(100)),
                )
                .await;
        });
        Ok(Self {
            addr,
            stop: Some(tx),
        })
    }

    /// `http://127.0.0.1:PORT` (append `/v1` for an OpenAI base URL).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client(&self) -> FakeClient {
        FakeClient::new(self.url())
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Serve forever on `addr` (the `fake-upstream` binary).
pub async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let acceptor = TcpAcceptor::from_tokio(listener)?;
    Server::new_with_acceptor(acceptor).run(app()).await
}

fn app() -> impl poem::Endpoint {
    let state: Shared = Arc::default();
    Route::new()
        .at("/v1/chat/completions", post(chat))
        .at("/v1/embeddings", post(embeddings))
        .at("/v1/models", get(models))
        .at("/health", get(health))
        .at("/_control/script", post(control_script))
        .at("/_control/default", post(control_default))
        .at("/_control/requests", get(control_requests))
        .at("/_control/reset", post(control_reset))
        .data(state)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn record(state: &Shared, path: &str, body: &Value) -> String {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    lock(state).log.push(Recorded {
        path: path.to_owned(),
        model: model.clone(),
        body: body.clone(),
        at_ms: now_ms(),
    });
    model
}

fn next_behaviour(state: &Shared, model: &str) -> Option<Behaviour> {
    let mut s = lock(state);
    if let Some(b) = s.queues.get_mut(model).and_then(VecDeque::pop_front) {
        return Some(b);
    }
    s.defaults.get(model).cloned()
}

#[handler]
async fn health() -> &'static str {
    "ok"
}

#[handler]
async fn models() -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "testkit"}]}),
    )
}

fn last_user_text(body: &Value) -> String {
    body.get("messages")
        .and_then(Value::as_array)
        .and_then(|m| {
            m.iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        })
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn error_status(code: u16, retry_after: Option<u64>, message: Option<String>) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = message.unwrap_or_else(|| format!("fake upstream error {code}"));
    let mut resp = Response::builder()
        .status(status)
        .content_type("application/json")
        .body(
            json!({"error": {"message": message, "type": "fake_error", "code": code}}).to_string(),
        );
    if let Some(secs) = retry_after
        && let Ok(v) = secs.to_string().parse()
    {
        resp.headers_mut().insert("retry-after", v);
    }
    resp
}

fn chunk(model: &str, delta: Value, finish: Option<&str>) -> Bytes {
    let v = json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": now_ms() / 1000, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
    });
    Bytes::from(format!("data: {v}\n\n"))
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn split_tokens(text: &str) -> Vec<String> {
    // words with their following whitespace, so the concatenation is the text
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        cur.push(c);
        if c.is_whitespace() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn sse_response(
    stream: impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
) -> Response {
    Response::builder()
        .content_type("text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_bytes_stream(stream))
}

#[handler]
async fn chat(state: Data<&Shared>, Json(body): Json<Value>) -> Response {
    let model = record(state.0, "/v1/chat/completions", &body);
    let streaming = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let prompt_tokens = body.to_string().len() / 4;
    let echo = |first_token_delay_ms, token_delay_ms| Behaviour::Reply {
        text: format!("echo: {}", last_user_text(&body)),
        tokens: None,
        first_token_delay_ms,
        token_delay_ms,
    };
    let behaviour = match next_behaviour(state.0, &model) {
        None => echo(0, 0),
        Some(Behaviour::Echo {
            first_token_delay_ms,
            token_delay_ms,
        }) => echo(first_token_delay_ms, token_delay_ms),
        Some(b) => b,
    };
    match behaviour {
        Behaviour::Status {
            code,
            retry_after_secs,
            message,
        } => error_status(code, retry_after_secs, message),
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            error_status(504, None, None)
        }
        Behaviour::Reply {
            text,
            tokens,
            first_token_delay_ms,
            token_delay_ms,
        } => {
            let tokens = tokens.unwrap_or_else(|| split_tokens(&text));
            if !streaming {
                tokio::time::sleep(Duration::from_millis(first_token_delay_ms)).await;
                return Json(json!({
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": now_ms() / 1000, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": usage(prompt_tokens, tokens.len()),
                }))
                .into_response();
            }
            let n = tokens.len();
            let m = model.clone();
            let stream = async_stream_tokens(
                m,
                tokens,
                first_token_delay_ms,
                token_delay_ms,
                Some(usage(prompt_tokens, n)),
            );
            sse_response(stream)
        }
        Behaviour::ToolCalls { calls } => {
            let tool_calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, c)| json!({"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                .collect();
            if !streaming {
                let msg_calls: Vec<Value> = calls
                    .iter()
                    .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                    .collect();
                return Json(json!({
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": now_ms() / 1000, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": msg_calls}, "finish_reason": "tool_calls"}],
                    "usage": usage(prompt_tokens, 10),
                }))
                .into_response();
            }
            let mut parts = vec![chunk(
                &model,
                json!({"role": "assistant", "tool_calls": tool_calls}),
                None,
            )];
            parts.push(chunk(&model, json!({}), Some("tool_calls")));
            parts.push(usage_chunk(&model, usage(prompt_tokens, 10)));
            parts.push(Bytes::from_static(b"data: [DONE]\n\n"));
            sse_response(futures::stream::iter(parts.into_iter().map(Ok)))
        }
        Behaviour::Cut { text, after_tokens } => {
            let tokens: Vec<String> = split_tokens(&text).into_iter().take(after_tokens).collect();
            let mut parts: Vec<Result<Bytes, std::io::Error>> = tokens
                .iter()
                .map(|t| Ok(chunk(&model, json!({"content": t}), None)))
                .collect();
            parts.push(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "cut by test",
            )));
            // Give the client time to read the tokens before the connection is cut.
            let stream = futures::stream::iter(parts).then(|p| async move {
                if p.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                p
            });
            sse_response(stream)
        }
        Behaviour::Malformed => sse_response(futures::stream::iter(vec![
            Ok(Bytes::from_static(
                b"data: {\"choices\": [{\"delta\": {\"content\": \n\n",
            )),
            Ok(Bytes::from_static(b"data: this is not json\n\n")),
        ])),
        Behaviour::Empty => sse_response(futures::stream::iter(vec![Ok(Bytes::from_static(
            b"data: [DONE]\n\n",
        ))])),
        // (turned into a Reply above)
        Behaviour::Echo { .. } => error_status(500, None, None),
    }
}

fn usage_chunk(model: &str, usage: Value) -> Bytes {
    let v = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": now_ms() / 1000,
        "model": model, "choices": [], "usage": usage});
    Bytes::from(format!("data: {v}\n\n"))
}

fn async_stream_tokens(
    model: String,
    tokens: Vec<String>,
    first_delay_ms: u64,
    token_delay_ms: u64,
    usage: Option<Value>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let mut parts: Vec<(u64, Bytes)> = Vec::with_capacity(tokens.len() + 3);
    for (i, t) in tokens.iter().enumerate() {
        let delay = if i == 0 {
            first_delay_ms
        } else {
            token_delay_ms
        };
        let delta = if i == 0 {
            json!({"role": "assistant", "content": t})
        } else {
            json!({"content": t})
        };
        parts.push((delay, chunk(&model, delta, None)));
    }
    if tokens.is_empty() {
        parts.push((
            first_delay_ms,
            chunk(&model, json!({"role": "assistant", "content": ""}), None),
        ));
    }
    parts.push((0, chunk(&model, json!({}), Some("stop"))));
    if let Some(u) = usage {
        parts.push((0, usage_chunk(&model, u)));
    }
    parts.push((0, Bytes::from_static(b"data: [DONE]\n\n")));
    futures::stream::iter(parts).then(|(delay, b)| async move {
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        Ok(b)
    })
}

/// A deterministic unit vector for `text`: equal texts give equal vectors, different texts
/// (almost surely) different ones.
pub fn fake_embedding(text: &str, dim: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(dim);
    let mut counter = 0u32;
    while out.len() < dim {
        let mut h = Sha256::new();
        h.update(counter.to_le_bytes());
        h.update(text.as_bytes());
        for pair in h.finalize().chunks(2) {
            if out.len() == dim {
                break;
            }
            let v = u16::from_le_bytes([pair[0], pair[1]]) as f32 / 32768.0 - 1.0;
            out.push(v);
        }
        counter += 1;
    }
    let norm = out.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-9);
    out.iter_mut().for_each(|v| *v /= norm);
    out
}

#[handler]
async fn embeddings(state: Data<&Shared>, Json(body): Json<Value>) -> Response {
    let model = record(state.0, "/v1/embeddings", &body);
    if let Some(b) = next_behaviour(state.0, &model) {
        match b {
            Behaviour::Status {
                code,
                retry_after_secs,
                message,
            } => return error_status(code, retry_after_secs, message),
            Behaviour::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return error_status(504, None, None);
            }
            _ => {}
        }
    }
    let inputs: Vec<String> = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect(),
        _ => return error_status(400, None, Some("input is required".into())),
    };
    let dim = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .unwrap_or(384) as usize;
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let v = fake_embedding(text, dim);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let tokens: usize = inputs.iter().map(|t| t.len() / 4 + 1).sum();
    Json(json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
        .into_response()
}

#[derive(Deserialize)]
struct ScriptBody {
    model: String,
    behaviours: Vec<Behaviour>,
}

#[handler]
async fn control_script(state: Data<&Shared>, Json(b): Json<ScriptBody>) -> StatusCode {
    lock(state.0)
        .queues
        .entry(b.model)
        .or_default()
        .extend(b.behaviours);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct DefaultBody {
    model: String,
    behaviour: Behaviour,
}

#[handler]
async fn control_default(state: Data<&Shared>, Json(b): Json<DefaultBody>) -> StatusCode {
    lock(state.0).defaults.insert(b.model, b.behaviour);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct ModelQuery {
    model: Option<String>,
}

#[handler]
async fn control_requests(
    state: Data<&Shared>,
    Query(q): Query<ModelQuery>,
) -> Json<Vec<Recorded>> {
    let s = lock(state.0);
    Json(
        s.log
            .iter()
            .filter(|r| q.model.as_deref().is_none_or(|m| m == r.model))
            .cloned()
            .collect(),
    )
}

#[handler]
async fn control_reset(state: Data<&Shared>, Query(q): Query<ModelQuery>) -> StatusCode {
    let mut s = lock(state.0);
    match q.model {
        Some(m) => {
            s.queues.remove(&m);
            s.defaults.remove(&m);
            s.log.retain(|r| r.model != m);
        }
        None => *s = State::default(),
    }
    StatusCode::NO_CONTENT
}

/// Scripts a fake upstream (in-process or the shared process) over its control API.
#[derive(Clone)]
pub struct FakeClient {
    base: String,
    http: reqwest::Client,
}

impl FakeClient {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into().trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// The shared fake behind LiteLLM (`FAKE_UPSTREAM_URL`, set by scripts/test).
    pub fn shared() -> Self {
        Self::new(crate::env::require("FAKE_UPSTREAM_URL"))
    }

    /// Queue behaviours for `model` (taken one per request, in order).
    pub async fn script(&self, model: &str, behaviours: Vec<Behaviour>) -> anyhow::Result<()> {
        self.http
            .post(format!("{}/_control/script", self.base))
            .json(&json!({"model": model, "behaviours": behaviours}))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// What `model` does once its queue is empty.
    pub async fn set_default(&self, model: &str, behaviour: Behaviour) -> anyhow::Result<()> {
        self.http
            .post(format!("{}/_control/default", self.base))
            .json(&json!({"model": model, "behaviour": behaviour}))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// The requests received for `model`, oldest first.
    pub async fn requests(&self, model: &str) -> anyhow::Result<Vec<Recorded>> {
        Ok(self
            .http
            .get(format!(
                "{}/_control/requests?model={}",
                self.base,
                urlencode(model)
            ))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
