//! The clients: turns sent as users send them (SSE or JSON, an `Idempotency-Key` each,
//! resuming with `Last-Event-ID`, retrying a 503), and what each one saw.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde_json::{Value, json};
use uuid::Uuid;

use super::stack::Stack;

/// One turn as its client saw it.
#[derive(Debug, Clone)]
pub(super) struct TurnResult {
    pub(super) index: usize,
    pub(super) conversation: Uuid,
    pub(super) response_id: Option<Uuid>,
    /// The client saw `message.completed` (SSE) or got the answer (JSON).
    pub(super) completed: bool,
    /// The text the client holds: tokens after the last `response.restarted` (SSE), or the
    /// answer's content (JSON).
    pub(super) text: String,
    pub(super) error: Option<String>,
    pub(super) started: Instant,
    pub(super) finished: Option<Instant>,
    /// The response's run number once finished (> 1: another run took over).
    pub(super) run: i64,
}

struct Client {
    token: String,
    conversation: Uuid,
}

/// Turns sent by `concurrency` clients, each with its own user and conversation.
pub(super) struct Load {
    results: Arc<Mutex<Vec<TurnResult>>>,
    tasks: tokio::task::JoinSet<()>,
    total: usize,
    db_url: String,
}

impl Load {
    pub(super) async fn start(
        stack: &Stack,
        turns: usize,
        concurrency: usize,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()?;
        let tasks_n = concurrency.clamp(1, turns.max(1));
        // one user (and conversation) per client, at most USERS: several clients of a user
        // send their turns into its conversation at once
        let mut users = Vec::new();
        for i in 0..tasks_n.min(USERS) {
            users.push(Arc::new(register(&http, &stack.base, i).await?));
        }
        let results: Arc<Mutex<Vec<TurnResult>>> = Arc::default();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..tasks_n {
            let client = users[t % users.len()].clone();
            let (http, base, results, next) = (
                http.clone(),
                stack.base.clone(),
                results.clone(),
                next.clone(),
            );
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= turns {
                        return;
                    }
                    let r = one_turn(&http, &base, &client, i).await;
                    results.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                }
            });
        }
        Ok(Self {
            results,
            tasks,
            total: turns,
            db_url: stack.pg.url(),
        })
    }

    pub(super) fn completed(&self) -> usize {
        self.results
            .lock()
            .map(|r| r.iter().filter(|t| t.completed).count())
            .unwrap_or(0)
    }

    pub(super) fn done(&self) -> bool {
        self.results.lock().map(|r| r.len()).unwrap_or(0) >= self.total
    }

    pub(super) async fn wait_completed(&self, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.completed() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait for every client (until `deadline`), then read each turn's run number.
    pub(super) async fn finish(mut self, deadline: Instant) -> Vec<TurnResult> {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!("the turns did not finish in time; the rest count as lost");
            self.tasks.abort_all();
        }
        let mut results =
            std::mem::take(&mut *self.results.lock().unwrap_or_else(|p| p.into_inner()));
        if let Ok(db) = sqlx::PgPool::connect(&self.db_url).await {
            for r in &mut results {
                if let Some(id) = r.response_id {
                    r.run = sqlx::query_scalar::<_, i32>("SELECT run FROM responses WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&db)
                        .await
                        .ok()
                        .flatten()
                        .map_or(0, i64::from);
                }
            }
            db.close().await;
        }
        results
    }
}

async fn register(http: &reqwest::Client, base: &str, i: usize) -> anyhow::Result<Client> {
    let r = http
        .post(format!("{base}/v1/auth/register"))
        .json(&json!({
            "email": format!("chaos-{i}-{}@example.com", Uuid::new_v4().simple()),
            "password": "correct horse battery",
            "name": "Chaos",
            "org_name": format!("Chaos {i}"),
        }))
        .send()
        .await?;
    anyhow::ensure!(r.status().as_u16() == 201, "register: {}", r.status());
    let v: Value = r.json().await?;
    let token = v["token"]
        .as_str()
        .context("register: no token")?
        .to_owned();
    let conversation = crate::chat::create_conversation(http, base, &token).await?;
    Ok(Client {
        token,
        conversation: conversation.parse()?,
    })
}

/// Users (each with one conversation) the clients of a scenario share.
const USERS: usize = 20;

/// How long a client keeps trying one turn.
const TURN_PATIENCE: Duration = Duration::from_secs(240);

/// One turn, as a careful client sends it: an `Idempotency-Key`, a retry with the same key when
/// the API answers 503 or the connection breaks, `Last-Event-ID` when a stream drops.
async fn one_turn(http: &reqwest::Client, base: &str, client: &Client, index: usize) -> TurnResult {
    let started = Instant::now();
    let mut r = TurnResult {
        index,
        conversation: client.conversation,
        response_id: None,
        completed: false,
        text: String::new(),
        error: None,
        started,
        finished: None,
        run: 0,
    };
    let sse = index.is_multiple_of(2);
    let key = Uuid::new_v4().to_string();
    let content = format!(
        "turn {index} from {} asks about alpha beta gamma",
        client.conversation
    );
    let deadline = started + TURN_PATIENCE;
    let mut stream = Follow {
        fresh: true,
        ..Follow::default()
    };
    while Instant::now() < deadline {
        let step = if let Some(response_id) = r.response_id.filter(|_| !stream.fresh) {
            follow(http, base, client, response_id, &mut stream).await
        } else {
            post(http, base, client, &key, &content, sse, &mut stream).await
        };
        match step {
            Ok(Step::Done) => break,
            Ok(Step::Failed(e)) => {
                r.error = Some(e);
                break;
            }
            Ok(Step::Again) => {}
            Err(e) => r.error = Some(format!("{e:#}")),
        }
        r.response_id = r.response_id.or(stream.response_id);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    r.response_id = r.response_id.or(stream.response_id);
    r.completed = stream.completed;
    if r.completed {
        r.error = None;
        r.finished = Some(Instant::now());
    }
    r.text = stream.text;
    r
}

enum Step {
    Done,
    Again,
    Failed(String),
}

/// What a client holds of one response's stream.
#[derive(Default)]
struct Follow {
    response_id: Option<Uuid>,
    last_id: Option<String>,
    text: String,
    completed: bool,
    /// No stream was read yet for this turn: a POST (with the key) starts or finds it.
    fresh: bool,
}

async fn post(
    http: &reqwest::Client,
    base: &str,
    client: &Client,
    key: &str,
    content: &str,
    sse: bool,
    st: &mut Follow,
) -> anyhow::Result<Step> {
    let mut req = http
        .post(format!(
            "{base}/v1/conversations/{}/messages",
            client.conversation
        ))
        .bearer_auth(&client.token)
        .header("Idempotency-Key", key)
        .timeout(Duration::from_secs(120))
        .json(&json!({"content": content, "stream": sse}));
    if sse {
        req = req.header("Accept", "text/event-stream");
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    match status {
        200 if sse => {
            // a POST replays the response's events from the start
            st.text.clear();
            st.last_id = None;
            st.fresh = false;
            read_events(resp, st).await
        }
        200 => {
            let v: Value = resp.json().await?;
            st.text = v["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            st.response_id = v["message"]["response_id"]
                .as_str()
                .and_then(|s| s.parse().ok());
            st.completed = true;
            Ok(Step::Done)
        }
        202 => {
            let v: Value = resp.json().await?;
            st.response_id = v["response_id"].as_str().and_then(|s| s.parse().ok());
            st.fresh = false;
            Ok(Step::Again)
        }
        502 => Ok(Step::Failed(format!("502 {}", resp.text().await?))),
        503 => {
            let body = resp.text().await.unwrap_or_default();
            if body.contains("internal_error") {
                return Ok(Step::Failed(format!("503 {body}")));
            }
            Ok(Step::Again)
        }
        _ => Ok(Step::Failed(format!("{status} {}", resp.text().await?))),
    }
}

async fn follow(
    http: &reqwest::Client,
    base: &str,
    client: &Client,
    response_id: Uuid,
    st: &mut Follow,
) -> anyhow::Result<Step> {
    let mut req = http
        .get(format!(
            "{base}/v1/conversations/{}/responses/{response_id}/events",
            client.conversation
        ))
        .bearer_auth(&client.token)
        .timeout(Duration::from_secs(120));
    if let Some(id) = &st.last_id {
        req = req.header("Last-Event-ID", id);
    }
    let resp = req.send().await?;
    match resp.status().as_u16() {
        200 => read_events(resp, st).await,
        503 => Ok(Step::Again),
        s => Ok(Step::Failed(format!("{s} {}", resp.text().await?))),
    }
}

/// Read an event stream until its terminal event (or until it drops).
async fn read_events(resp: reqwest::Response, st: &mut Follow) -> anyhow::Result<Step> {
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else {
            return Ok(Step::Again);
        };
        buf.extend_from_slice(&chunk);
        while let Some(pos) = crate::chat::find(&buf, b"\n\n") {
            let frame: Vec<u8> = buf.drain(..pos + 2).collect();
            let frame = String::from_utf8_lossy(&frame);
            let (mut id, mut event, mut data) = (None, None, None);
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = serde_json::from_str::<Value>(v).ok();
                }
            }
            let Some(event) = event else { continue };
            if let Some(id) = id {
                st.last_id = Some(id);
            }
            let data = data.unwrap_or(Value::Null);
            match event.as_str() {
                "message.created" => {
                    st.response_id = data["response_id"].as_str().and_then(|s| s.parse().ok());
                }
                "token" => st.text.push_str(data["text"].as_str().unwrap_or_default()),
                "response.restarted" => st.text.clear(),
                "message.completed" => {
                    st.completed = true;
                    return Ok(Step::Done);
                }
                "error" => return Ok(Step::Failed(format!("error event {data}"))),
                _ => {}
            }
        }
    }
    Ok(Step::Again)
}
