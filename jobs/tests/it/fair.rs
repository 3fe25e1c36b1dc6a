//! Fair admission (`[queues.<name>] fair`): jobs wait in their org's list and move to the
//! stream in weighted turns as consumers take work, so one org's backlog cannot hold another
//! org's job back by more than about one job; without it, first come, first served.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobs::kinds::Probe;
use jobs::{Envelope, Queue, Registry, Worker, WorkerOptions};
use testkit::TestRedis;

fn probe(key: &str) -> Envelope {
    Envelope::new(Probe {
        key: key.to_owned(),
        sleep_ms: 0,
        fail_times: 0,
        queue: Some(Queue::Chat),
    })
}

/// The keys of the probes a worker of concurrency 1 handles, in the order it handles them.
async fn handled_in_order(bus: &jobs::Bus) -> Vec<String> {
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut registry = Registry::new();
    {
        let order = order.clone();
        registry.register::<Probe, _, _>(move |_, job| {
            order.lock().unwrap().push(job.key);
            async { Ok(()) }
        });
    }
    let opts = WorkerOptions {
        queues: vec![Queue::Chat],
        concurrency: 1,
        consumer: format!("w-{:08x}", rand::random::<u32>()),
        read_block: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(5),
    };
    Worker::new(bus.clone(), registry, opts)
        .drain_until_empty(Duration::from_secs(30))
        .await
        .unwrap();
    order.lock().unwrap().clone()
}

/// 30 jobs of org A, then one of org B and, at weight 2, two of org C: where they stand and
/// in what order one consumer handles them.
async fn backlog_then_others(fair: bool) -> (Vec<Option<u64>>, Vec<String>) {
    let redis = TestRedis::new();
    let bus = crate::bus(
        &redis,
        &crate::queues(|q| {
            // one partition: the orgs share one stream, so the order is the admission's alone
            q.partitions = 1;
            q.chat.fair = fair;
        }),
    );
    for p in bus.parts(Queue::Chat) {
        bus.ensure_group(p).await.unwrap();
    }
    let a: Vec<Envelope> = (0..30).map(|_| probe("org-a")).collect();
    for env in &a {
        bus.enqueue_envelope(env).await.unwrap();
    }
    let b = probe("org-b");
    bus.enqueue_envelope(&b).await.unwrap();
    let mut positions = Vec::new();
    for env in [&a[0], &a[1], &a[29], &b] {
        positions.push(bus.fair_position(env).await.unwrap());
    }
    let stats = bus.stats(Queue::Chat).await.unwrap();
    if fair {
        // the first went to the idle stream at once; the rest wait in the orgs' lists
        assert_eq!(
            (stats.length, stats.waiting, stats.lag),
            (1, 30, 31),
            "{stats:?}"
        );
    } else {
        assert_eq!((stats.length, stats.waiting), (31, 0), "{stats:?}");
    }
    (positions, handled_in_order(&bus).await)
}

#[tokio::test]
async fn one_orgs_backlog_does_not_hold_another_orgs_job_back() {
    let (positions, order) = backlog_then_others(true).await;
    // A's first is in the stream already (no longer waiting); A's second goes next, then B
    // (the orgs' next tags tie; A's name sorts first), and A's last after all of that
    assert_eq!(positions, [None, Some(2), Some(31), Some(3)]);
    assert_eq!(order.len(), 31);
    let b_at = order.iter().position(|k| k == "org-b").unwrap();
    assert_eq!(b_at, 2, "{order:?}");
}

#[tokio::test]
async fn without_fair_admission_the_backlog_goes_first() {
    let (positions, order) = backlog_then_others(false).await;
    assert_eq!(positions, [None, None, None, None]);
    let b_at = order.iter().position(|k| k == "org-b").unwrap();
    assert_eq!(b_at, 30, "{order:?}");
}

#[tokio::test]
async fn weights_share_the_turns_and_a_lost_marker_is_enqueued_once() {
    let redis = TestRedis::new();
    let bus = crate::bus(
        &redis,
        &crate::queues(|q| {
            q.partitions = 1;
            q.chat.fair = true;
        }),
    );
    for p in bus.parts(Queue::Chat) {
        bus.ensure_group(p).await.unwrap();
    }
    bus.set_fair_weight(Queue::Chat, "org-heavy", 3)
        .await
        .unwrap();
    // one job goes to the idle stream; then 12 of each org wait
    bus.enqueue_envelope(&probe("org-first")).await.unwrap();
    for _ in 0..12 {
        bus.enqueue_envelope(&probe("org-light")).await.unwrap();
        bus.enqueue_envelope(&probe("org-heavy")).await.unwrap();
    }
    // a reconciler re-enqueue of a job still on the bus does nothing
    let again = probe("org-light");
    assert!(bus.enqueue_once(&again).await.unwrap());
    assert!(!bus.enqueue_once(&again).await.unwrap());
    let order = handled_in_order(&bus).await;
    assert_eq!(order.len(), 26, "{order:?}");
    // among the first 13 after the first, the heavy org (weight 3) had about three turns for
    // each of the light org's
    let heavy = order[1..13].iter().filter(|k| *k == "org-heavy").count();
    assert!((8..=10).contains(&heavy), "{heavy} of 12: {order:?}");
}

#[tokio::test]
async fn jobs_waiting_for_admission_are_taken_by_a_worker_with_fair_admission_off() {
    let redis = TestRedis::new();
    let fair = |on: bool| {
        crate::queues(move |q| {
            q.partitions = 1;
            q.chat.fair = on;
        })
    };
    let producer = crate::bus(&redis, &fair(true));
    for p in producer.parts(Queue::Chat) {
        producer.ensure_group(p).await.unwrap();
    }
    for i in 0..6 {
        let org = if i % 2 == 0 { "org-a" } else { "org-b" };
        producer.enqueue_envelope(&probe(org)).await.unwrap();
    }
    assert_eq!(producer.stats(Queue::Chat).await.unwrap().waiting, 5);
    // a worker of a process that has fair admission off still drains the lists
    let consumer = crate::bus(&redis, &fair(false));
    let order = handled_in_order(&consumer).await;
    assert_eq!(order.len(), 6, "{order:?}");
    assert_eq!(consumer.stats(Queue::Chat).await.unwrap().waiting, 0);
}
