//! What `bench chat` prints: each level, the breakdown of the switchboard path (the worker's
//! histograms, the round trips it is made of) and the summary.

use std::sync::Arc;
use std::time::Instant;

use crate::stats::Samples;

use super::{Level, WorkerSide, ms};

#[allow(clippy::print_stdout)]
pub(super) fn print_level(path: &str, c: usize, l: &Level) {
    println!(
        "chat: path={path} concurrency={c} turns={} ttft_p50_ms={:.3} ttft_p99_ms={:.3} \
         total_p50_ms={:.3} total_p99_ms={:.3} turns_per_s={:.0}",
        l.ttft.len(),
        l.ttft.p50(),
        l.ttft.p99(),
        l.total.p50(),
        l.total.p99(),
        l.ttft.len() as f64 / l.wall_secs
    );
}

#[allow(clippy::print_stdout)]
pub(super) fn print_breakdown(c: usize, s: &Level, w: &WorkerSide) {
    // client side: POST → headers (API: auth, rate limit, start_turn, publish, subscribe,
    // enqueue) → message.created frame → first token; worker side: means of its histograms
    println!(
        "chat: breakdown concurrency={c} (p50 / mean ms) post_to_headers={:.3}/{:.3} \
         post_to_created={:.3}/{:.3} post_to_first_token={:.3}/{:.3} | worker means: \
         pickup={:.3} model_ttft={:.3} job={:.3} | token events per turn (20 tokens): mean={:.2}",
        s.headers.p50(),
        s.headers.mean(),
        s.created.p50(),
        s.created.mean(),
        s.ttft.p50(),
        s.ttft.mean(),
        w.pickup_ms,
        w.model_ttft_ms,
        w.job_ms,
        s.token_events.mean()
    );
}

#[allow(clippy::print_stdout)]
pub(super) fn print_summary(rows: &[(usize, Level, Level, WorkerSide)], lite: &[(usize, Level)]) {
    println!();
    println!(
        "| concurrency | path | TTFT p50 ms | TTFT p99 ms | total p50 ms | total p99 ms | turns/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    let line = |c: usize, path: &str, l: &Level| {
        println!(
            "| {c} | {path} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
            l.ttft.p50(),
            l.ttft.p99(),
            l.total.p50(),
            l.total.p99(),
            l.ttft.len() as f64 / l.wall_secs
        );
    };
    for (c, d, s, _) in rows {
        line(*c, "direct", d);
        if let Some((_, l)) = lite.iter().find(|(lc, _)| lc == c) {
            line(*c, "litellm", l);
        }
        line(*c, "switchboard", s);
    }
    println!();
    println!(
        "| concurrency | overhead TTFT p50 ms | overhead TTFT p99 ms | overhead total p50 ms | overhead total p99 ms |"
    );
    println!("|---|---|---|---|---|");
    for (c, d, s, _) in rows {
        println!(
            "| {c} | {:.2} | {:.2} | {:.2} | {:.2} |",
            s.ttft.p50() - d.ttft.p50(),
            s.ttft.p99() - d.ttft.p99(),
            s.total.p50() - d.total.p50(),
            s.total.p99() - d.total.p99()
        );
    }
    println!();
}

/// Sums and counts of the worker's histograms in this process's recorder.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct WorkerMetrics {
    pickup: (f64, f64),
    model_ttft: (f64, f64),
    job: (f64, f64),
}

impl WorkerMetrics {
    pub(super) fn since(&self, before: &WorkerMetrics) -> WorkerSide {
        let mean = |a: (f64, f64), b: (f64, f64)| {
            let n = a.1 - b.1;
            if n > 0.0 {
                (a.0 - b.0) / n * 1000.0
            } else {
                f64::NAN
            }
        };
        WorkerSide {
            pickup_ms: mean(self.pickup, before.pickup),
            model_ttft_ms: mean(self.model_ttft, before.model_ttft),
            job_ms: mean(self.job, before.job),
        }
    }
}

pub(super) fn worker_metrics() -> WorkerMetrics {
    let text = jobs::telemetry::prometheus().render();
    let sum_count = |name: &str, filter: &str| {
        let (mut sum, mut count) = (0.0, 0.0);
        for line in text.lines() {
            if !line.contains(filter) {
                continue;
            }
            let value = || {
                line.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            if line.starts_with(&format!("{name}_sum")) {
                sum += value();
            } else if line.starts_with(&format!("{name}_count")) {
                count += value();
            }
        }
        (sum, count)
    };
    WorkerMetrics {
        pickup: sum_count("bus_job_pickup_seconds", "queue=\"chat\""),
        model_ttft: sum_count("model_time_to_first_token_seconds", ""),
        job: sum_count("bus_job_duration_seconds", "queue=\"chat\""),
    }
}

/// The cost of the round trips the chat path is made of, one at a time (p50 / p99 ms): what
/// the breakdown is explained with.
#[allow(clippy::print_stdout)]
pub(super) async fn primitives(settings: &config::Settings) -> anyhow::Result<()> {
    const N: usize = 300;
    let redis = Arc::new(jobs::RedisHandle::new(&settings.redis)?);
    let publisher = jobs::events::EventPublisher::new(redis.clone(), &settings.events);
    let pool = store::pool(&settings.database)?;
    sqlx::query("CREATE TABLE bench_commit (id int PRIMARY KEY, n bigint NOT NULL)")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO bench_commit VALUES (1, 0)")
        .execute(&pool)
        .await?;
    let response = uuid::Uuid::now_v7();
    let token = jobs::events::ResponseEvent::Token {
        text: "word ".to_owned(),
    };
    let mut conn = redis.conn().await?;
    let (mut ping, mut publish, mut select, mut commit) = (
        Vec::with_capacity(N),
        Vec::with_capacity(N),
        Vec::with_capacity(N),
        Vec::with_capacity(N),
    );
    for _ in 0..N {
        let t = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        ping.push(ms(t.elapsed()));
        let t = Instant::now();
        publisher.publish(response, &token).await?;
        publish.push(ms(t.elapsed()));
        let t = Instant::now();
        sqlx::query("SELECT 1").execute(&pool).await?;
        select.push(ms(t.elapsed()));
        let t = Instant::now();
        sqlx::query("UPDATE bench_commit SET n = n + 1 WHERE id = 1")
            .execute(&pool)
            .await?;
        commit.push(ms(t.elapsed()));
    }
    pool.close().await;
    let f = |v: Vec<f64>| {
        let s = Samples::new(v);
        format!("{:.3}/{:.3}", s.p50(), s.p99())
    };
    println!(
        "chat: round trips (p50/p99 ms, one at a time): redis_ping={} publish_event={} \
         pg_select_1={} pg_update_autocommit={}",
        f(ping),
        f(publish),
        f(select),
        f(commit)
    );
    Ok(())
}
