//! The chat handler against real PostgreSQL, Redis and the LiteLLM proxy in front of the shared
//! scripted fake upstream (`fake/<model>`), or directly against an in-process fake where the
//! proxy would hide what is tested (a stream cut after tokens).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jobs::events::{EventHub, ResponseEvent};
use jobs::kinds::Chat;
use jobs::{Bus, Envelope, Queue, RedisHandle, Worker, WorkerOptions};
use serde_json::json;
use store::Role;
use store::conversations::{self as conv, Answer};
use testkit::{Behaviour, FakeClient, FakeUpstream, TestDb, TestRedis, test_settings};
use testkit::{unique_model, via_litellm};
use uuid::Uuid;

use crate::bus::bus_for;
use crate::crash::{command_with, eventually};
use crate::process::{lines, wait_for};

/// An org with one user and one conversation.
struct Setup {
    org: Uuid,
    user: Uuid,
    conversation: Uuid,
}

async fn setup(db: &TestDb) -> Setup {
    let mut c = db.pool.acquire().await.unwrap();
    let org = store::tenancy::insert_org(&mut c, "acme").await.unwrap().id;
    let user = store::tenancy::insert_user(
        &mut c,
        &format!("u-{}@x.io", Uuid::new_v4().simple()),
        "U",
        "x",
    )
    .await
    .unwrap()
    .id;
    store::tenancy::insert_membership(&mut c, org, user, Role::Member)
        .await
        .unwrap();
    let conversation = conv::create(&mut c, org.into(), user.into(), "plans", None)
        .await
        .unwrap()
        .id;
    Setup {
        org: org.into(),
        user: user.into(),
        conversation,
    }
}

/// A user turn as the API makes it; returns the job that answers it.
async fn turn(db: &TestDb, s: &Setup, content: &str) -> Chat {
    let mut tx = db.pool.begin().await.unwrap();
    let (message, response) = testkit::turns::start(&mut tx, s.conversation, content).await;
    tx.commit().await.unwrap();
    Chat {
        conversation_id: s.conversation.into(),
        message_id: message.id.into(),
        response_id: response.id.into(),
        user_id: s.user.into(),
        org_id: s.org.into(),
    }
}

/// A finished earlier turn (user message + stored answer).
async fn past_turn(db: &TestDb, s: &Setup, question: &str, answer: &str) {
    let job = turn(db, s, question).await;
    let mut tx = db.pool.begin().await.unwrap();
    testkit::turns::answer(
        &mut tx,
        job.response_id.into(),
        &Answer {
            content: answer,
            model: "earlier",
            prompt_tokens: None,
            completion_tokens: None,
            latency_ms: 1,
            citations: json!([]),
            sources: Default::default(),
        },
    )
    .await;
    tx.commit().await.unwrap();
}

/// Test settings with quick, jitter-free retries (the rate-limit delay is then the cooldown
/// plus 100 ms · 2^(attempt-1), at most 1 s).
fn settings(db: &TestDb, redis: &TestRedis, extra: &[(&str, &str)]) -> config::Settings {
    let mut s = test_settings(db, redis, extra);
    s.queues.chat.backoff_base_ms = 100;
    s.queues.chat.backoff_cap_ms = 1000;
    s.queues.chat.jitter = config::Jitter::None;
    s
}

fn redis_handle(settings: &config::Settings) -> Arc<RedisHandle> {
    Arc::new(RedisHandle::new(&settings.redis).unwrap())
}

fn chat_worker(db: &TestDb, settings: &config::Settings) -> Worker {
    let mut registry = workers::handlers::registry(db.pool.clone());
    workers::handlers::chat::ChatHandler::new(db.pool.clone(), redis_handle(settings), settings)
        .unwrap()
        .register(&mut registry);
    let mut opts = WorkerOptions::from_settings(settings, vec![Queue::Chat]);
    opts.read_block = Duration::from_millis(200);
    Worker::new(bus_for(settings), registry, opts)
}

async fn drain(db: &TestDb, settings: &config::Settings) -> jobs::RunReport {
    chat_worker(db, settings)
        .drain_until_empty(Duration::from_secs(90))
        .await
        .expect("the chat queue empties")
}

/// An event hub following live events (as the API runs one), stopped when dropped.
struct LiveHub {
    hub: EventHub,
    stop: tokio_util::sync::CancellationToken,
}

impl LiveHub {
    async fn start(settings: &config::Settings) -> Self {
        let hub = EventHub::new(redis_handle(settings));
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(hub.clone().run(stop.clone()));
        assert!(hub.ready(Duration::from_secs(10)).await, "hub subscribed");
        Self { hub, stop }
    }

    /// Every event of a response from the start, as a client would see them, up to and
    /// including the terminal one (waiting for it at most `limit`).
    async fn events(&self, response_id: Uuid, limit: Duration) -> Option<Vec<ResponseEvent>> {
        tokio::time::timeout(
            limit,
            self.hub
                .events(response_id, None)
                .map(|e| e.unwrap().event)
                .collect::<Vec<_>>(),
        )
        .await
        .ok()
    }
}

impl Drop for LiveHub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Every event of a response (ends with the terminal event).
async fn events(settings: &config::Settings, response_id: Uuid) -> Vec<ResponseEvent> {
    LiveHub::start(settings)
        .await
        .events(response_id, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no terminal event for response {response_id} within 30 s"))
}

fn tokens(events: &[ResponseEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            ResponseEvent::Token { text } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

fn error_code(events: &[ResponseEvent]) -> Option<&str> {
    match events.last() {
        Some(ResponseEvent::Error { code, .. }) => Some(code),
        _ => None,
    }
}

async fn answers(db: &TestDb, response_id: Uuid) -> Vec<conv::Message> {
    sqlx::query_as::<_, conv::Message>(
        "SELECT id, conversation_id, seq, role, content, response_id, model, prompt_tokens, \
         completion_tokens, latency_ms, tool_calls, tool_call_id, citations, created_at \
         FROM messages WHERE response_id = $1 AND role = 'assistant'",
    )
    .bind(response_id)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

async fn response(db: &TestDb, response_id: Uuid) -> (String, Option<String>, i32) {
    sqlx::query_as("SELECT status, error_code, starts FROM responses WHERE id = $1")
        .bind(response_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Primary and fallback model names unique to this test, set as the org's models.
async fn org_models(db: &TestDb, s: &Setup) -> (String, String) {
    let (p, f) = (unique_model("primary"), unique_model("fallback"));
    conv::set_org_models(&db.pool, s.org, &via_litellm(&p), &via_litellm(&f))
        .await
        .unwrap();
    (p, f)
}

async fn calls(model: &str) -> Vec<testkit::fake_upstream::Recorded> {
    FakeClient::shared().requests(model).await.unwrap()
}

#[tokio::test]
async fn happy_path_streams_tokens_and_stores_one_answer_with_a_bounded_prompt() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = settings(&db, &redis, &[("RECENT_MESSAGES", "3")]);
    let s = setup(&db).await;
    let (primary, fallback) = org_models(&db, &s).await;
    past_turn(&db, &s, "first question", "first answer").await;
    past_turn(&db, &s, "second question", "second answer").await;
    let job = turn(&db, &s, "third question").await;
    FakeClient::shared()
        .script(
            &primary,
            vec![Behaviour::reply_tokens(&[
                "Your ", "plan ", "is ", "ready.",
            ])],
        )
        .await
        .unwrap();
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");

    let evs = events(&settings, job.response_id.into()).await;
    let token_events: Vec<&str> = evs
        .iter()
        .filter_map(|e| match e {
            ResponseEvent::Token { text } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    // tokens that arrive while a publish is in flight are joined into one event
    assert_eq!(
        token_events.concat(),
        "Your plan is ready.",
        "in order, nothing lost or repeated: {token_events:?}"
    );
    assert!(token_events.len() <= 4 && token_events.iter().all(|t| !t.is_empty()));
    assert!(token_events[0].starts_with("Your "));
    assert!(
        !evs.iter()
            .any(|e| matches!(e, ResponseEvent::ResponseRestarted { .. }))
    );
    let ResponseEvent::MessageCompleted {
        message,
        model,
        usage,
    } = evs.last().unwrap()
    else {
        panic!("last event is not message.completed: {evs:?}");
    };
    assert_eq!(model, &via_litellm(&primary));
    assert_eq!(message["content"], "Your plan is ready.");
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["model"], json!(via_litellm(&primary)));
    assert_eq!(usage["completion_tokens"], 4);
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);

    let stored = answers(&db, job.response_id.into()).await;
    assert_eq!(stored.len(), 1);
    let m = &stored[0];
    assert_eq!(m.content, "Your plan is ready.");
    assert_eq!(m.model.as_deref(), Some(via_litellm(&primary).as_str()));
    assert_eq!(message["id"], json!(m.id));
    assert_eq!(m.completion_tokens, Some(4));
    assert!(m.prompt_tokens.unwrap() > 0);
    assert!(m.latency_ms.unwrap() >= 0);
    assert_eq!(response(&db, job.response_id.into()).await.0, "completed");

    // what the model was sent: the system prompt, the last 3 messages, the fixed parameters
    let seen = calls(&primary).await;
    assert_eq!(seen.len(), 1);
    let body = &seen[0].body;
    let sent: Vec<(String, String)> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(sent.len(), 4, "{sent:?}");
    assert_eq!(sent[0].0, "system");
    assert_eq!(sent[0].1, workers::handlers::chat::prompt::SYSTEM_PROMPT);
    assert_eq!(
        sent[1..],
        [
            ("user".to_owned(), "second question".to_owned()),
            ("assistant".to_owned(), "second answer".to_owned()),
            ("user".to_owned(), "third question".to_owned()),
        ]
    );
    assert_eq!(body["temperature"], json!(settings.chat.temperature));
    assert_eq!(body["max_tokens"], json!(settings.chat.max_tokens));
    assert!(calls(&fallback).await.is_empty());
}

#[tokio::test]
async fn an_org_at_its_concurrency_cap_has_its_turns_answered_one_at_a_time() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    // four slots, but org A may run one turn at a time (fair admission's per-org cap)
    let settings = settings(
        &db,
        &redis,
        &[("WORKER_CONCURRENCY", "4"), ("CHAT_ORG_CONCURRENCY", "1")],
    );
    let a = setup(&db).await;
    let b = setup(&db).await;
    let (a_model, _) = org_models(&db, &a).await;
    let (b_model, _) = org_models(&db, &b).await;
    let slow = |text: &str| Behaviour::Reply {
        text: text.to_owned(),
        tokens: None,
        first_token_delay_ms: 700,
        token_delay_ms: 0,
    };
    FakeClient::shared()
        .set_default(&a_model, slow("for A"))
        .await
        .unwrap();
    FakeClient::shared()
        .set_default(&b_model, slow("for B"))
        .await
        .unwrap();
    let bus = bus_for(&settings);
    // three turns of A in three conversations (nothing else makes them wait for each other)
    for i in 0..3 {
        let mut c = db.pool.acquire().await.unwrap();
        let conversation = conv::create(&mut c, a.org, a.user, "more", None)
            .await
            .unwrap()
            .id;
        let s = Setup {
            org: a.org,
            user: a.user,
            conversation,
        };
        bus.enqueue(turn(&db, &s, &format!("question {i}")).await)
            .await
            .unwrap();
    }
    bus.enqueue(turn(&db, &b, "question of B").await)
        .await
        .unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!((report.completed, report.dead), (4, 0), "{report:?}");

    let mut a_calls: Vec<u64> = calls(&a_model).await.iter().map(|r| r.at_ms).collect();
    a_calls.sort_unstable();
    assert_eq!(a_calls.len(), 3);
    // each of A's calls starts after the one before it has answered (700 ms)
    for w in a_calls.windows(2) {
        assert!(w[1] - w[0] >= 650, "A's calls overlap: {a_calls:?}");
    }
    // B's turn took a free slot and did not wait for A's
    let b_calls = calls(&b_model).await;
    assert_eq!(b_calls.len(), 1);
    assert!(
        b_calls[0].at_ms < a_calls[1],
        "B {} A {a_calls:?}",
        b_calls[0].at_ms
    );
}

#[tokio::test]
async fn rate_limits_are_waited_out_on_the_primary_honouring_retry_after() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = settings(&db, &redis, &[]);
    let s = setup(&db).await;
    let (primary, fallback) = org_models(&db, &s).await;
    FakeClient::shared()
        .script(
            &primary,
            vec![
                Behaviour::rate_limited(1),
                Behaviour::rate_limited(1),
                Behaviour::reply("finally"),
            ],
        )
        .await
        .unwrap();
    let job = turn(&db, &s, "hello").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!((report.retried, report.completed, report.dead), (2, 1, 0));

    let evs = events(&settings, job.response_id.into()).await;
    assert_eq!(tokens(&evs), "finally");
    assert!(matches!(
        evs.last(),
        Some(ResponseEvent::MessageCompleted { .. })
    ));
    // the client was told, each time, that the turn waits on the rate limit and until when
    let waits: Vec<_> = evs
        .iter()
        .filter_map(|e| match e {
            ResponseEvent::Queued {
                position,
                reason,
                retry_at,
            } => Some((*position, reason.clone(), *retry_at)),
            _ => None,
        })
        .collect();
    assert_eq!(waits.len(), 2, "{evs:?}");
    let seen = calls(&primary).await;
    assert_eq!(seen.len(), 3, "two 429s, then the answer");
    for ((position, reason, retry_at), call) in waits.iter().zip(&seen) {
        assert_eq!((*position, reason.as_str()), (1, "rate_limited"));
        // at least the 429's Retry-After (1 s) after that call
        let retry_ms = retry_at.unwrap().timestamp_millis();
        assert!(
            retry_ms >= i64::try_from(call.at_ms).unwrap() + 950,
            "retry_at {retry_ms} ms, the 429 at {} ms",
            call.at_ms
        );
    }
    assert!(
        calls(&fallback).await.is_empty(),
        "a 429 is no reason to fall back"
    );
    for pair in seen.windows(2) {
        let gap = pair[1].at_ms - pair[0].at_ms;
        assert!(
            gap >= 950,
            "Retry-After 1 s honoured between calls: {gap} ms"
        );
    }
    let stored = answers(&db, job.response_id.into()).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].model.as_deref(),
        Some(via_litellm(&primary).as_str())
    );
}

#[tokio::test]
async fn a_cooling_down_model_is_not_called_by_other_jobs() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = settings(&db, &redis, &[]);
    let s = setup(&db).await;
    let (primary, fallback) = org_models(&db, &s).await;
    FakeClient::shared()
        .script(&primary, vec![Behaviour::rate_limited(2)])
        .await
        .unwrap();
    FakeClient::shared()
        .set_default(&primary, Behaviour::reply("ok"))
        .await
        .unwrap();
    let bus = bus_for(&settings);
    let first = turn(&db, &s, "one").await;
    bus.enqueue(first.clone()).await.unwrap();
    let worker = chat_worker(&db, &settings);
    let run = tokio::spawn(async move { worker.drain_until_empty(Duration::from_secs(90)).await });

    let cooldowns =
        workers::model::Cooldowns::new(redis_handle(&settings), Duration::from_secs(30));
    let model = via_litellm(&primary);
    eventually(
        "the first job hit the 429 and the model cools down",
        Duration::from_secs(20),
        || async { cooldowns.remaining(&model).await.unwrap().is_some() },
    )
    .await;
    // a second turn for the same model while it cools down
    let second = turn(&db, &s, "two").await;
    bus.enqueue(second.clone()).await.unwrap();
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.completed, report.dead), (2, 0), "{report:?}");
    assert!(
        report.retried >= 2,
        "the 429, and the second job waiting out the cooldown: {report:?}"
    );

    let seen = calls(&primary).await;
    assert_eq!(seen.len(), 3, "the 429, then one answer per job");
    let cooldown_ends = seen[0].at_ms + 2000;
    for r in &seen[1..] {
        assert!(
            r.at_ms + 50 >= cooldown_ends,
            "called {} ms before the cooldown ended",
            cooldown_ends - r.at_ms
        );
    }
    assert!(calls(&fallback).await.is_empty());
    for job in [&first, &second] {
        let evs = events(&settings, job.response_id.into()).await;
        assert_eq!(tokens(&evs), "ok");
        assert_eq!(answers(&db, job.response_id.into()).await.len(), 1);
    }
}

#[tokio::test]
async fn rate_limits_beyond_the_maximum_wait_end_in_a_rate_limited_error() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = settings(&db, &redis, &[("RATE_LIMIT_MAX_WAIT_SECS", "3")]);
    let s = setup(&db).await;
    let (primary, fallback) = org_models(&db, &s).await;
    FakeClient::shared()
        .set_default(&primary, Behaviour::rate_limited(1))
        .await
        .unwrap();
    let job = turn(&db, &s, "hello").await;
    let bus = bus_for(&settings);
    bus.enqueue(job.clone()).await.unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!(report.dead, 0, "the job did not die silently: {report:?}");

    let evs = events(&settings, job.response_id.into()).await;
    assert_eq!(error_code(&evs), Some("rate_limited"), "{evs:?}");
    assert_eq!(tokens(&evs), "");
    let (status, code, _) = response(&db, job.response_id.into()).await;
    assert_eq!(
        (status.as_str(), code.as_deref()),
        ("failed", Some("rate_limited"))
    );
    assert!(answers(&db, job.response_id.into()).await.is_empty());
    assert!(calls(&primary).await.len() >= 2, "it did wait and retry");
    assert!(calls(&fallback).await.is_empty());
    assert_eq!(bus.stats(Queue::Chat).await.unwrap().dead, 0);
}

#[tokio::test]
async fn a_failing_primary_falls_back_once() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = settings(&db, &redis, &[]);
    let s = setup(&db).await;
    let (primary, fallback) = org_models(&db, &s).await;
    let fake = FakeClient::shared();
    fake.script(&primary, vec![Behaviour::status(500)])
        .await
        .unwrap();
    fake.script(&fallback, vec![Behaviour::reply("from the fallback")])
        .await
        .unwrap();
    let job = turn(&db, &s, "hello").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    drain(&db, &settings).await;

    let evs = events(&settings, job.response_id.into()).await;
    assert_eq!(tokens(&evs), "from the fallback");
    let Some(ResponseEvent::MessageCompleted { model, .. }) = evs.last() else {
        panic!("{evs:?}");
    };
    assert_eq!(model, &via_litellm(&fallback));
    assert_eq!(calls(&primary).await.len(), 1);
    assert_eq!(calls(&fallback).await.len(), 1);
    let stored = answers(&db, job.response_id.into()).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].model.as_deref(),
        Some(via_litellm(&fallback).as_str())
    );
}

#[tokio::test]
async fn a_rate_limited_fallback_is_retried_without_calling_the_failed_primary_again() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = settings(&db, &redis, &[]);
    let s = setup(&db).await;
    let (primary, fallback) = org_models(&db, &s).await;
    let fake = FakeClient::shared();
    // After its script the primary would answer (the fake's default reply): a second primary
    // call would succeed, so only the count below tells the policy apart.
    fake.script(&primary, vec![Behaviour::status(500)])
        .await
        .unwrap();
    fake.script(
        &fallback,
        vec![
            Behaviour::rate_limited(1),
            Behaviour::reply("from the fallback"),
        ],
    )
    .await
    .unwrap();
    let job = turn(&db, &s, "hello").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!((report.retried, report.completed, report.dead), (1, 1, 0));

    let evs = events(&settings, job.response_id.into()).await;
    assert_eq!(tokens(&evs), "from the fallback");
    let Some(ResponseEvent::MessageCompleted { model, .. }) = evs.last() else {
        panic!("{evs:?}");
    };
    assert_eq!(model, &via_litellm(&fallback));
    assert_eq!(
        calls(&primary).await.len(),
        1,
        "the primary is not called again"
    );
    let seen = calls(&fallback).await;
    assert_eq!(seen.len(), 2, "the 429, then the answer");
    let gap = seen[1].at_ms - seen[0].at_ms;
    assert!(
        gap >= 950,
        "the fallback's Retry-After 1 s honoured: {gap} ms"
    );
    let stored = answers(&db, job.response_id.into()).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].model.as_deref(),
        Some(via_litellm(&fallback).as_str())
    );
}

#[tokio::test]
async fn primary_and_fallback_both_failing_is_model_unavailable_without_a_third_call() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = settings(&db, &redis, &[]);
    let s = setup(&db).await;
    let (primary, fallback) = org_models(&db, &s).await;
    let fake = FakeClient::shared();
    fake.set_default(&primary, Behaviour::status(500))
        .await
        .unwrap();
    fake.set_default(&fallback, Behaviour::Malformed)
        .await
        .unwrap();
    let job = turn(&db, &s, "hello").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!((report.completed, report.retried, report.dead), (1, 0, 0));

    let evs = events(&settings, job.response_id.into()).await;
    assert_eq!(error_code(&evs), Some("model_unavailable"), "{evs:?}");
    assert_eq!(calls(&primary).await.len(), 1);
    assert_eq!(calls(&fallback).await.len(), 1, "no third call");
    assert!(answers(&db, job.response_id.into()).await.is_empty());
    let (status, code, _) = response(&db, job.response_id.into()).await;
    assert_eq!(
        (status.as_str(), code.as_deref()),
        ("failed", Some("model_unavailable"))
    );
}

#[tokio::test]
async fn a_first_token_later_than_the_model_timeout_falls_back() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = settings(&db, &redis, &[("MODEL_TIMEOUT_SECS", "1")]);
    let s = setup(&db).await;
    let (primary, fallback) = org_models(&db, &s).await;
    let fake = FakeClient::shared();
    fake.script(
        &primary,
        vec![Behaviour::Reply {
            text: "too late".into(),
            tokens: None,
            first_token_delay_ms: 3000,
            token_delay_ms: 0,
        }],
    )
    .await
    .unwrap();
    fake.script(&fallback, vec![Behaviour::reply("in time")])
        .await
        .unwrap();
    let job = turn(&db, &s, "hello").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    drain(&db, &settings).await;

    let evs = events(&settings, job.response_id.into()).await;
    assert_eq!(tokens(&evs), "in time", "{evs:?}");
    assert_eq!(calls(&primary).await.len(), 1);
    assert_eq!(calls(&fallback).await.len(), 1);
    assert_eq!(
        answers(&db, job.response_id.into()).await[0]
            .model
            .as_deref(),
        Some(via_litellm(&fallback).as_str())
    );
}

/// Behind LiteLLM a cut looks like a normal end (see llm's canary test), so this talks to an
/// in-process fake upstream directly.
#[tokio::test]
async fn a_failure_after_tokens_is_an_error_without_fallback_or_answer() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let upstream = FakeUpstream::start().await.unwrap();
    let settings = settings(&db, &redis, &[("LITELLM_BASE_URL", &upstream.url())]);
    let s = setup(&db).await;
    let (primary, fallback) = (unique_model("primary"), unique_model("fallback"));
    conv::set_org_models(&db.pool, s.org, &primary, &fallback)
        .await
        .unwrap();
    upstream
        .client()
        .script(
            &primary,
            vec![Behaviour::Cut {
                text: "alpha beta gamma delta".into(),
                after_tokens: 2,
            }],
        )
        .await
        .unwrap();
    let job = turn(&db, &s, "hello").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!((report.completed, report.retried, report.dead), (1, 0, 0));

    let evs = events(&settings, job.response_id.into()).await;
    assert_eq!(tokens(&evs), "alpha beta ");
    assert_eq!(error_code(&evs), Some("model_stream_failed"), "{evs:?}");
    assert!(answers(&db, job.response_id.into()).await.is_empty());
    let (status, _, _) = response(&db, job.response_id.into()).await;
    assert_eq!(status, "failed");
    assert_eq!(upstream.client().requests(&primary).await.unwrap().len(), 1);
    assert!(
        upstream
            .client()
            .requests(&fallback)
            .await
            .unwrap()
            .is_empty(),
        "no fallback once tokens were sent"
    );
}

#[tokio::test]
async fn a_redelivered_job_neither_calls_the_model_again_nor_stores_twice() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = settings(&db, &redis, &[]);
    let s = setup(&db).await;
    let (primary, _) = org_models(&db, &s).await;
    FakeClient::shared()
        .script(&primary, vec![Behaviour::reply("once")])
        .await
        .unwrap();
    let job = turn(&db, &s, "hello").await;
    let bus: Bus = bus_for(&settings);
    let envelope: Envelope = bus.enqueue(job.clone()).await.unwrap();
    drain(&db, &settings).await;
    let first = events(&settings, job.response_id.into()).await;

    // the same envelope again: nothing new happens
    bus.enqueue_envelope(&envelope).await.unwrap();
    drain(&db, &settings).await;
    assert_eq!(events(&settings, job.response_id.into()).await, first);
    assert_eq!(calls(&primary).await.len(), 1);
    assert_eq!(answers(&db, job.response_id.into()).await.len(), 1);

    // a run that crashed between its commit and its publish (nothing of the terminal event in
    // Redis: neither its entry nor its mark on the fence): the redelivery publishes
    // message.completed from what is stored, still without calling the model
    let hub_keys = jobs::events::EventKeys::new(&settings.redis.prefix);
    let mut conn = redis_handle(&settings).conn().await.unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(hub_keys.replay(job.response_id.into()))
        .arg(hub_keys.fence(job.response_id.into()))
        .query_async(&mut conn)
        .await
        .unwrap();
    bus.enqueue_envelope(&envelope).await.unwrap();
    drain(&db, &settings).await;
    let again = events(&settings, job.response_id.into()).await;
    let Some(ResponseEvent::MessageCompleted { message, .. }) = again.last() else {
        panic!("{again:?}");
    };
    assert_eq!(message["content"], "once");
    assert_eq!(calls(&primary).await.len(), 1);
    assert_eq!(answers(&db, job.response_id.into()).await.len(), 1);
}

/// The org's usage rows from yesterday on (a test may straddle midnight UTC).
async fn usage_rows(db: &TestDb, org: Uuid) -> Vec<store::usage::Row> {
    let since = chrono::Utc::now().date_naive() - chrono::Days::new(1);
    store::usage::report(&db.pool, Some(org.into()), since)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_completed_turn_records_its_usage_once_even_when_redelivered() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = settings(&db, &redis, &[]);
    let s = setup(&db).await;
    let (primary, _) = org_models(&db, &s).await;
    FakeClient::shared()
        .script(
            &primary,
            vec![
                Behaviour::reply_tokens(&["one ", "answer"]),
                Behaviour::reply("again"),
            ],
        )
        .await
        .unwrap();
    let job = turn(&db, &s, "how much?").await;
    let bus: Bus = bus_for(&settings);
    let envelope: Envelope = bus.enqueue(job.clone()).await.unwrap();
    drain(&db, &settings).await;
    assert!(matches!(
        events(&settings, job.response_id.into()).await.last(),
        Some(ResponseEvent::MessageCompleted { .. })
    ));
    let stored = answers(&db, job.response_id.into()).await;
    assert_eq!(stored.len(), 1);
    let (prompt, completion) = (
        i64::from(stored[0].prompt_tokens.unwrap()),
        i64::from(stored[0].completion_tokens.unwrap()),
    );
    assert!(prompt > 0);
    assert_eq!(completion, 2);
    let once = usage_rows(&db, s.org).await;
    assert_eq!(once.len(), 1, "{once:?}");
    assert_eq!(once[0].org_id, s.org.into());
    assert_eq!(
        once[0].model,
        via_litellm(&primary),
        "the model that answered"
    );
    assert_eq!(
        (
            once[0].requests,
            once[0].prompt_tokens,
            once[0].completion_tokens
        ),
        (1, prompt, completion)
    );

    // the same envelope again: the response is finished, nothing is called or counted
    bus.enqueue_envelope(&envelope).await.unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");
    assert_eq!(calls(&primary).await.len(), 1);
    assert_eq!(usage_rows(&db, s.org).await, once);

    // a run that finds the answer stored only when it completes (simulated: the response looks
    // unfinished, its run's lease expired, when the job is delivered again): it calls the model,
    // but its answer is not stored and its usage not counted
    let keys = jobs::events::EventKeys::new(&settings.redis.prefix);
    let mut conn = redis_handle(&settings).conn().await.unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(keys.replay(job.response_id.into()))
        .arg(keys.fence(job.response_id.into()))
        .query_async(&mut conn)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE responses SET status = 'running', leased_until = now() - interval '1 second'
         WHERE id = $1",
    )
    .bind(job.response_id)
    .execute(&db.pool)
    .await
    .unwrap();
    bus.enqueue_envelope(&envelope).await.unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");
    assert_eq!(
        calls(&primary).await.len(),
        2,
        "the stalled run called the model"
    );
    let stored = answers(&db, job.response_id.into()).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].content, "one answer");
    assert_eq!(response(&db, job.response_id.into()).await.0, "completed");
    assert_eq!(usage_rows(&db, s.org).await, once, "counted once");

    // another turn of the same org on the same day adds to the same row
    FakeClient::shared()
        .script(&primary, vec![Behaviour::reply_tokens(&["more"])])
        .await
        .unwrap();
    let second = turn(&db, &s, "and now?").await;
    bus.enqueue(second.clone()).await.unwrap();
    drain(&db, &settings).await;
    let m = &answers(&db, second.response_id.into()).await[0];
    let both = usage_rows(&db, s.org).await;
    let requests: i64 = both.iter().map(|r| r.requests).sum();
    let completion_sum: i64 = both.iter().map(|r| r.completion_tokens).sum();
    assert_eq!(requests, 2, "{both:?}");
    assert_eq!(
        completion_sum,
        completion + i64::from(m.completion_tokens.unwrap())
    );
}

#[tokio::test]
async fn a_worker_killed_mid_answer_is_replaced_and_the_answer_restarts() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = settings(&db, &redis, &[]);
    let s = setup(&db).await;
    let (primary, fallback) = org_models(&db, &s).await;
    let words: Vec<String> = (1..=12).map(|i| format!("w{i} ")).collect();
    let full: String = words.concat();
    let slow = Behaviour::Reply {
        text: full.clone(),
        tokens: Some(words),
        first_token_delay_ms: 0,
        token_delay_ms: 250,
    };
    FakeClient::shared()
        .script(&primary, vec![slow.clone(), slow])
        .await
        .unwrap();
    // a short visibility timeout (which must exceed the longest model call), so the lost job is
    // reclaimed soon; the 3 s answer stays well inside it
    let overlay =
        "[litellm]\nrequest_timeout_secs = 5\n[queues.chat]\nvisibility_timeout_secs = 6\n";
    let bin = env!("CARGO_BIN_EXE_worker");
    let spawn = || {
        let mut cmd = command_with(bin, &db, &redis, overlay);
        for name in ["LITELLM_BASE_URL", "LITELLM_API_KEY"] {
            cmd.env(name, testkit::env::require(name));
        }
        cmd.env("WORKER_CONCURRENCY", "2");
        cmd.spawn().unwrap()
    };
    let mut a = spawn();
    let a_lines = lines(&mut a);
    wait_for(&a_lines, "worker ready", Duration::from_secs(20));

    let job = turn(&db, &s, "hello").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    let hub = EventHub::new(redis_handle(&settings));
    eventually(
        "A streamed a few tokens",
        Duration::from_secs(20),
        || async {
            hub.replay(job.response_id.into(), None)
                .await
                .unwrap()
                .len()
                >= 3
        },
    )
    .await;
    a.kill().unwrap(); // SIGKILL, mid-answer
    a.wait().unwrap();

    let mut b = spawn();
    let b_lines = lines(&mut b);
    wait_for(&b_lines, "worker ready", Duration::from_secs(20));
    let evs = LiveHub::start(&settings)
        .await
        .events(job.response_id.into(), Duration::from_secs(40))
        .await;
    b.kill().ok();
    b.wait().ok();
    let evs = evs.unwrap_or_else(|| {
        let logs: Vec<String> = b_lines.try_iter().collect();
        panic!("no terminal event within 40 s; B logged: {logs:#?}")
    });

    let restart = evs
        .iter()
        .position(|e| matches!(e, ResponseEvent::ResponseRestarted { .. }))
        .unwrap_or_else(|| panic!("no response.restarted: {evs:?}"));
    assert_eq!(
        evs[restart],
        ResponseEvent::ResponseRestarted {
            reason: "worker_lost".into()
        }
    );
    let before = tokens(&evs[..restart]);
    assert!(
        !before.is_empty() && before.len() < full.len(),
        "A was cut mid-answer: {before:?}"
    );
    assert_eq!(
        tokens(&evs[restart..]),
        full,
        "the whole answer after the restart"
    );
    let Some(ResponseEvent::MessageCompleted { message, .. }) = evs.last() else {
        panic!("{evs:?}");
    };
    assert_eq!(message["content"], json!(full));
    let stored = answers(&db, job.response_id.into()).await;
    assert_eq!(stored.len(), 1, "exactly one assistant message");
    assert_eq!(stored[0].content, full);
    let (status, _, starts) = response(&db, job.response_id.into()).await;
    assert_eq!((status.as_str(), starts), ("completed", 2));
    assert_eq!(calls(&primary).await.len(), 2);
    assert!(calls(&fallback).await.is_empty());
}

#[tokio::test]
async fn a_job_that_can_never_run_ends_the_turn_with_an_error_before_dying() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = settings(&db, &redis, &[]);
    let s = setup(&db).await;
    let (primary, _) = org_models(&db, &s).await;
    let mut job = turn(&db, &s, "hello").await;
    job.message_id = Uuid::now_v7().into(); // not the message its response answers
    let bus = bus_for(&settings);
    bus.enqueue(job.clone()).await.unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!(report.dead, 1, "an operator sees it: {report:?}");

    let evs = events(&settings, job.response_id.into()).await;
    assert_eq!(error_code(&evs), Some("internal_error"), "{evs:?}");
    let (status, code, _) = response(&db, job.response_id.into()).await;
    assert_eq!(
        (status.as_str(), code.as_deref()),
        ("failed", Some("internal_error"))
    );
    assert!(calls(&primary).await.is_empty());
}

#[tokio::test]
async fn no_fallback_call_when_the_fallback_is_the_primary() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = settings(&db, &redis, &[]);
    let s = setup(&db).await;
    let model = unique_model("only");
    conv::set_org_models(&db.pool, s.org, &via_litellm(&model), &via_litellm(&model))
        .await
        .unwrap();
    FakeClient::shared()
        .set_default(&model, Behaviour::status(503))
        .await
        .unwrap();
    let job = turn(&db, &s, "hello").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    drain(&db, &settings).await;

    let evs = events(&settings, job.response_id.into()).await;
    assert_eq!(error_code(&evs), Some("model_unavailable"), "{evs:?}");
    assert_eq!(
        calls(&model).await.len(),
        1,
        "the same model is not tried twice"
    );
}

#[tokio::test]
async fn a_superseded_run_publishes_and_stores_nothing_more() {
    // A run streams slowly; meanwhile another run takes the response over (as after its lease
    // expired: the run number moves on and the fence with it). The first run's next token is
    // refused, it stops without storing an answer or failing the response, and its job ends.
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let upstream = FakeUpstream::start().await.unwrap();
    let settings = settings(&db, &redis, &[("LITELLM_BASE_URL", &upstream.url())]);
    let s = setup(&db).await;
    let (primary, fallback) = (unique_model("primary"), unique_model("fallback"));
    conv::set_org_models(&db.pool, s.org, &primary, &fallback)
        .await
        .unwrap();
    let words: Vec<String> = (1..=10).map(|i| format!("w{i} ")).collect();
    upstream
        .client()
        .script(
            &primary,
            vec![Behaviour::Reply {
                text: words.concat(),
                tokens: Some(words.clone()),
                first_token_delay_ms: 0,
                token_delay_ms: 300,
            }],
        )
        .await
        .unwrap();
    let job = turn(&db, &s, "hello").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    let worker = chat_worker(&db, &settings);
    let run = tokio::spawn(async move { worker.drain_until_empty(Duration::from_secs(60)).await });
    let hub = EventHub::new(redis_handle(&settings));
    eventually(
        "the run streamed two tokens",
        Duration::from_secs(20),
        || async { tokens(&replayed(&hub, job.response_id.into()).await).len() >= "w1 w2 ".len() },
    )
    .await;
    // the takeover: run 2 holds the response (and its fence) now
    let run_no: i32 = sqlx::query_scalar(
        "UPDATE responses SET run = run + 1, leased_until = now() + interval '1 minute'
         WHERE id = $1 RETURNING run",
    )
    .bind(job.response_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(run_no, 2);
    let publisher = jobs::events::EventPublisher::new(redis_handle(&settings), &settings.events);
    assert_eq!(publisher.fence(job.response_id.into(), 2).await.unwrap(), 2);
    let seen = tokens(&replayed(&hub, job.response_id.into()).await);

    let report = run.await.unwrap().expect("the chat queue empties");
    assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");
    let after = replayed(&hub, job.response_id.into()).await;
    assert!(
        tokens(&after).len() <= seen.len() + "w10 ".len(),
        "at most the publish in flight at the takeover went out: {seen:?} then {after:?}"
    );
    assert!(tokens(&after).len() < words.concat().len(), "{after:?}");
    assert!(
        !after.iter().any(ResponseEvent::is_terminal),
        "the superseded run ended nothing: {after:?}"
    );
    assert!(
        answers(&db, job.response_id.into()).await.is_empty(),
        "no answer stored"
    );
    let (status, code, _) = response(&db, job.response_id.into()).await;
    assert_eq!((status.as_str(), code), ("running", None), "still run 2's");
    assert_eq!(calls_of(&upstream, &primary).await, 1);
}

/// The replay stream of a response as it is now.
async fn replayed(hub: &EventHub, response_id: Uuid) -> Vec<ResponseEvent> {
    hub.replay(response_id, None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect()
}

async fn calls_of(upstream: &FakeUpstream, model: &str) -> usize {
    upstream.client().requests(model).await.unwrap().len()
}

#[tokio::test]
async fn rate_limit_waits_use_up_no_attempt() {
    // More 429s than the chat queue has attempts, all within the maximum wait: the turn waits
    // them out and answers (waiting is not failing).
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let mut settings = settings(&db, &redis, &[]);
    settings.queues.chat.max_attempts = 2;
    let s = setup(&db).await;
    let (primary, fallback) = org_models(&db, &s).await;
    FakeClient::shared()
        .script(
            &primary,
            vec![
                Behaviour::rate_limited(1),
                Behaviour::rate_limited(1),
                Behaviour::rate_limited(1),
                Behaviour::reply("patience"),
            ],
        )
        .await
        .unwrap();
    let job = turn(&db, &s, "hello").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");
    let evs = events(&settings, job.response_id.into()).await;
    assert_eq!(tokens(&evs), "patience", "{evs:?}");
    assert_eq!(calls(&primary).await.len(), 4);
    assert!(calls(&fallback).await.is_empty());
}

#[tokio::test]
async fn a_response_whose_job_vanished_from_redis_completes_after_the_reconciler_interval() {
    // A committed turn whose job Redis lost (a restart without persistence, an API process
    // killed between its commit and its enqueue): the scheduler's reconciler, in the real
    // scheduler process, enqueues it again and a worker answers it.
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = settings(&db, &redis, &[]);
    let s = setup(&db).await;
    let (primary, _) = org_models(&db, &s).await;
    FakeClient::shared()
        .script(&primary, vec![Behaviour::reply("found again")])
        .await
        .unwrap();
    let mut c = db.pool.acquire().await.unwrap();
    let turn = conv::NewTurn {
        user_id: s.user,
        conversation_id: s.conversation,
        content: "hello",
        message_id: Uuid::now_v7(),
        response_id: Uuid::now_v7(),
        job_id: Uuid::now_v7(),
        key: None,
    };
    let Some(conv::TurnStarted::New(response)) = conv::start_own_turn(&mut c, &turn).await.unwrap()
    else {
        panic!("a new turn");
    };
    drop(c);
    // (its job never reached the bus)
    let worker = chat_worker(&db, &settings);
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { worker.run(stop).await }
    });
    let mut scheduler = crate::process::command(env!("CARGO_BIN_EXE_scheduler"), &db, &redis)
        .env("RECONCILE_INTERVAL_MS", "200")
        .env("RECONCILE_GRACE_SECS", "1")
        .spawn()
        .unwrap();
    let logs = lines(&mut scheduler);
    wait_for(&logs, "scheduler ready", Duration::from_secs(20));
    eventually(
        "the lost turn is answered",
        Duration::from_secs(30),
        || async { !answers(&db, response.id).await.is_empty() },
    )
    .await;
    scheduler.kill().ok();
    scheduler.wait().ok();
    stop.cancel();
    running.await.unwrap().unwrap();
    let stored = answers(&db, response.id).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].content, "found again");
    let recoveries: i32 = sqlx::query_scalar("SELECT recoveries FROM responses WHERE id = $1")
        .bind(response.id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(recoveries, 1, "re-enqueued once");
    assert_eq!(calls(&primary).await.len(), 1);
}

#[tokio::test]
async fn a_response_that_keeps_losing_its_job_fails_once_with_an_error_event() {
    // Past MAX_RECOVERIES re-enqueues the reconciler gives up: the response fails with
    // internal_error and its client is told, once.
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = settings(&db, &redis, &[("MAX_RECOVERIES", "2")]);
    let s = setup(&db).await;
    let job = turn(&db, &s, "hello").await;
    // its run died (an expired lease), after two recoveries already
    sqlx::query(
        "UPDATE responses SET status = 'running', run = 3, recoveries = 2, job_id = $2,
                              leased_until = now() - interval '1 second'
         WHERE id = $1",
    )
    .bind(job.response_id)
    .bind(Uuid::now_v7())
    .execute(&db.pool)
    .await
    .unwrap();
    let reconciler = workers::reconciler::Reconciler::new(
        db.pool.clone(),
        bus_for(&settings),
        redis_handle(&settings),
        &settings,
        "test".into(),
    );
    let first = reconciler.pass().await;
    assert_eq!(
        (first.responses, first.responses_failed),
        (0, 1),
        "{first:?}"
    );
    assert_eq!(reconciler.pass().await.responses_failed, 0, "once");
    let (status, code, _) = response(&db, job.response_id.into()).await;
    assert_eq!(
        (status.as_str(), code.as_deref()),
        ("failed", Some("internal_error"))
    );
    let evs = events(&settings, job.response_id.into()).await;
    assert_eq!(evs.iter().filter(|e| e.is_terminal()).count(), 1, "{evs:?}");
    assert_eq!(error_code(&evs), Some("internal_error"));
}
