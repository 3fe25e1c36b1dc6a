//! SSE capacity: how many open event streams one API process holds, and its memory per stream.
//!
//! The API runs as a separate process (`api serve`, next to this binary in `target/release`),
//! on the bench's scratch database and a Redis prefix of its own that no worker consumes, so
//! every response stays `queued` and its event stream stays open. The bench opens streams on
//! `GET /v1/conversations/{id}/responses/{response_id}/events` (spread over `RESPONSES`
//! responses), cumulatively up to each level, and reads the API's `VmRSS` from
//! `/proc/<pid>/status` and its `sse_open_streams` gauge from `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chat::{create_conversation, event_name, find};

/// Responses the streams follow (round robin).
const RESPONSES: usize = 100;
/// Streams being opened at once.
const OPENING: usize = 128;

/// The Redis prefix of the separate API process.
pub fn prefix_of(prefix: &str) -> String {
    format!("{prefix}sse")
}

#[derive(Debug)]
pub struct Point {
    requested: usize,
    open: usize,
    gauge: Option<f64>,
    rss_kb: u64,
    secs: f64,
}

#[derive(Debug)]
pub struct Capacity {
    baseline_kb: u64,
    points: Vec<Point>,
    stopped: Option<String>,
    fd_limit: Option<u64>,
}

impl Capacity {
    #[allow(clippy::print_stdout)]
    pub fn print(&self) {
        println!(
            "sse: API process (separate, `api serve`) baseline VmRSS {} KB; fd soft limit {}",
            self.baseline_kb,
            self.fd_limit
                .map_or_else(|| "?".to_owned(), |l| l.to_string())
        );
        println!(
            "| streams requested | streams open | sse_open_streams | API VmRSS MB | KB per stream | open time s |"
        );
        println!("|---|---|---|---|---|---|");
        for p in &self.points {
            println!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} |",
                p.requested,
                p.open,
                p.gauge
                    .map_or_else(|| "?".to_owned(), |g| format!("{g:.0}")),
                p.rss_kb as f64 / 1024.0,
                self.per_stream(p),
                p.secs
            );
        }
        if let Some(why) = &self.stopped {
            println!("sse: stopped early: {why}");
        }
        if let Some(p) = self.points.last() {
            println!(
                "sse: streams_held={} kb_per_stream={:.1}",
                p.open,
                self.per_stream(p)
            );
        }
    }

    fn per_stream(&self, p: &Point) -> f64 {
        if p.open == 0 {
            return f64::NAN;
        }
        (p.rss_kb as f64 - self.baseline_kb as f64) / p.open as f64
    }
}

fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

fn fd_soft_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

#[allow(clippy::print_stdout)]
pub async fn capacity(settings: &config::Settings, levels: &[usize]) -> anyhow::Result<Capacity> {
    let exe = std::env::current_exe()?.with_file_name("api");
    anyhow::ensure!(
        exe.exists(),
        "{} not found: build it first (cargo build --release -p api -p bench)",
        exe.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let secret = settings
        .auth
        .jwt_secret
        .as_ref()
        .map(|s| s.expose_secret().to_owned())
        .context("no JWT secret")?;
    let mut child = tokio::process::Command::new(&exe)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", settings.database.url.expose_secret())
        .env("DATABASE_MAX_CONNECTIONS", "16")
        .env("REDIS_URL", settings.redis.url.expose_secret())
        .env("REDIS_PREFIX", prefix_of(&settings.redis.prefix))
        .env("JWT_SECRET", secret)
        .env("API_ADDR", &addr)
        .env("LITELLM_BASE_URL", &settings.litellm.base_url)
        .env("MESSAGE_RATE_LIMIT", "1000000")
        // one user holds every stream of the capacity test
        .env("SSE_MAX_STREAMS_PER_USER", "1000000")
        .env("LOG_FILTER", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {}", exe.display()))?;
    let pid = child.id().context("the API process has no pid")?;
    let result = measure(pid, &addr, levels).await;
    // SIGTERM (graceful), then SIGKILL after 10 s
    let _ = tokio::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await;
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    result
}

#[allow(clippy::print_stdout)]
async fn measure(pid: u32, addr: &str, levels: &[usize]) -> anyhow::Result<Capacity> {
    let base = format!("http://{addr}");
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(64)
        .build()?;
    // up within 30 s
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await
            && r.status().is_success()
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the API did not come up in 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = http
        .post(format!("{base}/v1/auth/register"))
        .json(&json!({
            "email": format!("bench-sse-{}@example.com", uuid::Uuid::new_v4().simple()),
            "password": "correct horse battery",
            "name": "Bench",
            "org_name": "Bench SSE",
        }))
        .send()
        .await?;
    anyhow::ensure!(r.status().as_u16() == 201, "register: {}", r.status());
    let v: Value = r.json().await?;
    let token = v["token"].as_str().context("no token")?.to_owned();
    // responses that wait forever: nobody consumes this prefix's chat queue
    let mut targets = Vec::with_capacity(RESPONSES);
    for _ in 0..RESPONSES {
        let conversation = create_conversation(&http, &base, &token).await?;
        let response = start_turn(&http, &base, &token, &conversation).await?;
        targets.push(format!(
            "{base}/v1/conversations/{conversation}/responses/{response}/events"
        ));
    }
    // a few streams opened and closed, so lazily built things (pools, buffers) are in the
    // baseline
    for url in targets.iter().take(50) {
        let _ = open_one(&http, url, &token).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let baseline_kb = rss_kb(pid)?;
    println!("sse: API pid {pid} baseline VmRSS {baseline_kb} KB");

    // client: a connection each, no pooling between streams
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(0)
        .build()?;
    let hold = CancellationToken::new();
    let holders = TaskTracker::new();
    let open = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut points = Vec::new();
    let mut stopped = None;
    let mut requested = 0usize;
    let fd_limit = fd_soft_limit();
    for &level in levels {
        if level <= requested {
            continue;
        }
        let start = Instant::now();
        let gate = Arc::new(Semaphore::new(OPENING));
        for i in requested..level {
            let Ok(permit) = gate.clone().acquire_owned().await else {
                break;
            };
            let (client, url, token) = (
                client.clone(),
                targets[i % targets.len()].clone(),
                token.clone(),
            );
            let (hold, open, failed) = (hold.clone(), open.clone(), failed.clone());
            holders.spawn(async move {
                let opened =
                    tokio::time::timeout(Duration::from_secs(60), open_one(&client, &url, &token))
                        .await;
                drop(permit);
                let mut body = match opened {
                    Ok(Ok(body)) => body,
                    Ok(Err(e)) => {
                        if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                            tracing::warn!(error = format!("{e:#}"), "a stream did not open");
                        }
                        return;
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                open.fetch_add(1, Ordering::Relaxed);
                loop {
                    tokio::select! {
                        _ = hold.cancelled() => break,
                        chunk = body.next() => match chunk {
                            Some(Ok(_)) => continue,
                            _ => break,
                        },
                    }
                }
                open.fetch_sub(1, Ordering::Relaxed);
            });
        }
        // every attempt settled (opened or failed), bounded
        let deadline = Instant::now() + Duration::from_secs(120);
        while open.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < level
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        requested = level;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let point = Point {
            requested: level,
            open: open.load(Ordering::Relaxed),
            gauge: gauge(&http, &base).await,
            rss_kb: rss_kb(pid)?,
            secs,
        };
        println!(
            "sse: requested={} open={} gauge={:?} api_rss_kb={} ({:.1} s to open)",
            point.requested, point.open, point.gauge, point.rss_kb, point.secs
        );
        let short = point.open < level;
        points.push(point);
        if short {
            stopped = Some(format!(
                "{} of {level} streams open, {} failed to open (see the log)",
                open.load(Ordering::Relaxed),
                failed.load(Ordering::Relaxed)
            ));
            break;
        }
    }
    hold.cancel();
    holders.close();
    let _ = tokio::time::timeout(Duration::from_secs(30), holders.wait()).await;
    Ok(Capacity {
        baseline_kb,
        points,
        stopped,
        fd_limit,
    })
}

type Body = futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>;

/// GET the events stream and read up to its first event (the replayed `message.created`).
async fn open_one(client: &reqwest::Client, url: &str, token: &str) -> anyhow::Result<Body> {
    let resp = client.get(url).bearer_auth(token).send().await?;
    anyhow::ensure!(resp.status().as_u16() == 200, "events: {}", resp.status());
    let mut body: Body = resp.bytes_stream().boxed();
    let mut buf = Vec::new();
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk?);
        if let Some(pos) = find(&buf, b"\n\n") {
            anyhow::ensure!(
                event_name(&buf[..pos + 2]) == Some("message.created"),
                "the first event is not message.created"
            );
            return Ok(body);
        }
    }
    anyhow::bail!("the stream ended before its first event")
}

/// POST a streamed turn, read its `message.created`, hang up; the response id.
async fn start_turn(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    conversation: &str,
) -> anyhow::Result<String> {
    let resp = http
        .post(format!("{base}/v1/conversations/{conversation}/messages"))
        .bearer_auth(token)
        .json(&json!({"content": "hold this stream open", "stream": true}))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().as_u16() == 200,
        "POST messages: {}",
        resp.status()
    );
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk?);
        if let Some(pos) = find(&buf, b"\n\n") {
            let frame = std::str::from_utf8(&buf[..pos])?;
            let data = frame
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .context("message.created without data")?;
            let v: Value = serde_json::from_str(data)?;
            return Ok(v["response_id"]
                .as_str()
                .context("no response_id")?
                .to_owned());
        }
    }
    anyhow::bail!("the stream ended before message.created")
}

/// The API's `sse_open_streams` gauge.
async fn gauge(http: &reqwest::Client, base: &str) -> Option<f64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(api::sse::OPEN_STREAMS))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
