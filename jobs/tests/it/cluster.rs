//! Redis Cluster (`REDIS_CLUSTER=true`; `scripts/test` runs this crate's tests a second time
//! against the local cluster of `scripts/services up --cluster`): a step that spans two slots
//! fails loudly instead of passing, each listened response holds one shard subscription, and a
//! killed primary is replaced while the bus and the event hub carry on. On a single node these
//! tests have nothing to check and return at once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jobs::events::{EventHub, EventKeys, EventPublisher, ResponseEvent};
use jobs::kinds::Probe;
use jobs::{Bus, Queue, RedisHandle, Registry, Worker, WorkerOptions};
use testkit::TestRedis;
use testkit::cluster::PrivateCluster;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn events_settings() -> config::EventsSettings {
    config::EventsSettings {
        retention_secs: 3600,
        replay_max_len: 10_000,
    }
}

fn is_crossslot(e: &redis::RedisError) -> bool {
    e.code() == Some("CROSSSLOT") || e.to_string().to_ascii_lowercase().contains("crossslot")
}

/// The negative control of the whole cluster pass: were a transaction or a script of ours to
/// span two slots, it would fail like these do — nothing in the client or the server lets it
/// through — so the bus and events tests passing on the cluster shows ours stay in one slot.
#[tokio::test]
async fn a_step_that_spans_two_slots_fails_with_crossslot() {
    let redis = TestRedis::new();
    if !redis.cluster {
        return;
    }
    let bus = crate::bus(&redis, &crate::queues(|_| {}));
    let (chat, memory) = (
        bus.keys(Queue::Chat).stream.clone(),
        bus.keys(Queue::Memory).stream.clone(),
    );
    let mut conn = bus.redis().conn().await.unwrap();

    let tx: Result<(u64, u64), _> = redis::pipe()
        .atomic()
        .xlen(&chat)
        .xlen(&memory)
        .query_async(&mut conn)
        .await;
    assert!(is_crossslot(tx.as_ref().unwrap_err()), "{tx:?}");

    let script: Result<i64, _> =
        redis::Script::new("return redis.call('EXISTS', KEYS[1], KEYS[2])")
            .key(&chat)
            .key(&memory)
            .invoke_async(&mut conn)
            .await;
    assert!(is_crossslot(script.as_ref().unwrap_err()), "{script:?}");

    // the same steps within one queue's hash tag pass
    let keys = bus.keys(Queue::Chat);
    let (_, _): (u64, u64) = redis::pipe()
        .atomic()
        .xlen(&keys.stream)
        .zcard(&keys.delayed)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// The number of shard subscriptions to `channel` over every node of the cluster.
async fn shard_subscribers(redis: &TestRedis, channel: &str) -> i64 {
    let mut total = 0;
    for url in redis.url.split(',') {
        let client = redis::Client::open(url.trim()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(channel)
            .query_async(&mut c)
            .await
            .unwrap();
        total += n;
    }
    total
}

/// A cluster of the test's own with a handle on it (under the test's prefix), a publisher and
/// a running event hub.
async fn private_stack(
    shared: &TestRedis,
) -> (
    PrivateCluster,
    Arc<RedisHandle>,
    EventPublisher,
    EventHub,
    CancellationToken,
) {
    let cluster = PrivateCluster::start().unwrap();
    let settings = config::RedisSettings {
        url: cluster.url().into(),
        prefix: shared.prefix.clone(),
        cluster: true,
    };
    let handle = Arc::new(RedisHandle::new(&settings).unwrap());
    let publisher = EventPublisher::new(handle.clone(), &events_settings());
    let hub = EventHub::new(handle.clone());
    let shutdown = CancellationToken::new();
    tokio::spawn(hub.clone().run(shutdown.clone()));
    assert!(hub.ready(Duration::from_secs(5)).await);
    (cluster, handle, publisher, hub, shutdown)
}

/// Whether `events` yields the token `text` within 10 s.
async fn gets_token(
    events: &mut (
             impl futures::Stream<Item = Result<jobs::events::StoredEvent, jobs::events::EventsError>>
             + Unpin
         ),
    text: &str,
) -> bool {
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(ev) = events.next().await {
            if matches!(ev.unwrap().event, ResponseEvent::Token { text: ref t } if t == text) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}

async fn eventually(mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn a_listened_response_holds_one_shard_subscription_until_its_listeners_leave() {
    let redis = TestRedis::new();
    if !redis.cluster {
        return;
    }
    let handle = Arc::new(RedisHandle::new(&redis.settings()).unwrap());
    let publisher = EventPublisher::new(handle.clone(), &events_settings());
    let hub = EventHub::new(handle.clone());
    let shutdown = CancellationToken::new();
    tokio::spawn(hub.clone().run(shutdown.clone()));
    assert!(hub.ready(Duration::from_secs(5)).await);

    let rid = Uuid::new_v4();
    let channel = EventKeys::new(handle.prefix()).shard_channel(rid);
    publisher
        .publish(rid, &ResponseEvent::Token { text: "a".into() })
        .await
        .unwrap();
    // two listeners of one response: one subscription
    let mut first = Box::pin(hub.events(rid, None));
    let mut second = Box::pin(hub.events(rid, None));
    assert!(first.next().await.unwrap().is_ok());
    assert!(second.next().await.unwrap().is_ok());
    assert_eq!(shard_subscribers(&redis, &channel).await, 1);
    // a live event reaches both through the shard channel
    publisher
        .publish(rid, &ResponseEvent::Token { text: "b".into() })
        .await
        .unwrap();
    for s in [&mut first, &mut second] {
        let ev = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(matches!(ev.event, ResponseEvent::Token { ref text } if text == "b"));
    }
    drop(first);
    assert_eq!(
        shard_subscribers(&redis, &channel).await,
        1,
        "one listener left"
    );
    drop(second);
    assert!(
        eventually(async || shard_subscribers(&redis, &channel).await == 0).await,
        "the last listener's leaving unsubscribes"
    );
    shutdown.cancel();
}

/// A primary killed mid-load: its replica takes over, the worker's reads and the hub's
/// subscriptions come back by themselves. Every job was either handled or has lost its
/// marker with the primary (so the PostgreSQL reconciler re-enqueues it: issue 16's ledger);
/// none stays on the bus unhandled. Prints the pause the producer saw.
#[tokio::test]
async fn a_killed_primary_is_replaced_and_the_bus_and_the_hub_carry_on() {
    let shared = TestRedis::new();
    if !shared.cluster {
        return;
    }
    let (mut cluster, handle, publisher, hub, shutdown) = private_stack(&shared).await;
    let bus = Bus::new(handle.clone(), &crate::queues(|_| {}));
    bus.ensure_group(Queue::Actions).await.unwrap();

    // a listener on a response whose slot lives on the primary that will die
    let victim = cluster
        .primary_of(&bus.keys(Queue::Actions).stream)
        .unwrap();
    let rid = loop {
        let rid = Uuid::new_v4();
        let key = EventKeys::new(&shared.prefix).replay(rid);
        if cluster.primary_of(&key).unwrap() == victim {
            break rid;
        }
    };
    publisher
        .publish(
            rid,
            &ResponseEvent::Token {
                text: "before".into(),
            },
        )
        .await
        .unwrap();
    let mut events = Box::pin(hub.events(rid, None));
    assert!(events.next().await.unwrap().is_ok());

    // a worker handling what a producer enqueues
    let handled = Arc::new(Mutex::new(HashSet::<String>::new()));
    let mut registry = Registry::new();
    {
        let handled = handled.clone();
        registry.register::<Probe, _, _>(move |_ctx, job| {
            handled.lock().unwrap().insert(job.key.clone());
            async { Ok(()) }
        });
    }
    let worker = Worker::new(
        bus.clone(),
        registry,
        WorkerOptions {
            queues: vec![Queue::Actions],
            concurrency: 4,
            consumer: "failover-w".into(),
            read_block: Duration::from_millis(200),
            shutdown_grace: Duration::from_secs(5),
        },
    );
    let stop = CancellationToken::new();
    let worker_task = {
        let stop = stop.clone();
        tokio::spawn(async move { worker.run(stop).await })
    };

    let mut enqueued = Vec::new(); // (key, job id)
    let mut failed_enqueues = 0;
    let mut killed_at = None;
    let mut pause = Duration::ZERO;
    let mut last_ok = Instant::now();
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(25) {
        if killed_at.is_none() && i == 100 {
            cluster.kill(victim);
            killed_at = Some(Instant::now());
        }
        let key = format!("job-{i}");
        match bus.enqueue(Probe::new(&key)).await {
            Ok(env) => {
                pause = pause.max(last_ok.elapsed());
                last_ok = Instant::now();
                enqueued.push((key, env.id));
            }
            // refused while the slot has no primary (MOVED inside the transaction, CLUSTERDOWN):
            // the API keeps such a turn queued in PostgreSQL for the reconciler
            Err(_) => failed_enqueues += 1,
        }
        i += 1;
        // 100 jobs after the kill went through: enough
        if killed_at.is_some() && enqueued.len() >= 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        enqueued.len() >= 200,
        "the bus took new jobs after the failover"
    );
    cluster.wait_ok(Duration::from_secs(20)).unwrap();
    assert_ne!(
        cluster
            .primary_of(&bus.keys(Queue::Actions).stream)
            .unwrap(),
        victim
    );

    // every job is handled or gone with its marker (never left on the bus unhandled)
    let deadline = Instant::now() + Duration::from_secs(30);
    let ids: Vec<Uuid> = enqueued.iter().map(|(_, id)| *id).collect();
    let waiting = loop {
        let marks = bus.markers(Queue::Actions, &ids).await.unwrap_or_default();
        let done = handled.lock().unwrap().clone();
        let waiting = enqueued
            .iter()
            .zip(&marks)
            .filter(|((key, _), marked)| **marked && !done.contains(key))
            .count();
        if waiting == 0 || Instant::now() > deadline {
            break waiting;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        waiting, 0,
        "jobs still on the bus, unhandled, after the failover"
    );
    let after_kill: Vec<&String> = enqueued.iter().skip(100).map(|(k, _)| k).collect();
    let done = handled.lock().unwrap().clone();
    assert!(
        after_kill.iter().all(|k| done.contains(*k)),
        "every job enqueued after the failover is handled"
    );

    // the hub resubscribed: an event published after the failover reaches the old listener
    publisher
        .publish(
            rid,
            &ResponseEvent::Token {
                text: "after".into(),
            },
        )
        .await
        .unwrap();
    assert!(
        gets_token(&mut events, "after").await,
        "the listener got the event published after the failover"
    );

    let lost = enqueued.len()
        - done
            .intersection(&enqueued.iter().map(|(k, _)| k.clone()).collect())
            .count();
    eprintln!(
        "failover: producer pause {} ms, {failed_enqueues} enqueues refused meanwhile, \
         {} jobs enqueued, {lost} lost with the primary (left to the reconciler)",
        pause.as_millis(),
        enqueued.len()
    );
    stop.cancel();
    let _ = worker_task.await;
    shutdown.cancel();
}

/// A manual failover (a rolling upgrade's `CLUSTER FAILOVER`): the server unsubscribes the shard
/// channels of the slots that moved; the hub subscribes them again, so a listener open across
/// it still gets the events published afterwards.
#[tokio::test]
async fn a_listener_keeps_its_events_across_a_manual_failover() {
    let shared = TestRedis::new();
    if !shared.cluster {
        return;
    }
    let (cluster, _handle, publisher, hub, shutdown) = private_stack(&shared).await;

    let rid = Uuid::new_v4();
    let primary = cluster
        .primary_of(&EventKeys::new(&shared.prefix).replay(rid))
        .unwrap();
    publisher
        .publish(
            rid,
            &ResponseEvent::Token {
                text: "before".into(),
            },
        )
        .await
        .unwrap();
    let mut events = Box::pin(hub.events(rid, None));
    assert!(events.next().await.unwrap().is_ok());

    let replica = cluster.replica_of(primary).unwrap();
    cluster.manual_failover(replica).unwrap();
    // every node's view of the slot follows by gossip
    let key = EventKeys::new(&shared.prefix).replay(rid);
    let moved = eventually(async || cluster.primary_of(&key).ok() == Some(replica)).await;
    assert!(moved, "the replica serves the slot");
    // the publisher's client follows the move (MOVED); the listener must get this live
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut published = false;
    while !published && Instant::now() < deadline {
        published = publisher
            .publish(
                rid,
                &ResponseEvent::Token {
                    text: "after".into(),
                },
            )
            .await
            .is_ok();
        if !published {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(published, "publishing works after the failover");
    assert!(
        gets_token(&mut events, "after").await,
        "the listener got the event published after the failover"
    );
    shutdown.cancel();
}
