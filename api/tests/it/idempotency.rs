//! `Idempotency-Key` on `POST /v1/conversations/{id}/messages`: a retry returns the same turn
//! (JSON: the same answer, or 202 with its ids while it runs; SSE: the same response's events
//! from the start, with their original ids); the same key with another body is a 409.

use std::time::Duration;

use serde_json::{Value, json};

use crate::chat_helpers::{FakeWorker, SseReader};
use crate::helpers::{Resp, TestApp, email, spawn_app, spawn_app_with};

async fn post_keyed(app: &TestApp, token: &str, conv: &str, key: &str, body: Value) -> Resp {
    let r = app
        .http
        .post(app.url(&format!("/v1/conversations/{conv}/messages")))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null);
    Resp {
        status,
        body,
        headers,
    }
}

#[tokio::test]
async fn a_retried_json_turn_returns_the_same_turn_and_writes_nothing_twice() {
    let app = spawn_app_with(&[("JSON_WAIT_SECS", "1")]).await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    let mut worker = FakeWorker::new(&app).await;
    let body = json!({"content": "the answer?"});

    // the first request times out waiting (202): the turn runs
    let first = post_keyed(&app, &user.token, &conv, "k-1", body.clone()).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let (rid, mid) = (&first.body["response_id"], &first.body["message_id"]);
    // its retry while it runs: 202 with the same ids, no second turn, no second job
    let again = post_keyed(&app, &user.token, &conv, "k-1", body.clone()).await;
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(
        (&again.body["response_id"], &again.body["message_id"]),
        (rid, mid)
    );
    let job = worker.next_job().await;
    assert_eq!(job.response_id.to_string(), rid.as_str().unwrap());
    assert!(
        worker
            .try_next_job(Duration::from_millis(300))
            .await
            .is_none(),
        "one job for one turn"
    );
    worker.answer(&job, &["forty", "-two"]).await;
    // once answered: the same answer, still one user message and one answer
    let done = post_keyed(&app, &user.token, &conv, "k-1", body.clone()).await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(done.body["message"]["content"], "forty-two");
    assert_eq!(done.body["message"]["response_id"], *rid);
    assert_eq!(app.count("responses").await, 1);
    assert_eq!(app.count("messages").await, 2);

    // the same key with another body is a conflict; another key is another turn
    let other = post_keyed(&app, &user.token, &conv, "k-1", json!({"content": "else"})).await;
    assert_eq!(other.status, 409, "{}", other.body);
    assert_eq!(other.body["error"]["code"], "conflict");
    assert!(
        other.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key")
    );
    let fresh = post_keyed(&app, &user.token, &conv, "k-2", body).await;
    assert_eq!(fresh.status, 202, "{}", fresh.body);
    assert_ne!(fresh.body["response_id"], *rid);
    assert_eq!(app.count("responses").await, 2);
}

#[tokio::test]
async fn a_retried_sse_turn_replays_the_same_events_with_their_ids() {
    let app = spawn_app().await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    let mut worker = FakeWorker::new(&app).await;
    let answering = tokio::spawn(async move {
        let job = worker.next_job().await;
        worker.answer(&job, &["one ", "two"]).await;
    });
    let body = json!({"content": "count", "stream": true});
    let stream = |key: &'static str| {
        app.http
            .post(app.url(&format!("/v1/conversations/{conv}/messages")))
            .bearer_auth(&user.token)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };
    let first = SseReader::new(stream("s-1").await.unwrap()).rest().await;
    answering.await.unwrap();
    let again = SseReader::new(stream("s-1").await.unwrap()).rest().await;
    let ids = |f: &[crate::chat_helpers::Frame]| -> Vec<(String, String)> {
        f.iter()
            .map(|e| (e.id().to_owned(), e.name().to_owned()))
            .collect()
    };
    assert_eq!(
        ids(&again),
        ids(&first),
        "the same events with the same ids"
    );
    assert_eq!(
        first.iter().map(|f| f.name()).collect::<Vec<_>>(),
        ["message.created", "token", "token", "message.completed"]
    );
    assert_eq!(app.count("responses").await, 1);
}

#[tokio::test]
async fn idempotency_keys_are_per_user_and_validated() {
    let app = spawn_app().await;
    let alice = app.register(&email("a"), "A").await;
    let bob = app.register(&email("b"), "B").await;
    let (ca, cb) = (
        app.conversation(&alice.token).await,
        app.conversation(&bob.token).await,
    );
    let mut worker = FakeWorker::new(&app).await;
    let body = json!({"content": "hi", "stream": false});
    let answering = tokio::spawn(async move {
        for _ in 0..2 {
            let job = worker.next_job().await;
            worker.answer(&job, &["ok"]).await;
        }
    });
    // the same key by two users: two turns
    let a = post_keyed(&app, &alice.token, &ca, "shared", body.clone()).await;
    let b = post_keyed(&app, &bob.token, &cb, "shared", body.clone()).await;
    answering.await.unwrap();
    assert_eq!((a.status, b.status), (200, 200), "{} {}", a.body, b.body);
    assert_ne!(a.body["message"]["id"], b.body["message"]["id"]);
    // bob cannot use alice's key to reach her conversation (another request: 409 at most,
    // never her turn)
    let probe = post_keyed(&app, &bob.token, &ca, "shared", body.clone()).await;
    assert_eq!(probe.status, 409, "{}", probe.body);
    for bad in ["", &"k".repeat(256), "with space", "tab\there"] {
        let r = app
            .http
            .post(app.url(&format!("/v1/conversations/{ca}/messages")))
            .bearer_auth(&alice.token)
            .header("Idempotency-Key", bad)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{bad:?}");
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("Idempotency-Key"),
            "{v}"
        );
    }
    assert_eq!(app.count("responses").await, 2);
}

#[tokio::test]
async fn a_finished_turn_whose_terminal_event_was_lost_still_ends_for_its_follower() {
    // The worker committed the answer and died before publishing `message.completed`: a client
    // following the response gets it, sent from what is stored, not a stream that never ends.
    let app = spawn_app_with(&[("JSON_WAIT_SECS", "1")]).await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    let mut worker = FakeWorker::new(&app).await;
    let r = post_keyed(&app, &user.token, &conv, "k", json!({"content": "q"})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let rid = r.body["response_id"].as_str().unwrap().to_owned();
    let job = worker.next_job().await;
    let mut tx = app.db.pool.begin().await.unwrap();
    testkit::turns::answer(
        &mut tx,
        job.response_id.into(),
        &store::conversations::Answer {
            content: "stored only",
            model: "m",
            prompt_tokens: None,
            completion_tokens: None,
            latency_ms: 1,
            citations: json!([]),
            sources: Default::default(),
        },
    )
    .await;
    tx.commit().await.unwrap();
    let frames = SseReader::new(app.events(&user.token, &conv, &rid, None).await)
        .rest()
        .await;
    let names: Vec<&str> = frames.iter().map(|f| f.name()).collect();
    assert_eq!(names, ["message.created", "message.completed"]);
    assert_eq!(frames[1].data()["message"]["content"], "stored only");
    // and once only: a second follower gets the same events
    let again = SseReader::new(app.events(&user.token, &conv, &rid, None).await)
        .rest()
        .await;
    assert_eq!(
        again.iter().map(|f| f.id().to_owned()).collect::<Vec<_>>(),
        frames.iter().map(|f| f.id().to_owned()).collect::<Vec<_>>()
    );
}
