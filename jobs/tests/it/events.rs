//! Response events: publish (replay stream + pub/sub, atomically), replay after an id, live
//! fan-out through one hub, and the hand-over between them without loss or repetition.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jobs::RedisHandle;
use jobs::events::{EventHub, EventId, EventPublisher, ResponseEvent, StoredEvent};
use testkit::TestRedis;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Setup {
    _redis: TestRedis,
    handle: Arc<RedisHandle>,
    publisher: EventPublisher,
    hub: EventHub,
    shutdown: CancellationToken,
    hub_task: tokio::task::JoinHandle<()>,
}

async fn setup() -> Setup {
    setup_with(config::EventsSettings {
        retention_secs: 3600,
        replay_max_len: 10_000,
    })
    .await
}

async fn setup_with(settings: config::EventsSettings) -> Setup {
    let redis = TestRedis::new();
    let handle = Arc::new(RedisHandle::new(&redis.settings()).unwrap());
    let publisher = EventPublisher::new(handle.clone(), &settings);
    let hub = EventHub::new(handle.clone());
    let shutdown = CancellationToken::new();
    let hub_task = tokio::spawn(hub.clone().run(shutdown.clone()));
    assert!(hub.ready(Duration::from_secs(5)).await, "hub subscribed");
    Setup {
        _redis: redis,
        handle,
        publisher,
        hub,
        shutdown,
        hub_task,
    }
}

fn token(i: usize) -> ResponseEvent {
    ResponseEvent::Token {
        text: format!("t{i} "),
    }
}

fn completed() -> ResponseEvent {
    ResponseEvent::MessageCompleted {
        message: serde_json::json!({"content": "done"}),
        model: "m".into(),
        usage: serde_json::json!({}),
    }
}

async fn collect(
    stream: impl futures::Stream<Item = Result<StoredEvent, jobs::events::EventsError>>,
) -> Vec<StoredEvent> {
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.map(Result::unwrap).collect::<Vec<_>>(),
    )
    .await
    .expect("stream ends after the terminal event")
}

#[tokio::test]
async fn events_replay_in_order_and_end_after_the_terminal_event() {
    let s = setup().await;
    let rid = Uuid::now_v7();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            s.publisher
                .publish(rid, &token(i))
                .await
                .unwrap()
                .id()
                .unwrap(),
        );
    }
    ids.push(
        s.publisher
            .publish(rid, &completed())
            .await
            .unwrap()
            .id()
            .unwrap(),
    );
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");

    let all = collect(s.hub.events(rid, None)).await;
    assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    assert_eq!(all[0].event, token(0));
    assert!(all[3].event.is_terminal());

    // resume after the second event: exactly the rest, same ids
    let rest = collect(s.hub.events(rid, Some(ids[1]))).await;
    assert_eq!(
        rest.iter().map(|e| e.id).collect::<Vec<_>>(),
        ids[2..].to_vec()
    );
    assert_eq!(s.hub.listeners(), 0, "finished streams unregister");

    // nothing follows the terminal event: a late `queued` (unfenced, as the API's watcher
    // publishes it) is refused and never replayed
    let late = s
        .publisher
        .publish(rid, &ResponseEvent::queued_backlog(2))
        .await
        .unwrap();
    assert_eq!(late.id(), None, "{late:?}");
    let replayed = s.hub.replay(rid, None).await.unwrap();
    assert_eq!(replayed.len(), 4);
    assert!(replayed[3].event.is_terminal());
}

#[tokio::test]
async fn a_listener_gets_live_events_published_after_it_attached() {
    let s = setup().await;
    let rid = Uuid::now_v7();
    let stream = s.hub.events(rid, None);
    let reader = tokio::spawn(collect(stream));
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..5 {
        s.publisher.publish(rid, &token(i)).await.unwrap();
    }
    s.publisher.publish(rid, &completed()).await.unwrap();
    let got = reader.await.unwrap();
    assert_eq!(got.len(), 6);
    assert_eq!(got[4].event, token(4));
}

#[tokio::test]
async fn attaching_while_publishing_loses_and_repeats_nothing() {
    let s = setup().await;
    let rid = Uuid::now_v7();
    let publisher = s.publisher.clone();
    let producer = tokio::spawn(async move {
        let mut ids = Vec::new();
        for i in 0..300 {
            ids.push(
                publisher
                    .publish(rid, &token(i))
                    .await
                    .unwrap()
                    .id()
                    .unwrap(),
            );
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        ids.push(
            publisher
                .publish(rid, &completed())
                .await
                .unwrap()
                .id()
                .unwrap(),
        );
        ids
    });
    // Readers attach at different moments, some resuming from an id they "already have".
    let mut readers = Vec::new();
    for k in 0..12 {
        let hub = s.hub.clone();
        let handle = s.handle.clone();
        readers.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(k * 7)).await;
            // resume point: the newest id so far for odd k, from scratch for even k
            let after = if k % 2 == 1 {
                let mut c = handle.conn().await.unwrap();
                let key = jobs::events::EventKeys::new(handle.prefix()).replay(rid);
                let last: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
                    .arg(&key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                last.first().and_then(|(id, _)| EventId::parse(id))
            } else {
                None
            };
            (after, collect(hub.events(rid, after)).await)
        }));
    }
    let ids = producer.await.unwrap();
    for r in readers {
        let (after, got) = r.await.unwrap();
        let want: Vec<EventId> = ids
            .iter()
            .copied()
            .filter(|id| after.is_none_or(|a| *id > a))
            .collect();
        assert_eq!(
            got.iter().map(|e| e.id).collect::<Vec<_>>(),
            want,
            "after {after:?}"
        );
    }
}

#[tokio::test]
async fn a_slow_reader_that_overflows_its_buffer_still_gets_everything() {
    let s = setup().await;
    let rid = Uuid::now_v7();
    let mut stream = Box::pin(s.hub.events(rid, None));
    // Publish far more than the listener buffer before reading anything.
    for i in 0..1000 {
        s.publisher.publish(rid, &token(i)).await.unwrap();
    }
    s.publisher.publish(rid, &completed()).await.unwrap();
    let mut n = 0;
    let mut last = None;
    while let Some(ev) = stream.next().await {
        let ev = ev.unwrap();
        assert!(last.is_none_or(|l| ev.id > l), "in order, no repeats");
        last = Some(ev.id);
        n += 1;
    }
    assert_eq!(n, 1001);
}

#[tokio::test]
async fn the_replay_stream_expires_and_is_capped() {
    let s = setup_with(config::EventsSettings {
        retention_secs: 60,
        replay_max_len: 100,
    })
    .await;
    let rid = Uuid::now_v7();
    for i in 0..1000 {
        s.publisher.publish(rid, &token(i)).await.unwrap();
    }
    let key = jobs::events::EventKeys::new(s.handle.prefix()).replay(rid);
    let mut c = s.handle.conn().await.unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "ttl {ttl}");
    let len: usize = redis::cmd("XLEN")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((100..1000).contains(&len), "capped near 100, got {len}");
}

#[tokio::test]
async fn streams_end_when_the_hub_shuts_down() {
    let s = setup().await;
    let rid = Uuid::now_v7();
    let mut stream = Box::pin(s.hub.events(rid, None));
    s.publisher.publish(rid, &token(0)).await.unwrap();
    // the reader has the event (replayed or live) before the hub stops
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap();
    assert_eq!(first.unwrap().unwrap().event, token(0));
    s.shutdown.cancel();
    let rest = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream ends when the hub shuts down");
    assert!(rest.is_none(), "{rest:?}");
    s.hub_task.await.unwrap();
}

#[test]
fn event_names_and_payloads_follow_the_contract() {
    let e = ResponseEvent::MessageCreated {
        message_id: Uuid::nil(),
        response_id: Uuid::nil(),
    };
    assert_eq!(e.name(), "message.created");
    assert_eq!(e.data()["response_id"], Uuid::nil().to_string());
    assert_eq!(token(1).name(), "token");
    assert_eq!(token(1).data(), serde_json::json!({"text": "t1 "}));
    let err = ResponseEvent::Error {
        code: "model_unavailable".into(),
        message: "x".into(),
    };
    assert_eq!(err.name(), "error");
    assert!(err.is_terminal());
    assert_eq!(
        ResponseEvent::ResponseRestarted {
            reason: "worker lost".into()
        }
        .name(),
        "response.restarted"
    );
    assert_eq!(
        ResponseEvent::ActionProposed {
            action: serde_json::json!({})
        }
        .name(),
        "action.proposed"
    );
    assert!(EventId::parse("12-3").unwrap() < EventId::parse("12-10").unwrap());
    assert!(EventId::parse("9-0").unwrap() < EventId::parse("10-0").unwrap());
}

/// The hub pings its subscription connection; a healthy one answers, so the hub stays on its
/// first subscription and live events keep flowing.
#[tokio::test]
async fn the_hub_watchdog_keeps_a_healthy_subscription() {
    let redis = TestRedis::new();
    let handle = Arc::new(RedisHandle::new(&redis.settings()).unwrap());
    let publisher = EventPublisher::new(
        handle.clone(),
        &config::EventsSettings {
            retention_secs: 60,
            replay_max_len: 100,
        },
    );
    let hub = EventHub::with_ping_every(handle.clone(), Duration::from_millis(100));
    let stop = CancellationToken::new();
    let task = tokio::spawn(hub.clone().run(stop.clone()));
    assert!(hub.ready(Duration::from_secs(5)).await);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(hub.subscriptions(), 1, "pings answered: no reconnect");
    let rid = Uuid::now_v7();
    let reader = tokio::spawn(collect(hub.events(rid, None)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    publisher.publish(rid, &token(0)).await.unwrap();
    publisher.publish(rid, &completed()).await.unwrap();
    assert_eq!(reader.await.unwrap().len(), 2);
    stop.cancel();
    task.await.unwrap();
}
