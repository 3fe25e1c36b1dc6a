//! How the processes run: worker and scheduler, the bus's queues, the ledger's leases, response
//! events and logging.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub concurrency: usize,
    pub shutdown_grace_secs: u64,
    pub metrics_addr: String,
    /// How long one blocking `XREADGROUP` waits for a job; also bounds how long a stopping
    /// worker waits for a read already sent to Redis.
    pub read_block_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSettings {
    pub metrics_addr: String,
    /// Time to live of the leader lease; the leader renews it every third of this.
    pub lease_secs: u64,
}

/// Per-org token budgets (docs/architecture/api.md, "Budgets").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSettings {
    /// Tokens a chat turn holds against its org's budget from admission until its real usage
    /// is recorded: the worst case of one turn.
    pub turn_reserve_tokens: u64,
    /// The daily limit of an org that has not set one; 0: unlimited.
    pub default_daily_tokens: u64,
    /// The monthly limit of an org that has not set one; 0: unlimited.
    pub default_monthly_tokens: u64,
}

/// PostgreSQL as the ledger of in-flight work (docs/ARCHITECTURE.md, "The ledger"): run leases
/// and the scheduler's reconciler.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSettings {
    /// A running response's lease; its run renews it every third of this. A run that stops
    /// renewing (its worker died) is taken over after at most this long.
    pub lease_secs: u64,
    /// How often the reconciler (in the scheduler leader) looks for lost work.
    pub reconcile_interval_ms: u64,
    /// Work handed to a job this long ago whose job is not on the bus any more is re-enqueued
    /// (the time an API process has between its commit and its enqueue).
    pub grace_secs: u64,
    /// Re-enqueues of one response (or action, or summary fold) before it fails for good.
    pub max_recoveries: u32,
    /// How long an `Idempotency-Key` of `POST .../messages` is kept (at least).
    pub idempotency_retention_secs: u64,
}

/// Response events (SSE): the per-response replay stream behind `Last-Event-ID`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSettings {
    /// How long a response's events stay replayable after its last event.
    pub retention_secs: u64,
    /// Cap of one response's replay stream (entries, approximate).
    pub replay_max_len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub filter: String,
}

/// The bus's per-queue knobs (`[queues.<name>]`): retries and crash recovery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuesSettings {
    /// Streams per queue (`QUEUE_PARTITIONS`, 1..=64): a job's partition follows its org (or
    /// the record it works on), so one queue's traffic spreads over a cluster's shards.
    #[serde(default = "default_partitions")]
    pub partitions: u16,
    pub chat: QueueSettings,
    pub memory: QueueSettings,
    pub index: QueueSettings,
    pub actions: QueueSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    /// Attempts in all (first delivery included) before a job goes to the dead letters.
    pub max_attempts: u32,
    /// Backoff before retry n (n >= 1): up to `min(cap, base * 2^(n-1))`.
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    pub jitter: Jitter,
    /// A delivered job not acknowledged for this long is reclaimed by another consumer.
    pub visibility_timeout_secs: u64,
    /// A handler running longer than this is stopped (apalis's timeout layer) and its job
    /// retried like any retryable failure.
    #[serde(default = "default_run_timeout_secs")]
    pub run_timeout_secs: u64,
    /// Admit jobs fairly across orgs (weighted fair queueing): a job waits in its org's list and
    /// moves to the stream only as consumers take work (docs/architecture/bus.md, "Fair
    /// admission"). Chat only: the jobs of other queues carry no org to be fair to.
    #[serde(default)]
    pub fair: bool,
    /// The most jobs of one org admitted and not yet settled at once (fair queues only; 0: no
    /// cap). `worker fair-cap` sets an org's own cap (docs/architecture/bus.md, "Fair
    /// admission").
    #[serde(default)]
    pub org_concurrency: u32,
}

fn default_run_timeout_secs() -> u64 {
    3600
}

fn default_partitions() -> u16 {
    1
}

/// The largest per-org concurrency cap (`queues.<name>.org_concurrency`, `worker fair-cap`).
pub const MAX_ORG_CONCURRENCY: u32 = 10_000;

/// The most partitions a queue may have (`queues.partitions`).
pub const MAX_PARTITIONS: u16 = 64;

/// How a backoff delay is randomised: `full` = uniform in `[0, delay]` (the default), `none` =
/// exactly `delay` (deterministic; for tests and diagnosis).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    Full,
    None,
}

impl QueuesSettings {
    /// The settings of a queue by its name (`chat`, `memory`, `index`, `actions`).
    pub fn get(&self, name: &str) -> Option<&QueueSettings> {
        match name {
            "chat" => Some(&self.chat),
            "memory" => Some(&self.memory),
            "index" => Some(&self.index),
            "actions" => Some(&self.actions),
            _ => None,
        }
    }

    pub(crate) fn all(&self) -> [(&'static str, &QueueSettings); 4] {
        [
            ("chat", &self.chat),
            ("memory", &self.memory),
            ("index", &self.index),
            ("actions", &self.actions),
        ]
    }
}
