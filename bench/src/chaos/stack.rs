//! The stack of one scenario: the binaries and their services, started, checked and
//! stopped, and the check of every turn against PostgreSQL and the replay streams.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use testkit::FakeUpstream;
use uuid::Uuid;

use super::load::TurnResult;
use super::services::{PgServer, RedisServer};
use super::{ChaosArgs, FALLBACK, JWT_SECRET, Outcome, PRIMARY, echo};

/// The binaries, their services and their logs for one scenario.
pub(super) struct Stack {
    dir: PathBuf,
    bins: PathBuf,
    pub(super) redis: RedisServer,
    pub(super) pg: PgServer,
    pub(super) fake: FakeUpstream,
    env: Vec<(String, String)>,
    api: Proc,
    pub(super) base: String,
    pub(super) workers: Vec<Proc>,
    scheduler: Proc,
    spawned: usize,
}

pub(super) struct Proc {
    child: Child,
}

impl Proc {
    pub(super) fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Stack {
    pub(super) async fn start(name: &str, args: &ChaosArgs, aof: bool) -> anyhow::Result<Self> {
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

    pub(super) fn spawn_worker(&mut self) -> anyhow::Result<Proc> {
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
    pub(super) async fn verify(
        &self,
        scenario: &str,
        results: &[TurnResult],
    ) -> anyhow::Result<Outcome> {
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

    pub(super) fn stop(mut self, keep: bool) {
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
pub(super) async fn last_event_before_run(
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
