//! `worker` — consumes jobs from the Redis Streams bus; also the operator's view of the bus.
//!
//! ```text
//! worker [--queues chat,index] [--until-empty]   consume (default: the queues it has handlers for)
//! worker queues                                  length, pending, delayed, dead per queue
//! worker dead list [--queue Q] [--limit N]       dead letters with their last error
//! worker dead replay <ID> | --all [--queue Q]    put dead letters back on their queue
//! worker enqueue-probe [--count N] [--key K] [--sleep-ms MS] [--fail-times N] [--queue Q]
//! worker index [--now [--all]]                   enqueue an index job, or (--now) run one
//!                                                index pass inline and print its figures
//!                                                (--all: queue every source first)
//! worker memory list|add|delete ...              conversation memory entries (operators)
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use jobs::kinds::Probe;
use jobs::{Queue, Worker, WorkerOptions};
use store::memory::Tier;
use tokio_util::sync::CancellationToken;
use workers::ops::memory::parse_tier;

#[derive(Parser)]
#[command(
    name = "worker",
    about = "Switchboard worker: consumes jobs from the bus"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Args)]
struct RunArgs {
    /// Queues to consume, comma-separated (chat, memory, index, actions). Default: the queues
    /// of the job kinds this worker has handlers for.
    #[arg(long, value_delimiter = ',')]
    queues: Vec<Queue>,
    /// Stop (exit 0) once the consumed queues have nothing left to do.
    #[arg(long)]
    until_empty: bool,
    /// With --until-empty: fail (exit 1) if the queues are not empty by then.
    #[arg(long, default_value_t = 3600, requires = "until_empty")]
    timeout_secs: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Length, pending, delayed and dead counts per queue.
    Queues,
    /// Dead letters: list or replay.
    Dead {
        #[command(subcommand)]
        cmd: DeadCmd,
    },
    /// Re-index what the outbox recorded: enqueue an `index` job, or run a pass with --now.
    Index(IndexArgs),
    /// Enqueue diagnostic probe jobs.
    EnqueueProbe {
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value = "operator")]
        key: String,
        #[arg(long, default_value_t = 0)]
        sleep_ms: u64,
        #[arg(long, default_value_t = 0)]
        fail_times: u32,
        /// The queue to exercise (default actions).
        #[arg(long)]
        queue: Option<Queue>,
    },
    /// An org's weight in the chat queue's fair admission: an org of weight 2 gets twice the
    /// turns of an org of weight 1 while both wait (1 is the default).
    FairWeight {
        #[arg(long)]
        org: uuid::Uuid,
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        weight: u32,
    },
    /// An org's concurrency cap in the chat queue's fair admission: the most of its turns
    /// admitted and not yet settled at once. A number (0: no cap for this org), or `default`
    /// for the queue's `CHAT_ORG_CONCURRENCY`.
    FairCap {
        #[arg(long)]
        org: uuid::Uuid,
        #[arg(long, value_parser = parse_cap)]
        cap: Cap,
    },
    /// Conversation memory (operators only; users never see it): list, add, delete entries.
    Memory {
        #[command(subcommand)]
        command: MemoryCommand,
    },
}

#[derive(Subcommand)]
enum MemoryCommand {
    /// An organization's memory entries, newest first (tab-separated).
    List {
        #[arg(long, value_name = "ORG_ID")]
        org: uuid::Uuid,
        /// Only this tier: org, project or user.
        #[arg(long, value_parser = parse_tier)]
        tier: Option<Tier>,
        #[arg(long, value_name = "PROJECT_ID")]
        project: Option<uuid::Uuid>,
        #[arg(long, value_name = "USER_ID")]
        user: Option<uuid::Uuid>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Add an entry (org-tier entries are added only this way); prints its id.
    Add {
        #[arg(long, value_name = "ORG_ID")]
        org: uuid::Uuid,
        /// org, project (with --project) or user (with --user).
        #[arg(long, value_parser = parse_tier)]
        tier: Tier,
        #[arg(long, value_name = "PROJECT_ID")]
        project: Option<uuid::Uuid>,
        #[arg(long, value_name = "USER_ID")]
        user: Option<uuid::Uuid>,
        #[arg(long)]
        content: String,
    },
    /// Delete an entry of the organization.
    Delete {
        #[arg(long, value_name = "ORG_ID")]
        org: uuid::Uuid,
        #[arg(long, value_name = "ENTRY_ID")]
        id: uuid::Uuid,
    },
}

#[derive(Args)]
struct IndexArgs {
    /// Run one index pass here and now (inline, in this process) instead of enqueueing an
    /// `index` job; prints what it did. Safe beside running workers: the outbox rows are
    /// claimed with FOR UPDATE SKIP LOCKED and each source under its own lock.
    #[arg(long)]
    now: bool,
    /// First queue every source (documents, projects, tasks, messages) for re-indexing, e.g.
    /// after changing EMBEDDING_MODEL; unchanged chunks cost no embedding call.
    #[arg(long)]
    all: bool,
    /// List the dead-lettered outbox rows (sources that could not be indexed) with their last
    /// error, instead of indexing.
    #[arg(long, conflicts_with_all = ["now", "all"])]
    dead: bool,
    /// With --dead: give those rows a fresh start (after fixing what made them fail).
    #[arg(long, requires = "dead")]
    revive: bool,
}

#[derive(Subcommand)]
enum DeadCmd {
    /// The oldest dead letters, with their last error.
    List {
        #[arg(long)]
        queue: Option<Queue>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Put dead letters back on their queue (same job id, attempt 1).
    Replay {
        /// The dead letter's id (first column of `dead list` after the queue).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every dead letter (of --queue, or of all queues).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        queue: Option<Queue>,
    },
}

// (`docs/bench-bus.md`: the allocator was a quarter of a job's CPU with glibc's malloc)
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match workers::load_settings("worker") {
        Ok(s) => s,
        Err(code) => return code,
    };
    match cli.cmd {
        None => run(settings, cli.run).await,
        Some(Cmd::Index(IndexArgs {
            dead: true, revive, ..
        })) => index_dead(settings, revive).await,
        Some(Cmd::Index(IndexArgs { now: true, all, .. })) => index_now(settings, all).await,
        Some(cmd) => operate(settings, cmd).await,
    }
}

/// `worker index --dead [--revive]`: the dead-lettered outbox rows, tab-separated on stdout.
#[allow(clippy::print_stdout)]
async fn index_dead(settings: config::Settings, revive: bool) -> ExitCode {
    let rt = match workers::Runtime::connect(settings, Duration::from_secs(30)).await {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "cannot connect");
            return ExitCode::FAILURE;
        }
    };
    let listed = async {
        let mut conn = rt.db.acquire().await?;
        let rows = store::outbox::dead(&mut conn, 1000).await?;
        let revived = if revive {
            Some(store::outbox::revive_dead(&mut conn).await?)
        } else {
            None
        };
        Ok::<_, store::StoreError>((rows, revived))
    };
    match listed.await {
        Ok((rows, revived)) => {
            for r in &rows {
                println!(
                    "{}\torg={}\t{}\t{}\tattempts={}\t{}\t{}",
                    r.id,
                    r.org_id,
                    r.source_kind,
                    r.source_id,
                    r.attempts,
                    r.dead_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    r.last_error.as_deref().unwrap_or("").replace('\n', " ")
                );
            }
            if rows.is_empty() {
                println!("index: no dead outbox rows");
            }
            if let Some(n) = revived {
                println!("index: revived {n} dead outbox rows");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read the dead outbox rows");
            ExitCode::FAILURE
        }
    }
}

/// `worker index --now`: one index pass inline, with its figures on stdout.
#[allow(clippy::print_stdout)]
async fn index_now(settings: config::Settings, all: bool) -> ExitCode {
    let rt = match workers::Runtime::connect(settings, Duration::from_secs(30)).await {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "cannot connect");
            return ExitCode::FAILURE;
        }
    };
    let indexer = match workers::handlers::index::Indexer::new(rt.db.clone(), &rt.settings) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the LiteLLM client");
            return ExitCode::FAILURE;
        }
    };
    if all {
        let queued = match rt.db.acquire().await {
            Ok(mut conn) => store::outbox::requeue_all(&mut conn).await,
            Err(e) => Err(e.into()),
        };
        match queued {
            Ok(n) => println!("index: queued {n} sources"),
            Err(e) => {
                tracing::error!(error = %e, "cannot queue the sources");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("index: model={} running one pass", indexer.model());
    let mut batch = 0u64;
    let progress = |b: &workers::handlers::index::PassReport| {
        batch += 1;
        println!(
            "index: batch={batch} sources={} chunks_embedded={} chunks_skipped={} chunks_deleted={} embed_ms={} write_ms={}",
            b.sources,
            b.chunks_embedded,
            b.chunks_skipped,
            b.chunks_deleted,
            b.embed_ms,
            b.write_ms
        );
    };
    match workers::handlers::index::run_now(&indexer, progress).await {
        Ok((r, took)) => {
            let secs = took.as_secs_f64().max(1e-9);
            println!(
                "index: batches={} sources={} outbox_rows={} chunks_embedded={} chunks_skipped={} \
                 chunks_deleted={} documents_failed={} sources_failed={} sources_dead={} embed_requests={} ms={} chunks_per_s={:.0}",
                r.batches,
                r.sources,
                r.outbox_rows,
                r.chunks_embedded,
                r.chunks_skipped,
                r.chunks_deleted,
                r.documents_failed,
                r.sources_failed,
                r.sources_dead,
                r.embed_requests,
                took.as_millis(),
                r.chunks_embedded as f64 / secs
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "index pass failed; the outbox rows of the failed batch are kept");
            ExitCode::FAILURE
        }
    }
}

/// `worker memory list|add|delete`: PostgreSQL only, but for `add`'s embedding call to the
/// model proxy (skipped, with a warning, when the proxy does not answer).
async fn memory(settings: &config::Settings, command: MemoryCommand) -> anyhow::Result<()> {
    use std::io::Write as _;
    use workers::ops::memory;
    let pool = store::pool(&settings.database)?;
    let text = match command {
        MemoryCommand::List {
            org,
            tier,
            project,
            user,
            limit,
        } => {
            let mut conn = pool.acquire().await?;
            let entries =
                store::memory::list(&mut conn, org, tier, project, user, limit.clamp(1, 10_000))
                    .await?;
            memory::render(&entries)
        }
        MemoryCommand::Add {
            org,
            tier,
            project,
            user,
            content,
        } => {
            let owner = memory::owner(org, tier, project, user).map_err(anyhow::Error::msg)?;
            match memory::add(settings, &pool, owner, &content).await? {
                store::memory::Inserted::New { id, removed } => {
                    tracing::info!(%id, removed, "memory entry added");
                    format!("{id}\n")
                }
                store::memory::Inserted::Refreshed { id } => {
                    tracing::info!(%id, "a near-duplicate entry was refreshed instead");
                    format!("{id}\n")
                }
            }
        }
        MemoryCommand::Delete { org, id } => {
            let mut conn = pool.acquire().await?;
            if !store::memory::delete(&mut conn, org, id).await? {
                anyhow::bail!("--id: no memory entry {id} in organization {org}");
            }
            tracing::info!(%id, "memory entry deleted");
            String::new()
        }
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

async fn run(settings: config::Settings, args: RunArgs) -> ExitCode {
    let rt = match workers::Runtime::connect(settings, Duration::from_secs(30)).await {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "worker cannot start");
            return ExitCode::FAILURE;
        }
    };
    let registry = match workers::handlers::worker_registry(&rt) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "worker cannot start");
            return ExitCode::FAILURE;
        }
    };
    let queues = if args.queues.is_empty() {
        registry.queues()
    } else {
        let mut q = args.queues.clone();
        q.sort();
        q.dedup();
        q
    };
    let served = registry.queues();
    for q in queues.iter().filter(|q| !served.contains(q)) {
        tracing::warn!(
            queue = %q,
            kinds = ?registry.kinds(),
            "consuming a queue none of whose own job kinds has a handler here: such jobs are \
             retried and end in the dead letters"
        );
    }
    let opts = WorkerOptions::from_settings(&rt.settings, queues);
    let worker = Worker::new(rt.bus.clone(), registry, opts);
    // Install the signal handlers before announcing readiness.
    let stop_signal = jobs::telemetry::shutdown_signal();
    tracing::info!(
        concurrency = rt.settings.worker.concurrency,
        prefix = rt.redis.prefix(),
        consumer = worker.consumer(),
        queues = ?worker.queues(),
        "worker ready"
    );
    let shutdown = CancellationToken::new();
    let metrics_stop = CancellationToken::new();
    let metrics_task = match workers::metrics_server::serve(
        &rt.settings.worker.metrics_addr,
        rt.bus.clone(),
        metrics_stop.clone(),
    )
    .await
    {
        Ok((_, task)) => task,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), addr = %rt.settings.worker.metrics_addr, "cannot bind the metrics listener");
            return ExitCode::FAILURE;
        }
    };
    let done = CancellationToken::new();
    let signal = async {
        tokio::select! {
            () = stop_signal => {
                tracing::info!("worker stopping");
                shutdown.cancel();
            }
            () = done.cancelled() => {}
        }
    };
    let work = async {
        let r = if args.until_empty {
            worker
                .run_until_empty(shutdown.clone(), Duration::from_secs(args.timeout_secs))
                .await
        } else {
            worker.run(shutdown.clone()).await
        };
        done.cancel();
        r
    };
    let ((), result) = tokio::join!(signal, work);
    metrics_stop.cancel();
    let _ = metrics_task.await;
    rt.db.close().await;
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "worker failed");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stdout)]
async fn operate(settings: config::Settings, cmd: Cmd) -> ExitCode {
    let bus = match workers::ops::bus(&settings) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "invalid REDIS_URL");
            return ExitCode::from(2);
        }
    };
    // the bus commands see every partition ever recorded (stats, dead letters)
    if !matches!(cmd, Cmd::Memory { .. })
        && let Err(e) = bus.record_partitions().await
    {
        tracing::warn!(error = %e, "cannot read the recorded queue partitions");
    }
    let result = match cmd {
        // the database only (and the model proxy for `add`): the bus above is not used
        Cmd::Memory { command } => {
            return match memory(&settings, command).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "memory command failed");
                    ExitCode::FAILURE
                }
            };
        }
        Cmd::Queues => workers::ops::queues_table(&bus)
            .await
            .map(|t| print!("{t}")),
        Cmd::FairWeight { org, weight } => bus
            .set_fair_weight(Queue::Chat, &org.to_string(), weight)
            .await
            .map(|()| println!("chat\t{org}\tweight {weight}")),
        Cmd::FairCap { org, cap } => bus
            .set_fair_cap(Queue::Chat, &org.to_string(), cap.0)
            .await
            .map(|()| match cap.0 {
                Some(n) => println!("chat\t{org}\tcap {n}"),
                None => println!("chat\t{org}\tcap default"),
            }),
        Cmd::Dead {
            cmd: DeadCmd::List { queue, limit },
        } => workers::ops::dead_list(&bus, queue, limit)
            .await
            .map(|t| print!("{t}")),
        Cmd::Dead {
            cmd: DeadCmd::Replay { id, all, queue },
        } => {
            if all {
                workers::ops::dead_replay_all(&bus, queue)
                    .await
                    .map(|counts| {
                        for (q, n) in counts {
                            println!("{q}\treplayed {n}");
                        }
                    })
            } else {
                let id = id.unwrap_or_default();
                match workers::ops::dead_replay(&bus, queue, &id).await {
                    Ok(Some(q)) => {
                        println!("{q}\treplayed {id}");
                        Ok(())
                    }
                    Ok(None) => {
                        tracing::error!(id, "no such dead letter");
                        return ExitCode::FAILURE;
                    }
                    Err(e) => Err(e),
                }
            }
        }
        Cmd::Index(args) => {
            if args.all {
                tracing::error!("--all goes with --now");
                return ExitCode::from(2);
            }
            bus.enqueue(jobs::kinds::Index {
                reason: jobs::kinds::IndexReason::Requested,
            })
            .await
            .map(|env| println!("{}", env.id))
        }
        Cmd::EnqueueProbe {
            count,
            key,
            sleep_ms,
            fail_times,
            queue,
        } => {
            let probe = Probe {
                key,
                sleep_ms,
                fail_times,
                queue,
            };
            workers::ops::enqueue_probes(&bus, &probe, count)
                .await
                .map(|ids| {
                    for id in ids {
                        println!("{id}");
                    }
                })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "command failed");
            ExitCode::FAILURE
        }
    }
}

/// `worker fair-cap --cap`: a number up to `config::MAX_ORG_CONCURRENCY`, or `default`.
#[derive(Clone, Copy, Debug)]
struct Cap(Option<u32>);

fn parse_cap(s: &str) -> Result<Cap, String> {
    if s == "default" {
        return Ok(Cap(None));
    }
    match s.parse::<u32>() {
        Ok(n) if n <= config::MAX_ORG_CONCURRENCY => Ok(Cap(Some(n))),
        _ => Err(format!(
            "a number from 0 to {} (0: no cap), or `default`",
            config::MAX_ORG_CONCURRENCY
        )),
    }
}
