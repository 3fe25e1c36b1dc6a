//! What the worker takes from apalis and what our backend adds to it: the catch-panic and
//! timeout layers feed our retries, one concurrency limit across every queue's apalis worker,
//! and a read that a stop interrupts goes back to its queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use jobs::kinds::Probe;
use jobs::{Queue, Registry, Worker, WorkerOptions};
use testkit::TestRedis;
use tokio_util::sync::CancellationToken;

fn worker_opts(queues: Vec<Queue>, concurrency: usize, read_block_ms: u64) -> WorkerOptions {
    WorkerOptions {
        queues,
        concurrency,
        consumer: format!("w-{:08x}", rand::random::<u32>()),
        read_block: Duration::from_millis(read_block_ms),
        shutdown_grace: Duration::from_secs(5),
    }
}

/// Run `registry` on `queues` until they are empty.
async fn drain(
    bus: &jobs::Bus,
    registry: Registry,
    queues: Vec<Queue>,
    concurrency: usize,
    read_block_ms: u64,
) -> jobs::RunReport {
    Worker::new(
        bus.clone(),
        registry,
        worker_opts(queues, concurrency, read_block_ms),
    )
    .drain_until_empty(Duration::from_secs(30))
    .await
    .unwrap()
}

/// Fast, exact retries on the actions queue.
fn quick_retries(q: &mut config::QueuesSettings) {
    q.actions.backoff_base_ms = 50;
    q.actions.backoff_cap_ms = 50;
    q.actions.jitter = config::Jitter::None;
}

#[tokio::test]
async fn a_panicking_handler_is_caught_and_its_job_retried() {
    let redis = TestRedis::new();
    let bus = crate::bus(&redis, &crate::queues(quick_retries));
    let runs = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    {
        let runs = runs.clone();
        registry.register::<Probe, _, _>(move |ctx, _| {
            runs.fetch_add(1, Ordering::SeqCst);
            async move {
                if ctx.attempt == 1 {
                    panic!("a bug in a handler");
                }
                Ok(())
            }
        });
    }
    bus.enqueue(Probe::new("panics")).await.unwrap();
    let report = drain(&bus, registry, vec![Queue::Actions], 2, 200).await;
    assert_eq!((report.retried, report.completed, report.dead), (1, 1, 0));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_handler_past_its_run_timeout_is_stopped_and_its_job_retried() {
    let redis = TestRedis::new();
    let bus = crate::bus(
        &redis,
        &crate::queues(|q| {
            quick_retries(q);
            q.actions.run_timeout_secs = 1;
        }),
    );
    let finished_first = Arc::new(AtomicBool::new(false));
    let mut registry = Registry::new();
    {
        let finished_first = finished_first.clone();
        registry.register::<Probe, _, _>(move |ctx, _| {
            let finished_first = finished_first.clone();
            async move {
                if ctx.attempt == 1 {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    finished_first.store(true, Ordering::SeqCst);
                }
                Ok(())
            }
        });
    }
    bus.enqueue(Probe::new("slow")).await.unwrap();
    let report = drain(&bus, registry, vec![Queue::Actions], 2, 200).await;
    assert_eq!((report.retried, report.completed), (1, 1));
    assert!(
        !finished_first.load(Ordering::SeqCst),
        "the timed-out run was stopped"
    );
}

#[tokio::test]
async fn one_concurrency_limit_holds_across_the_queues() {
    let redis = TestRedis::new();
    // (with QUEUE_PARTITIONS set, a reader per partition: idle readers hold no permit)
    let bus = crate::bus(&redis, &crate::queues(|_| {}));
    let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut registry = Registry::new();
    {
        let (running, most) = (running.clone(), most.clone());
        registry.register::<Probe, _, _>(move |_, _| {
            let (running, most) = (running.clone(), most.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        });
    }
    for i in 0..12 {
        let mut p = Probe::new(format!("c{i}"));
        p.queue = Some([Queue::Actions, Queue::Memory, Queue::Index][i % 3]);
        bus.enqueue(p).await.unwrap();
    }
    let queues = vec![Queue::Actions, Queue::Memory, Queue::Index];
    let report = drain(&bus, registry, queues, 2, 100).await;
    assert_eq!(report.completed, 12);
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "WORKER_CONCURRENCY bounds the jobs of all queues together"
    );
}

#[tokio::test]
async fn a_read_that_a_stop_interrupts_goes_back_to_the_queue() {
    let redis = TestRedis::new();
    // a job left pending on the stopped worker would wait a minute for a reclaim
    let bus = crate::bus(
        &redis,
        &crate::queues(|q| q.actions.visibility_timeout_secs = 60),
    );
    let ran = Arc::new(AtomicUsize::new(0));
    let requeued = Arc::new(AtomicBool::new(false));
    let mut registry = Registry::new();
    {
        let (ran, requeued) = (ran.clone(), requeued.clone());
        registry.register::<Probe, _, _>(move |ctx, _| {
            ran.fetch_add(1, Ordering::SeqCst);
            // given back through the delayed set: due later than enqueued
            requeued.store(ctx.due_at > ctx.enqueued_at, Ordering::SeqCst);
            async { Ok(()) }
        });
    }
    // the first worker blocks in a long read; it is told to stop, and the job arrives while
    // that read is still out
    let first = Worker::new(
        bus.clone(),
        registry.clone(),
        worker_opts(vec![Queue::Actions], 1, 3000),
    );
    let stop = CancellationToken::new();
    let running = {
        let stop = stop.clone();
        tokio::spawn(async move { first.run(stop).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    bus.enqueue(Probe::new("late")).await.unwrap();
    let report = running.await.unwrap().unwrap();
    assert_eq!(report.completed, 0, "a stopping worker starts nothing new");
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    let s = bus.stats(Queue::Actions).await.unwrap();
    assert_eq!(
        s.pending, 0,
        "nothing is left pending on the stopped worker"
    );

    let report = drain(&bus, registry, vec![Queue::Actions], 1, 100).await;
    assert_eq!(report.completed, 1);
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    assert!(
        requeued.load(Ordering::SeqCst),
        "the first worker's read took the job and gave it back"
    );
}
