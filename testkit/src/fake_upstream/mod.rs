//! A scripted, OpenAI-compatible upstream: the test equipment behind the real LiteLLM proxy.
//!
//! Each model name has a queue of [`Behaviour`]s; a request for that model takes the next one
//! (or the model's default, or an echo reply when nothing is scripted). Every request is
//! recorded so a test can assert what the model was sent and how many calls it saw.
//!
//! Tests script it through a small HTTP control API (`/_control/...`) with [`FakeClient`], so
//! the same code drives an in-process instance ([`FakeUpstream::start`]) and the shared
//! `fake-upstream` process that scripts/test runs behind LiteLLM (`fake/<model>` routes).

mod control;
mod openai;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use poem::listener::TcpAcceptor;
use poem::{EndpointExt, Route, Server, get, post};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use control::{control_default, control_requests, control_reset, control_script};
use openai::{chat, embeddings, health, models};

pub use control::FakeClient;
pub use openai::fake_embedding;

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
