//! A turn that waits behind another org's turns is told where it stands — `queued` events on
//! its stream as its place changes, the same object in a JSON 202 — and is taken in its org's
//! turn (fair admission, `[queues.chat] fair`), not after the other org's whole backlog.

use std::time::Duration;

use serde_json::json;

use crate::chat_helpers::{FakeWorker, Frame};
use crate::helpers::{email, spawn_app_with};

#[tokio::test]
async fn a_waiting_turn_is_told_its_place_and_goes_before_another_orgs_backlog() {
    // one partition: A's and B's turns share one stream, so the places are exact
    let app = spawn_app_with(&[
        ("JSON_WAIT_SECS", "1"),
        ("MESSAGE_RATE_LIMIT", "1000"),
        ("QUEUE_PARTITIONS", "1"),
    ])
    .await;
    let mut worker = FakeWorker::new(&app).await;
    let a = app.register(&email("fair-a"), "A").await;
    let b = app.register(&email("fair-b"), "B").await;
    let a_conversation = app.conversation(&a.token).await;
    let b_conversation = app.conversation(&b.token).await;
    // A's backlog: the first goes to the idle stream, four wait in A's list
    for i in 0..5 {
        let r = app
            .post(
                &format!("/v1/conversations/{a_conversation}/messages"),
                &a.token,
                json!({"content": format!("a{i}")}),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
    }
    // B's first turn goes after one more of A's: their next turns tie, and the sorted set orders
    // a tie by org id (time-ordered: A registered first)
    assert!(a.org_id < b.org_id);
    let mut sse = app.post_stream(&b.token, &b_conversation, "b0").await;
    let created = sse.next_event().await.unwrap();
    assert_eq!(created.name(), "message.created");
    let queued = sse.next_event().await.unwrap();
    assert_eq!(queued.name(), "queued", "{queued:?}");
    let first_place = 3;
    assert_eq!(
        queued.data(),
        &json!({"position": first_place, "reason": "backlog", "retry_at": null})
    );
    // JSON mode: the 202 says where the turn still waits
    let r = app
        .post(
            &format!("/v1/conversations/{b_conversation}/messages"),
            &b.token,
            json!({"content": "b1"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(
        r.body["queued"],
        json!({"position": 5, "reason": "backlog", "retry_at": null}),
        "{}",
        r.body
    );

    // a worker takes them in the orgs' turns: B's first within the first three, not seventh
    let mut order = Vec::new();
    let first = worker.next_job().await;
    order.push(first.org_id.to_string() == b.org_id);
    // B's place moves up, and its stream says so (looked at every 2 s)
    let moved = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match sse.next_event().await {
                Some(f @ Frame::Event { .. }) if f.name() == "queued" => break f,
                Some(_) => {}
                None => panic!("the stream ended"),
            }
        }
    })
    .await
    .expect("a queued event with the new place");
    assert!(
        moved.data()["position"].as_u64().unwrap() < first_place,
        "{moved:?}"
    );
    for _ in 0..6 {
        let job = worker.next_job().await;
        order.push(job.org_id.to_string() == b.org_id);
    }
    let b_first = order.iter().position(|is_b| *is_b).unwrap();
    assert!(
        b_first <= 2,
        "B's first turn was taken {b_first}th: {order:?}"
    );
    assert_eq!(order.iter().filter(|is_b| **is_b).count(), 2, "{order:?}");
}
