//! A chat turn through the API, with a fake worker standing in for the real one: SSE relay,
//! resumption with Last-Event-ID, JSON mode, refused generation parameters, the per-user
//! limit, keep-alives and shutdown.

use std::time::Duration;

use jobs::events::{EventId, ResponseEvent};
use serde_json::json;

use crate::chat_helpers::{FakeWorker, Frame, SseReader};
use crate::helpers::{TestApp, email, spawn_app, spawn_app_with};

fn ids_increase(frames: &[Frame]) {
    let ids: Vec<EventId> = frames
        .iter()
        .map(|f| EventId::parse(f.id()).expect("every event has an id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
}

fn names(frames: &[Frame]) -> Vec<&str> {
    frames.iter().map(Frame::name).collect()
}

async fn messages(app: &TestApp, token: &str, conversation: &str) -> serde_json::Value {
    let r = app
        .get(&format!("/v1/conversations/{conversation}/messages"), token)
        .await;
    assert_eq!(r.status, 200);
    r.body["items"].clone()
}

#[tokio::test]
async fn generation_parameters_are_refused_and_nothing_is_written() {
    let app = spawn_app().await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    let path = format!("/v1/conversations/{conv}/messages");
    let mut worker = FakeWorker::new(&app).await;
    for (field, value) in [
        ("temperature", json!(1.5)),
        ("max_tokens", json!(10)),
        ("model", json!("gpt-4")),
        ("top_p", json!(0.5)),
        ("stop", json!(["x"])),
        ("seed", json!(1)),
        ("tools", json!([])),
        ("fallback_model", json!("x")),
        ("max_completion_tokens", json!(5)),
    ] {
        let mut body = json!({"content": "hello"});
        body[field] = value;
        let r = app.post(&path, &user.token, body).await;
        assert_eq!(r.status, 400, "{field}: {}", r.body);
        assert_eq!(r.body["error"]["code"], "invalid_input");
        let msg = r.body["error"]["message"].as_str().unwrap();
        assert!(msg.starts_with(&format!("{field}:")), "{msg}");
        assert!(msg.contains("fixed by the system configuration"), "{msg}");
    }
    for (body, field) in [
        (json!({"content": "hi", "colour": 1}), "colour"),
        (json!({}), "content"),
        (json!({"content": "   "}), "content"),
        (json!({"content": 5}), "content"),
        (json!({"content": "x".repeat(40_000)}), "content"),
        (json!({"content": "hi", "stream": "yes"}), "stream"),
    ] {
        let r = app.post(&path, &user.token, body).await;
        assert_eq!(r.status, 400, "{field}: {}", r.body);
        let msg = r.body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(field), "{field}: {msg}");
    }
    assert_eq!(app.count("messages").await, 0);
    assert_eq!(app.count("responses").await, 0);
    assert!(
        worker
            .try_next_job(Duration::from_millis(200))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn sse_relays_the_turn_in_order_and_ends() {
    let app = spawn_app().await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    let mut worker = FakeWorker::new(&app).await;
    let mut sse = app.post_stream(&user.token, &conv, "hello there").await;
    let first = sse.next_event().await.unwrap();
    assert_eq!(first.name(), "message.created");
    let response_id = first.data()["response_id"].as_str().unwrap().to_owned();

    let job = worker.next_job().await;
    assert_eq!(job.response_id.to_string(), response_id);
    assert_eq!(job.conversation_id.to_string(), conv);
    assert_eq!(job.user_id.to_string(), user.user_id);
    assert_eq!(first.data()["message_id"], job.message_id.to_string());
    worker.answer(&job, &["Hel", "lo", "!"]).await;

    let mut frames = vec![first];
    frames.extend(sse.rest().await);
    assert_eq!(
        names(&frames),
        [
            "message.created",
            "token",
            "token",
            "token",
            "message.completed"
        ]
    );
    ids_increase(&frames);
    assert_eq!(frames[1].data(), &json!({"text": "Hel"}));
    assert_eq!(frames[4].data()["message"]["content"], "Hello!");
    assert_eq!(frames[4].data()["model"], "local-chat");

    let items = messages(&app, &user.token, &conv).await;
    assert_eq!(items.as_array().unwrap().len(), 2);
    assert_eq!(items[0]["role"], "user");
    assert_eq!(items[0]["content"], "hello there");
    assert_eq!(items[1]["role"], "assistant");
    assert_eq!(items[1]["content"], "Hello!");
    assert_eq!(items[1]["model"], "local-chat");
    assert_eq!(items[1]["response_id"], response_id.as_str());
    assert_eq!(items[1]["usage"]["total_tokens"], 10);
}

#[tokio::test]
async fn accept_header_selects_sse() {
    let app = spawn_app().await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    let mut worker = FakeWorker::new(&app).await;
    let r = app
        .http
        .post(app.url(&format!("/v1/conversations/{conv}/messages")))
        .bearer_auth(&user.token)
        .header("Accept", "application/json, text/event-stream")
        .json(&json!({"content": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut sse = SseReader::new(r);
    let job = worker.next_job().await;
    worker.answer(&job, &["ok"]).await;
    let frames = sse.rest().await;
    assert_eq!(
        names(&frames),
        ["message.created", "token", "message.completed"]
    );
}

#[tokio::test]
async fn resume_after_disconnect_loses_and_repeats_nothing() {
    let app = spawn_app().await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    let mut worker = FakeWorker::new(&app).await;
    let mut sse = app.post_stream(&user.token, &conv, "tell me").await;
    let job = worker.next_job().await;
    worker.tokens(job.response_id.into(), &["a", "b"]).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(sse.next_event().await.unwrap());
    }
    assert_eq!(names(&seen), ["message.created", "token", "token"]);
    drop(sse); // the client goes away mid-answer

    worker.tokens(job.response_id.into(), &["c", "d"]).await;
    worker.complete(&job, "abcd").await;

    let rid = job.response_id.to_string();
    let last = seen[2].id().to_owned();
    let r = app.events(&user.token, &conv, &rid, Some(&last)).await;
    assert_eq!(r.status().as_u16(), 200);
    let rest = SseReader::new(r).rest().await;
    assert_eq!(names(&rest), ["token", "token", "message.completed"]);
    assert_eq!(rest[0].data()["text"], "c");
    assert_eq!(rest[1].data()["text"], "d");

    let mut all = seen.clone();
    all.extend(rest.iter().cloned());
    ids_increase(&all);

    // after the end: the whole stream again, with the same ids
    let r = app.events(&user.token, &conv, &rid, None).await;
    let replay = SseReader::new(r).rest().await;
    let replay_ids: Vec<&str> = replay.iter().map(Frame::id).collect();
    let all_ids: Vec<&str> = all.iter().map(Frame::id).collect();
    assert_eq!(replay_ids, all_ids);
    assert_eq!(replay[0].name(), "message.created");

    // resuming after the last event: an empty stream that ends
    let last = all.last().unwrap().id().to_owned();
    let r = app.events(&user.token, &conv, &rid, Some(&last)).await;
    assert!(SseReader::new(r).rest().await.is_empty());
}

/// Two API processes on one PostgreSQL and one Redis (or cluster): a stream started on one
/// resumes on the other with `Last-Event-ID`, and the rest of the answer arrives there live.
#[tokio::test]
async fn a_stream_started_on_one_api_process_resumes_live_on_another() {
    let app = spawn_app().await;
    let other = api::Application::build(app.settings.clone())
        .await
        .expect("the second API builds");
    let other_addr = other.addr().to_string();
    let other_stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(other.run_until_stopped(other_stop.clone()));
    let _stop_other = other_stop.clone().drop_guard();

    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    let mut worker = FakeWorker::new(&app).await;
    let mut sse = app.post_stream(&user.token, &conv, "tell me").await;
    let job = worker.next_job().await;
    worker.tokens(job.response_id.into(), &["a"]).await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(sse.next_event().await.unwrap());
    }
    assert_eq!(names(&seen), ["message.created", "token"]);
    drop(sse);

    // resume on the other process before the rest is published
    let rid = job.response_id.to_string();
    let r = app
        .http
        .get(format!(
            "http://{other_addr}/v1/conversations/{conv}/responses/{rid}/events"
        ))
        .bearer_auth(&user.token)
        .header("Last-Event-ID", seen[1].id())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut resumed = SseReader::new(r);
    // let the other process attach (subscribe, read the replay) so the rest arrives live there
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.tokens(job.response_id.into(), &["b", "c"]).await;
    worker.complete(&job, "abc").await;
    let rest = resumed.rest().await;
    assert_eq!(names(&rest), ["token", "token", "message.completed"]);
    assert_eq!(rest[0].data()["text"], "b");
    assert_eq!(rest[1].data()["text"], "c");
    let mut all = seen.clone();
    all.extend(rest.iter().cloned());
    ids_increase(&all);
}

#[tokio::test]
async fn an_early_disconnect_does_not_stop_the_answer() {
    let app = spawn_app().await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    let mut worker = FakeWorker::new(&app).await;
    let mut sse = app.post_stream(&user.token, &conv, "hello").await;
    let created = sse.next_event().await.unwrap();
    drop(sse);
    let job = worker.next_job().await;
    worker.answer(&job, &["still ", "here"]).await;

    let items = messages(&app, &user.token, &conv).await;
    assert_eq!(items[1]["content"], "still here");
    let r = app
        .events(&user.token, &conv, &job.response_id.to_string(), None)
        .await;
    let frames = SseReader::new(r).rest().await;
    assert_eq!(
        names(&frames),
        ["message.created", "token", "token", "message.completed"]
    );
    assert_eq!(frames[0].id(), created.id());
}

#[tokio::test]
async fn json_mode_answers_with_the_message() {
    let app = spawn_app().await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    let mut worker = FakeWorker::new(&app).await;
    let answering = tokio::spawn(async move {
        let job = worker.next_job().await;
        worker.answer(&job, &["forty", "-two"]).await;
    });
    let r = app
        .post(
            &format!("/v1/conversations/{conv}/messages"),
            &user.token,
            json!({"content": "the answer?", "stream": false}),
        )
        .await;
    answering.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["message"]["role"], "assistant");
    assert_eq!(r.body["message"]["content"], "forty-two");
    assert_eq!(r.body["message"]["model"], "local-chat");
    assert!(r.body["message"]["id"].is_string());
    assert!(r.body["message"]["created_at"].is_string());
    assert_eq!(r.body["actions"], json!([]));
}

/// JSON mode: a model failure is 502 with the worker's code; our own failure is 503.
#[tokio::test]
async fn json_mode_failures_are_502_for_the_model_and_503_for_ours() {
    let app = spawn_app().await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    for (code, status) in [("model_unavailable", 502), ("internal_error", 503)] {
        let mut worker = FakeWorker::new(&app).await;
        let failing = tokio::spawn(async move {
            let job = worker.next_job().await;
            worker.fail(&job, code.parse().unwrap()).await;
        });
        let r = app
            .post(
                &format!("/v1/conversations/{conv}/messages"),
                &user.token,
                json!({"content": "hi"}),
            )
            .await;
        failing.await.unwrap();
        assert_eq!(r.status, status, "{code}: {}", r.body);
        assert_eq!(r.body["error"]["code"], code);
        assert!(r.body["error"]["message"].is_string());
    }
}

#[tokio::test]
async fn json_mode_answers_202_when_the_wait_runs_out() {
    let app = spawn_app_with(&[("JSON_WAIT_SECS", "1")]).await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    let mut worker = FakeWorker::new(&app).await;
    let r = app
        .post(
            &format!("/v1/conversations/{conv}/messages"),
            &user.token,
            json!({"content": "slow one"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let rid = r.body["response_id"].as_str().unwrap().to_owned();
    // the answer arrives later and is there to follow
    let job = worker.next_job().await;
    assert_eq!(job.response_id.to_string(), rid);
    worker.answer(&job, &["late"]).await;
    let frames = SseReader::new(app.events(&user.token, &conv, &rid, None).await)
        .rest()
        .await;
    assert_eq!(
        names(&frames),
        ["message.created", "token", "message.completed"]
    );
}

#[tokio::test]
async fn posting_is_rate_limited_per_user() {
    let app = spawn_app_with(&[("MESSAGE_RATE_LIMIT", "2")]).await;
    let user = app.register(&email("u"), "Org").await;
    let other = app.register(&email("o"), "Org 2").await;
    let conv = app.conversation(&user.token).await;
    for _ in 0..2 {
        let sse = app.post_stream(&user.token, &conv, "hi").await;
        drop(sse);
    }
    let r = app
        .post(
            &format!("/v1/conversations/{conv}/messages"),
            &user.token,
            json!({"content": "one too many", "stream": true}),
        )
        .await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "rate_limited");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(app.count("responses").await, 2);
    // another user is not affected
    let other_conv = app.conversation(&other.token).await;
    drop(app.post_stream(&other.token, &other_conv, "hi").await);
}

#[tokio::test]
async fn keep_alive_comments_while_waiting() {
    let app = spawn_app_with(&[("SSE_KEEP_ALIVE_SECS", "1")]).await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    let mut sse = app.post_stream(&user.token, &conv, "hi").await;
    let f = sse.next_frame(Duration::from_secs(5)).await.unwrap();
    assert_eq!(f.name(), "message.created");
    let f = sse.next_frame(Duration::from_secs(5)).await.unwrap();
    assert!(matches!(f, Frame::Comment), "{f:?}");

    let gauge = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("sse_open_streams "))
            .map(|v| v.trim().parse::<f64>().unwrap())
    };
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    assert_eq!(gauge(&text), Some(1.0), "{text}");
    drop(sse);
    let mut closed = false;
    for _ in 0..50 {
        let text = app
            .http
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if gauge(&text) == Some(0.0) {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed, "the gauge went back to 0 when the client left");
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let app = spawn_app().await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    let mut sse = app.post_stream(&user.token, &conv, "hi").await;
    assert_eq!(sse.next_event().await.unwrap().name(), "message.created");
    app.shutdown.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while sse.next_frame(Duration::from_secs(5)).await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the stream ended at shutdown");
}

#[tokio::test]
async fn events_endpoint_checks_owner_and_last_event_id() {
    let app = spawn_app().await;
    let user = app.register(&email("u"), "Org").await;
    let colleague = app.add_member(&user, &email("c"), "admin").await;
    let conv = app.conversation(&user.token).await;
    let mut worker = FakeWorker::new(&app).await;
    drop(app.post_stream(&user.token, &conv, "hi").await);
    let job = worker.next_job().await;
    worker.answer(&job, &["x"]).await;
    let rid = job.response_id.to_string();

    let r = app.events(&colleague.token, &conv, &rid, None).await;
    assert_eq!(r.status().as_u16(), 404);
    let r = app
        .events(&user.token, &conv, &uuid::Uuid::now_v7().to_string(), None)
        .await;
    assert_eq!(r.status().as_u16(), 404);
    let other_conv = app.conversation(&user.token).await;
    let r = app.events(&user.token, &other_conv, &rid, None).await;
    assert_eq!(r.status().as_u16(), 404);

    let r = app
        .events(&user.token, &conv, &rid, Some("yesterday"))
        .await;
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Last-Event-ID")
    );
}

#[tokio::test]
async fn expired_events_are_rebuilt_from_the_stored_answer() {
    let app = spawn_app().await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    let mut worker = FakeWorker::new(&app).await;
    drop(app.post_stream(&user.token, &conv, "hi").await);
    let job = worker.next_job().await;
    worker.answer(&job, &["stored"]).await;
    // the retention window passes
    let mut conn = crate::redis_conn(&app.redis).await;
    let key = format!("{}:{{resp:{}}}:events", app.redis.prefix, job.response_id);
    let deleted: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted, 1);

    let rid = job.response_id.to_string();
    let frames = SseReader::new(app.events(&user.token, &conv, &rid, None).await)
        .rest()
        .await;
    assert_eq!(names(&frames), ["message.completed"]);
    assert_eq!(frames[0].data()["message"]["content"], "stored");
    assert!(EventId::parse(frames[0].id()).is_some());
    // resuming after that event: nothing more
    let again = SseReader::new(
        app.events(&user.token, &conv, &rid, Some(frames[0].id()))
            .await,
    )
    .rest()
    .await;
    assert!(again.is_empty());
}

#[tokio::test]
async fn the_openapi_document_describes_the_chat_endpoints() {
    let app = spawn_app().await;
    let r = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    let doc: serde_json::Value = r.json().await.unwrap();
    let paths = &doc["paths"];
    for p in [
        "/v1/conversations",
        "/v1/conversations/{id}",
        "/v1/conversations/{id}/messages",
        "/v1/conversations/{id}/responses/{response_id}/events",
        "/v1/orgs/{org_id}/settings/model",
    ] {
        assert!(paths.get(p).is_some(), "{p} missing");
    }
    let post = &paths["/v1/conversations/{id}/messages"]["post"];
    assert!(post["responses"]["200"]["content"]["text/event-stream"].is_object());
    assert!(post["security"].is_array());
    let events = &paths["/v1/conversations/{id}/responses/{response_id}/events"]["get"];
    assert!(events["responses"]["200"]["content"]["text/event-stream"].is_object());
    let _ = ResponseEvent::Token {
        text: String::new(),
    };
}

#[tokio::test]
async fn a_turn_that_cannot_be_enqueued_is_kept_and_enqueued_by_the_reconciler() {
    let app = spawn_app_with(&[("JSON_WAIT_SECS", "1")]).await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    // break the chat queue: its stream key holds a string, so XADD fails
    let redis = std::sync::Arc::new(jobs::RedisHandle::new(&app.settings.redis).unwrap());
    let bus = jobs::Bus::new(redis.clone(), &app.settings.queues);
    let mut conn = crate::redis_conn(&app.redis).await;
    for p in bus.parts(jobs::Queue::Chat) {
        let () = redis::cmd("SET")
            .arg(&bus.keys(p).stream)
            .arg("not a stream")
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    // the turn is committed with its job: accepted (202 with its ids), never lost
    let r = app
        .post(
            &format!("/v1/conversations/{conv}/messages"),
            &user.token,
            json!({"content": "hi"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let rid: uuid::Uuid = r.body["response_id"].as_str().unwrap().parse().unwrap();
    assert!(r.body["message_id"].is_string(), "{}", r.body);
    let (status, job): (String, Option<uuid::Uuid>) =
        sqlx::query_as("SELECT status, job_id FROM responses WHERE id = $1")
            .bind(rid)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(status, "queued");
    assert!(job.is_some());

    // Redis is fine again; the scheduler's reconciler finds the turn's job missing from the
    // bus (past the grace period) and enqueues it, once
    for p in bus.parts(jobs::Queue::Chat) {
        let _: i64 = redis::cmd("DEL")
            .arg(&bus.keys(p).stream)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE responses SET enqueued_at = now() - interval '1 minute'")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let reconciler = workers::reconciler::Reconciler::new(
        app.db.pool.clone(),
        bus.clone(),
        redis,
        &app.settings,
        "test".into(),
    );
    assert_eq!(reconciler.pass().await.responses, 1);
    assert_eq!(
        reconciler.pass().await.responses,
        0,
        "its job is on the bus"
    );
    let mut worker = FakeWorker::new(&app).await;
    let job = worker.next_job().await;
    assert_eq!(job.response_id, rid.into());
    worker.answer(&job, &["recovered"]).await;
    let frames = SseReader::new(app.events(&user.token, &conv, &rid.to_string(), None).await)
        .rest()
        .await;
    assert_eq!(
        names(&frames),
        ["message.created", "token", "message.completed"]
    );
}

#[tokio::test]
async fn messages_are_paginated_in_order() {
    let app = spawn_app().await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    let mut worker = FakeWorker::new(&app).await;
    for i in 0..2 {
        drop(app.post_stream(&user.token, &conv, &format!("q{i}")).await);
        let job = worker.next_job().await;
        worker.answer(&job, &[&format!("a{i}")]).await;
    }
    let mut contents = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/conversations/{conv}/messages?limit=3&cursor={c}"),
            None => format!("/v1/conversations/{conv}/messages?limit=3"),
        };
        let r = app.get(&path, &user.token).await;
        assert_eq!(r.status, 200, "{}", r.body);
        for m in r.body["items"].as_array().unwrap() {
            contents.push(m["content"].as_str().unwrap().to_owned());
            // nothing internal leaks
            let keys: Vec<&String> = m.as_object().unwrap().keys().collect();
            for k in &keys {
                assert!(
                    [
                        "id",
                        "role",
                        "content",
                        "model",
                        "created_at",
                        "response_id",
                        "usage",
                        "citations"
                    ]
                    .contains(&k.as_str()),
                    "{k}"
                );
            }
        }
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(contents, ["q0", "a0", "q1", "a1"]);
    let r = app
        .get(
            &format!("/v1/conversations/{conv}/messages?cursor=bogus"),
            &user.token,
        )
        .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn json_mode_wait_ends_at_shutdown_with_202() {
    let app = spawn_app().await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    let shutdown = app.shutdown.clone();
    let stopping = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        shutdown.cancel();
    });
    let started = std::time::Instant::now();
    let r = app
        .post(
            &format!("/v1/conversations/{conv}/messages"),
            &user.token,
            json!({"content": "hi"}),
        )
        .await;
    stopping.await.unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(r.body["response_id"].is_string());
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// `SSE_MAX_STREAMS_PER_USER`: past the cap, POST messages in SSE mode and GET .../events
/// answer 429 `too_many_streams` with `Retry-After` (nothing written); other users are not
/// affected; a closed stream gives its place back.
#[tokio::test]
async fn open_event_streams_are_capped_per_user() {
    let app = spawn_app_with(&[
        ("SSE_MAX_STREAMS_PER_USER", "2"),
        ("SSE_KEEP_ALIVE_SECS", "1"),
    ])
    .await;
    let user = app.register(&email("u"), "Org").await;
    let other = app.register(&email("o"), "Other").await;
    let conv = app.conversation(&user.token).await;
    // no worker: both answers stay open
    let mut first = app.post_stream(&user.token, &conv, "one").await;
    let created = first.next_event().await.unwrap();
    let rid = created.data()["response_id"].as_str().unwrap().to_owned();
    let mut second = app.events(&user.token, &conv, &rid, None).await;
    assert_eq!(second.status().as_u16(), 200);
    let _ = second.chunk().await.unwrap();

    let before = app.count("messages").await;
    let r = app
        .http
        .post(app.url(&format!("/v1/conversations/{conv}/messages")))
        .bearer_auth(&user.token)
        .json(&json!({"content": "three", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_streams");
    assert!(body["error"]["message"].as_str().unwrap().contains("2"));
    assert_eq!(app.count("messages").await, before, "nothing written");

    let r = app.events(&user.token, &conv, &rid, None).await;
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().contains_key("retry-after"));

    // another user is not affected
    let other_conv = app.conversation(&other.token).await;
    let mut theirs = app.post_stream(&other.token, &other_conv, "mine").await;
    assert_eq!(theirs.next_event().await.unwrap().name(), "message.created");

    // a closed stream frees its place (noticed at the next keep-alive write)
    drop(first);
    let mut freed = false;
    for _ in 0..50 {
        let r = app.events(&user.token, &conv, &rid, None).await;
        if r.status().as_u16() == 200 {
            freed = true;
            break;
        }
        assert_eq!(r.status().as_u16(), 429);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(freed, "the closed stream's place came back");
    drop(second);
}

/// A client that hangs up is noticed when it hangs up, not at the stream's next write: with an
/// hour between keep-alives and nothing else to send, its place under the per-user cap comes
/// back at once (the server's pending read on the connection sees the end of it).
#[tokio::test]
async fn a_client_that_hangs_up_frees_its_stream_at_once() {
    let app = spawn_app_with(&[
        ("SSE_MAX_STREAMS_PER_USER", "1"),
        ("SSE_KEEP_ALIVE_SECS", "3600"),
    ])
    .await;
    let user = app.register(&email("u"), "Org").await;
    let conv = app.conversation(&user.token).await;
    // no worker: the answer stays open
    let mut first = app.post_stream(&user.token, &conv, "one").await;
    let created = first.next_event().await.unwrap();
    let rid = created.data()["response_id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.events(&user.token, &conv, &rid, None)
            .await
            .status()
            .as_u16(),
        429
    );
    drop(first);
    let mut freed = false;
    for _ in 0..50 {
        let r = app.events(&user.token, &conv, &rid, None).await;
        if r.status().as_u16() == 200 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "the hung-up stream's place came back within 5 s");
}
