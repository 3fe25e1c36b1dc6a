//! Consuming the bus with apalis: our Redis Streams bus is an apalis backend, job kinds are
//! apalis task functions, and a [`Worker`] runs one apalis worker per queue under apalis's
//! `Monitor`.
//!
//! - [`registry`]: the [`Registry`] of task functions by kind, and the [`JobContext`] a task
//!   function takes;
//! - [`backend`]: the backend (`apalis_core::backend::Backend`): a permit, then a read; reclaim of
//!   lost workers' entries; a stopped worker's unstarted reads given back;
//! - [`settle`]: the backend's layer, outermost (the job's span, the pickup metric, the dead
//!   letters of jobs that keep losing their worker), and the settle layer in the job's own task:
//!   ack after the handler's commit, retry through our delayed set with our backoff and
//!   `Retry-After`, dead letters, the per-entry heartbeat.
//!
//! The layers of every queue's worker, outermost first: the backend's entry layer, tracing
//! (apalis's, in the job's span), handlers spawned in parallel (`parallelize`, on a tracker of
//! this run, aborted if dropped), then in the job's own task our settle layer (runs the handler
//! under the heartbeat and the grace period, drops it there when its entry was reclaimed or the
//! grace is over, then settles), catch-panic, a timeout per queue (`[queues.<name>]
//! run_timeout_secs`), then the task function. A panic while settling costs one job (its task
//! ends; the job stays pending); a queue's worker that fails all the same is restarted by the
//! monitor. One `WORKER_CONCURRENCY` semaphore is shared by every queue's backend: a permit is
//! taken before each read and released when the task is settled. The delayed-set mover of each
//! queue and the ack batcher are tasks of the run, next to the monitor.
//!
//! Stopping: at the stop signal the readers stop, and what a read already sent returns goes back
//! to its queue at once (apalis polls a stopping worker's backend no more); in-flight jobs get
//! `shutdown_grace`, after which they are cut and left pending for the other workers to reclaim
//! (counted as abandoned). apalis's `shutdown_timeout`, the grace plus 5 s, bounds the settling
//! that follows (a retry or an ack against a Redis that does not answer).

mod backend;
mod registry;
mod settle;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::layers::WorkerBuilderExt;
use apalis::layers::tracing::TraceLayer;
use apalis_core::monitor::Monitor;
use apalis_core::task::Task;
use apalis_core::worker::builder::WorkerBuilder;
use apalis_core::worker::ext::parallelize::ParallelizeExt;
use chrono::Utc;
use futures::StreamExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use backend::StreamsBackend;
pub use registry::{HandlerResult, JobContext, NoJobContext, Registry};
pub use settle::{EntryLayer, EntryService, Settle, SettleLayer};

use crate::bus::Bus;
use crate::error::BusError;
use crate::kinds::Job;
use crate::metrics;
use crate::queue::{Part, Queue};

/// The longest the delayed-set mover sleeps without looking (other processes add retries too).
pub const MOVER_MAX_SLEEP: Duration = Duration::from_secs(1);
/// How often a worker re-reads the record of the queues' partitions.
const PARTITIONS_REFRESH: Duration = Duration::from_secs(10);
/// Delayed entries moved per script call.
const MOVE_BATCH: usize = 200;
/// Entries per read at most.
const MAX_BATCH: usize = 64;
/// The longest a retry waits, whatever a handler's `Retry-After` says.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);
/// How much longer than the grace period apalis's monitor waits before it gives up on a worker
/// (the grace itself is ours: see [`Worker::run`]).
const MONITOR_MARGIN: Duration = Duration::from_secs(5);
/// How long a restarted queue worker waits before it reads again.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

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
    /// Tasks made (each one's apalis task id).
    tasks: AtomicU64,
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

    fn next_reclaim(&self) -> u64 {
        self.reclaims.fetch_add(1, Ordering::Relaxed)
    }

    fn next_task(&self) -> u64 {
        self.tasks.fetch_add(1, Ordering::Relaxed)
    }

    fn reclaimed(&self, n: u64) {
        self.reclaimed.fetch_add(n, Ordering::Relaxed);
    }
}

/// A worker: consumes its queues with the registry's task functions until stopped.
pub struct Worker {
    core: Arc<Core>,
}

/// What a worker keeps across runs.
struct Core {
    bus: Bus,
    registry: Registry,
    opts: WorkerOptions,
    consumer: Arc<str>,
    semaphore: Arc<Semaphore>,
    counters: Counters,
}

/// One run of a worker: what its backends, layers and background tasks share.
struct Run {
    core: Arc<Core>,
    /// Cancelled when the worker stops: no new reads or reclaims.
    reading: CancellationToken,
    /// Cancelled when the grace period is over: in-flight handlers are dropped.
    hard_stop: CancellationToken,
    /// Wakes a queue partition's mover when this run schedules a retry.
    movers: HashMap<Part, Arc<Notify>>,
    /// The ack batchers by queue partition; emptied at the end of the run, which ends them.
    ackers: Mutex<HashMap<Part, settle::Acker>>,
    /// The jobs' tasks (spawned by apalis's `parallelize`): each runs its handler and settles.
    handlers: TaskTracker,
    /// Settling aside (malformed entries, reads given back at a stop).
    side: TaskTracker,
    /// Every backend's delivery stream, for [`Run::stop_reading`].
    deliveries: Mutex<Vec<backend::Deliveries>>,
}

impl Run {
    fn acker(&self, q: Part) -> Option<settle::Acker> {
        self.ackers.lock().ok()?.get(&q).cloned()
    }

    fn register_deliveries(&self, d: backend::Deliveries) {
        if let Ok(mut all) = self.deliveries.lock() {
            all.push(d);
        }
    }

    /// Stop reading and reclaiming, and give back to their queues whatever the reads already
    /// sent return (apalis polls a backend no more once its worker stops). Idempotent.
    fn stop_reading(self: &Arc<Self>) {
        self.reading.cancel();
        let streams: Vec<_> = match self.deliveries.lock() {
            Ok(all) => all
                .iter()
                .filter_map(|d| d.lock().ok().and_then(|mut s| s.take()))
                .collect(),
            Err(_) => Vec::new(),
        };
        for mut deliveries in streams {
            let run = self.clone();
            self.side.spawn(async move {
                while let Some((d, _permit)) = deliveries.next().await {
                    backend::give_back(&run, &d).await;
                }
            });
        }
    }
}

impl Worker {
    pub fn new(bus: Bus, registry: Registry, opts: WorkerOptions) -> Self {
        Self {
            core: Arc::new(Core {
                semaphore: Arc::new(Semaphore::new(opts.concurrency.max(1))),
                consumer: Arc::from(opts.consumer.as_str()),
                bus,
                registry,
                counters: Counters::default(),
                opts,
            }),
        }
    }

    pub fn consumer(&self) -> &str {
        &self.core.consumer
    }

    pub fn queues(&self) -> &[Queue] {
        &self.core.opts.queues
    }

    /// Run until `shutdown` is cancelled, then stop as described in the module docs.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<RunReport, BusError> {
        metrics::describe();
        let core = &self.core;
        let before = core.counters.report();
        // every partition a larger setting ever created is read too
        core.bus.record_partitions().await?;
        let parts: Vec<Part> = core
            .opts
            .queues
            .iter()
            .flat_map(|q| core.bus.parts(*q))
            .collect();
        for p in &parts {
            core.bus.ensure_group(*p).await?;
        }
        let background = TaskTracker::new();
        let mut ackers = HashMap::new();
        let mut receivers = Vec::new();
        for p in &parts {
            let (tx, rx) = mpsc::unbounded_channel();
            ackers.insert(*p, tx);
            receivers.push((*p, rx));
        }
        let run = Arc::new(Run {
            core: core.clone(),
            reading: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            movers: parts
                .iter()
                .map(|p| (*p, Arc::new(Notify::new())))
                .collect(),
            ackers: Mutex::new(ackers),
            handlers: TaskTracker::new(),
            side: TaskTracker::new(),
            deliveries: Mutex::new(Vec::new()),
        });
        for (q, rx) in receivers {
            background.spawn(settle::ack_loop(run.clone(), q, rx));
            background.spawn(move_loop(run.clone(), q));
        }
        background.spawn(watch_partitions(
            run.clone(),
            background.clone(),
            parts.clone(),
        ));
        background.close();

        let mut monitor =
            Monitor::new()
                .shutdown_timeout(core.opts.shutdown_grace + MONITOR_MARGIN)
                // a queue's worker that fails (a panic outside a handler) starts again
                .should_restart(|w, e| {
                    tracing::error!(worker = w.name(), error = %e, "an apalis worker failed; restarting it");
                    true
                });
        for q in core.opts.queues.clone() {
            let run = run.clone();
            let timeout = Duration::from_secs(core.bus.settings(q).run_timeout_secs);
            monitor = monitor.register(move |restarts| {
                let pause = if restarts > 0 {
                    RESTART_PAUSE
                } else {
                    Duration::ZERO
                };
                WorkerBuilder::new(format!("{}:{q}", run.core.consumer))
                    .backend(StreamsBackend::new(run.clone(), q, pause))
                    .layer(
                        TraceLayer::new()
                            .make_span_with(|_: &Task<Job>| tracing::Span::current())
                            .on_failure(()),
                    )
                    .parallelize(spawn_on(run.handlers.clone()))
                    .layer(SettleLayer::new(run.clone()))
                    .catch_panic()
                    .timeout(timeout)
                    .build(run.core.registry.dispatch())
            });
        }
        tracing::info!(
            consumer = %core.consumer,
            queues = ?core.opts.queues,
            concurrency = core.opts.concurrency,
            kinds = ?core.registry.kinds(),
            "worker consuming"
        );
        let grace = core.opts.shutdown_grace;
        let signal = {
            let (shutdown, run) = (shutdown.clone(), run.clone());
            async move {
                shutdown.cancelled().await;
                tracing::info!(
                    tasks_in_flight = run.handlers.len(),
                    grace_secs = grace.as_secs_f64(),
                    "worker stopping: no new reads, finishing jobs in flight"
                );
                run.stop_reading();
                Ok::<(), std::io::Error>(())
            }
        };
        // The grace period: when it is over, the handlers still running are dropped (their
        // entries stay pending, for the other workers to reclaim).
        let grace_timer = {
            let (shutdown, run) = (shutdown.clone(), run.clone());
            async move {
                shutdown.cancelled().await;
                tokio::time::sleep(grace).await;
                if !run.handlers.is_empty() {
                    tracing::warn!(
                        tasks_in_flight = run.handlers.len(),
                        "grace period over: leaving the jobs in flight to be reclaimed by other workers"
                    );
                }
                run.hard_stop.cancel();
            }
        };
        // (with a shutdown timeout set, the monitor answers Ok whatever its workers did; they
        // log their own errors)
        let result = tokio::select! {
            r = monitor.run_with_signal(signal) => r,
            () = async { grace_timer.await; std::future::pending::<()>().await } => Ok(()),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "the apalis monitor failed");
        }
        let ended_early = !shutdown.is_cancelled();
        if ended_early {
            tracing::error!("the worker's apalis workers ended without being asked to; stopping");
        }
        run.reading.cancel();
        run.hard_stop.cancel();
        run.handlers.close();
        run.handlers.wait().await;
        run.side.close();
        run.side.wait().await;
        // the ackers flush what they hold and end with their last sender
        if let Ok(mut a) = run.ackers.lock() {
            a.clear();
        }
        background.wait().await;
        for p in &parts {
            if let Err(e) = core.bus.remove_consumer_if_idle(*p, &core.consumer).await {
                tracing::warn!(queue = %p, error = %e, "cannot tidy up the consumer");
            }
        }
        if ended_early {
            return Err(BusError::Ended("apalis workers"));
        }
        let report = core.counters.report().since(&before);
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
            let bus = self.core.bus.clone();
            let queues = self.core.opts.queues.clone();
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

/// Spawns a job's task (its handler under the settle layer) on `tracker`, in the current
/// span, aborted when dropped (apalis's `parallelize` executor).
fn spawn_on<F>(
    tracker: TaskTracker,
) -> impl Fn(F) -> AbortOnDrop<F::Output> + Clone + Send + 'static
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    move |fut| AbortOnDrop(tracker.spawn(fut.in_current_span()))
}

/// A job's spawned task, aborted when whoever waits for it stops waiting (apalis's monitor,
/// giving up on a worker after its shutdown timeout).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
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

/// Re-reads the record of the queues' partitions every [`PARTITIONS_REFRESH`]: when another
/// process raised the setting, the new partitions get their movers here (their readers and
/// reclaimers start in the backends, `backend::StreamsBackend`).
async fn watch_partitions(run: Arc<Run>, background: TaskTracker, mut known: Vec<Part>) {
    while sleep_or_stop(PARTITIONS_REFRESH, &run.reading).await {
        if let Err(e) = run.core.bus.record_partitions().await {
            tracing::debug!(error = %e, "cannot re-read the recorded queue partitions");
            continue;
        }
        for q in &run.core.opts.queues {
            for p in run.core.bus.parts(*q) {
                if known.contains(&p) {
                    continue;
                }
                tracing::info!(queue = %p, "a new queue partition: reading it too");
                if let Err(e) = run.core.bus.ensure_group(p).await {
                    tracing::warn!(queue = %p, error = %e, "cannot create the new partition's group yet");
                    continue;
                }
                known.push(p);
                background.spawn(move_loop(run.clone(), p));
            }
        }
    }
}

/// Moves due delayed retries of one queue partition back to its stream (Lua), sleeping until the
/// next due time (at most [`MOVER_MAX_SLEEP`]) or until this run schedules a retry.
async fn move_loop(run: Arc<Run>, q: Part) {
    let notify = run.movers.get(&q).cloned().unwrap_or_default();
    let stop = run.reading.clone();
    loop {
        let wait = match run.core.bus.move_due(q, MOVE_BATCH).await {
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
