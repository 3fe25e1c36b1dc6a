//! Consuming the bus: a registry of handlers by kind, and the worker loop.
//!
//! Per consumed queue a worker runs three loops, all owned by one [`TaskTracker`] and stopped by
//! one [`CancellationToken`]:
//! - the reader: takes a concurrency permit, *then* `XREADGROUP ... BLOCK` on its own
//!   connection, and hands each entry with its permit to a job task. After a read that returned
//!   jobs it reads again without blocking, with as many permits as are free, so bursts go in
//!   batches while an idle reader holds a single permit;
//! - the mover: moves due delayed retries back to the stream (Lua), sleeping until the next due
//!   time (at most [`MOVER_MAX_SLEEP`]) or until this process schedules a retry;
//! - the reclaimer: every quarter of the visibility timeout (0.1–5 s), `XAUTOCLAIM`s entries
//!   idle longer than the visibility timeout (their worker died or stalled), and once a minute
//!   removes consumer names idle for 10 minutes with nothing pending (dead workers' names).
//!
//! A job task runs the handler and then, only after it returned: `Ok` → ack (`XACK`+`XDEL`,
//! batched with the acks of jobs finishing at the same time by the queue's acker task);
//! retryable and attempts left → the next attempt goes to the delayed set and the entry is
//! acked in one Lua step; otherwise → dead letters + ack in one Lua step. If Redis fails at that
//! point, the entry stays pending and is reclaimed later: handlers are idempotent by job id.
//!
//! Stopping: the readers stop reading (a read already sent finishes, within `read_block_ms`,
//! and what it returned is handled); in-flight jobs get `shutdown_grace`, after which they are
//! dropped and left pending for the other workers to reclaim.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::backoff;
use crate::bus::{Bus, DeadReason, Delivery};
use crate::envelope::Envelope;
use crate::error::{BusError, JobError};
use crate::kinds::{Job, JobKind};
use crate::metrics::{self, Outcome};
use crate::queue::Queue;

/// The longest the delayed-set mover sleeps without looking (other processes add retries too).
pub const MOVER_MAX_SLEEP: Duration = Duration::from_secs(1);
/// Delayed entries moved per script call.
const MOVE_BATCH: usize = 200;
/// Entries per read at most.
const MAX_BATCH: usize = 64;
/// How often a reclaimer prunes the consumer names of dead workers, and how long such a name
/// must have been idle (with nothing pending) first.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const PRUNE_IDLE: Duration = Duration::from_secs(600);
/// How much longer than `read_block` a read may take before its connection is given up.
const READ_SLACK: Duration = Duration::from_secs(5);
/// The longest a retry waits, whatever a handler's `Retry-After` says.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Entries per acknowledgement call at most.
const ACK_BATCH: usize = 256;

/// A handled entry to acknowledge (with its job, whose marker goes too); `done` says whether
/// the ack reached Redis.
struct AckRequest {
    entry_id: String,
    job_id: Uuid,
    done: oneshot::Sender<bool>,
}

type Acker = mpsc::UnboundedSender<AckRequest>;

/// What a handler knows about the job it runs.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub id: Uuid,
    pub queue: Queue,
    pub kind: &'static str,
    /// 1 for the first run.
    pub attempt: u32,
    pub enqueued_at: DateTime<Utc>,
    /// When the job became due (`not_before` or `enqueued_at`).
    pub due_at: DateTime<Utc>,
    /// W3C `traceparent` from the envelope.
    pub trace: Option<String>,
    /// The consumer (worker process) running it.
    pub consumer: Arc<str>,
}

pub type HandlerResult = Result<(), JobError>;
type BoxedHandler = Arc<dyn Fn(JobContext, Job) -> BoxFuture<'static, HandlerResult> + Send + Sync>;
type BoxedDeadHook = Arc<dyn Fn(Uuid, Job, String) -> BoxFuture<'static, ()> + Send + Sync>;

/// How long a dead-letter hook may take before the job is dead-lettered anyway.
const DEAD_HOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Handlers by job kind. A worker consumes the queues of the kinds it has handlers for.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<&'static str, (Queue, BoxedHandler)>,
    dead_hooks: HashMap<&'static str, BoxedDeadHook>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register the handler of kind `J`.
    pub fn register<J, F, Fut>(&mut self, handler: F) -> &mut Self
    where
        J: JobKind,
        F: Fn(JobContext, J) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let boxed: BoxedHandler = Arc::new(move |ctx: JobContext, job: Job| {
            let handler = handler.clone();
            Box::pin(async move {
                match J::from_job(job) {
                    Some(j) => handler(ctx, j).await,
                    None => Err(JobError::permanent("job routed to the wrong handler")),
                }
            })
        });
        self.handlers.insert(J::NAME, (J::QUEUE, boxed));
        self
    }

    /// The home queues of the registered kinds (what a worker consumes by default).
    pub fn queues(&self) -> Vec<Queue> {
        let mut qs: Vec<Queue> = self.handlers.values().map(|(q, _)| *q).collect();
        qs.sort();
        qs.dedup();
        qs
    }

    pub fn kinds(&self) -> Vec<&'static str> {
        let mut k: Vec<&'static str> = self.handlers.keys().copied().collect();
        k.sort_unstable();
        k
    }

    fn get(&self, kind: &str) -> Option<BoxedHandler> {
        self.handlers.get(kind).map(|(_, h)| h.clone())
    }

    /// Register what to do when a job of kind `J` is dead-lettered *without* its handler having
    /// ended it — it kept losing its worker, or failed for good — e.g. tell a waiting client.
    /// The hook gets the job and the last error; it runs before the job moves to the dead
    /// letters, bounded in time, and must be idempotent (the handler may have done it too).
    pub fn on_dead<J, F, Fut>(&mut self, hook: F) -> &mut Self
    where
        J: JobKind,
        F: Fn(Uuid, J, String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let hook = Arc::new(hook);
        let boxed: BoxedDeadHook = Arc::new(move |id: Uuid, job: Job, error: String| {
            let hook = hook.clone();
            Box::pin(async move {
                if let Some(j) = J::from_job(job) {
                    hook(id, j, error).await;
                }
            })
        });
        self.dead_hooks.insert(J::NAME, boxed);
        self
    }

    /// Run the dead-letter hook of the job's kind, if any (bounded by `DEAD_HOOK_TIMEOUT`).
    async fn run_dead_hook(&self, env: &Envelope, error: &str) {
        if let Some(hook) = self.dead_hooks.get(env.job.name())
            && tokio::time::timeout(
                DEAD_HOOK_TIMEOUT,
                hook(env.id, env.job.clone(), error.to_owned()),
            )
            .await
            .is_err()
        {
            tracing::warn!("the dead-letter hook timed out");
        }
    }
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub queues: Vec<Queue>,
    /// Jobs handled at once (`WORKER_CONCURRENCY`), across all queues.
    pub concurrency: usize,
    /// Unique per process: see [`consumer_name`].
    pub consumer: String,
    pub read_block: Duration,
    pub shutdown_grace: Duration,
}

impl WorkerOptions {
    pub fn from_settings(settings: &config::Settings, queues: Vec<Queue>) -> Self {
        Self {
            queues,
            concurrency: settings.worker.concurrency,
            consumer: consumer_name(),
            read_block: Duration::from_millis(settings.worker.read_block_ms),
            shutdown_grace: Duration::from_secs(settings.worker.shutdown_grace_secs),
        }
    }
}

/// A consumer name unique per process: `host-pid-random`.
pub fn consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// What one run of a worker did (this process only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    pub completed: u64,
    pub retried: u64,
    pub dead: u64,
    pub abandoned: u64,
    pub reclaimed: u64,
}

impl RunReport {
    fn since(&self, before: &RunReport) -> RunReport {
        RunReport {
            completed: self.completed - before.completed,
            retried: self.retried - before.retried,
            dead: self.dead - before.dead,
            abandoned: self.abandoned - before.abandoned,
            reclaimed: self.reclaimed - before.reclaimed,
        }
    }
}

#[derive(Default)]
struct Counters {
    /// Reclaim calls made (names each one's consumer).
    reclaims: AtomicU64,
    completed: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    abandoned: AtomicU64,
    reclaimed: AtomicU64,
}

impl Counters {
    fn report(&self) -> RunReport {
        RunReport {
            completed: self.completed.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead: self.dead.load(Ordering::Relaxed),
            abandoned: self.abandoned.load(Ordering::Relaxed),
            reclaimed: self.reclaimed.load(Ordering::Relaxed),
        }
    }
}

/// A worker: consumes its queues with the registry's handlers until stopped.
pub struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    bus: Bus,
    registry: Registry,
    opts: WorkerOptions,
    consumer: Arc<str>,
    semaphore: Arc<Semaphore>,
    /// Wakes a queue's mover when this process schedules a retry.
    movers: HashMap<Queue, Arc<Notify>>,
    counters: Counters,
    /// Cancelled when the grace period of the current run is over: in-flight handlers are
    /// dropped. A fresh token per run.
    hard_stop: std::sync::Mutex<CancellationToken>,
}

impl Worker {
    pub fn new(bus: Bus, registry: Registry, opts: WorkerOptions) -> Self {
        let movers = opts
            .queues
            .iter()
            .map(|q| (*q, Arc::new(Notify::new())))
            .collect();
        Self {
            inner: Arc::new(Inner {
                semaphore: Arc::new(Semaphore::new(opts.concurrency.max(1))),
                consumer: Arc::from(opts.consumer.as_str()),
                bus,
                registry,
                movers,
                counters: Counters::default(),
                hard_stop: std::sync::Mutex::new(CancellationToken::new()),
                opts,
            }),
        }
    }

    pub fn consumer(&self) -> &str {
        &self.inner.consumer
    }

    pub fn queues(&self) -> &[Queue] {
        &self.inner.opts.queues
    }

    /// Run until `shutdown` is cancelled, then stop as described in the module docs.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<RunReport, BusError> {
        metrics::describe();
        let inner = &self.inner;
        let before = inner.counters.report();
        let hard_stop = CancellationToken::new();
        if let Ok(mut t) = inner.hard_stop.lock() {
            *t = hard_stop.clone();
        }
        for q in &inner.opts.queues {
            inner.bus.ensure_group(*q).await?;
        }
        let loops = TaskTracker::new();
        let jobs = TaskTracker::new();
        let ackers = TaskTracker::new();
        for q in inner.opts.queues.clone() {
            let (acker, rx) = mpsc::unbounded_channel();
            ackers.spawn(ack_loop(inner.clone(), q, rx));
            loops.spawn(read_loop(
                inner.clone(),
                q,
                shutdown.clone(),
                jobs.clone(),
                acker.clone(),
            ));
            loops.spawn(move_loop(inner.clone(), q, shutdown.clone()));
            loops.spawn(reclaim_loop(
                inner.clone(),
                q,
                shutdown.clone(),
                jobs.clone(),
                acker,
            ));
        }
        ackers.close();
        loops.close();
        tracing::info!(
            consumer = %inner.consumer,
            queues = ?inner.opts.queues,
            concurrency = inner.opts.concurrency,
            kinds = ?inner.registry.kinds(),
            "worker consuming"
        );
        shutdown.cancelled().await;
        let deadline = tokio::time::Instant::now() + inner.opts.shutdown_grace;
        tracing::info!(
            in_flight = jobs.len(),
            grace_secs = inner.opts.shutdown_grace.as_secs_f64(),
            "worker stopping: no new reads, finishing jobs in flight"
        );
        // Readers finish a read already sent; what it returned becomes jobs in flight.
        if tokio::time::timeout_at(deadline, loops.wait())
            .await
            .is_err()
        {
            tracing::warn!("worker loops did not stop within the grace period");
        }
        jobs.close();
        if tokio::time::timeout_at(deadline, jobs.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = jobs.len(),
                "grace period over: leaving the jobs in flight to be reclaimed by other workers"
            );
            hard_stop.cancel();
            jobs.wait().await;
        }
        loops.wait().await;
        // every sender is gone with the loops and the jobs: the ackers flush and end
        ackers.wait().await;
        for q in &inner.opts.queues {
            match inner.bus.remove_consumer_if_idle(*q, &inner.consumer).await {
                Ok(_) => {}
                Err(e) => tracing::warn!(queue = %q, error = %e, "cannot tidy up the consumer"),
            }
        }
        let report = inner.counters.report().since(&before);
        tracing::info!(?report, "worker stopped");
        Ok(report)
    }

    /// Run until none of the worker's queues has work left (nothing in the streams, nothing
    /// delayed), or fail with [`BusError::Timeout`] after `timeout`. For deterministic tests
    /// and `worker --until-empty`.
    pub async fn drain_until_empty(&self, timeout: Duration) -> Result<RunReport, BusError> {
        self.run_until_empty(CancellationToken::new(), timeout)
            .await
    }

    /// [`Worker::drain_until_empty`] that also stops (successfully) when `shutdown` is
    /// cancelled.
    pub async fn run_until_empty(
        &self,
        shutdown: CancellationToken,
        timeout: Duration,
    ) -> Result<RunReport, BusError> {
        let stop = shutdown.child_token();
        let watcher = {
            let stop = stop.clone();
            let bus = self.inner.bus.clone();
            let queues = self.inner.opts.queues.clone();
            async move {
                let deadline = tokio::time::Instant::now() + timeout;
                let mut empty_in_a_row = 0;
                loop {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                    match bus.is_empty(&queues).await {
                        Ok(true) => empty_in_a_row += 1,
                        Ok(false) => empty_in_a_row = 0,
                        Err(e) => tracing::warn!(error = %e, "cannot check the queues"),
                    }
                    // twice in a row: a handler may enqueue a follow-up on another queue
                    if empty_in_a_row >= 2 || stop.is_cancelled() {
                        stop.cancel();
                        return true;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        stop.cancel();
                        return false;
                    }
                }
            }
        };
        let run = async {
            let r = self.run(stop.clone()).await;
            stop.cancel(); // ends the watcher too, should the run fail
            r
        };
        let (emptied, report) = tokio::join!(watcher, run);
        let report = report?;
        if emptied {
            Ok(report)
        } else {
            Err(BusError::Timeout(timeout))
        }
    }
}

async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Take one permit (waiting), then as many more as are free, up to `max`.
async fn take_permits(
    sem: &Arc<Semaphore>,
    max: usize,
    stop: &CancellationToken,
) -> Option<Vec<OwnedSemaphorePermit>> {
    let first = tokio::select! {
        biased;
        _ = stop.cancelled() => return None,
        p = sem.clone().acquire_owned() => p.ok()?,
    };
    let mut permits = vec![first];
    while permits.len() < max {
        match sem.clone().try_acquire_owned() {
            Ok(p) => permits.push(p),
            Err(_) => break,
        }
    }
    Some(permits)
}

async fn read_loop(
    inner: Arc<Inner>,
    q: Queue,
    stop: CancellationToken,
    jobs: TaskTracker,
    acker: Acker,
) {
    let mut conn = None;
    let mut busy = false;
    loop {
        let max = if busy { MAX_BATCH } else { 1 };
        let Some(mut permits) = take_permits(&inner.semaphore, max, &stop).await else {
            break;
        };
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match inner.bus.redis().blocking_conn().await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    tracing::warn!(queue = %q, error = %e, "cannot connect for reading; retrying");
                    drop(permits);
                    if !sleep_or_stop(Duration::from_millis(500), &stop).await {
                        break;
                    }
                    continue;
                }
            },
        };
        let block = (!busy).then_some(inner.opts.read_block);
        // The blocking connection has no reply timeout; bound the read here so that a
        // connection that died silently cannot hang the reader.
        let read = tokio::time::timeout(
            inner.opts.read_block + READ_SLACK,
            inner.bus.read(c, q, &inner.consumer, permits.len(), block),
        )
        .await
        .unwrap_or_else(|_| Err(BusError::Stalled));
        match read {
            Ok(deliveries) => {
                busy = !deliveries.is_empty();
                for d in deliveries {
                    let permit = match permits.pop() {
                        Some(p) => p,
                        // COUNT bounds the reply; this is only a guard
                        None => match inner.semaphore.clone().acquire_owned().await {
                            Ok(p) => p,
                            Err(_) => break,
                        },
                    };
                    jobs.spawn(process(inner.clone(), d, permit, acker.clone()));
                }
            }
            Err(e) => {
                busy = false;
                conn = None;
                drop(permits);
                if is_nogroup(&e) {
                    let _ = inner.bus.ensure_group(q).await;
                } else {
                    tracing::warn!(queue = %q, error = %e, "read failed; retrying");
                }
                if !sleep_or_stop(Duration::from_millis(200), &stop).await {
                    break;
                }
            }
        }
    }
}

fn is_nogroup(e: &BusError) -> bool {
    matches!(e, BusError::Redis(r) if r.code() == Some("NOGROUP"))
}

async fn move_loop(inner: Arc<Inner>, q: Queue, stop: CancellationToken) {
    let notify = inner.movers.get(&q).cloned().unwrap_or_default();
    loop {
        let wait = match inner.bus.move_due(q, MOVE_BATCH).await {
            Ok((moved, _)) if moved as usize >= MOVE_BATCH => Duration::ZERO,
            Ok((_, Some(next_ms))) => {
                let now = Utc::now().timestamp_millis();
                Duration::from_millis(u64::try_from(next_ms - now).unwrap_or(0))
                    .min(MOVER_MAX_SLEEP)
            }
            Ok((_, None)) => MOVER_MAX_SLEEP,
            Err(e) => {
                tracing::warn!(queue = %q, error = %e, "moving delayed jobs failed");
                MOVER_MAX_SLEEP
            }
        };
        if wait.is_zero() {
            if stop.is_cancelled() {
                break;
            }
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn reclaim_loop(
    inner: Arc<Inner>,
    q: Queue,
    stop: CancellationToken,
    jobs: TaskTracker,
    acker: Acker,
) {
    let visibility = Duration::from_secs(inner.bus.settings(q).visibility_timeout_secs);
    let period = (visibility / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut last_prune = Instant::now();
    while sleep_or_stop(period, &stop).await {
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = Instant::now();
            match inner
                .bus
                .prune_consumers(q, &inner.consumer, PRUNE_IDLE)
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(queue = %q, removed = n, "removed the names of consumers gone for good")
                }
                Err(e) => tracing::warn!(queue = %q, error = %e, "cannot prune consumers"),
            }
        }
        let mut cursor = "0-0".to_owned();
        loop {
            let Some(mut permits) = take_permits(&inner.semaphore, MAX_BATCH, &stop).await else {
                return;
            };
            // A name of its own per reclaim: an entry of this very process that went idle (a
            // stalled handler) is then no longer owned by the name its first run acks under,
            // so one entry never runs twice under one owner. (Nothing is claimed, and no name
            // is created, when no entry is idle.)
            let reclaimer = format!(
                "{}~r{}",
                inner.consumer,
                inner.counters.reclaims.fetch_add(1, Ordering::Relaxed)
            );
            let claimed = inner
                .bus
                .reclaim(q, &reclaimer, visibility, &cursor, permits.len())
                .await;
            match claimed {
                Ok((next, deliveries)) => {
                    if !deliveries.is_empty() {
                        tracing::info!(queue = %q, count = deliveries.len(), "reclaimed jobs idle past the visibility timeout");
                        inner
                            .counters
                            .reclaimed
                            .fetch_add(deliveries.len() as u64, Ordering::Relaxed);
                    }
                    for d in deliveries {
                        let Some(permit) = permits.pop() else { break };
                        jobs.spawn(process(inner.clone(), d, permit, acker.clone()));
                    }
                    if next == "0-0" || stop.is_cancelled() {
                        break;
                    }
                    cursor = next;
                }
                Err(e) => {
                    if !is_nogroup(&e) {
                        tracing::warn!(queue = %q, error = %e, "reclaim failed");
                    }
                    break;
                }
            }
        }
    }
}

/// Handle one delivered entry and settle it (ack, retry or dead-letter).
async fn process(inner: Arc<Inner>, d: Delivery, permit: OwnedSemaphorePermit, acker: Acker) {
    let _permit = permit;
    let q = d.queue;
    let env = match Envelope::from_json(&d.body) {
        Ok(env) => env,
        Err(e) => {
            let error = format!("not a valid job envelope: {e}");
            tracing::error!(queue = %q, entry = %d.entry_id, %error, "dead-lettering a malformed entry");
            settle_dead(&inner, &d, ("unknown", None), &error, DeadReason::Malformed).await;
            return;
        }
    };
    let kind = env.job.name();
    let settings = inner.bus.settings(q);
    let attempt = env.attempt.saturating_add(d.deliveries.saturating_sub(1));
    let span = tracing::info_span!(
        "job",
        job_id = %env.id,
        kind,
        queue = %q,
        attempt,
        trace_id = env.trace_id().unwrap_or(""),
    );
    async {
        if d.deliveries > 1 && attempt > settings.max_attempts {
            let error = format!(
                "delivered {} times without being acknowledged (worker lost or stalled past the \
                 {} s visibility timeout)",
                d.deliveries, settings.visibility_timeout_secs
            );
            tracing::error!(%error, "dead-lettering a job that keeps losing its worker");
            inner.registry.run_dead_hook(&env, &error).await;
            settle_dead(&inner, &d, (kind, Some(env.id)), &error, DeadReason::Lost).await;
            return;
        }
        if d.deliveries == 1 {
            let latency = (Utc::now() - env.due_at()).to_std().unwrap_or_default();
            metrics::picked_up(q, kind, latency);
        }
        let ctx = JobContext {
            id: env.id,
            queue: q,
            kind,
            attempt,
            enqueued_at: env.enqueued_at,
            due_at: env.due_at(),
            trace: env.trace.clone(),
            consumer: d.consumer.clone(),
        };
        let hard_stop = inner
            .hard_stop
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        let started = Instant::now();
        let result = match inner.registry.get(kind) {
            Some(handler) => {
                // While the handler runs, keep the entry claimed (a heartbeat every third of the
                // visibility timeout), so that only a dead or stalled worker's jobs are
                // reclaimed, never a long answer still streaming.
                let visibility = Duration::from_secs(settings.visibility_timeout_secs);
                tokio::select! {
                    r = handler(ctx, env.job.clone()) => Some(r),
                    _ = hard_stop.cancelled() => None,
                    () = keep_claimed(&inner, &d, visibility) => None,
                }
            }
            None => Some(Err(JobError::retryable(format!(
                "this worker has no handler for kind {kind}"
            )))),
        };
        let took = started.elapsed();
        let Some(result) = result else {
            tracing::warn!("handler dropped (end of the grace period, or the entry was reclaimed); the job stays with its owner");
            inner.counters.abandoned.fetch_add(1, Ordering::Relaxed);
            metrics::finished(q, kind, Outcome::Abandoned, took);
            return;
        };
        match result {
            Ok(()) => {
                tracing::debug!(took_ms = took.as_millis() as u64, "job done");
                settle_ack(&inner, &d, env.id, &acker).await;
                inner.counters.completed.fetch_add(1, Ordering::Relaxed);
                metrics::finished(q, kind, Outcome::Ok, took);
            }
            Err(JobError::Wait { reason, after }) => {
                // not a failure: the same attempt again after the wait
                tracing::info!(%reason, delay_ms = after.as_millis() as u64, "job waits; re-queued");
                schedule_again(&inner, &d, &env, attempt, after.min(MAX_RETRY_DELAY), took).await;
            }
            Err(JobError::Retryable { error, retry_after }) if attempt < settings.max_attempts => {
                let delay = backoff::delay(settings, attempt, retry_after, &mut rand::rng())
                    .min(MAX_RETRY_DELAY);
                tracing::warn!(%error, delay_ms = delay.as_millis() as u64, "job failed; retrying later");
                schedule_again(&inner, &d, &env, attempt + 1, delay, took).await;
            }
            Err(e) => {
                let reason = if e.is_retryable() {
                    DeadReason::Exhausted
                } else {
                    DeadReason::Permanent
                };
                let error = e.to_string();
                tracing::error!(%error, reason = reason.as_str(), "job failed for good; dead-lettering it");
                metrics::finished(q, kind, Outcome::Dead, took);
                inner.registry.run_dead_hook(&env, &error).await;
                settle_dead(&inner, &d, (kind, Some(env.id)), &error, reason).await;
            }
        }
    }
    .instrument(span)
    .await
}

/// Put the job back for attempt `next_attempt` after `delay` (the delayed set) and ack the
/// delivered entry, in one step. Should Redis stay unreachable here for half the visibility
/// timeout, the entry stays pending and is reclaimed (and the ledger's reconciler covers the
/// work that waits on it).
async fn schedule_again(
    inner: &Inner,
    d: &Delivery,
    env: &Envelope,
    next_attempt: u32,
    delay: Duration,
    took: Duration,
) {
    let q = d.queue;
    let now = Utc::now();
    let due = chrono::Duration::from_std(delay)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(now);
    let mut next = env.clone();
    next.attempt = next_attempt;
    next.not_before = Some(due);
    // Redis down for a moment (a restart, a failover) is the usual reason this fails: keep
    // trying for up to half the visibility timeout — the entry stays ours meanwhile — rather
    // than leave the job to a reclaim a whole visibility timeout later.
    let visibility = Duration::from_secs(inner.bus.settings(q).visibility_timeout_secs);
    let give_up = Instant::now() + visibility / 2;
    let mut pause = Duration::from_millis(100);
    loop {
        match inner
            .bus
            .retry(q, &d.consumer, &d.entry_id, &next, due)
            .await
        {
            Ok(true) => {
                inner.counters.retried.fetch_add(1, Ordering::Relaxed);
                metrics::finished(q, env.job.name(), Outcome::Retry, took);
                if let Some(n) = inner.movers.get(&q) {
                    n.notify_one();
                }
                return;
            }
            Ok(false) => {
                tracing::warn!("the entry was reclaimed by another worker meanwhile; it decides");
                return;
            }
            Err(e) if Instant::now() + pause < give_up => {
                tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "cannot schedule the retry yet; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot schedule the retry; the job stays pending and will be reclaimed");
                return;
            }
        }
    }
}

/// The heartbeat of a running handler: resets the entry's idle time every third of the
/// visibility timeout. Resolves only when the entry is no longer this consumer's (another
/// worker reclaimed it after missed heartbeats): the caller then drops the handler, so one job
/// never runs twice at once; the new owner decides its fate.
async fn keep_claimed(inner: &Inner, d: &Delivery, visibility: Duration) {
    let period = (visibility / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(period).await;
        match inner.bus.touch(d.queue, &d.consumer, &d.entry_id).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(entry = %d.entry_id, "the entry was reclaimed by another worker; dropping this run");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed; will try again"),
        }
    }
}

/// Acknowledge through the queue's acker (which batches the acks of jobs finishing together)
/// and wait until it reached Redis. A reclaimed entry (owned by a reclaim's own name) is
/// acknowledged on its own.
async fn settle_ack(inner: &Inner, d: &Delivery, job_id: Uuid, acker: &Acker) {
    let entry = [(d.entry_id.as_str(), job_id)];
    let acked = if d.consumer != inner.consumer {
        ack_with_retries(inner, d.queue, &d.consumer, &entry).await
    } else {
        let (done, reply) = oneshot::channel();
        let req = AckRequest {
            entry_id: d.entry_id.clone(),
            job_id,
            done,
        };
        match acker.send(req) {
            Ok(()) => reply.await.unwrap_or(false),
            Err(_) => ack_with_retries(inner, d.queue, &inner.consumer, &entry).await,
        }
    };
    if !acked {
        tracing::error!(
            "cannot ack; the job stays pending and will be redelivered (handlers are idempotent)"
        );
    }
}

/// Tries for ~10 s (a Redis restart or failover takes a few): an ack lost here means a
/// (harmless, idempotent) redelivery a visibility timeout later.
async fn ack_with_retries(
    inner: &Inner,
    q: Queue,
    consumer: &str,
    entries: &[(&str, Uuid)],
) -> bool {
    for wait in [0u64, 50, 200, 500, 1000, 1000, 2000, 2000, 3000] {
        if wait > 0 {
            // (a zero sleep would still wait for the next timer tick)
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        match inner.bus.ack(q, consumer, entries).await {
            Ok(_) => return true,
            Err(e) => tracing::warn!(queue = %q, error = %e, "ack failed"),
        }
    }
    false
}

/// Acknowledges handled entries of one queue: whatever has queued up while the previous call
/// was in flight goes in the next one (no timer, so no added latency when idle). Ends when
/// every sender is gone.
async fn ack_loop(inner: Arc<Inner>, q: Queue, mut rx: mpsc::UnboundedReceiver<AckRequest>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < ACK_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let entries: Vec<(&str, Uuid)> = batch
            .iter()
            .map(|r| (r.entry_id.as_str(), r.job_id))
            .collect();
        let ok = ack_with_retries(&inner, q, &inner.consumer, &entries).await;
        for r in batch {
            let _ = r.done.send(ok);
        }
    }
}

async fn settle_dead(
    inner: &Inner,
    d: &Delivery,
    (kind, job_id): (&'static str, Option<Uuid>),
    error: &str,
    reason: DeadReason,
) {
    match inner
        .bus
        .dead_letter(
            d.queue,
            &d.consumer,
            &d.entry_id,
            &d.body,
            error,
            reason,
            job_id,
        )
        .await
    {
        Ok(true) => {
            inner.counters.dead.fetch_add(1, Ordering::Relaxed);
            metrics::dead(d.queue, kind, reason.as_str());
        }
        Ok(false) => {
            tracing::warn!("the entry was reclaimed by another worker meanwhile; it decides")
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot dead-letter; the job stays pending and will be reclaimed")
        }
    }
}
