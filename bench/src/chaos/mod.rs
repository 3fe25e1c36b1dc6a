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

mod load;
mod services;
mod stack;

use std::time::{Duration, Instant};

use testkit::Behaviour;

use load::{Load, TurnResult};
use stack::{Stack, last_event_before_run};

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
