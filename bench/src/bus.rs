//! `bench bus`: the job bus on the configured Redis (`REDIS_URL`), under a unique key prefix
//! deleted afterwards. It measures, in one run and bounded in time:
//! 1. the raw `XADD` rate of that Redis, with the same client and concurrency as the producer;
//! 2. end-to-end no-op jobs/s (enqueue → handle → ack) with 1, 2 and 4 consumers, the producer
//!    running at the same time;
//! 3. pickup latency (enqueue call → handler start) on an idle bus, one job at a time.
//!
//! The raw `XADD` rate is measured first and again last; the higher one is used for the ratio.
//! The last line is `bus: jobs_per_s=N ratio_to_xadd=R pickup_p50_ms=X pickup_p99_ms=Y`, where
//! N is the best of the consumer counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use jobs::kinds::Probe;
use jobs::{Bus, Queue, Registry, Worker, WorkerOptions};
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[allow(clippy::print_stdout)]
pub async fn bench_bus(
    settings: &config::Settings,
    secs: u64,
    producers: usize,
    concurrency: usize,
    samples: usize,
) -> anyhow::Result<()> {
    let redis = Arc::new(jobs::RedisHandle::new(&settings.redis).context("REDIS_URL")?);
    redis.ping().await.context("Redis is unreachable")?;
    let bus = Bus::new(redis.clone(), &settings.queues);
    let outcome = run_all(&bus, settings, secs, producers, concurrency, samples).await;
    cleanup(&redis).await;
    let (raw, rates, p50, p99) = outcome?;
    for (n, rate) in &rates {
        println!("bus: consumers={n} jobs_per_s={rate:.0}");
    }
    let best = rates.iter().map(|(_, r)| *r).fold(0.0, f64::max);
    println!("bus: raw_xadd_per_s={raw:.0}");
    println!(
        "bus: jobs_per_s={best:.0} ratio_to_xadd={:.2} pickup_p50_ms={p50:.3} pickup_p99_ms={p99:.3}",
        best / raw
    );
    Ok(())
}

type Figures = (f64, Vec<(usize, f64)>, f64, f64);

#[allow(clippy::print_stdout)]
async fn run_all(
    bus: &Bus,
    settings: &config::Settings,
    secs: u64,
    producers: usize,
    concurrency: usize,
    samples: usize,
) -> anyhow::Result<Figures> {
    let dur = Duration::from_secs(secs);
    let raw = raw_xadd(bus, dur, producers).await?;
    println!("bus: raw_xadd_per_s={raw:.0} ({producers} tasks, {secs} s)");
    let mut rates = Vec::new();
    for consumers in [1usize, 2, 4] {
        let rate = end_to_end(bus, settings, dur, producers, consumers, concurrency).await?;
        println!("bus: consumers={consumers} jobs_per_s={rate:.0}");
        rates.push((consumers, rate));
    }
    let (p50, p99) = pickup(bus, settings, samples).await?;
    println!("bus: pickup_p50_ms={p50:.3} pickup_p99_ms={p99:.3} ({samples} samples)");
    // measured again at the end; the higher of the two keeps the ratio conservative on a
    // machine shared with other work
    let raw_again = raw_xadd(bus, dur, producers).await?;
    println!("bus: raw_xadd_per_s={raw_again:.0} (again, at the end)");
    Ok((raw.max(raw_again), rates, p50, p99))
}

fn probe_body() -> String {
    jobs::Envelope::new(Probe::new("bench"))
        .to_json()
        .unwrap_or_default()
}

/// `XADD`s of a probe-sized body from `tasks` concurrent tasks for `dur`.
async fn raw_xadd(bus: &Bus, dur: Duration, tasks: usize) -> anyhow::Result<f64> {
    let key = format!("{}:rawxadd", bus.redis().prefix());
    let conn = bus.redis().conn().await?;
    let count = Arc::new(AtomicU64::new(0));
    let body = probe_body();
    let tracker = TaskTracker::new();
    let start = Instant::now();
    for _ in 0..tasks {
        let (mut conn, key, body, count) = (conn.clone(), key.clone(), body.clone(), count.clone());
        tracker.spawn(async move {
            while start.elapsed() < dur {
                let r: redis::RedisResult<String> = conn.xadd(&key, "*", &[("j", &body)]).await;
                if r.is_err() {
                    break;
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    let secs = start.elapsed().as_secs_f64();
    let mut conn = conn;
    let _: i64 = conn.del(&key).await?;
    Ok(count.load(Ordering::Relaxed) as f64 / secs)
}

fn noop_registry(handled: Arc<AtomicU64>) -> Registry {
    let mut r = Registry::new();
    r.register::<Probe, _, _>(move |_ctx, _job| {
        let handled = handled.clone();
        async move {
            handled.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    });
    r
}

fn options(settings: &config::Settings, concurrency: usize) -> WorkerOptions {
    let mut o = WorkerOptions::from_settings(settings, vec![Queue::Actions]);
    o.concurrency = concurrency;
    o.shutdown_grace = Duration::from_secs(5);
    o
}

/// Jobs/s from the first enqueue to the last ack, producing for `dur` while `consumers`
/// workers consume.
async fn end_to_end(
    bus: &Bus,
    settings: &config::Settings,
    dur: Duration,
    producers: usize,
    consumers: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    bus.ensure_group(Queue::Actions).await?;
    let handled = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let workers = TaskTracker::new();
    for _ in 0..consumers {
        let w = Worker::new(
            bus.clone(),
            noop_registry(handled.clone()),
            options(settings, concurrency),
        );
        let stop = stop.clone();
        workers.spawn(async move { w.run(stop).await });
    }
    workers.close();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let produced = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let prod = TaskTracker::new();
    let start = Instant::now();
    for _ in 0..producers {
        let (bus, produced, failed) = (bus.clone(), produced.clone(), failed.clone());
        prod.spawn(async move {
            while start.elapsed() < dur {
                if bus.enqueue(Probe::new("bench")).await.is_err() {
                    failed.store(true, Ordering::Relaxed);
                    break;
                }
                produced.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    prod.close();
    prod.wait().await;
    let total = produced.load(Ordering::Relaxed);
    let produce_secs = start.elapsed().as_secs_f64();
    let backlog = total.saturating_sub(handled.load(Ordering::Relaxed));
    tracing::warn!(
        consumers,
        produced = total,
        enqueue_per_s = (total as f64 / produce_secs) as u64,
        backlog,
        "producing done"
    );
    // wait for the backlog to be handled and acknowledged (bounded)
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conn = bus.redis().conn().await?;
    let stream = bus.keys(Queue::Actions).stream.clone();
    loop {
        let len: u64 = conn.xlen(&stream).await?;
        if handled.load(Ordering::Relaxed) >= total && len == 0 {
            break;
        }
        if Instant::now() > deadline {
            stop.cancel();
            workers.wait().await;
            anyhow::bail!(
                "backlog not drained within 30 s: {} of {total} handled, {len} in the stream",
                handled.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.cancel();
    workers.wait().await;
    anyhow::ensure!(!failed.load(Ordering::Relaxed), "enqueue failed");
    Ok(total as f64 / elapsed)
}

/// Pickup latency on an idle bus: enqueue one job, wait for its handler to start, repeat.
async fn pickup(
    bus: &Bus,
    settings: &config::Settings,
    samples: usize,
) -> anyhow::Result<(f64, f64)> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let mut r = Registry::new();
    r.register::<Probe, _, _>(move |_ctx, _job| {
        let _ = tx.send(Instant::now());
        async { Ok(()) }
    });
    let w = Worker::new(bus.clone(), r, options(settings, 8));
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    {
        let stop = stop.clone();
        tracker.spawn(async move { w.run(stop).await });
    }
    tracker.close();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut lat = Vec::with_capacity(samples);
    let result: anyhow::Result<()> = async {
        for _ in 0..samples {
            // let the reader go back to its blocking read: the bus is idle
            tokio::time::sleep(Duration::from_millis(3)).await;
            let t0 = Instant::now();
            bus.enqueue(Probe::new("pickup")).await?;
            let t1 = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .context("a job was not picked up within 5 s")?
                .context("handler gone")?;
            lat.push(t1.saturating_duration_since(t0).as_secs_f64() * 1000.0);
        }
        Ok(())
    }
    .await;
    stop.cancel();
    tracker.wait().await;
    result?;
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    Ok((pct(0.50), pct(0.99)))
}

/// Delete every key of the bench's prefix.
pub async fn cleanup(redis: &jobs::RedisHandle) {
    let Ok(mut conn) = redis.conn().await else {
        return;
    };
    let pattern = format!("{}:*", redis.prefix());
    let mut cursor: u64 = 0;
    loop {
        let r: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(&mut conn)
            .await;
        let Ok((next, keys)) = r else { return };
        if !keys.is_empty() {
            let _: redis::RedisResult<i64> = conn.del(&keys).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
