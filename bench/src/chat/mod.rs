//! `bench chat`: the chat path, in one run, against the real Redis and PostgreSQL.
//!
//! 1. **direct** — a streamed completion from an in-process [`FakeUpstream`] (no delay, a
//!    20-token reply) through `llm::LlmClient`;
//! 2. **litellm** — the same through the LiteLLM proxy (`LITELLM_BASE_URL`, model
//!    `fake/<name>` routed to the shared fake upstream, `FAKE_UPSTREAM_URL`); a reference;
//! 3. **switchboard** — `POST /v1/conversations/{id}/messages` `{stream: true}` on an
//!    in-process API (port 0) → bus → an in-process chat worker → the same in-process fake →
//!    pub/sub → SSE; TTFT = POST sent → first `token` event, total → `message.completed`.
//!
//! Each at concurrency 1, 50 and 200 (closed loop: that many tasks, each running turns back to
//! back). The overhead is switchboard minus direct, on TTFT. A breakdown of where the
//! switchboard time goes comes from the client's timestamps (response headers, the
//! `message.created` frame, the first token) and from the worker's own histograms
//! (`bus_job_pickup_seconds`, `model_time_to_first_token_seconds`) in this process's recorder.
//!
//! Then [`crate::sse`]: how many open SSE streams one API process holds, and its memory each.
//!
//! The last line is `chat: overhead_p50_ms=X overhead_p99_ms=Y concurrency=200` (TTFT).

mod paths;
mod report;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use testkit::{Behaviour, FakeUpstream};

use crate::scratch::ScratchDb;
use crate::stats::Samples;

use paths::{Direct, Switchboard, litellm_path, switchboard_via_litellm, via_litellm_prefix};
pub use paths::{create_conversation, event_name, find};
use report::{primitives, print_breakdown, print_level, print_summary, worker_metrics};

#[derive(clap::Args, Debug, Clone)]
pub struct ChatArgs {
    /// Concurrency levels (concurrent turns).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 50, 200])]
    concurrency: Vec<usize>,
    /// Turns measured per level (rounded up to a multiple of the concurrency; at least
    /// 3 per task).
    #[arg(long, default_value_t = 400)]
    turns: usize,
    /// Turns per level through LiteLLM (it is slow; a reference figure).
    #[arg(long, default_value_t = 200)]
    litellm_turns: usize,
    /// Skip the LiteLLM path.
    #[arg(long)]
    no_litellm: bool,
    /// Chat workers (`jobs::Worker` instances) in the process.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// WORKER_CONCURRENCY of each worker.
    #[arg(long, default_value_t = 256)]
    worker_concurrency: usize,
    /// Open SSE stream counts for the capacity measurement (cumulative).
    #[arg(long, value_delimiter = ',', default_values_t = [1000usize, 5000, 10000])]
    streams: Vec<usize>,
    /// Skip the SSE capacity measurement.
    #[arg(long)]
    no_sse: bool,
}

/// The reply of the fake: 20 tokens.
const REPLY: [&str; 20] = [
    "Your ",
    "plan ",
    "is ",
    "on ",
    "track: ",
    "three ",
    "tasks ",
    "are ",
    "done, ",
    "two ",
    "are ",
    "in ",
    "progress ",
    "and ",
    "one ",
    "is ",
    "due ",
    "on ",
    "Friday",
    ".",
];
const QUESTION: &str = "How is my plan for this week going, and what is still open?";
const MODEL: &str = "bench-chat";
const FALLBACK: &str = "bench-chat-fallback";
/// Bound of one turn; a turn slower than this fails the bench.
const TURN_LIMIT: Duration = Duration::from_secs(60);

/// One measured turn, milliseconds from the request being sent.
#[derive(Debug, Clone, Copy, Default)]
struct Turn {
    ttft: f64,
    total: f64,
    /// Switchboard only: response headers; the `message.created` frame.
    headers: f64,
    created: f64,
    /// Switchboard only: `token` events received (tokens that arrived together are coalesced).
    token_events: f64,
}

#[derive(Debug, Default)]
struct Level {
    ttft: Samples,
    total: Samples,
    headers: Samples,
    created: Samples,
    token_events: Samples,
    wall_secs: f64,
}

impl Level {
    fn new(turns: Vec<Turn>, wall_secs: f64) -> Self {
        Self {
            ttft: Samples::new(turns.iter().map(|t| t.ttft).collect()),
            total: Samples::new(turns.iter().map(|t| t.total).collect()),
            headers: Samples::new(turns.iter().map(|t| t.headers).collect()),
            created: Samples::new(turns.iter().map(|t| t.created).collect()),
            token_events: Samples::new(turns.iter().map(|t| t.token_events).collect()),
            wall_secs,
        }
    }
}

/// Means from the worker's histograms over one level (milliseconds).
#[derive(Debug, Default, Clone, Copy)]
struct WorkerSide {
    pickup_ms: f64,
    model_ttft_ms: f64,
    job_ms: f64,
}

#[allow(clippy::print_stdout)]
pub async fn bench_chat(mut settings: config::Settings, args: ChatArgs) -> anyhow::Result<()> {
    let redis = Arc::new(jobs::RedisHandle::new(&settings.redis).context("REDIS_URL")?);
    redis.ping().await.context("Redis is unreachable")?;
    let db = ScratchDb::create(&settings.database.url).await?;
    println!(
        "chat: scratch database {}, Redis prefix {}",
        db.name, settings.redis.prefix
    );
    let litellm = settings.litellm.clone();
    settings.database.url = db.url.clone().into();
    let outcome = run(&mut settings, &litellm, &args).await;
    crate::bus::cleanup(&redis, &settings.redis).await;
    for prefix in [
        crate::sse::prefix_of(&settings.redis.prefix),
        via_litellm_prefix(&settings.redis.prefix),
    ] {
        if let Ok(r) = jobs::RedisHandle::new(&config::RedisSettings {
            prefix,
            ..settings.redis.clone()
        }) {
            crate::bus::cleanup(&r, &settings.redis).await;
        }
    }
    db.drop_db().await;
    outcome
}

#[allow(clippy::print_stdout)]
async fn run(
    settings: &mut config::Settings,
    litellm: &config::LitellmSettings,
    args: &ChatArgs,
) -> anyhow::Result<()> {
    let fake = FakeUpstream::start()
        .await
        .context("start the fake upstream")?;
    let reply = Behaviour::reply_tokens(&REPLY);
    fake.client().set_default(MODEL, reply.clone()).await?;
    fake.client().set_default(FALLBACK, reply.clone()).await?;

    settings.api.addr = "127.0.0.1:0".to_owned();
    settings.api.message_rate_limit = 1_000_000;
    // 25 concurrent streams per user at concurrency 200 (8 users)
    settings.api.sse_max_streams_per_user = 1_000_000;
    settings.worker.concurrency = args.worker_concurrency;
    settings.database.max_connections = 32;
    settings.litellm.base_url = fake.url();
    settings.litellm.api_key = None;
    settings.chat.default_model = MODEL.to_owned();
    settings.chat.default_fallback_model = FALLBACK.to_owned();
    if settings.auth.jwt_secret.is_none() {
        settings.auth.jwt_secret = Some(format!("bench-{}", uuid::Uuid::new_v4().simple()).into());
    }

    let stack = crate::stack::Stack::start(settings, args.workers).await?;
    let result = measure(settings, litellm, args, &fake, &stack.base).await;
    stack.stop().await;
    result
}

fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1024)
        .build()?)
}

#[allow(clippy::print_stdout)]
async fn measure(
    settings: &config::Settings,
    litellm: &config::LitellmSettings,
    args: &ChatArgs,
    fake: &FakeUpstream,
    base: &str,
) -> anyhow::Result<()> {
    let http = http_client()?;
    let max_c = args.concurrency.iter().copied().max().unwrap_or(1);
    // users and one conversation per concurrent task
    let sb = Arc::new(Switchboard::setup(&http, base, max_c).await?);
    let direct = Arc::new(Direct::new(
        &config::LitellmSettings {
            base_url: fake.url(),
            api_key: None,
            ..litellm.clone()
        },
        MODEL,
        settings,
    )?);

    // warm up every path (connections, prepared statements, the fake's allocations)
    run_level(20, 2, |i| {
        let d = direct.clone();
        async move { d.turn(i).await }
    })
    .await?;
    run_level(20, 2, |i| {
        let s = sb.clone();
        async move { s.turn(i).await }
    })
    .await?;

    primitives(settings).await?;

    let mut rows: Vec<(usize, Level, Level, WorkerSide)> = Vec::new();
    for &c in &args.concurrency {
        let per_task = args.turns.div_ceil(c).max(3);
        let d = run_level(c, per_task, |i| {
            let d = direct.clone();
            async move { d.turn(i).await }
        })
        .await?;
        let before = worker_metrics();
        let s = run_level(c, per_task, |i| {
            let s = sb.clone();
            async move { s.turn(i).await }
        })
        .await?;
        let ws = worker_metrics().since(&before);
        print_level("direct", c, &d);
        print_level("switchboard", c, &s);
        println!(
            "chat: concurrency={c} overhead_ttft_p50_ms={:.3} overhead_ttft_p99_ms={:.3} \
             overhead_total_p50_ms={:.3} overhead_total_p99_ms={:.3}",
            s.ttft.p50() - d.ttft.p50(),
            s.ttft.p99() - d.ttft.p99(),
            s.total.p50() - d.total.p50(),
            s.total.p99() - d.total.p99(),
        );
        print_breakdown(c, &s, &ws);
        rows.push((c, d, s, ws));
    }

    let mut lite_rows: Vec<(usize, Level)> = Vec::new();
    if !args.no_litellm {
        match litellm_path(litellm, settings).await {
            Ok(l) => {
                let l = Arc::new(l);
                for &c in &args.concurrency {
                    let per_task = args.litellm_turns.div_ceil(c).max(1);
                    match run_level(c, per_task, |i| {
                        let l = l.clone();
                        async move { l.turn(i).await }
                    })
                    .await
                    {
                        Ok(level) => {
                            print_level("litellm", c, &level);
                            lite_rows.push((c, level));
                        }
                        Err(e) => println!("chat: litellm concurrency={c} failed: {e:#}"),
                    }
                }
            }
            Err(e) => println!("chat: litellm path skipped: {e:#}"),
        }
        if let Err(e) = switchboard_via_litellm(settings, litellm, args).await {
            println!("chat: switchboard+litellm skipped: {e:#}");
        }
    }

    let sse = if args.no_sse {
        None
    } else {
        match crate::sse::capacity(settings, &args.streams).await {
            Ok(r) => Some(r),
            Err(e) => {
                println!("sse: failed: {e:#}");
                None
            }
        }
    };

    print_summary(&rows, &lite_rows);
    if let Some(r) = &sse {
        r.print();
    }
    let last = rows
        .iter()
        .find(|(c, ..)| *c == 200)
        .or_else(|| rows.last())
        .context("no level measured")?;
    let (c, d, s, _) = last;
    println!("chat: overhead is on TTFT (switchboard minus direct, same concurrency)");
    println!(
        "chat: overhead_p50_ms={:.3} overhead_p99_ms={:.3} concurrency={c}",
        s.ttft.p50() - d.ttft.p50(),
        s.ttft.p99() - d.ttft.p99()
    );
    Ok(())
}
/// `c` tasks, each running `per_task` turns back to back; task `i` passes `i` to `turn`.
async fn run_level<F, Fut>(c: usize, per_task: usize, turn: F) -> anyhow::Result<Level>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Turn>> + Send + 'static,
{
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..c {
        let futs: Vec<Fut> = (0..per_task).map(|_| turn(i)).collect();
        set.spawn(async move {
            let mut out = Vec::with_capacity(futs.len());
            for f in futs {
                let t = tokio::time::timeout(TURN_LIMIT, f)
                    .await
                    .context("a turn took longer than 60 s")??;
                out.push(t);
            }
            anyhow::Ok(out)
        });
    }
    let mut turns = Vec::with_capacity(c * per_task);
    let mut failure = None;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(t)) => turns.extend(t),
            Ok(Err(e)) => {
                failure.get_or_insert(e);
                set.abort_all();
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                failure.get_or_insert(anyhow::anyhow!("turn task failed: {e}"));
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(Level::new(turns, start.elapsed().as_secs_f64()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
