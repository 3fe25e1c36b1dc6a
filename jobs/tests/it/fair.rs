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

/// A bus over `redis` whose chat queue admits fairly in one partition (the orgs share one
/// stream, so the order is the admission's alone), `chat` applied to its settings; that
/// partition's group made. Returns the bus and the partition.
async fn one_stream(
    redis: &TestRedis,
    chat: impl FnOnce(&mut config::QueueSettings),
) -> (jobs::Bus, jobs::Part) {
    let bus = crate::bus(
        redis,
        &crate::queues(|q| {
            q.partitions = 1;
            q.chat.fair = true;
            chat(&mut q.chat);
        }),
    );
    let p = bus.parts(Queue::Chat).next().unwrap();
    bus.ensure_group(p).await.unwrap();
    (bus, p)
}

/// A worker of the chat queue with `concurrency` slots whose idle reads block `read_block`.
fn chat_worker(
    bus: &jobs::Bus,
    registry: Registry,
    concurrency: usize,
    read_block: Duration,
) -> Worker {
    let opts = WorkerOptions {
        queues: vec![Queue::Chat],
        concurrency,
        consumer: format!("w-{:08x}", rand::random::<u32>()),
        read_block,
        shutdown_grace: Duration::from_secs(5),
    };
    Worker::new(bus.clone(), registry, opts)
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
    chat_worker(bus, registry, 1, Duration::from_millis(200))
        .drain_until_empty(Duration::from_secs(30))
        .await
        .unwrap();
    order.lock().unwrap().clone()
}

/// 30 jobs of org A, then one of org B and, at weight 2, two of org C: where they stand and
/// in what order one consumer handles them.
async fn backlog_then_others(fair: bool) -> (Vec<Option<u64>>, Vec<String>) {
    let redis = TestRedis::new();
    let (bus, _) = one_stream(&redis, |c| c.fair = fair).await;
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
    let (bus, _) = one_stream(&redis, |_| {}).await;
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

/// Handles probes on `concurrency` slots, `hold` each; returns the most of each key's probes
/// that ran at once, and the order they started in (and when).
async fn run_with_caps(
    bus: &jobs::Bus,
    concurrency: usize,
    hold: Duration,
    read_block: Duration,
) -> (
    std::collections::HashMap<String, usize>,
    Vec<(String, std::time::Instant)>,
) {
    #[derive(Default)]
    struct Seen {
        running: std::collections::HashMap<String, usize>,
        most: std::collections::HashMap<String, usize>,
        started: Vec<(String, std::time::Instant)>,
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut registry = Registry::new();
    {
        let seen = seen.clone();
        registry.register::<Probe, _, _>(move |_, job| {
            let seen = seen.clone();
            async move {
                {
                    let mut s = seen.lock().unwrap();
                    let n = {
                        let r = s.running.entry(job.key.clone()).or_default();
                        *r += 1;
                        *r
                    };
                    let most = s.most.entry(job.key.clone()).or_default();
                    *most = (*most).max(n);
                    s.started.push((job.key.clone(), std::time::Instant::now()));
                }
                tokio::time::sleep(hold).await;
                *seen.lock().unwrap().running.get_mut(&job.key).unwrap() -= 1;
                Ok(())
            }
        });
    }
    chat_worker(bus, registry, concurrency, read_block)
        .drain_until_empty(Duration::from_secs(60))
        .await
        .unwrap();
    let s = seen.lock().unwrap();
    (s.most.clone(), s.started.clone())
}

#[tokio::test]
async fn an_org_at_its_concurrency_cap_waits_while_other_orgs_take_the_free_slots() {
    let redis = TestRedis::new();
    let (bus, _) = one_stream(&redis, |c| c.org_concurrency = 2).await;
    // org-c has a cap of its own; org-free has none
    bus.set_fair_cap(Queue::Chat, "org-c", Some(1))
        .await
        .unwrap();
    bus.set_fair_cap(Queue::Chat, "org-free", Some(0))
        .await
        .unwrap();
    for _ in 0..8 {
        bus.enqueue_envelope(&probe("org-a")).await.unwrap();
    }
    for _ in 0..3 {
        bus.enqueue_envelope(&probe("org-c")).await.unwrap();
    }
    for _ in 0..5 {
        bus.enqueue_envelope(&probe("org-free")).await.unwrap();
    }
    bus.enqueue_envelope(&probe("org-b")).await.unwrap();
    // eight slots: A's backlog alone would fill them
    let (most, started) = run_with_caps(
        &bus,
        8,
        Duration::from_millis(300),
        Duration::from_millis(200),
    )
    .await;
    assert_eq!(started.len(), 17, "{started:?}");
    assert_eq!(most["org-a"], 2, "{most:?}");
    assert_eq!(most["org-c"], 1, "{most:?}");
    assert!(most["org-free"] >= 3, "org-free has no cap: {most:?}");
    // B went in the first round, not after A's capped backlog
    let b_at = started.iter().position(|(k, _)| k == "org-b").unwrap();
    assert!(b_at < 8, "{started:?}");
    assert_eq!(bus.stats(Queue::Chat).await.unwrap().waiting, 0);
}

#[tokio::test]
async fn a_settled_job_lets_its_capped_org_go_at_once_not_at_the_next_read() {
    let redis = TestRedis::new();
    let (bus, _) = one_stream(&redis, |c| c.org_concurrency = 1).await;
    for _ in 0..3 {
        bus.enqueue_envelope(&probe("org-a")).await.unwrap();
    }
    // an idle consumer blocks 6 s on its read: were the next job admitted only by a read,
    // each of the two that wait would take that long (each takes 100 ms)
    let (most, started) =
        run_with_caps(&bus, 4, Duration::from_millis(100), Duration::from_secs(6)).await;
    assert_eq!((started.len(), most["org-a"]), (3, 1), "{started:?}");
    let took = started[2].1 - started[0].1;
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn a_capped_orgs_slot_held_by_a_settled_or_stale_job_is_given_back() {
    let redis = TestRedis::new();
    let (bus, p) = one_stream(&redis, |c| c.org_concurrency = 1).await;
    let keys = bus.keys(p);
    let runs = format!("{}org-a", keys.fair_runs);
    let mut conn = bus.redis().conn().await.unwrap();
    use redis::AsyncCommands;
    // a job of org-a admitted and still marked holds its one slot: the next one waits
    let _: () = conn.hset(&keys.marks, "held", 1).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let _: () = conn.zadd(&runs, "held", now).await.unwrap();
    bus.enqueue_envelope(&probe("org-a")).await.unwrap();
    let mut reader = bus.redis().conn().await.unwrap();
    assert_eq!(bus.admit(&mut reader, p, 5).await.unwrap(), 0);
    let stats = bus.stats(Queue::Chat).await.unwrap();
    assert_eq!((stats.length, stats.waiting), (0, 1), "{stats:?}");
    // its marker gone (acked, dead-lettered): the slot is free
    let _: () = conn.hdel(&keys.marks, "held").await.unwrap();
    assert_eq!(bus.admit(&mut reader, p, 5).await.unwrap(), 1);
    // the admitted job holds the slot now, under its own id
    let members: Vec<String> = conn.zrange(&runs, 0, -1).await.unwrap();
    assert_eq!(members.len(), 1);
    assert_ne!(members[0], "held");
    // a marked job admitted longer ago than all its attempts could take (Redis lost it, say)
    // no longer counts
    let _: () = conn.del(&runs).await.unwrap();
    let _: () = conn.hset(&keys.marks, "lost", 1).await.unwrap();
    let _: () = conn.zadd(&runs, "lost", 1_000).await.unwrap();
    bus.enqueue_envelope(&probe("org-a")).await.unwrap();
    assert_eq!(bus.admit(&mut reader, p, 5).await.unwrap(), 1);
    let ttl: i64 = conn.pttl(&runs).await.unwrap();
    assert!(ttl > 0, "the run set expires: {ttl}");
}

#[tokio::test]
async fn an_org_held_at_its_cap_gets_no_credit_for_it_nor_inflates_others_places() {
    let redis = TestRedis::new();
    let (bus, p) = one_stream(&redis, |_| {}).await;
    bus.set_fair_cap(Queue::Chat, "org-a", Some(1))
        .await
        .unwrap();
    // A's first job goes to the idle stream and is taken (and held): A is at its cap
    for _ in 0..21 {
        bus.enqueue_envelope(&probe("org-a")).await.unwrap();
    }
    let mut reader = bus.redis().blocking_conn().await.unwrap();
    let taken = bus.read(&mut reader, p, "held", 1, None).await.unwrap();
    assert_eq!(taken.len(), 1);
    // B's jobs go while A waits
    for _ in 0..20 {
        bus.enqueue_envelope(&probe("org-b")).await.unwrap();
    }
    let mut conn = bus.redis().conn().await.unwrap();
    bus.admit(&mut conn, p, 10).await.unwrap();
    let stats = bus.stats(Queue::Chat).await.unwrap();
    assert_eq!((stats.length, stats.waiting), (11, 30), "{stats:?}");
    // A was passed over, not left behind the virtual time
    let keys = bus.keys(p);
    use redis::AsyncCommands;
    let vt: f64 = conn.get(&keys.fair_vt).await.unwrap();
    let a: f64 = conn.zscore(&keys.fair, "org-a").await.unwrap();
    assert!(a >= vt - 1e-9, "A's tag {a} behind the virtual time {vt}");
    // a newcomer stands behind the 10 undelivered and about one turn of A and of B, not
    // behind A's backlog (20 more)
    let c = probe("org-c");
    bus.enqueue_envelope(&c).await.unwrap();
    let place = bus.fair_position(&c).await.unwrap().unwrap();
    assert!((11..=14).contains(&place), "{place}");
}

#[tokio::test]
async fn a_capped_orgs_retried_job_keeps_its_slot_and_its_dead_letter_frees_it_at_once() {
    let redis = TestRedis::new();
    let (bus, _) = one_stream(&redis, |c| {
        c.org_concurrency = 1;
        c.backoff_base_ms = 300;
        c.backoff_cap_ms = 300;
        c.jitter = config::Jitter::None;
    })
    .await;
    // in org A's order: one that fails once, one that fails for good, one that succeeds
    for fail_times in [1, 99, 0] {
        bus.enqueue_envelope(&Envelope::new(Probe {
            key: "org-a".to_owned(),
            sleep_ms: 0,
            fail_times,
            queue: Some(Queue::Chat),
        }))
        .await
        .unwrap();
    }
    type Run = (u32, u32, std::time::Instant, std::time::Instant);
    let runs: Arc<Mutex<Vec<Run>>> = Arc::default();
    let mut registry = Registry::new();
    {
        let runs = runs.clone();
        registry.register::<Probe, _, _>(move |ctx, job| {
            let runs = runs.clone();
            async move {
                let start = std::time::Instant::now();
                tokio::time::sleep(Duration::from_millis(100)).await;
                runs.lock().unwrap().push((
                    job.fail_times,
                    ctx.attempt,
                    start,
                    std::time::Instant::now(),
                ));
                match job.fail_times {
                    99 => Err(jobs::JobError::permanent("never")),
                    n if ctx.attempt <= n => Err(jobs::JobError::retryable("once")),
                    _ => Ok(()),
                }
            }
        });
    }
    // an idle consumer blocks 6 s on its read: only an admission at settlement is quicker
    let report = chat_worker(&bus, registry, 4, Duration::from_secs(6))
        .drain_until_empty(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!((report.completed, report.dead), (2, 1), "{report:?}");
    let runs = runs.lock().unwrap().clone();
    let order: Vec<(u32, u32)> = runs.iter().map(|r| (r.0, r.1)).collect();
    // the retried job's second attempt came before the next job: it kept its slot
    assert_eq!(order, [(1, 1), (1, 2), (99, 1), (0, 1)], "{runs:?}");
    for w in runs.windows(2) {
        assert!(w[1].2 >= w[0].3, "two of A's jobs ran at once: {runs:?}");
    }
    // the dead letter let the last one go at once
    let after_dead = runs[3].2 - runs[2].3;
    assert!(after_dead < Duration::from_secs(3), "{after_dead:?}");
}

#[tokio::test]
async fn an_envelope_this_build_cannot_read_gives_its_orgs_slot_back_when_dead_lettered() {
    let redis = TestRedis::new();
    let (bus, p) = one_stream(&redis, |c| c.org_concurrency = 1).await;
    // a job of a kind this build does not know (a newer build enqueued it), waiting in org-a's
    // list like any other
    let mut env = serde_json::to_value(probe("org-a")).unwrap();
    env["kind"] = serde_json::json!("from_the_future");
    let id = env["id"].as_str().unwrap().to_owned();
    let keys = bus.keys(p);
    let mut conn = bus.redis().conn().await.unwrap();
    use redis::AsyncCommands;
    let _: () = conn
        .rpush(format!("{}org-a", keys.fair_lists), env.to_string())
        .await
        .unwrap();
    let _: () = conn.zadd(&keys.fair, "org-a", 1).await.unwrap();
    let _: () = conn.hset(&keys.marks, &id, 1).await.unwrap();
    assert_eq!(bus.admit(&mut conn, p, 1).await.unwrap(), 1);
    let runs = format!("{}org-a", keys.fair_runs);
    let held: Vec<String> = conn.zrange(&runs, 0, -1).await.unwrap();
    assert_eq!(held, std::slice::from_ref(&id));
    // a worker dead-letters it (malformed for this build): org-a's slot and its marker go
    let report = handled_in_order(&bus).await;
    assert!(report.is_empty(), "{report:?}");
    let held: Vec<String> = conn.zrange(&runs, 0, -1).await.unwrap();
    assert!(held.is_empty(), "{held:?}");
    let marked: bool = conn.hexists(&keys.marks, &id).await.unwrap();
    assert!(!marked);
    assert_eq!(bus.stats(Queue::Chat).await.unwrap().dead, 1);
}
