//! End to end: the real API, a real chat worker consuming the bus, the real LiteLLM proxy and
//! the scripted fake upstream behind it. HTTP in, SSE (or JSON) out.

use std::sync::Arc;
use std::time::Duration;

use jobs::{Queue, Worker, WorkerOptions};
use serde_json::json;
use testkit::{Behaviour, FakeClient, unique_model, via_litellm};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::chat_helpers::Frame;
use crate::helpers::{TestApp, email, spawn_app_with};

/// A chat worker running in the background until dropped.
pub(crate) struct RunningWorker {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningWorker {
    pub(crate) fn start(app: &TestApp) -> Self {
        let settings = &app.settings;
        let redis = Arc::new(jobs::RedisHandle::new(&settings.redis).unwrap());
        let mut registry = jobs::Registry::new();
        workers::handlers::chat::ChatHandler::new(app.db.pool.clone(), redis.clone(), settings)
            .unwrap()
            .register(&mut registry);
        let mut opts = WorkerOptions::from_settings(settings, vec![Queue::Chat]);
        opts.read_block = Duration::from_millis(200);
        let worker = Worker::new(jobs::Bus::new(redis, &settings.queues), registry, opts);
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let _ = worker.run(token).await;
        });
        Self {
            stop,
            task: Some(task),
        }
    }

    pub(crate) async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An org whose models are unique `fake/...` names (set directly in the database; the API would
/// accept them too, as names under the proxy's `fake/*` route), and its owner's token.
pub(crate) async fn org_with_fake_models(app: &TestApp) -> (String, String, String) {
    let owner = app.register(&email("e2e"), "E2E").await;
    let primary = unique_model("e2e-primary");
    let fallback = unique_model("e2e-fallback");
    store::conversations::set_org_models(
        &app.db.pool,
        Uuid::parse_str(&owner.org_id).unwrap(),
        &via_litellm(&primary),
        &via_litellm(&fallback),
    )
    .await
    .unwrap();
    (owner.token, primary, fallback)
}

#[tokio::test]
async fn a_streamed_turn_goes_from_http_through_the_bus_and_litellm_back_to_sse() {
    let app = spawn_app_with(&[]).await;
    let worker = RunningWorker::start(&app);
    let (token, primary, fallback) = org_with_fake_models(&app).await;
    let fake = FakeClient::shared();
    fake.script(
        &primary,
        vec![Behaviour::reply_tokens(&[
            "Your ", "plan ", "is ", "on ", "track.",
        ])],
    )
    .await
    .unwrap();

    let conversation = app.conversation(&token).await;
    let mut sse = app
        .post_stream(&token, &conversation, "How is my plan?")
        .await;
    let frames = sse.rest().await;
    let names: Vec<&str> = frames.iter().map(Frame::name).collect();
    assert_eq!(names.first(), Some(&"message.created"), "{names:?}");
    assert_eq!(names.last(), Some(&"message.completed"), "{names:?}");
    let text: String = frames
        .iter()
        .filter(|f| f.name() == "token")
        .map(|f| f.data()["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "Your plan is on track.");
    let done = frames.last().unwrap().data();
    assert_eq!(done["message"]["content"], "Your plan is on track.");
    assert_eq!(done["model"], via_litellm(&primary));
    // ids strictly increase (usable as Last-Event-ID)
    let ids: Vec<&str> = frames.iter().map(Frame::id).collect();
    assert!(
        ids.windows(2)
            .all(|w| jobs::events::EventId::parse(w[0]) < jobs::events::EventId::parse(w[1])),
        "{ids:?}"
    );

    // the model got the user's words, once; the fallback was never called
    let seen = fake.requests(&primary).await.unwrap();
    assert_eq!(seen.len(), 1);
    let last = seen[0].body["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["content"], "How is my plan?");
    assert!(fake.requests(&fallback).await.unwrap().is_empty());

    // the conversation shows both messages, the answer with its model
    let r = app
        .get(
            &format!("/v1/conversations/{conversation}/messages"),
            &token,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[1]["role"], "assistant");
    assert_eq!(items[1]["content"], "Your plan is on track.");
    worker.stop().await;
}

#[tokio::test]
async fn a_json_turn_answers_with_the_message_and_a_failing_primary_falls_back() {
    let app = spawn_app_with(&[]).await;
    let worker = RunningWorker::start(&app);
    let (token, primary, fallback) = org_with_fake_models(&app).await;
    let fake = FakeClient::shared();
    fake.script(&primary, vec![Behaviour::status(500)])
        .await
        .unwrap();
    fake.script(&fallback, vec![Behaviour::reply("From the fallback.")])
        .await
        .unwrap();
    let conversation = app.conversation(&token).await;
    let r = app
        .post(
            &format!("/v1/conversations/{conversation}/messages"),
            &token,
            json!({"content": "hello"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["message"]["role"], "assistant");
    assert_eq!(r.body["message"]["content"], "From the fallback.");
    assert_eq!(r.body["message"]["model"], via_litellm(&fallback));
    assert!(r.body["actions"].is_array());
    assert_eq!(fake.requests(&primary).await.unwrap().len(), 1);
    assert_eq!(fake.requests(&fallback).await.unwrap().len(), 1);

    // both failing: 502 model_unavailable, no third call
    fake.script(&primary, vec![Behaviour::status(500)])
        .await
        .unwrap();
    fake.script(&fallback, vec![Behaviour::status(503)])
        .await
        .unwrap();
    let r = app
        .post(
            &format!("/v1/conversations/{conversation}/messages"),
            &token,
            json!({"content": "again"}),
        )
        .await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "model_unavailable");
    assert_eq!(fake.requests(&primary).await.unwrap().len(), 2);
    assert_eq!(fake.requests(&fallback).await.unwrap().len(), 2);
    worker.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_streamed_turns_all_complete_with_their_own_text() {
    // one user with 50 open streams (within the per-user cap, said explicitly)
    let app = spawn_app_with(&[
        ("MESSAGE_RATE_LIMIT", "1000"),
        ("WORKER_CONCURRENCY", "16"),
        ("SSE_MAX_STREAMS_PER_USER", "50"),
    ])
    .await;
    let worker = RunningWorker::start(&app);
    let (token, primary, _) = org_with_fake_models(&app).await;
    // unscripted, the fake echoes the last user message: each turn's text is its own
    let app = Arc::new(app);
    let mut turns = Vec::new();
    for i in 0..50 {
        let app = app.clone();
        let token = token.clone();
        turns.push(tokio::spawn(async move {
            let conversation = app.conversation(&token).await;
            let question = format!("question number {i} about task {}", Uuid::new_v4());
            let mut sse = app.post_stream(&token, &conversation, &question).await;
            let frames = sse.rest().await;
            let text: String = frames
                .iter()
                .filter(|f| f.name() == "token")
                .map(|f| f.data()["text"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(
                frames.last().map(Frame::name),
                Some("message.completed"),
                "turn {i}"
            );
            (question, text)
        }));
    }
    for t in turns {
        let (question, text) = t.await.unwrap();
        assert_eq!(text, format!("echo: {question}"));
    }
    assert_eq!(
        FakeClient::shared().requests(&primary).await.unwrap().len(),
        50
    );
    let answers: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE role = 'assistant'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(answers, 50);
    worker.stop().await;
}

/// The request's trace context goes into the chat job's envelope: a caller's `x-request-id`
/// (32 hex digits) becomes the trace id, and a caller's W3C `traceparent` is continued.
#[tokio::test]
async fn a_turns_job_carries_the_requests_trace_id() {
    let app = spawn_app_with(&[("JSON_WAIT_SECS", "1")]).await;
    let (token, _, _) = org_with_fake_models(&app).await;
    let conversation = app.conversation(&token).await;
    let request_id = Uuid::new_v4().simple().to_string();
    let caller_trace = Uuid::new_v4().simple().to_string();
    for (header, value, want) in [
        ("x-request-id", request_id.clone(), request_id.clone()),
        (
            "traceparent",
            format!("00-{caller_trace}-b7ad6b7169203331-01"),
            caller_trace.clone(),
        ),
    ] {
        let r = app
            .http
            .post(app.url(&format!("/v1/conversations/{conversation}/messages")))
            .bearer_auth(&token)
            .header(header, value)
            .json(&json!({"content": "trace me"}))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap();
        // no worker runs here: JSON mode answers 202 after the wait; the job is what matters
        let _ = r.status();
        let handle = jobs::RedisHandle::new(&app.settings.redis).unwrap();
        let mut conn = handle.conn().await.unwrap();
        let bus = jobs::Bus::new(std::sync::Arc::new(handle), &app.settings.queues);
        let mut envs: Vec<jobs::Envelope> = Vec::new();
        for p in bus.parts(Queue::Chat) {
            let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(&bus.keys(p).stream)
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .unwrap();
            envs.extend(
                entries
                    .ids
                    .iter()
                    .map(|e| jobs::Envelope::from_json(&e.get::<String>("j").unwrap()).unwrap()),
            );
            // and those still waiting for fair admission, in their org's list
            let keys = bus.keys(p);
            let orgs: Vec<String> = redis::cmd("ZRANGE")
                .arg(&keys.fair)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap();
            for org in orgs {
                let waiting: Vec<String> = redis::cmd("LRANGE")
                    .arg(format!("{}{org}", keys.fair_lists))
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                envs.extend(
                    waiting
                        .iter()
                        .map(|j| jobs::Envelope::from_json(j).unwrap()),
                );
            }
        }
        assert!(
            envs.iter().any(|e| e.trace_id() == Some(want.as_str())),
            "no job with trace {want}"
        );
    }
}

/// `message.completed`'s `message` has one shape everywhere: the live event (real worker), the
/// replayed event, the event rebuilt from Postgres past the retention window, the JSON-mode
/// answer, and the messages listing agree field for field.
#[tokio::test]
async fn the_completed_message_has_one_shape_live_replayed_rebuilt_json_and_listed() {
    let app = spawn_app_with(&[]).await;
    let worker = RunningWorker::start(&app);
    let (token, primary, _fallback) = org_with_fake_models(&app).await;
    let fake = FakeClient::shared();
    fake.script(
        &primary,
        vec![
            Behaviour::reply_tokens(&["one ", "shape"]),
            Behaviour::reply("json mode"),
        ],
    )
    .await
    .unwrap();
    let conversation = app.conversation(&token).await;

    // live
    let frames = app
        .post_stream(&token, &conversation, "first")
        .await
        .rest()
        .await;
    let done = frames.last().unwrap();
    assert_eq!(done.name(), "message.completed", "{frames:?}");
    let live = done.data().clone();
    let response_id = live["message"]["response_id"].as_str().unwrap().to_owned();

    // replayed
    let replayed = crate::chat_helpers::SseReader::new(
        app.events(&token, &conversation, &response_id, None).await,
    )
    .rest()
    .await;
    let replayed = replayed.last().unwrap().data().clone();

    // rebuilt (the replay stream expired)
    let mut conn = crate::redis_conn(&app.redis).await;
    let key = format!("{}:{{resp:{response_id}}}:events", app.redis.prefix);
    let deleted: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let rebuilt = crate::chat_helpers::SseReader::new(
        app.events(&token, &conversation, &response_id, None).await,
    )
    .rest()
    .await;
    assert_eq!(rebuilt.len(), 1);
    let rebuilt = rebuilt[0].data().clone();

    // JSON mode (the next turn)
    let r = app
        .post(
            &format!("/v1/conversations/{conversation}/messages"),
            &token,
            json!({"content": "second"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let json_mode = r.body["message"].clone();

    let listed = app
        .get(
            &format!("/v1/conversations/{conversation}/messages"),
            &token,
        )
        .await;
    assert_eq!(listed.status, 200);
    let items = listed.body["items"].as_array().unwrap().clone();
    let listed_first = items
        .iter()
        .find(|m| m["response_id"] == live["message"]["response_id"] && m["role"] == "assistant")
        .unwrap()
        .clone();
    let listed_second = items
        .iter()
        .find(|m| m["id"] == json_mode["id"])
        .unwrap()
        .clone();

    assert_eq!(live["message"]["content"], "one shape");
    assert!(live["message"]["usage"]["total_tokens"].as_i64().unwrap() > 0);
    assert_eq!(live["message"], listed_first, "live vs listing");
    assert_eq!(replayed, live, "replayed vs live");
    assert_eq!(rebuilt["message"], listed_first, "rebuilt vs listing");
    assert_eq!(rebuilt["usage"], live["usage"], "rebuilt vs live usage");
    assert_eq!(rebuilt["model"], live["model"]);
    assert_eq!(live["usage"], live["message"]["usage"]);
    assert_eq!(json_mode["content"], "json mode");
    assert_eq!(json_mode, listed_second, "JSON mode vs listing");
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&json_mode), keys(&live["message"]));
    worker.stop().await;
}
