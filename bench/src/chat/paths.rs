//! The paths measured: direct to the fake upstream, through LiteLLM, through Switchboard (and
//! Switchboard calling LiteLLM), and the SSE frame helpers they share with `bench sse`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use futures::StreamExt;
use serde_json::{Value, json};
use testkit::{Behaviour, FakeClient};

use super::report::print_level;
use super::{ChatArgs, QUESTION, REPLY, Turn, http_client, ms, run_level};

/// A streamed completion through `llm::LlmClient` (direct to the fake, or via LiteLLM).
pub(super) struct Direct {
    client: llm::LlmClient,
    req: llm::ChatRequest,
    timeouts: llm::Timeouts,
}

impl Direct {
    pub(super) fn new(
        litellm: &config::LitellmSettings,
        model: &str,
        settings: &config::Settings,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            client: llm::LlmClient::new(litellm)?,
            // the shape of the worker's prompt: the system prompt and the question
            req: llm::ChatRequest {
                model: model.to_owned(),
                messages: vec![
                    llm::Message::system(workers::handlers::chat::prompt::SYSTEM_PROMPT),
                    llm::Message::user(QUESTION),
                ],
                tools: Vec::new(),
                params: llm::GenerationParams::from(&settings.chat),
            },
            timeouts: llm::Timeouts::from_settings(&settings.chat),
        })
    }

    pub(super) async fn turn(&self, _task: usize) -> anyhow::Result<Turn> {
        let t0 = Instant::now();
        let mut stream = self.client.chat_stream(&self.req, self.timeouts).await?;
        let mut first = None;
        let mut tokens = 0usize;
        while let Some(ev) = stream.next().await {
            if let llm::ChatEvent::Token(_) = ev? {
                tokens += 1;
                first.get_or_insert_with(|| t0.elapsed());
            }
        }
        let total = t0.elapsed();
        anyhow::ensure!(tokens > 0, "the model sent no token");
        let ttft = first.unwrap_or(total);
        Ok(Turn {
            ttft: ms(ttft),
            total: ms(total),
            ..Turn::default()
        })
    }
}

/// The LiteLLM path: a unique `fake/<name>` model answered by the shared fake upstream.
pub(super) async fn litellm_path(
    litellm: &config::LitellmSettings,
    settings: &config::Settings,
) -> anyhow::Result<Direct> {
    let fake_url =
        std::env::var("FAKE_UPSTREAM_URL").unwrap_or_else(|_| "http://127.0.0.1:4010".to_owned());
    let name = testkit::unique_model("bench-chat");
    FakeClient::new(&fake_url)
        .set_default(&name, Behaviour::reply_tokens(&REPLY))
        .await
        .with_context(|| format!("the shared fake upstream at {fake_url}"))?;
    let d = Direct::new(litellm, &testkit::via_litellm(&name), settings)?;
    d.turn(0)
        .await
        .with_context(|| format!("a first turn through LiteLLM at {}", litellm.base_url))?;
    Ok(d)
}

/// The API in this process: users, one conversation per concurrent task.
pub(super) struct Switchboard {
    http: reqwest::Client,
    base: String,
    /// (token, conversation id), one per task index.
    slots: Vec<(String, String)>,
}

/// Concurrent turns per user (tasks share users; the rate limit is raised).
const TASKS_PER_USER: usize = 25;

impl Switchboard {
    pub(super) async fn setup(
        http: &reqwest::Client,
        base: &str,
        tasks: usize,
    ) -> anyhow::Result<Self> {
        let users = tasks.div_ceil(TASKS_PER_USER).max(1);
        let mut tokens = Vec::with_capacity(users);
        for u in 0..users {
            let r = http
                .post(format!("{base}/v1/auth/register"))
                .json(&json!({
                    "email": format!("bench-{u}-{}@example.com", uuid::Uuid::new_v4().simple()),
                    "password": "correct horse battery",
                    "name": "Bench",
                    "org_name": format!("Bench {u}"),
                }))
                .send()
                .await?;
            anyhow::ensure!(r.status().as_u16() == 201, "register: {}", r.status());
            let v: Value = r.json().await?;
            tokens.push(
                v["token"]
                    .as_str()
                    .context("register: no token")?
                    .to_owned(),
            );
        }
        let mut slots = Vec::with_capacity(tasks);
        for i in 0..tasks {
            let token = tokens[i % users].clone();
            let conversation = create_conversation(http, base, &token).await?;
            slots.push((token, conversation));
        }
        Ok(Self {
            http: http.clone(),
            base: base.to_owned(),
            slots,
        })
    }

    pub(super) async fn turn(&self, task: usize) -> anyhow::Result<Turn> {
        let (token, conversation) = &self.slots[task % self.slots.len()];
        let t0 = Instant::now();
        let resp = self
            .http
            .post(format!(
                "{}/v1/conversations/{conversation}/messages",
                self.base
            ))
            .bearer_auth(token)
            .json(&json!({"content": QUESTION, "stream": true}))
            .send()
            .await?;
        let headers = t0.elapsed();
        anyhow::ensure!(
            resp.status().as_u16() == 200,
            "POST messages: {}",
            resp.status()
        );
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let (mut created, mut first) = (None, None);
        let mut tokens = 0usize;
        let mut text = String::new();
        while let Some(chunk) = body.next().await {
            buf.extend_from_slice(&chunk?);
            while let Some(pos) = find(&buf, b"\n\n") {
                let frame: Vec<u8> = buf.drain(..pos + 2).collect();
                match event_name(&frame) {
                    Some("message.created") => {
                        created.get_or_insert_with(|| t0.elapsed());
                    }
                    Some("token") => {
                        tokens += 1;
                        first.get_or_insert_with(|| t0.elapsed());
                        text.push_str(&token_text(&frame)?);
                    }
                    Some("message.completed") => {
                        let total = t0.elapsed();
                        anyhow::ensure!(
                            text == REPLY.concat(),
                            "the tokens say {text:?}, not the 20-token reply"
                        );
                        let first = first.context("completed without a token")?;
                        return Ok(Turn {
                            ttft: ms(first),
                            total: ms(total),
                            headers: ms(headers),
                            created: ms(created.unwrap_or(first)),
                            token_events: tokens as f64,
                        });
                    }
                    Some("error") => anyhow::bail!(
                        "the turn failed: {}",
                        String::from_utf8_lossy(&frame).trim()
                    ),
                    _ => {}
                }
            }
        }
        anyhow::bail!("the stream ended before message.completed")
    }
}

pub async fn create_conversation(
    http: &reqwest::Client,
    base: &str,
    token: &str,
) -> anyhow::Result<String> {
    let r = http
        .post(format!("{base}/v1/conversations"))
        .bearer_auth(token)
        .json(&json!({"title": "bench"}))
        .send()
        .await?;
    anyhow::ensure!(r.status().as_u16() == 201, "conversation: {}", r.status());
    let v: Value = r.json().await?;
    Ok(v["id"].as_str().context("conversation: no id")?.to_owned())
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The `event:` field of one SSE frame.
/// The `text` of a `token` frame.
fn token_text(frame: &[u8]) -> anyhow::Result<String> {
    let data = std::str::from_utf8(frame)?
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .context("a token frame without data")?;
    let v: Value = serde_json::from_str(data)?;
    Ok(v["text"]
        .as_str()
        .context("a token without text")?
        .to_owned())
}

pub fn event_name(frame: &[u8]) -> Option<&str> {
    std::str::from_utf8(frame)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("event: "))
}

pub(super) fn via_litellm_prefix(prefix: &str) -> String {
    format!("{prefix}ll")
}

/// The production shape: Switchboard with its worker calling the LiteLLM proxy (model
/// `fake/<unique>` → the shared fake). A second in-process API and worker on a Redis prefix of
/// their own; printed as `path=switchboard+litellm` (a reference, like the LiteLLM path).
#[allow(clippy::print_stdout)]
pub(super) async fn switchboard_via_litellm(
    settings: &config::Settings,
    litellm: &config::LitellmSettings,
    args: &ChatArgs,
) -> anyhow::Result<()> {
    let fake_url =
        std::env::var("FAKE_UPSTREAM_URL").unwrap_or_else(|_| "http://127.0.0.1:4010".to_owned());
    let name = testkit::unique_model("bench-chat-sb");
    FakeClient::new(&fake_url)
        .set_default(&name, Behaviour::reply_tokens(&REPLY))
        .await?;
    let mut s = settings.clone();
    s.redis.prefix = via_litellm_prefix(&settings.redis.prefix);
    s.litellm = litellm.clone();
    s.chat.default_model = testkit::via_litellm(&name);
    s.chat.default_fallback_model = testkit::via_litellm(&name);
    let stack = crate::stack::Stack::start(&s, 1).await?;
    let base = stack.base.clone();
    let result = async {
        let max_c = args.concurrency.iter().copied().max().unwrap_or(1);
        let sb = Arc::new(Switchboard::setup(&http_client()?, &base, max_c).await?);
        for &c in &args.concurrency {
            let per_task = args.litellm_turns.div_ceil(c).max(1);
            let level = run_level(c, per_task, |i| {
                let sb = sb.clone();
                async move { sb.turn(i).await }
            })
            .await?;
            print_level("switchboard+litellm", c, &level);
        }
        anyhow::Ok(())
    }
    .await;
    stack.stop().await;
    result
}
