//! `bench fairness`: one org's flood against another org's steady turns, on the real Redis and
//! PostgreSQL (a scratch database), an in-process API and chat worker, and an in-process fake
//! upstream whose every call waits `--delay-ms` before its first token.
//!
//! Three phases, each on a Redis prefix of its own (a phase's leftover backlog cannot reach the
//! next one):
//! 1. **alone** — org B sends a streamed turn every second; TTFT = POST sent → first `token`;
//! 2. **flooded** — org A posts `--flood` turns at once (JSON mode, answered 202 at once), then
//!    B sends its turns as in 1, with fair admission (`[queues.chat] fair = true`);
//! 3. **fifo** — the same as 2 with fair admission off (first come, first served).
//!
//! The last line is
//! `fairness: b_alone_p99_ms=X b_flooded_p99_ms=Y fifo_b_flooded_p99_ms=Z job_ms=D`, where D is
//! one job's duration (the upstream's delay; the two-token reply adds little). The goal:
//! Y ≤ 2·X + D.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde_json::{Value, json};
use testkit::{Behaviour, FakeUpstream};
use tokio_util::task::TaskTracker;

use crate::chat::{create_conversation, event_name, find};
use crate::scratch::ScratchDb;
use crate::stats::Samples;

const MODEL: &str = "bench-fair";

#[derive(clap::Args, Debug, Clone)]
pub struct FairnessArgs {
    /// Turns org A posts at once.
    #[arg(long, default_value_t = 1000)]
    flood: usize,
    /// Turns org B sends, one a second, in each phase.
    #[arg(long, default_value_t = 20)]
    b_turns: usize,
    /// The fake upstream's delay before each call's first token.
    #[arg(long, default_value_t = 200)]
    delay_ms: u64,
    /// The chat worker's concurrency (WORKER_CONCURRENCY).
    #[arg(long, default_value_t = 8)]
    worker_concurrency: usize,
}

/// One phase's B TTFTs (ms).
struct Phase {
    ttft: Samples,
}

#[allow(clippy::print_stdout)]
pub async fn bench_fairness(settings: config::Settings, args: FairnessArgs) -> anyhow::Result<()> {
    let redis = Arc::new(jobs::RedisHandle::new(&settings.redis).context("REDIS_URL")?);
    redis.ping().await.context("Redis is unreachable")?;
    let db = ScratchDb::create(&settings.database.url).await?;
    let outcome = phases(&settings, &args, &db).await;
    db.drop_db().await;
    outcome
}

#[allow(clippy::print_stdout)]
async fn phases(
    settings: &config::Settings,
    args: &FairnessArgs,
    db: &ScratchDb,
) -> anyhow::Result<()> {
    println!(
        "fairness: scratch database {}, {} flood turns, B one turn a second ({} a phase), upstream delay {} ms, worker concurrency {}",
        db.name, args.flood, args.b_turns, args.delay_ms, args.worker_concurrency
    );
    let fake = FakeUpstream::start()
        .await
        .context("start the fake upstream")?;
    let reply = Behaviour::Reply {
        text: "Fair enough.".to_owned(),
        tokens: Some(vec!["Fair ".to_owned(), "enough.".to_owned()]),
        first_token_delay_ms: args.delay_ms,
        token_delay_ms: 0,
    };
    fake.client().set_default(MODEL, reply).await?;
    let mut base = settings.clone();
    base.database.url = db.url.clone().into();
    base.litellm.base_url = fake.url();
    base.litellm.api_key = None;
    base.chat.default_model = MODEL.to_owned();
    base.chat.default_fallback_model = MODEL.to_owned();
    base.api.addr = "127.0.0.1:0".to_owned();
    base.api.message_rate_limit = 1_000_000;
    base.api.sse_max_streams_per_user = 1_000_000;
    base.api.json_wait_secs = 0;
    base.worker.concurrency = args.worker_concurrency;
    base.database.max_connections = 32;
    if base.auth.jwt_secret.is_none() {
        base.auth.jwt_secret = Some(format!("bench-{}", uuid::Uuid::new_v4().simple()).into());
    }
    let mut outcome = Vec::new();
    for (name, flood, fair) in [
        ("alone", 0, true),
        ("flooded", args.flood, true),
        ("fifo", args.flood, false),
    ] {
        let mut s = base.clone();
        s.redis.prefix = format!("{}{name}", settings.redis.prefix);
        s.queues.chat.fair = fair;
        let r = phase(&s, args, flood).await;
        if let Ok(r) = jobs::RedisHandle::new(&s.redis) {
            crate::bus::cleanup(&r, &s.redis).await;
        }
        let p = r.with_context(|| format!("phase {name}"))?;
        println!(
            "fairness: {name}: b_ttft_p50_ms={:.0} b_ttft_p99_ms={:.0} ({} turns)",
            p.ttft.p50(),
            p.ttft.p99(),
            p.ttft.len()
        );
        outcome.push(p);
    }
    let job_ms = args.delay_ms as f64;
    println!(
        "fairness: b_alone_p99_ms={:.0} b_flooded_p99_ms={:.0} fifo_b_flooded_p99_ms={:.0} job_ms={job_ms:.0}",
        outcome[0].ttft.p99(),
        outcome[1].ttft.p99(),
        outcome[2].ttft.p99()
    );
    Ok(())
}

/// An API and a chat worker on `settings`; A's flood, then B's turns a second apart.
async fn phase(
    settings: &config::Settings,
    args: &FairnessArgs,
    flood: usize,
) -> anyhow::Result<Phase> {
    let stack = crate::stack::Stack::start(settings, 1).await?;
    let base = stack.base.clone();
    let result = async {
        let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
        let a = register(&http, &base, "A").await?;
        let b = register(&http, &base, "B").await?;
        let b_conversation = create_conversation(&http, &base, &b).await?;
        if flood > 0 {
            let conversations = 20.min(flood);
            let mut slots = Vec::with_capacity(conversations);
            for _ in 0..conversations {
                slots.push(create_conversation(&http, &base, &a).await?);
            }
            let posts = (0..flood).map(|i| {
                let (http, base, a, c) = (&http, &base, &a, &slots[i % slots.len()]);
                async move {
                    let r = http
                        .post(format!("{base}/v1/conversations/{c}/messages"))
                        .bearer_auth(a)
                        .json(&json!({"content": format!("flood {i}")}))
                        .send()
                        .await?;
                    anyhow::ensure!(r.status().as_u16() == 202, "flood: {}", r.status());
                    Ok(())
                }
            });
            let results: Vec<anyhow::Result<()>> = futures::stream::iter(posts)
                .buffer_unordered(64)
                .collect()
                .await;
            results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
        }
        let mut ttft = Vec::with_capacity(args.b_turns);
        let mut next = Instant::now();
        let turns = TaskTracker::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..args.b_turns {
            tokio::time::sleep_until(next.into()).await;
            next += Duration::from_secs(1);
            let (http, base, b, c, tx) = (
                http.clone(),
                base.clone(),
                b.clone(),
                b_conversation.clone(),
                tx.clone(),
            );
            turns.spawn(async move {
                let _ = tx.send(b_turn(&http, &base, &b, &c).await);
            });
        }
        drop(tx);
        turns.close();
        turns.wait().await;
        while let Some(r) = rx.recv().await {
            ttft.push(r?);
        }
        Ok(Phase {
            ttft: Samples::new(ttft),
        })
    }
    .await;
    stack.stop().await;
    result
}

async fn register(http: &reqwest::Client, base: &str, org: &str) -> anyhow::Result<String> {
    let r = http
        .post(format!("{base}/v1/auth/register"))
        .json(&json!({
            "email": format!("fair-{org}-{}@example.com", uuid::Uuid::new_v4().simple()),
            "password": "correct horse battery",
            "name": "Bench",
            "org_name": format!("Org {org}"),
        }))
        .send()
        .await?;
    anyhow::ensure!(r.status().as_u16() == 201, "register: {}", r.status());
    let v: Value = r.json().await?;
    Ok(v["token"]
        .as_str()
        .context("register: no token")?
        .to_owned())
}

/// One streamed turn of B: ms from the POST to the first `token` event (the stream is read to
/// its end).
async fn b_turn(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    conversation: &str,
) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let resp = http
        .post(format!("{base}/v1/conversations/{conversation}/messages"))
        .bearer_auth(token)
        .json(&json!({"content": "and mine?", "stream": true}))
        .send()
        .await?;
    anyhow::ensure!(resp.status().as_u16() == 200, "B: {}", resp.status());
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut first = None;
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(pos) = find(&buf, b"\n\n") {
            let frame: Vec<u8> = buf.drain(..pos + 2).collect();
            match event_name(&frame) {
                Some("token") => {
                    first.get_or_insert_with(|| t0.elapsed());
                }
                Some("message.completed") => {
                    let first = first.context("completed without a token")?;
                    return Ok(first.as_secs_f64() * 1000.0);
                }
                Some("error") => anyhow::bail!(
                    "B's turn failed: {}",
                    String::from_utf8_lossy(&frame).trim()
                ),
                _ => {}
            }
        }
    }
    anyhow::bail!("B's stream ended before message.completed")
}
