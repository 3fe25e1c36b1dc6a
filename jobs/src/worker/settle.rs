//! Settling jobs on the bus, in two layers:
//!
//! - [`EntryLayer`], the backend's layer, which apalis places outermost (in the queue's apalis
//!   worker task): the job's span, the pickup metric, the dead letters of a job that keeps
//!   losing its worker, and the count of a job task that ended before it settled;
//! - [`SettleLayer`], just inside apalis's `parallelize`, so in the job's own task: it runs the
//!   handler and settles the entry only after the handler returned (so after its commit).
//!
//! Settling:
//! - `Ok` → ack (`XACK`+`XDEL` and the job's marker, batched with the acks of jobs finishing at
//!   the same time by the queue's acker task);
//! - [`JobError::Wait`] → the same attempt again after the wait (the delayed set);
//! - retryable with attempts left → the next attempt goes to the delayed set after our backoff
//!   (or the handler's `Retry-After`), and the entry is acked, in one Lua step;
//! - otherwise → the kind's dead-letter hook, then dead letters + ack in one Lua step.
//!
//! Errors that are not a [`JobError`] (a panic caught by apalis's catch-panic layer, the
//! timeout layer's, a kind this worker does not know) count as retryable. apalis's own retry
//! layer is not used: it would hold the concurrency slot while it waits and keep a second
//! attempt counter.
//!
//! While the handler runs, a heartbeat keeps the entry claimed (every third of the visibility
//! timeout), so that only a dead or stalled worker's jobs are reclaimed, never a long answer
//! still streaming; should another worker have reclaimed it all the same, the handler is
//! dropped (one job never runs twice at once) and the new owner decides. If Redis fails while
//! settling, the entry stays pending and is reclaimed later: handlers are idempotent by job id.
//! A panic while settling ends the job's task only: the entry layer counts the job as
//! abandoned, and it stays pending for a reclaim.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use apalis_core::error::BoxDynError;
use apalis_core::layers::{Layer, Service};
use apalis_core::task::Task;
use chrono::Utc;
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;
use uuid::Uuid;

use super::backend::Entry;
use super::registry::is_wrong_kind;
use super::{MAX_RETRY_DELAY, Run};
use crate::backoff;
use crate::bus::{DeadReason, Delivery};
use crate::error::JobError;
use crate::kinds::Job;
use crate::metrics::{self, Outcome};
use crate::queue::Part;

/// Entries per acknowledgement call at most.
const ACK_BATCH: usize = 256;

/// A handled entry to acknowledge (with its job, whose marker goes too); `done` says whether
/// the ack reached Redis.
pub(super) struct AckRequest {
    entry_id: String,
    job_id: Uuid,
    done: oneshot::Sender<bool>,
}

pub(super) type Acker = mpsc::UnboundedSender<AckRequest>;

/// The layer of [`super::backend::StreamsBackend`], which apalis places outermost, in the
/// queue's apalis worker task: the job's span and pickup metric, the dead letters of a job
/// that keeps losing its worker, and the count of a job task that ended before it settled.
#[derive(Clone)]
pub struct EntryLayer {
    run: Arc<Run>,
}

impl EntryLayer {
    pub(super) fn new(run: Arc<Run>) -> Self {
        Self { run }
    }
}

impl<S> Layer<S> for EntryLayer {
    type Service = EntryService<S>;

    fn layer(&self, inner: S) -> EntryService<S> {
        EntryService {
            inner,
            run: self.run.clone(),
        }
    }
}

/// See [`EntryLayer`].
#[derive(Clone)]
pub struct EntryService<S> {
    inner: S,
    run: Arc<Run>,
}

impl<S> Service<Task<Job>> for EntryService<S>
where
    S: Service<Task<Job>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxDynError>,
{
    type Response = ();
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<(), BoxDynError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxDynError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<Job>) -> Self::Future {
        let Some(entry) = task.ctx().data().get::<Arc<Entry>>().cloned() else {
            return Box::pin(async { Err(BoxDynError::from("a task without its bus entry")) });
        };
        let run = self.run.clone();
        let d = &entry.delivery;
        let settings = run.core.bus.settings(d.part.queue);
        let span = tracing::info_span!(
            "job",
            job_id = %entry.env.id,
            kind = entry.env.job.name(),
            queue = %d.part,
            attempt = entry.attempt,
            trace_id = entry.env.trace_id().unwrap_or(""),
        );
        if d.deliveries > 1 && entry.attempt > settings.max_attempts {
            // not run again: dead-lettered aside (a panic there costs this job only, which
            // stays pending)
            let permit = entry.permit.lock().ok().and_then(|mut p| p.take());
            let lost = async move {
                let _permit = permit;
                if std::panic::AssertUnwindSafe(settle_lost(&run, &entry))
                    .catch_unwind()
                    .await
                    .is_err()
                {
                    tracing::error!("dead-lettering a lost job panicked; it stays pending");
                    run.core.counters.abandoned.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            };
            return Box::pin(lost.instrument(span));
        }
        if d.deliveries == 1 {
            let latency = (Utc::now() - entry.env.due_at())
                .to_std()
                .unwrap_or_default();
            metrics::picked_up(d.part.queue, entry.env.job.name(), latency);
        }
        // The inner layers (apalis's tracing, then `parallelize`, which spawns the job's task in
        // the current span) take this span as the task's.
        let job = {
            let _guard = span.enter();
            self.inner.call(task)
        };
        let settled = async move {
            // [`Settle`] settles every job it ran and answers `Ok`: an error here is its task
            // ending first (a panic while settling). The entry stays pending, for a reclaim. (A
            // task aborted because the monitor gave up on the worker is not seen here: this
            // future is dropped with it.)
            if let Err(e) = job.await {
                let e: BoxDynError = e.into();
                tracing::error!(error = %e, "a job's task ended before it settled; the job stays pending and will be reclaimed");
                run.core.counters.abandoned.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        };
        Box::pin(settled.instrument(span))
    }
}

/// The layer just inside apalis's `parallelize`, so in the job's own task: runs the handler
/// under the entry's heartbeat and the grace period, then settles the job (see the module
/// docs). A handler dropped here (its entry was reclaimed, or the grace period is over) stops
/// at once, in this task, before the permit goes.
#[derive(Clone)]
pub struct SettleLayer {
    run: Arc<Run>,
}

impl SettleLayer {
    pub(super) fn new(run: Arc<Run>) -> Self {
        Self { run }
    }
}

impl<S> Layer<S> for SettleLayer {
    type Service = Settle<S>;

    fn layer(&self, inner: S) -> Settle<S> {
        Settle {
            inner,
            run: self.run.clone(),
        }
    }
}

/// See [`SettleLayer`].
#[derive(Clone)]
pub struct Settle<S> {
    inner: S,
    run: Arc<Run>,
}

impl<S> Service<Task<Job>> for Settle<S>
where
    S: Service<Task<Job>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxDynError>,
{
    type Response = ();
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<(), BoxDynError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxDynError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<Job>) -> Self::Future {
        let Some(entry) = task.ctx().data().get::<Arc<Entry>>().cloned() else {
            return Box::pin(async { Err(BoxDynError::from("a task without its bus entry")) });
        };
        let run = self.run.clone();
        let permit = entry.permit.lock().ok().and_then(|mut p| p.take());
        let handler = self.inner.call(task);
        Box::pin(async move {
            let _permit = permit;
            let visibility = Duration::from_secs(
                run.core
                    .bus
                    .settings(entry.delivery.part.queue)
                    .visibility_timeout_secs,
            );
            let started = Instant::now();
            // The heartbeat first: polled before the handler, it cannot be starved by a
            // handler that keeps using up the task's cooperative budget. (It shares the task
            // with the handler: a handler must not block its thread — CPU-heavy work goes to
            // `spawn_blocking`.)
            let result = tokio::select! {
                biased;
                () = keep_claimed(&run, &entry.delivery, visibility) => None,
                r = handler => Some(r.map(|_| ()).map_err(Into::into)),
                _ = run.hard_stop.cancelled() => None,
            };
            settle(&run, &entry, result, started.elapsed()).await;
            Ok(())
        })
    }
}

/// A handler's error as a [`JobError`]: its own, or retryable for what apalis's layers return.
fn job_error(e: BoxDynError) -> JobError {
    match e.downcast::<JobError>() {
        Ok(e) => *e,
        Err(e) if is_wrong_kind(e.as_ref()) => JobError::permanent(e),
        Err(e) => JobError::retryable(e),
    }
}

async fn settle(run: &Run, entry: &Entry, result: Option<Result<(), BoxDynError>>, took: Duration) {
    let d = &entry.delivery;
    let (q, kind, attempt) = (d.part.queue, entry.env.job.name(), entry.attempt);
    let counters = &run.core.counters;
    let Some(result) = result else {
        tracing::warn!(
            "handler dropped (end of the grace period, or the entry was reclaimed); the job stays with its owner"
        );
        counters.abandoned.fetch_add(1, Ordering::Relaxed);
        metrics::finished(q, kind, Outcome::Abandoned, took);
        return;
    };
    let settings = run.core.bus.settings(q);
    match result.map_err(job_error) {
        Ok(()) => {
            tracing::debug!(took_ms = took.as_millis() as u64, "job done");
            settle_ack(run, d, entry.env.id).await;
            counters.completed.fetch_add(1, Ordering::Relaxed);
            metrics::finished(q, kind, Outcome::Ok, took);
        }
        Err(JobError::Wait { reason, after }) => {
            // not a failure: the same attempt again after the wait
            tracing::info!(%reason, delay_ms = after.as_millis() as u64, "job waits; re-queued");
            schedule_again(run, entry, attempt, after.min(MAX_RETRY_DELAY), took).await;
        }
        Err(JobError::Retryable { error, retry_after }) if attempt < settings.max_attempts => {
            let delay = backoff::delay(settings, attempt, retry_after, &mut rand::rng())
                .min(MAX_RETRY_DELAY);
            tracing::warn!(%error, delay_ms = delay.as_millis() as u64, "job failed; retrying later");
            schedule_again(run, entry, attempt + 1, delay, took).await;
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
            run.core.registry.run_dead_hook(&entry.env, &error).await;
            settle_dead(run, d, (kind, Some(entry.env.id)), &error, reason).await;
        }
    }
}

/// A job delivered more often than its attempts allow, each time without being settled: its
/// worker keeps dying or stalling on it.
async fn settle_lost(run: &Run, entry: &Entry) {
    let d = &entry.delivery;
    let settings = run.core.bus.settings(d.part.queue);
    let error = format!(
        "delivered {} times without being acknowledged (worker lost or stalled past the {} s \
         visibility timeout)",
        d.deliveries, settings.visibility_timeout_secs
    );
    tracing::error!(%error, "dead-lettering a job that keeps losing its worker");
    run.core.registry.run_dead_hook(&entry.env, &error).await;
    let kind = entry.env.job.name();
    settle_dead(run, d, (kind, Some(entry.env.id)), &error, DeadReason::Lost).await;
}

/// Put the job back for attempt `next_attempt` after `delay` (the delayed set) and ack the
/// delivered entry, in one step. Should Redis stay unreachable here for half the visibility
/// timeout, the entry stays pending and is reclaimed (and the ledger's reconciler covers the
/// work that waits on it).
async fn schedule_again(
    run: &Run,
    entry: &Entry,
    next_attempt: u32,
    delay: Duration,
    took: Duration,
) {
    let d = &entry.delivery;
    let q = d.part;
    let now = Utc::now();
    let due = chrono::Duration::from_std(delay)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(now);
    let mut next = entry.env.clone();
    next.attempt = next_attempt;
    next.not_before = Some(due);
    // Redis down for a moment (a restart, a failover) is the usual reason this fails: keep
    // trying for up to half the visibility timeout — the entry stays ours meanwhile — rather
    // than leave the job to a reclaim a whole visibility timeout later.
    let visibility = Duration::from_secs(run.core.bus.settings(q.queue).visibility_timeout_secs);
    let give_up = Instant::now() + visibility / 2;
    let mut pause = Duration::from_millis(100);
    loop {
        match run
            .core
            .bus
            .retry(q, &d.consumer, &d.entry_id, &next, due)
            .await
        {
            Ok(true) => {
                run.core.counters.retried.fetch_add(1, Ordering::Relaxed);
                metrics::finished(q.queue, entry.env.job.name(), Outcome::Retry, took);
                if let Some(n) = run.movers.get(&q) {
                    n.notify_one();
                }
                return;
            }
            Ok(false) => {
                tracing::warn!("the entry was reclaimed by another worker meanwhile; it decides");
                return;
            }
            Err(e) if Instant::now() + pause < give_up && !run.hard_stop.is_cancelled() => {
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
/// worker reclaimed it after missed heartbeats): the caller then drops the handler.
async fn keep_claimed(run: &Run, d: &Delivery, visibility: Duration) {
    let period = (visibility / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(period).await;
        match run.core.bus.touch(d.part, &d.consumer, &d.entry_id).await {
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
async fn settle_ack(run: &Run, d: &Delivery, job_id: Uuid) {
    let entry = [(d.entry_id.as_str(), job_id)];
    let acker = run.acker(d.part);
    let acked = match acker {
        Some(acker) if *d.consumer == *run.core.consumer => {
            let (done, reply) = oneshot::channel();
            let req = AckRequest {
                entry_id: d.entry_id.clone(),
                job_id,
                done,
            };
            match acker.send(req) {
                Ok(()) => reply.await.unwrap_or(false),
                Err(_) => ack_with_retries(run, d.part, &d.consumer, &entry).await,
            }
        }
        _ => ack_with_retries(run, d.part, &d.consumer, &entry).await,
    };
    if !acked {
        tracing::error!(
            "cannot ack; the job stays pending and will be redelivered (handlers are idempotent)"
        );
    }
}

/// Tries for ~10 s (a Redis restart or failover takes a few): an ack lost here means a
/// (harmless, idempotent) redelivery a visibility timeout later.
async fn ack_with_retries(run: &Run, q: Part, consumer: &str, entries: &[(&str, Uuid)]) -> bool {
    for wait in [0u64, 50, 200, 500, 1000, 1000, 2000, 2000, 3000] {
        if wait > 0 {
            // (a zero sleep would still wait for the next timer tick)
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        match run.core.bus.ack(q, consumer, entries).await {
            Ok(_) => return true,
            Err(e) => tracing::warn!(queue = %q, error = %e, "ack failed"),
        }
        if run.hard_stop.is_cancelled() {
            break;
        }
    }
    false
}

/// Acknowledges handled entries of one queue partition: whatever has queued up while the previous call
/// was in flight goes in the next one (no timer, so no added latency when idle). Ends when
/// every sender is gone.
pub(super) async fn ack_loop(run: Arc<Run>, q: Part, mut rx: mpsc::UnboundedReceiver<AckRequest>) {
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
        let ok = ack_with_retries(&run, q, &run.core.consumer, &entries).await;
        for r in batch {
            let _ = r.done.send(ok);
        }
    }
}

pub(super) async fn settle_dead(
    run: &Run,
    d: &Delivery,
    (kind, job_id): (&'static str, Option<Uuid>),
    error: &str,
    reason: DeadReason,
) {
    match run
        .core
        .bus
        .dead_letter(
            d.part,
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
            run.core.counters.dead.fetch_add(1, Ordering::Relaxed);
            metrics::dead(d.part.queue, kind, reason.as_str());
        }
        Ok(false) => {
            tracing::warn!("the entry was reclaimed by another worker meanwhile; it decides")
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot dead-letter; the job stays pending and will be reclaimed")
        }
    }
}
