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

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use jobs::{Queue, Worker, WorkerOptions};
use serde_json::{Value, json};
use testkit::{Behaviour, FakeClient, FakeUpstream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::scratch::ScratchDb;
use crate::stats::Samples;

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
    crate::bus::cleanup(&redis).await;
    for prefix in [
        crate::sse::prefix_of(&settings.redis.prefix),
        via_litellm_prefix(&settings.redis.prefix),
    ] {
        if let Ok(r) = jobs::RedisHandle::new(&config::RedisSettings {
            prefix,
            ..settings.redis.clone()
        }) {
            crate::bus::cleanup(&r).await;
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

    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let result = async {
        let app = api::Application::build(settings.clone()).await?;
        let base = format!("http://{}", app.addr());
        {
            let stop = stop.clone();
            tasks.spawn(async move { app.run_until_stopped(stop).await });
        }
        let pool = store::pool(&settings.database)?;
        let redis = Arc::new(jobs::RedisHandle::new(&settings.redis)?);
        for _ in 0..args.workers {
            let mut registry = jobs::Registry::new();
            workers::handlers::chat::ChatHandler::new(pool.clone(), redis.clone(), settings)?
                .register(&mut registry);
            let opts = WorkerOptions::from_settings(settings, vec![Queue::Chat]);
            let worker = Worker::new(
                jobs::Bus::new(redis.clone(), &settings.queues),
                registry,
                opts,
            );
            let stop = stop.clone();
            tasks.spawn(async move {
                if let Err(e) = worker.run(stop).await {
                    tracing::error!(error = %e, "chat worker stopped");
                }
            });
        }
        measure(settings, litellm, args, &fake, &base).await
    }
    .await;
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(30), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("API or worker did not stop within 30 s");
    }
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

#[allow(clippy::print_stdout)]
fn print_level(path: &str, c: usize, l: &Level) {
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
fn print_breakdown(c: usize, s: &Level, w: &WorkerSide) {
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
fn print_summary(rows: &[(usize, Level, Level, WorkerSide)], lite: &[(usize, Level)]) {
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

/// A streamed completion through `llm::LlmClient` (direct to the fake, or via LiteLLM).
struct Direct {
    client: llm::LlmClient,
    req: llm::ChatRequest,
    timeouts: llm::Timeouts,
}

impl Direct {
    fn new(
        litellm: &config::LitellmSettings,
        model: &str,
        settings: &config::Settings,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            client: llm::LlmClient::new(litellm)?,
            // the shape of the worker's prompt: the system prompt and the question
            req: llm::ChatRequest {
                model: model.to_owned(),
                messages: vec![
                    llm::Message::system(workers::handlers::chat::prompt::SYSTEM_PROMPT),
                    llm::Message::user(QUESTION),
                ],
                tools: Vec::new(),
                params: llm::GenerationParams::from(&settings.chat),
            },
            timeouts: llm::Timeouts::from_settings(&settings.chat),
        })
    }

    async fn turn(&self, _task: usize) -> anyhow::Result<Turn> {
        let t0 = Instant::now();
        let mut stream = self.client.chat_stream(&self.req, self.timeouts).await?;
        let mut first = None;
        let mut tokens = 0usize;
        while let Some(ev) = stream.next().await {
            if let llm::ChatEvent::Token(_) = ev? {
                tokens += 1;
                first.get_or_insert_with(|| t0.elapsed());
            }
        }
        let total = t0.elapsed();
        anyhow::ensure!(tokens > 0, "the model sent no token");
        let ttft = first.unwrap_or(total);
        Ok(Turn {
            ttft: ms(ttft),
            total: ms(total),
            ..Turn::default()
        })
    }
}

/// The LiteLLM path: a unique `fake/<name>` model answered by the shared fake upstream.
async fn litellm_path(
    litellm: &config::LitellmSettings,
    settings: &config::Settings,
) -> anyhow::Result<Direct> {
    let fake_url =
        std::env::var("FAKE_UPSTREAM_URL").unwrap_or_else(|_| "http://127.0.0.1:4010".to_owned());
    let name = testkit::unique_model("bench-chat");
    FakeClient::new(&fake_url)
        .set_default(&name, Behaviour::reply_tokens(&REPLY))
        .await
        .with_context(|| format!("the shared fake upstream at {fake_url}"))?;
    let d = Direct::new(litellm, &testkit::via_litellm(&name), settings)?;
    d.turn(0)
        .await
        .with_context(|| format!("a first turn through LiteLLM at {}", litellm.base_url))?;
    Ok(d)
}

/// The API in this process: users, one conversation per concurrent task.
struct Switchboard {
    http: reqwest::Client,
    base: String,
    /// (token, conversation id), one per task index.
    slots: Vec<(String, String)>,
}

/// Concurrent turns per user (tasks share users; the rate limit is raised).
const TASKS_PER_USER: usize = 25;

impl Switchboard {
    async fn setup(http: &reqwest::Client, base: &str, tasks: usize) -> anyhow::Result<Self> {
        let users = tasks.div_ceil(TASKS_PER_USER).max(1);
        let mut tokens = Vec::with_capacity(users);
        for u in 0..users {
            let r = http
                .post(format!("{base}/v1/auth/register"))
                .json(&json!({
                    "email": format!("bench-{u}-{}@example.com", uuid::Uuid::new_v4().simple()),
                    "password": "correct horse battery",
                    "name": "Bench",
                    "org_name": format!("Bench {u}"),
                }))
                .send()
                .await?;
            anyhow::ensure!(r.status().as_u16() == 201, "register: {}", r.status());
            let v: Value = r.json().await?;
            tokens.push(
                v["token"]
                    .as_str()
                    .context("register: no token")?
                    .to_owned(),
            );
        }
        let mut slots = Vec::with_capacity(tasks);
        for i in 0..tasks {
            let token = tokens[i % users].clone();
            let conversation = create_conversation(http, base, &token).await?;
            slots.push((token, conversation));
        }
        Ok(Self {
            http: http.clone(),
            base: base.to_owned(),
            slots,
        })
    }

    async fn turn(&self, task: usize) -> anyhow::Result<Turn> {
        let (token, conversation) = &self.slots[task % self.slots.len()];
        let t0 = Instant::now();
        let resp = self
            .http
            .post(format!(
                "{}/v1/conversations/{conversation}/messages",
                self.base
            ))
            .bearer_auth(token)
            .json(&json!({"content": QUESTION, "stream": true}))
            .send()
            .await?;
        let headers = t0.elapsed();
        anyhow::ensure!(
            resp.status().as_u16() == 200,
            "POST messages: {}",
            resp.status()
        );
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let (mut created, mut first) = (None, None);
        let mut tokens = 0usize;
        let mut text = String::new();
        while let Some(chunk) = body.next().await {
            buf.extend_from_slice(&chunk?);
            while let Some(pos) = find(&buf, b"\n\n") {
                let frame: Vec<u8> = buf.drain(..pos + 2).collect();
                match event_name(&frame) {
                    Some("message.created") => {
                        created.get_or_insert_with(|| t0.elapsed());
                    }
                    Some("token") => {
                        tokens += 1;
                        first.get_or_insert_with(|| t0.elapsed());
                        text.push_str(&token_text(&frame)?);
                    }
                    Some("message.completed") => {
                        let total = t0.elapsed();
                        anyhow::ensure!(
                            text == REPLY.concat(),
                            "the tokens say {text:?}, not the 20-token reply"
                        );
                        let first = first.context("completed without a token")?;
                        return Ok(Turn {
                            ttft: ms(first),
                            total: ms(total),
                            headers: ms(headers),
                            created: ms(created.unwrap_or(first)),
                            token_events: tokens as f64,
                        });
                    }
                    Some("error") => anyhow::bail!(
                        "the turn failed: {}",
                        String::from_utf8_lossy(&frame).trim()
                    ),
                    _ => {}
                }
            }
        }
        anyhow::bail!("the stream ended before message.completed")
    }
}

pub async fn create_conversation(
    http: &reqwest::Client,
    base: &str,
    token: &str,
) -> anyhow::Result<String> {
    let r = http
        .post(format!("{base}/v1/conversations"))
        .bearer_auth(token)
        .json(&json!({"title": "bench"}))
        .send()
        .await?;
    anyhow::ensure!(r.status().as_u16() == 201, "conversation: {}", r.status());
    let v: Value = r.json().await?;
    Ok(v["id"].as_str().context("conversation: no id")?.to_owned())
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The `event:` field of one SSE frame.
/// The `text` of a `token` frame.
fn token_text(frame: &[u8]) -> anyhow::Result<String> {
    let data = std::str::from_utf8(frame)?
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .context("a token frame without data")?;
    let v: Value = serde_json::from_str(data)?;
    Ok(v["text"]
        .as_str()
        .context("a token without text")?
        .to_owned())
}

pub fn event_name(frame: &[u8]) -> Option<&str> {
    std::str::from_utf8(frame)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("event: "))
}

/// Sums and counts of the worker's histograms in this process's recorder.
#[derive(Debug, Default, Clone, Copy)]
struct WorkerMetrics {
    pickup: (f64, f64),
    model_ttft: (f64, f64),
    job: (f64, f64),
}

impl WorkerMetrics {
    fn since(&self, before: &WorkerMetrics) -> WorkerSide {
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

fn worker_metrics() -> WorkerMetrics {
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
async fn primitives(settings: &config::Settings) -> anyhow::Result<()> {
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

fn via_litellm_prefix(prefix: &str) -> String {
    format!("{prefix}ll")
}

/// The production shape: Switchboard with its worker calling the LiteLLM proxy (model
/// `fake/<unique>` → the shared fake). A second in-process API and worker on a Redis prefix of
/// their own; printed as `path=switchboard+litellm` (a reference, like the LiteLLM path).
#[allow(clippy::print_stdout)]
async fn switchboard_via_litellm(
    settings: &config::Settings,
    litellm: &config::LitellmSettings,
    args: &ChatArgs,
) -> anyhow::Result<()> {
    let fake_url =
        std::env::var("FAKE_UPSTREAM_URL").unwrap_or_else(|_| "http://127.0.0.1:4010".to_owned());
    let name = testkit::unique_model("bench-chat-sb");
    FakeClient::new(&fake_url)
        .set_default(&name, Behaviour::reply_tokens(&REPLY))
        .await?;
    let mut s = settings.clone();
    s.redis.prefix = via_litellm_prefix(&settings.redis.prefix);
    s.litellm = litellm.clone();
    s.chat.default_model = testkit::via_litellm(&name);
    s.chat.default_fallback_model = testkit::via_litellm(&name);
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let result = async {
        let app = api::Application::build(s.clone()).await?;
        let base = format!("http://{}", app.addr());
        {
            let stop = stop.clone();
            tasks.spawn(async move { app.run_until_stopped(stop).await });
        }
        let pool = store::pool(&s.database)?;
        let redis = Arc::new(jobs::RedisHandle::new(&s.redis)?);
        let mut registry = jobs::Registry::new();
        workers::handlers::chat::ChatHandler::new(pool, redis.clone(), &s)?.register(&mut registry);
        let worker = Worker::new(
            jobs::Bus::new(redis, &s.queues),
            registry,
            WorkerOptions::from_settings(&s, vec![Queue::Chat]),
        );
        {
            let stop = stop.clone();
            tasks.spawn(async move {
                if let Err(e) = worker.run(stop).await {
                    tracing::error!(error = %e, "chat worker stopped");
                }
            });
        }
        let max_c = args.concurrency.iter().copied().max().unwrap_or(1);
        let sb = Arc::new(Switchboard::setup(&http_client()?, &base, max_c).await?);
        for &c in &args.concurrency {
            let per_task = args.litellm_turns.div_ceil(c).max(1);
            let level = run_level(c, per_task, |i| {
                let sb = sb.clone();
                async move { sb.turn(i).await }
            })
            .await?;
            print_level("switchboard+litellm", c, &level);
        }
        anyhow::Ok(())
    }
    .await;
    stop.cancel();
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(30), tasks.wait()).await;
    result
}
