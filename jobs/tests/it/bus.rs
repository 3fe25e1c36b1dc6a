//! The atomic steps of the bus and the worker's retry timing, with in-memory handlers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use jobs::kinds::Probe;
use jobs::{Bus, DeadReason, Envelope, JobError, Queue, Registry, Worker, WorkerOptions};
use testkit::TestRedis;

#[tokio::test]
async fn retry_is_atomic_and_only_the_current_owner_may_settle() {
    let redis = TestRedis::new();
    let bus = crate::bus(&redis, &crate::queues(|_| {}));
    let q = Queue::Actions;
    bus.ensure_group(q).await.unwrap();
    let env = bus.enqueue(Probe::new("own")).await.unwrap();
    bus.enqueue(Probe::new("other")).await.unwrap();
    // the autoscaling signal: both waiting, none delivered
    let s = bus.stats(q).await.unwrap();
    assert_eq!((s.length, s.pending, s.lag), (2, 0, 2));

    let mut conn = bus.redis().blocking_conn().await.unwrap();
    let got = bus.read(&mut conn, q, "a", 1, None).await.unwrap();
    assert_eq!(got.len(), 1);
    let s = bus.stats(q).await.unwrap();
    assert_eq!((s.length, s.pending, s.lag), (2, 1, 1));
    let other = bus.read(&mut conn, q, "c", 1, None).await.unwrap();
    let other_job = Envelope::from_json(&other[0].body).unwrap().id;
    bus.ack(q, "c", &[(other[0].entry_id.as_str(), other_job)])
        .await
        .unwrap();
    assert_eq!(got[0].deliveries, 1);
    let entry = got[0].entry_id.clone();

    // "a" stalls; "b" reclaims the entry (idle >= 0 ms) and sees the second delivery
    let (_, claimed) = bus
        .reclaim(q, "b", Duration::ZERO, "0-0", 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].entry_id, entry);
    assert_eq!(claimed[0].deliveries, 2);
    assert_eq!(Envelope::from_json(&claimed[0].body).unwrap().id, env.id);

    let mut next = env.clone();
    next.attempt = 2;
    let due = Utc::now() + chrono::Duration::seconds(30);
    // the stalled "a" may no longer settle it
    assert!(!bus.retry(q, "a", &entry, &next, due).await.unwrap());
    assert!(
        !bus.dead_letter(
            q,
            "a",
            &entry,
            &claimed[0].body,
            "x",
            DeadReason::Permanent,
            Some(env.id)
        )
        .await
        .unwrap()
    );
    let s = bus.stats(q).await.unwrap();
    assert_eq!((s.length, s.pending, s.delayed, s.dead), (1, 1, 0, 0));

    // the owner retries: delayed + acked in one step
    assert!(bus.retry(q, "b", &entry, &next, due).await.unwrap());
    let s = bus.stats(q).await.unwrap();
    assert_eq!((s.length, s.pending, s.delayed, s.dead), (0, 0, 1, 0));
    // not due yet: nothing moves
    assert_eq!(bus.move_due(q, 10).await.unwrap().0, 0);
}

#[tokio::test]
async fn dead_letters_keep_the_error_and_replay_once() {
    let redis = TestRedis::new();
    let bus = crate::bus(&redis, &crate::queues(|_| {}));
    let q = Queue::Actions;
    bus.ensure_group(q).await.unwrap();
    let env = bus.enqueue(Probe::new("dead")).await.unwrap();
    let mut conn = bus.redis().blocking_conn().await.unwrap();
    let d = bus
        .read(&mut conn, q, "a", 1, None)
        .await
        .unwrap()
        .remove(0);
    assert!(
        bus.dead_letter(
            q,
            "a",
            &d.entry_id,
            &d.body,
            "boom: it broke",
            DeadReason::Permanent,
            Some(env.id)
        )
        .await
        .unwrap()
    );
    let s = bus.stats(q).await.unwrap();
    assert_eq!((s.length, s.pending, s.dead), (0, 0, 1));

    let dead = bus.dead_list(q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].error, "boom: it broke");
    assert_eq!(dead[0].reason, "permanent");
    assert_eq!(dead[0].envelope.as_ref().unwrap().id, env.id);
    assert!(dead[0].failed_at.is_some());

    assert!(bus.replay(q, &dead[0].id).await.unwrap());
    assert!(
        !bus.replay(q, &dead[0].id).await.unwrap(),
        "replayed once only"
    );
    let s = bus.stats(q).await.unwrap();
    assert_eq!((s.length, s.dead), (1, 0));
    let back = bus
        .read(&mut conn, q, "a", 1, None)
        .await
        .unwrap()
        .remove(0);
    let back = Envelope::from_json(&back.body).unwrap();
    assert_eq!(back.id, env.id, "the job id survives a replay");
    assert_eq!(back.attempt, 1);
}

#[tokio::test]
async fn enqueue_with_not_before_waits_in_the_delayed_set() {
    let redis = TestRedis::new();
    let bus = crate::bus(&redis, &crate::queues(|_| {}));
    let q = Queue::Actions;
    let later =
        Envelope::new(Probe::new("later")).with_not_before(Utc::now() + chrono::Duration::hours(1));
    bus.enqueue_envelope(&later).await.unwrap();
    bus.enqueue(Probe::new("now")).await.unwrap();
    let s = bus.stats(q).await.unwrap();
    assert_eq!((s.length, s.delayed), (1, 1));
    assert!(!bus.is_empty(&[q]).await.unwrap());
}

#[derive(Debug, Clone)]
struct Run {
    attempt: u32,
    due_at: DateTime<Utc>,
    at: DateTime<Utc>,
}

#[tokio::test]
async fn a_handlers_retry_after_replaces_the_backoff() {
    let redis = TestRedis::new();
    // a computed backoff would wait a minute
    let queues = crate::queues(|q| {
        q.actions.backoff_base_ms = 60_000;
        q.actions.backoff_cap_ms = 60_000;
    });
    let bus = crate::bus(&redis, &queues);
    let runs: Arc<Mutex<Vec<Run>>> = Arc::default();
    let mut registry = Registry::new();
    {
        let runs = runs.clone();
        registry.register::<Probe, _, _>(move |ctx, _job| {
            let runs = runs.clone();
            async move {
                runs.lock().unwrap().push(Run {
                    attempt: ctx.attempt,
                    due_at: ctx.due_at,
                    at: Utc::now(),
                });
                if ctx.attempt == 1 {
                    Err(JobError::retry_after(
                        "429 from upstream",
                        Duration::from_millis(700),
                    ))
                } else {
                    Ok(())
                }
            }
        });
    }
    bus.enqueue(Probe::new("ra")).await.unwrap();
    let opts = actions_worker("w1", 4, 200, 5);
    let report = Worker::new(bus.clone(), registry, opts)
        .drain_until_empty(Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!((report.completed, report.retried), (1, 1));
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[1].attempt, 2);
    let waited = runs[1].due_at - runs[0].at;
    assert!(
        waited >= chrono::Duration::milliseconds(700) && waited < chrono::Duration::seconds(5),
        "the retry was due {waited:?} after the failure; expected Retry-After (700 ms)"
    );
    assert!(runs[1].at >= runs[1].due_at, "not run before it was due");
}

#[tokio::test]
async fn idle_consumer_names_without_pending_entries_are_pruned() {
    let redis = TestRedis::new();
    let bus = crate::bus(&redis, &crate::queues(|_| {}));
    let q = Queue::Actions;
    bus.ensure_group(q).await.unwrap();
    bus.enqueue(Probe::new("p")).await.unwrap();
    let mut conn = bus.redis().blocking_conn().await.unwrap();
    // "busy" holds an entry; "ghost" and "me" hold nothing
    assert_eq!(
        bus.read(&mut conn, q, "busy", 1, None).await.unwrap().len(),
        1
    );
    let mut c = bus.redis().conn().await.unwrap();
    for name in ["ghost", "me"] {
        let _: i64 = redis::cmd("XGROUP")
            .arg("CREATECONSUMER")
            .arg(&bus.keys(q).stream)
            .arg("workers")
            .arg(name)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    assert_eq!(bus.stats(q).await.unwrap().consumers, 3);
    // nobody idle for an hour yet
    assert_eq!(
        bus.prune_consumers(q, "me", Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        bus.prune_consumers(q, "me", Duration::ZERO).await.unwrap(),
        1
    );
    let s = bus.stats(q).await.unwrap();
    assert_eq!((s.consumers, s.pending), (2, 1), "only the ghost went");
    // a stopped worker removes its own name only when it holds nothing: the check and the
    // removal are one step, so an entry it holds is never dropped from the group
    assert!(!bus.remove_consumer_if_idle(q, "busy").await.unwrap());
    assert!(bus.remove_consumer_if_idle(q, "me").await.unwrap());
    let s = bus.stats(q).await.unwrap();
    assert_eq!((s.consumers, s.pending), (1, 1));
}

#[tokio::test]
async fn a_job_that_keeps_losing_its_worker_is_dead_lettered_as_lost() {
    let redis = TestRedis::new();
    let queues = crate::queues(|q| {
        q.actions.max_attempts = 2;
        q.actions.visibility_timeout_secs = 1;
    });
    let bus = crate::bus(&redis, &queues);
    let q = Queue::Actions;
    bus.ensure_group(q).await.unwrap();
    let env = bus.enqueue(Probe::new("lost")).await.unwrap();
    // delivered twice already, never acknowledged (two workers died holding it)
    let mut conn = bus.redis().blocking_conn().await.unwrap();
    assert_eq!(bus.read(&mut conn, q, "a", 1, None).await.unwrap().len(), 1);
    let (_, c) = bus.reclaim(q, "b", Duration::ZERO, "0-0", 1).await.unwrap();
    assert_eq!(c[0].deliveries, 2);

    let calls = Arc::new(Mutex::new(0u32));
    let mut registry = Registry::new();
    {
        let calls = calls.clone();
        registry.register::<Probe, _, _>(move |_ctx, _job| {
            *calls.lock().unwrap() += 1;
            async { Ok(()) }
        });
    }
    let opts = WorkerOptions {
        queues: vec![q],
        concurrency: 2,
        consumer: "c".into(),
        read_block: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(5),
    };
    let report = Worker::new(bus.clone(), registry, opts)
        .drain_until_empty(Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!((report.reclaimed, report.dead, report.completed), (1, 1, 0));
    assert_eq!(
        *calls.lock().unwrap(),
        0,
        "the third delivery is over max_attempts"
    );
    let dead = bus.dead_list(q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "lost");
    assert!(
        dead[0].error.contains("delivered 3 times"),
        "{}",
        dead[0].error
    );
    assert_eq!(dead[0].envelope.as_ref().unwrap().id, env.id);
}

/// A handler running longer than the visibility timeout keeps its entry (heartbeat): a second
/// worker that reclaims idle entries does not take it, so the job runs once.
#[tokio::test]
async fn a_long_running_handler_is_not_reclaimed_while_it_runs() {
    let redis = TestRedis::new();
    let queues = crate::queues(|q| q.actions.visibility_timeout_secs = 1);
    let bus = crate::bus(&redis, &queues);
    let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let registry = |runs: Arc<std::sync::atomic::AtomicU32>| {
        let mut r = Registry::new();
        r.register::<Probe, _, _>(move |_ctx, _job| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(3500)).await;
                Ok(())
            }
        });
        r
    };
    bus.enqueue(Probe::new("long")).await.unwrap();
    let opts = |name: &str| actions_worker(name, 2, 100, 10);
    let stop = tokio_util::sync::CancellationToken::new();
    let w1 = Worker::new(bus.clone(), registry(runs.clone()), opts("w1"));
    let w2 = Worker::new(bus.clone(), registry(runs.clone()), opts("w2"));
    let (s1, s2) = (stop.clone(), stop.clone());
    let t1 = tokio::spawn(async move { w1.run(s1).await });
    let t2 = tokio::spawn(async move { w2.run(s2).await });
    // long enough for several reclaim rounds past the 1 s visibility timeout
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stats = bus.stats(Queue::Actions).await.unwrap();
        if runs.load(std::sync::atomic::Ordering::SeqCst) >= 1
            && stats.length == 0
            && stats.pending == 0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job did not finish: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let r1 = t1.await.unwrap().unwrap();
    let r2 = t2.await.unwrap().unwrap();
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the handler ran once"
    );
    assert_eq!(r1.completed + r2.completed, 1);
}

/// A worker whose entry was reclaimed by another cannot acknowledge (delete) it any more: the
/// new owner decides.
#[tokio::test]
async fn a_stale_owner_cannot_acknowledge_a_reclaimed_entry() {
    let redis = TestRedis::new();
    let queues = crate::queues(|_| {});
    let bus = crate::bus(&redis, &queues);
    bus.ensure_group(Queue::Actions).await.unwrap();
    bus.enqueue(Probe::new("stale")).await.unwrap();
    let handle = jobs::RedisHandle::new(&redis.settings()).unwrap();
    let mut conn = handle.blocking_conn().await.unwrap();
    let got = bus
        .read(
            &mut conn,
            Queue::Actions,
            "old",
            1,
            Some(Duration::from_millis(500)),
        )
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    let id = got[0].entry_id.clone();
    let job = Envelope::from_json(&got[0].body).unwrap().id;
    let (_, taken) = bus
        .reclaim(Queue::Actions, "new", Duration::ZERO, "0-0", 10)
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(
        bus.ack(Queue::Actions, "old", &[(&id, job)]).await.unwrap(),
        0,
        "the stale owner's ack is refused"
    );
    let stats = bus.stats(Queue::Actions).await.unwrap();
    assert_eq!(
        (stats.length, stats.pending),
        (1, 1),
        "still there for the new owner"
    );
    assert_eq!(
        bus.ack(Queue::Actions, "new", &[(&id, job)]).await.unwrap(),
        1
    );
    let stats = bus.stats(Queue::Actions).await.unwrap();
    assert_eq!((stats.length, stats.pending), (0, 0));
}

/// One ack call settles a batch: only the entries the caller still owns (not those reclaimed
/// by another consumer), with their markers — each checked on its own, however many entries the
/// caller holds in the batch's id range.
#[tokio::test]
async fn a_batched_ack_settles_only_owned_entries() {
    let redis = TestRedis::new();
    // one stream: the caller's 700 entries in flight lie in one id range
    let bus = crate::bus(&redis, &crate::queues(|q| q.partitions = 1));
    let q = Queue::Actions;
    bus.ensure_group(q).await.unwrap();
    let envs: Vec<Envelope> = (0..700)
        .map(|i| Envelope::new(Probe::new(format!("batch {i}"))))
        .collect();
    bus.enqueue_many(&envs).await.unwrap();
    let mut conn = bus.redis().blocking_conn().await.unwrap();
    let got = bus.read(&mut conn, q, "a", 700, None).await.unwrap();
    assert_eq!(got.len(), 700);
    // "b" takes the first ten
    let (_, taken) = bus
        .reclaim(q, "b", Duration::ZERO, "0-0", 10)
        .await
        .unwrap();
    assert_eq!(taken.len(), 10);
    let pick = |i: usize| {
        let job = Envelope::from_json(&got[i].body).unwrap().id;
        (got[i].entry_id.as_str(), job)
    };
    // out of order, with b's entries and the same entry twice
    let batch = [
        pick(699),
        pick(0),
        pick(20),
        pick(1),
        pick(350),
        pick(698),
        pick(20),
    ];
    assert_eq!(bus.ack(q, "a", &batch).await.unwrap(), 4);
    let s = bus.stats(q).await.unwrap();
    assert_eq!((s.length, s.pending), (696, 696));
    assert_eq!(bus.jobs_on_bus(q).await.unwrap(), 696);
    let ids: Vec<_> = batch.iter().map(|(_, j)| *j).collect();
    assert_eq!(
        bus.markers(q, &ids).await.unwrap(),
        vec![false, true, false, true, false, false, false]
    );
    // b's entries are still b's to settle
    assert_eq!(bus.ack(q, "b", &[pick(0), pick(1)]).await.unwrap(), 2);
    assert_eq!(bus.jobs_on_bus(q).await.unwrap(), 694);
}

/// A job that fails for good runs its kind's dead-letter hook (once) before it is dead-lettered.
#[tokio::test]
async fn a_dead_letter_hook_runs_before_a_job_is_dead_lettered() {
    let redis = TestRedis::new();
    let queues = crate::queues(|_| {});
    let bus = crate::bus(&redis, &queues);
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut registry = Registry::new();
    registry.register::<Probe, _, _>(|_ctx, _job| async {
        Err(JobError::permanent("broken for good"))
    });
    {
        let seen = seen.clone();
        registry.on_dead::<Probe, _, _>(move |_id, job, error| {
            let seen = seen.clone();
            async move { seen.lock().unwrap().push(format!("{}: {error}", job.key)) }
        });
    }
    bus.enqueue(Probe::new("doomed")).await.unwrap();
    let opts = actions_worker("w", 2, 100, 5);
    let report = Worker::new(bus.clone(), registry, opts)
        .drain_until_empty(Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(report.dead, 1);
    assert_eq!(
        seen.lock().unwrap().clone(),
        vec!["doomed: broken for good".to_owned()]
    );
    assert_eq!(bus.stats(Queue::Actions).await.unwrap().dead, 1);
}

/// Options of a worker consuming the `actions` queue.
fn actions_worker(
    consumer: &str,
    concurrency: usize,
    read_block_ms: u64,
    grace_secs: u64,
) -> WorkerOptions {
    WorkerOptions {
        queues: vec![Queue::Actions],
        concurrency,
        consumer: consumer.into(),
        read_block: Duration::from_millis(read_block_ms),
        shutdown_grace: Duration::from_secs(grace_secs),
    }
}

/// A TCP relay to Redis that can be cut: while cut, its connections are dropped and new ones
/// closed at once — a Redis restart as a client sees it.
struct Relay {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    async fn start(redis_url: &str) -> Relay {
        let upstream = redis_url
            .trim_start_matches("redis://")
            .rsplit('@')
            .next()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if *rx.borrow() {
                    continue; // dropped: closed at once
                }
                let upstream = upstream.clone();
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Relay { addr, cut }
    }
}

/// Redis gone for a moment just as a handler asks to run again later: the worker keeps trying
/// to schedule the next run (the entry stays its own meanwhile) instead of leaving the job to
/// a reclaim a whole visibility timeout later.
#[tokio::test]
async fn a_retry_that_meets_redis_restarting_is_scheduled_once_redis_is_back() {
    let redis = TestRedis::new();
    if redis.cluster {
        // a relay in front of one node cannot stand for a cluster (its nodes announce their
        // own addresses); the cluster's outage is the failover test's (tests/it/cluster.rs)
        return;
    }
    let relay = Relay::start(&redis.url).await;
    let queues = crate::queues(|q| q.actions.visibility_timeout_secs = 8);
    let mut settings = redis.settings();
    settings.url = format!("redis://{}", relay.addr).into();
    let bus = Bus::new(
        Arc::new(jobs::RedisHandle::new(&settings).unwrap()),
        &queues,
    );
    bus.ensure_group(Queue::Actions).await.unwrap();
    bus.enqueue(Probe::new("across a restart")).await.unwrap();

    let runs = Arc::new(Mutex::new(Vec::<u32>::new()));
    let done = Arc::new(tokio::sync::Notify::new());
    let cut = Arc::new(relay.cut);
    let mut registry = Registry::new();
    {
        let (runs, done, cut) = (runs.clone(), done.clone(), cut.clone());
        registry.register::<Probe, _, _>(move |ctx, _job| {
            let n = {
                let mut r = runs.lock().unwrap();
                r.push(ctx.attempt);
                r.len()
            };
            let (done, cut) = (done.clone(), cut.clone());
            async move {
                if n > 1 {
                    done.notify_one();
                    return Ok(());
                }
                // Redis "restarts" for 1.5 s as this run ends with a wait
                cut.send_replace(true);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    cut.send_replace(false);
                });
                Err(JobError::Wait {
                    reason: "rate limited".into(),
                    after: Duration::from_millis(100),
                })
            }
        });
    }
    let worker = Worker::new(bus.clone(), registry, actions_worker("w", 2, 200, 5));
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn({
        let stop = stop.clone();
        async move { worker.run(stop).await }
    });
    tokio::time::timeout(Duration::from_secs(60), done.notified())
        .await
        .expect("the job ran again");
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(
        *runs.lock().unwrap(),
        vec![1, 1],
        "a wait keeps the attempt"
    );
    assert_eq!(
        (report.retried, report.reclaimed),
        (1, 0),
        "scheduled by its worker once Redis was back, not reclaimed"
    );
}
