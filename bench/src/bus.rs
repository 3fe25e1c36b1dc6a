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
//!
//! With `--cluster <seeds>` the same run follows on that Redis Cluster, with the `memory` queue
//! in `--partitions` partitions (3: `{q:memory}`, `{q:memory:1}`, `{q:memory:2}` hash to slots
//! 8263, 13033 and 650, one per primary of a cluster formed by `redis-cli --cluster create`
//! with 3 primaries), the raw `XADD` rate measured on keys of those same hash tags, and producers
//! whose probe keys spread the jobs over the partitions. Its line is `bus-cluster: …` with the
//! same figures.

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
    cluster: Option<(String, u16)>,
) -> anyhow::Result<()> {
    let single = measure(
        settings,
        secs,
        producers,
        concurrency,
        samples,
        Queue::Actions,
    )
    .await?;
    let Some((seeds, partitions)) = cluster else {
        print_line("bus", &single);
        return Ok(());
    };
    let mut on_cluster = settings.clone();
    on_cluster.redis.url = seeds.into();
    on_cluster.redis.cluster = true;
    on_cluster.queues.partitions = partitions;
    let clustered = measure(
        &on_cluster,
        secs,
        producers,
        concurrency,
        samples,
        Queue::Memory,
    )
    .await?;
    print_line("bus", &single);
    print_line("bus-cluster", &clustered);
    Ok(())
}

#[allow(clippy::print_stdout)]
fn print_line(label: &str, (raw, rates, p50, p99): &Figures) {
    for (n, rate) in rates {
        println!("{label}: consumers={n} jobs_per_s={rate:.0}");
    }
    let best = rates.iter().map(|(_, r)| *r).fold(0.0, f64::max);
    println!("{label}: raw_xadd_per_s={raw:.0}");
    println!(
        "{label}: jobs_per_s={best:.0} ratio_to_xadd={:.2} pickup_p50_ms={p50:.3} pickup_p99_ms={p99:.3}",
        best / raw
    );
}

async fn measure(
    settings: &config::Settings,
    secs: u64,
    producers: usize,
    concurrency: usize,
    samples: usize,
    queue: Queue,
) -> anyhow::Result<Figures> {
    let redis = Arc::new(jobs::RedisHandle::new(&settings.redis).context("REDIS_URL")?);
    redis.ping().await.context("Redis is unreachable")?;
    let bus = Bus::new(redis.clone(), &settings.queues);
    bus.record_partitions().await?;
    let outcome = run_all(&bus, settings, secs, producers, concurrency, samples, queue).await;
    cleanup(&redis, &settings.redis).await;
    outcome
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
    queue: Queue,
) -> anyhow::Result<Figures> {
    let dur = Duration::from_secs(secs);
    let raw = raw_xadd(bus, queue, dur, producers).await?;
    println!("bus: raw_xadd_per_s={raw:.0} ({producers} tasks, {secs} s)");
    let mut rates = Vec::new();
    for consumers in [1usize, 2, 4] {
        let rate = end_to_end(bus, settings, queue, dur, producers, consumers, concurrency).await?;
        println!("bus: consumers={consumers} jobs_per_s={rate:.0}");
        rates.push((consumers, rate));
    }
    let (p50, p99) = pickup(bus, settings, queue, samples).await?;
    println!("bus: pickup_p50_ms={p50:.3} pickup_p99_ms={p99:.3} ({samples} samples)");
    // measured again at the end; the higher of the two keeps the ratio conservative on a
    // machine shared with other work
    let raw_again = raw_xadd(bus, queue, dur, producers).await?;
    println!("bus: raw_xadd_per_s={raw_again:.0} (again, at the end)");
    Ok((raw.max(raw_again), rates, p50, p99))
}

fn probe_body() -> String {
    jobs::Envelope::new(Probe::new("bench"))
        .to_json()
        .unwrap_or_default()
}

/// The bench's probe for producer `i` on `queue`: on several partitions, producers' keys
/// spread the jobs over them.
fn probe(queue: Queue, i: usize) -> Probe {
    Probe {
        queue: Some(queue),
        ..Probe::new(format!("bench{i}"))
    }
}

/// `XADD`s of a probe-sized body from `tasks` concurrent tasks for `dur`, to a key beside each
/// partition stream of `queue` (same hash tag, so the same shard), task `i` on partition
/// `i mod n`.
async fn raw_xadd(bus: &Bus, queue: Queue, dur: Duration, tasks: usize) -> anyhow::Result<f64> {
    let keys: Vec<String> = bus
        .parts(queue)
        .map(|p| format!("{}:rawxadd", bus.keys(p).stream))
        .collect();
    let conn = bus.redis().conn().await?;
    let count = Arc::new(AtomicU64::new(0));
    let body = probe_body();
    let tracker = TaskTracker::new();
    let start = Instant::now();
    for i in 0..tasks {
        let key = keys[i % keys.len()].clone();
        let (mut conn, body, count) = (conn.clone(), body.clone(), count.clone());
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
    for key in &keys {
        let _: i64 = conn.del(key).await?;
    }
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

fn options(settings: &config::Settings, queue: Queue, concurrency: usize) -> WorkerOptions {
    let mut o = WorkerOptions::from_settings(settings, vec![queue]);
    o.concurrency = concurrency;
    o.shutdown_grace = Duration::from_secs(5);
    o
}

/// Jobs/s from the first enqueue to the last ack, producing for `dur` while `consumers`
/// workers consume.
async fn end_to_end(
    bus: &Bus,
    settings: &config::Settings,
    queue: Queue,
    dur: Duration,
    producers: usize,
    consumers: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    for p in bus.parts(queue) {
        bus.ensure_group(p).await?;
    }
    let handled = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let workers = TaskTracker::new();
    for _ in 0..consumers {
        let w = Worker::new(
            bus.clone(),
            noop_registry(handled.clone()),
            options(settings, queue, concurrency),
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
    for i in 0..producers {
        let (bus, produced, failed) = (bus.clone(), produced.clone(), failed.clone());
        prod.spawn(async move {
            let job = probe(queue, i);
            while start.elapsed() < dur {
                if bus.enqueue(job.clone()).await.is_err() {
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
    let streams: Vec<String> = bus
        .parts(queue)
        .map(|p| bus.keys(p).stream.clone())
        .collect();
    loop {
        let mut len = 0;
        for stream in &streams {
            let n: u64 = conn.xlen(stream).await?;
            len += n;
        }
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
    queue: Queue,
    samples: usize,
) -> anyhow::Result<(f64, f64)> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let mut r = Registry::new();
    r.register::<Probe, _, _>(move |_ctx, _job| {
        let _ = tx.send(Instant::now());
        async { Ok(()) }
    });
    let w = Worker::new(bus.clone(), r, options(settings, queue, 8));
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
        for i in 0..samples {
            // let the reader go back to its blocking read: the bus is idle
            tokio::time::sleep(Duration::from_millis(3)).await;
            let t0 = Instant::now();
            bus.enqueue(probe(queue, i)).await?;
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

/// Delete every key of the bench's prefix (on every node of a cluster, one key at a time).
pub async fn cleanup(redis: &jobs::RedisHandle, settings: &config::RedisSettings) {
    if redis.is_cluster() {
        for url in settings.urls() {
            let Ok(node) = jobs::RedisHandle::new(&config::RedisSettings {
                url: url.into(),
                prefix: redis.prefix().to_owned(),
                cluster: false,
            }) else {
                continue;
            };
            let Ok(mut conn) = node.conn().await else {
                continue;
            };
            let mut cursor: u64 = 0;
            loop {
                let r: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{}:*", redis.prefix()))
                    .arg("COUNT")
                    .arg(500)
                    .query_async(&mut conn)
                    .await;
                let Ok((next, keys)) = r else { break };
                for k in keys {
                    // a replica refuses: its primary deletes it
                    let _: redis::RedisResult<i64> = conn.del(&k).await;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        return;
    }
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
