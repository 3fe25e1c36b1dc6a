//! Test equipment for chat turns: a fake worker (the worker side is another issue) that takes
//! `chat` jobs off the bus and publishes events / completes responses exactly as a worker
//! would, and a small SSE reader.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use jobs::events::{EventId, EventPublisher, Published, ResponseEvent};
use jobs::{Bus, Envelope, Job, Queue, RedisHandle};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::TestApp;

pub struct FakeWorker {
    bus: Bus,
    publisher: EventPublisher,
    pool: sqlx::PgPool,
    conn: jobs::RedisConn,
}

impl FakeWorker {
    pub async fn new(app: &TestApp) -> Self {
        let redis = Arc::new(RedisHandle::new(&app.settings.redis).unwrap());
        let bus = Bus::new(redis.clone(), &app.settings.queues);
        for p in bus.parts(Queue::Chat) {
            bus.ensure_group(p).await.unwrap();
        }
        let conn = redis.blocking_conn().await.unwrap();
        Self {
            bus,
            publisher: EventPublisher::new(redis, &app.settings.events),
            pool: app.db.pool.clone(),
            conn,
        }
    }

    /// The next `chat` job, waiting at most `wait` (every partition is looked at in turn,
    /// `QUEUE_PARTITIONS`; one alone blocks).
    pub async fn try_next_job(&mut self, wait: Duration) -> Option<jobs::kinds::Chat> {
        let parts: Vec<jobs::Part> = self.bus.parts(Queue::Chat).collect();
        let deadline = tokio::time::Instant::now() + wait;
        let d = 'found: loop {
            let block = match parts.len() {
                1 => Some(wait),
                _ => None,
            };
            for p in &parts {
                let got = self
                    .bus
                    .read(&mut self.conn, *p, "fake-worker", 1, block)
                    .await
                    .unwrap();
                if let Some(d) = got.into_iter().next() {
                    break 'found d;
                }
            }
            if block.is_some() || tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let env = Envelope::from_json(&d.body).unwrap();
        self.bus
            .ack(d.part, "fake-worker", &[(&d.entry_id, env.id)])
            .await
            .unwrap();
        match env.job {
            Job::Chat(c) => Some(c),
            other => panic!("unexpected job {other:?}"),
        }
    }

    pub async fn next_job(&mut self) -> jobs::kinds::Chat {
        self.try_next_job(Duration::from_secs(10))
            .await
            .expect("a chat job was enqueued")
    }

    pub async fn publish(&self, response_id: Uuid, event: ResponseEvent) -> EventId {
        match self.publisher.publish(response_id, &event).await.unwrap() {
            Published::Sent(id) | Published::AlreadyFinished(id) => id,
            other => panic!("not published: {other:?}"),
        }
    }

    pub async fn tokens(&self, response_id: Uuid, tokens: &[&str]) {
        for t in tokens {
            self.publish(
                response_id,
                ResponseEvent::Token {
                    text: (*t).to_owned(),
                },
            )
            .await;
        }
    }

    /// Store the answer (commit first), then publish `message.completed`.
    pub async fn complete(&self, job: &jobs::kinds::Chat, content: &str) {
        let mut tx = self.pool.begin().await.unwrap();
        let (m, _) = testkit::turns::answer(
            &mut tx,
            job.response_id.into(),
            &store::conversations::Answer {
                content,
                model: "local-chat",
                prompt_tokens: Some(7),
                completion_tokens: Some(3),
                latency_ms: 12,
                citations: json!([]),
                sources: Default::default(),
            },
        )
        .await;
        tx.commit().await.unwrap();
        // as the worker does: the one public shape of a message
        let c = store::public::PublicMessage::from(m).completed();
        assert_eq!(c.usage["total_tokens"], 10);
        self.publish(
            job.response_id.into(),
            ResponseEvent::MessageCompleted {
                message: c.message,
                model: c.model,
                usage: c.usage,
            },
        )
        .await;
    }

    /// A whole answer: tokens, then the stored message and `message.completed`.
    pub async fn answer(&self, job: &jobs::kinds::Chat, tokens: &[&str]) {
        self.tokens(job.response_id.into(), tokens).await;
        self.complete(job, &tokens.concat()).await;
    }

    /// Fail the response with `code`, as a worker does.
    pub async fn fail(&self, job: &jobs::kinds::Chat, code: store::ErrorCode) {
        let mut conn = self.pool.acquire().await.unwrap();
        store::responses::fail_unfinished(
            &mut conn,
            job.response_id,
            None,
            code,
            "both models failed",
        )
        .await
        .unwrap();
        self.publish(
            job.response_id.into(),
            ResponseEvent::Error {
                code: code.to_string(),
                message: "both models failed".into(),
            },
        )
        .await;
    }
}

/// One SSE frame: an event, or a comment (keep-alive).
#[derive(Debug, Clone)]
pub enum Frame {
    Event {
        id: String,
        event: String,
        data: Value,
    },
    Comment,
}

impl Frame {
    pub fn name(&self) -> &str {
        match self {
            Frame::Event { event, .. } => event,
            Frame::Comment => ":",
        }
    }
    pub fn id(&self) -> &str {
        match self {
            Frame::Event { id, .. } => id,
            Frame::Comment => "",
        }
    }
    pub fn data(&self) -> &Value {
        match self {
            Frame::Event { data, .. } => data,
            Frame::Comment => &Value::Null,
        }
    }
}

pub struct SseReader {
    body: BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> Self {
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
        Self {
            body: resp.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next frame (events and comments); `None` when the stream ended. Panics after `wait`.
    pub async fn next_frame(&mut self, wait: Duration) -> Option<Frame> {
        tokio::time::timeout(wait, async {
            loop {
                if let Some(pos) = self.buf.find("\n\n") {
                    let raw: String = self.buf.drain(..pos + 2).collect();
                    return Some(parse_frame(&raw));
                }
                match self.body.next().await {
                    Some(Ok(chunk)) => self.buf.push_str(std::str::from_utf8(&chunk).unwrap()),
                    Some(Err(_)) | None => return None,
                }
            }
        })
        .await
        .expect("an SSE frame in time")
    }

    /// The next event, skipping keep-alive comments.
    pub async fn next_event(&mut self) -> Option<Frame> {
        loop {
            match self.next_frame(Duration::from_secs(10)).await? {
                Frame::Comment => continue,
                f => return Some(f),
            }
        }
    }

    /// Every remaining event, up to the end of the stream.
    pub async fn rest(&mut self) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(f) = self.next_event().await {
            out.push(f);
        }
        out
    }
}

fn parse_frame(raw: &str) -> Frame {
    let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
    let mut comment = true;
    for line in raw.lines() {
        if let Some(v) = line.strip_prefix("id: ") {
            id = v.to_owned();
            comment = false;
        } else if let Some(v) = line.strip_prefix("event: ") {
            event = v.to_owned();
            comment = false;
        } else if let Some(v) = line.strip_prefix("data: ") {
            data.push_str(v);
            comment = false;
        }
    }
    if comment {
        return Frame::Comment;
    }
    Frame::Event {
        id,
        event,
        data: serde_json::from_str(&data).unwrap_or(Value::Null),
    }
}

impl TestApp {
    /// Start a conversation of `token`'s user.
    pub async fn conversation(&self, token: &str) -> String {
        let r = self
            .post("/v1/conversations", token, json!({"title": "chat"}))
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["id"].as_str().unwrap().to_owned()
    }

    /// POST a message asking for SSE; the open stream.
    pub async fn post_stream(&self, token: &str, conversation: &str, content: &str) -> SseReader {
        let r = self
            .http
            .post(self.url(&format!("/v1/conversations/{conversation}/messages")))
            .bearer_auth(token)
            .json(&json!({"content": content, "stream": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        SseReader::new(r)
    }

    /// GET the events of a response, after `last_event_id`.
    pub async fn events(
        &self,
        token: &str,
        conversation: &str,
        response: &str,
        last_event_id: Option<&str>,
    ) -> reqwest::Response {
        let mut rb = self
            .http
            .get(self.url(&format!(
                "/v1/conversations/{conversation}/responses/{response}/events"
            )))
            .bearer_auth(token);
        if let Some(id) = last_event_id {
            rb = rb.header("Last-Event-ID", id);
        }
        rb.send().await.unwrap()
    }
}
