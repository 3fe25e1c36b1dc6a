//! `bench` — measurements against the real services (`eval "$(scripts/services env)"` first).
//!
//! - `bench bus`: the job bus (raw `XADD`, end-to-end jobs/s, pickup latency); see [`bus`].
//! - `bench chat`: the chat path — direct to a fake upstream, through the LiteLLM proxy, and
//!   through Switchboard (HTTP → bus → chat worker → model → SSE) — and the SSE capacity of one
//!   API process; see [`chat`] and [`sse`].
//! - `bench index`: indexing throughput (chunks/s) with the zero-latency fake embedder, direct
//!   and through the LiteLLM proxy; see [`index`].
//! - `bench retrieval`: filtered hybrid search on a generated index (latency, recall@10
//!   against exact filtered search, for users who see 1 %, 10 % and 100 %); see [`retrieval`].
//! - `bench memory`: memory at full capacity — prompt reads and inserts; see [`memory`].
//! - `bench fairness`: one org's flood against another org's steady turns, with and without
//!   fair admission; see [`fairness`].
//! - `bench chaos`: the real binaries broken mid-load (worker kill -9, Redis and PostgreSQL
//!   restarts, a 429 storm), counting lost and duplicated turns; see [`chaos`].
//!
//! Every run uses its own Redis key prefix (and, for `chat`, its own scratch database), deleted
//! at the end, and stops by itself.

mod bus;
mod chaos;
mod chat;
mod fairness;
mod index;
mod memory;
mod retrieval;
mod scratch;
mod sse;
mod stack;
mod stats;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Switchboard benchmarks against the real services"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The job bus: raw XADD rate, end-to-end jobs/s with 1, 2, 4 consumers, pickup latency.
    Bus {
        /// Seconds of producing per measurement.
        #[arg(long, default_value_t = 4)]
        secs: u64,
        /// Concurrent producer tasks (and raw XADD tasks).
        #[arg(long, default_value_t = 16)]
        producers: usize,
        /// Concurrency of each consumer (WORKER_CONCURRENCY; the handler is a no-op, so this
        /// only bounds the jobs in flight between read and ack).
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        /// Pickup latency samples.
        #[arg(long, default_value_t = 400)]
        samples: usize,
        /// Then the same on this Redis Cluster (comma-separated seed URLs, as
        /// `scripts/services env --cluster` prints them), the `memory` queue partitioned.
        #[arg(long)]
        cluster: Option<String>,
        /// Partitions per queue on the cluster.
        #[arg(long, default_value_t = 3)]
        partitions: u16,
    },
    /// The chat path: TTFT and total, direct / via LiteLLM / via Switchboard, at several
    /// concurrencies; then how many SSE streams one API process holds.
    Chat(chat::ChatArgs),
    /// Indexing throughput: chunks/s of an index pass, direct to the fake embedder and through
    /// the LiteLLM proxy, in a scratch database.
    Index {
        /// Sources to index (one chunk each).
        #[arg(long, default_value_t = 5000)]
        chunks: usize,
    },
    /// Retrieval: filtered hybrid search on a generated index in a scratch database.
    Retrieval(retrieval::RetrievalArgs),
    /// Memory at full capacity: prompt reads (visibility + exact ranking) and inserts.
    Memory(memory::MemoryArgs),
    /// Fairness: org A floods turns while org B sends one a second; B's TTFT alone, under the
    /// flood with fair admission, and under the flood first come, first served.
    Fairness(fairness::FairnessArgs),
    /// Chaos: the real binaries with their own Redis and PostgreSQL, broken mid-load (worker
    /// kill -9, Redis and PostgreSQL restarts, a 429 storm); lost / duplicated turns counted.
    Chaos(chaos::ChaosArgs),
}

// (`docs/bench-bus.md`: the allocator was a quarter of a job's CPU with glibc's malloc)
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut settings = match config::Settings::load() {
        Ok(s) => s,
        Err(e) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("bench: {e}");
            }
            return ExitCode::from(2);
        }
    };
    // quiet unless RUST_LOG asks: the figures go to stdout
    settings.log.filter = "warn".to_owned();
    jobs::telemetry::init_tracing(&settings.log);
    settings.redis.prefix = format!("bench{:08x}", rand::random::<u32>());
    let result = match cli.cmd {
        Cmd::Bus {
            secs,
            producers,
            concurrency,
            samples,
            cluster,
            partitions,
        } => {
            let cluster = cluster.map(|seeds| (seeds, partitions));
            bus::bench_bus(&settings, secs, producers, concurrency, samples, cluster).await
        }
        Cmd::Chat(args) => chat::bench_chat(settings, args).await,
        Cmd::Index { chunks } => index::bench_index(settings, chunks).await,
        Cmd::Retrieval(args) => retrieval::bench_retrieval(settings, args).await,
        Cmd::Memory(args) => memory::bench_memory(settings, args).await,
        Cmd::Chaos(args) => chaos::bench_chaos(args).await,
        Cmd::Fairness(args) => fairness::bench_fairness(settings, args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "bench failed");
            ExitCode::FAILURE
        }
    }
}
