//! The apalis backend over our Redis Streams bus: one [`StreamsBackend`] per queue.
//!
//! `poll_next` drives a reader and a reclaimer per queue partition, merged into one stream: the
//! reader (once a concurrency permit is free, `XREADGROUP ... BLOCK` on a connection of its own,
//! holding no permit while it blocks, then a permit for the entry it brought; after a read that
//! returned jobs it reads again without blocking with as many permits as are free, so bursts
//! go in batches) and the reclaimer (every quarter of the visibility
//! timeout, `XAUTOCLAIM` of entries idle past it, and once a minute the pruning of dead
//! workers' consumer names). Redis errors never leave `poll_next` (an error there ends an apalis
//! worker): the streams log them, reconnect and go on.
//!
//! Every task carries its [`Entry`] (the delivery, its envelope, its permit and the
//! [`JobContext`] for the task function) in its data, for the layers of [`super::settle`]. A malformed
//! entry never becomes a task: it goes to the dead letters here.
//!
//! `poll_close` (apalis calls it once the worker stopped and its tasks are done) stops the
//! streams, waits for a read already sent, and gives what it returned back to the queue (the
//! delayed set, due at once, same attempt): nothing read is left pending on a stopped worker.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use apalis_core::backend::{Backend, BackendConfig};
use apalis_core::task::Task;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::task_id::TaskId;
use apalis_core::worker::context::WorkerContext;
use chrono::Utc;
use futures::StreamExt;
use futures::stream::{self, BoxStream, SelectAll};
use tokio::sync::OwnedSemaphorePermit;

use super::registry::JobContext;
use super::settle::{EntryLayer, settle_dead};
use super::{MAX_BATCH, Run, sleep_or_stop, take_permits};
use crate::bus::{DeadReason, Delivery};
use crate::envelope::Envelope;
use crate::error::BusError;
use crate::kinds::Job;
use crate::queue::{Part, Queue};

/// How much longer than `read_block` a read may take before its connection is given up.
const READ_SLACK: Duration = Duration::from_secs(5);
/// How often a reclaimer prunes the consumer names of dead workers, and how long such a name
/// must have been idle (with nothing pending) first.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const PRUNE_IDLE: Duration = Duration::from_secs(600);

/// A delivered entry with the concurrency permit it runs under.
type Delivered = (Delivery, OwnedSemaphorePermit);

/// What the entry and settle layers (and the task function's [`JobContext`]) need of a task:
/// carried in the task's data.
pub(super) struct Entry {
    pub delivery: Delivery,
    pub env: Envelope,
    /// The attempt this run is (`envelope.attempt` plus the deliveries that lost their worker).
    pub attempt: u32,
    /// Released when the task is settled.
    pub permit: Mutex<Option<OwnedSemaphorePermit>>,
    /// What the task function is told of its job.
    pub ctx: JobContext,
}

/// Our Redis Streams bus as an apalis backend, for one queue.
pub struct StreamsBackend {
    run: Arc<Run>,
    queue: Queue,
    /// The merged reader and reclaimer, shared with [`Run::stop_reading`], which takes it away
    /// at a stop to give back what a read in flight returns.
    deliveries: Deliveries,
    /// A restarted backend (its apalis worker failed) waits this long before its first read.
    pause: Duration,
    /// The partitions whose reader and reclaimer run (more start when the record of the
    /// queue's partitions grows: `Bus::record_partitions`).
    started: u16,
}

/// A backend's delivery streams (a reader and a reclaimer per partition); `None` once taken
/// away.
pub(super) type Deliveries = Arc<Mutex<Option<SelectAll<BoxStream<'static, Delivered>>>>>;

impl StreamsBackend {
    pub(super) fn new(run: Arc<Run>, queue: Queue, pause: Duration) -> Self {
        let deliveries = Arc::new(Mutex::new(None));
        run.register_deliveries(deliveries.clone());
        Self {
            run,
            queue,
            deliveries,
            pause,
            started: 0,
        }
    }

    /// The task of a delivered entry, or `None` for a malformed one (dead-lettered aside).
    fn task(run: &Arc<Run>, d: Delivery, permit: OwnedSemaphorePermit) -> Option<Task<Job>> {
        let env = match Envelope::from_json(&d.body) {
            Ok(env) => env,
            Err(e) => {
                let error = format!("not a valid job envelope: {e}");
                tracing::error!(queue = %d.part, entry = %d.entry_id, %error, "dead-lettering a malformed entry");
                let run = run.clone();
                run.clone().side.spawn(async move {
                    let _permit = permit;
                    settle_dead(&run, &d, ("unknown", None), &error, DeadReason::Malformed).await;
                });
                return None;
            }
        };
        let attempt = env.attempt.saturating_add(d.deliveries.saturating_sub(1));
        let ctx = JobContext {
            id: env.id,
            queue: d.part.queue,
            kind: env.job.name(),
            attempt,
            enqueued_at: env.enqueued_at,
            due_at: env.due_at(),
            trace: env.trace.clone(),
            consumer: d.consumer.clone(),
        };
        let job = env.job.clone();
        // unique within the process (the span and the logs name the job and its entry)
        let id = TaskId::from_int(run.core.counters.next_task());
        let entry = Arc::new(Entry {
            delivery: d,
            env,
            attempt,
            permit: Mutex::new(Some(permit)),
            ctx,
        });
        Some(
            TaskBuilder::new(job)
                .task_id(id)
                .attempt(attempt as usize)
                .data(entry)
                .build(),
        )
    }
}

impl Backend for StreamsBackend {
    type Task = Task<Job>;
    type Error = BusError;

    fn poll_ready(&mut self, _: &mut Context<'_>, _: &WorkerContext) -> Poll<Result<(), BusError>> {
        // the permits are taken in the streams, before each read
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Option<Result<Task<Job>, BusError>>> {
        let Ok(mut slot) = self.deliveries.lock() else {
            return Poll::Ready(None);
        };
        if slot.is_none() {
            if self.run.reading.is_cancelled() {
                return Poll::Ready(None);
            }
            self.started = 0;
            *slot = Some(SelectAll::new());
        }
        let Some(deliveries) = slot.as_mut() else {
            return Poll::Ready(None);
        };
        // a reader and a reclaimer per partition (one each for an unpartitioned queue); the
        // partitions a grown record adds join here (a new stream is polled at once)
        let (run, q) = (self.run.clone(), self.queue);
        for p in run.core.bus.parts(q).skip(usize::from(self.started)) {
            deliveries.push(reader(run.clone(), p, self.pause));
            deliveries.push(reclaimer(run.clone(), p));
            self.started += 1;
        }
        loop {
            let Some((d, permit)) = futures::ready!(deliveries.poll_next_unpin(cx)) else {
                return Poll::Ready(None);
            };
            if let Some(task) = Self::task(&self.run, d, permit) {
                return Poll::Ready(Some(Ok(task)));
            }
        }
    }

    fn poll_close(&mut self, _: &mut Context<'_>, _: &WorkerContext) -> Poll<Result<(), BusError>> {
        // normally done at the stop signal already; what it gives back is awaited by the run
        self.run.stop_reading();
        Poll::Ready(Ok(()))
    }
}

impl Drop for StreamsBackend {
    fn drop(&mut self) {
        // a backend dropped with its worker (a restart) reads no more: its permits go
        if let Ok(mut slot) = self.deliveries.lock() {
            slot.take();
        }
    }
}

impl BackendConfig for StreamsBackend {
    type Args = Job;
    type Id = String;
    type Kind = apalis_core::backend::finalize::Ephemeral;
    type Config = Queue;
    type Layer = EntryLayer;

    fn config(&self) -> &Queue {
        &self.queue
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> EntryLayer {
        EntryLayer::new(self.run.clone())
    }
}

/// Put an entry read but never run back on its queue: the delayed set, due now, and ack it. Its
/// next run is the attempt this one would have been (runs that lost their worker count).
pub(super) async fn give_back(run: &Run, d: &Delivery) {
    let Ok(mut env) = Envelope::from_json(&d.body) else {
        settle_dead(
            run,
            d,
            ("unknown", None),
            "not a valid job envelope",
            DeadReason::Malformed,
        )
        .await;
        return;
    };
    env.attempt = env.attempt.saturating_add(d.deliveries.saturating_sub(1));
    env.not_before = Some(Utc::now());
    match run
        .core
        .bus
        .retry(d.part, &d.consumer, &d.entry_id, &env, Utc::now())
        .await
    {
        Ok(true) => {
            tracing::info!(queue = %d.part, job_id = %env.id, "stopping: a job read but not started goes back to its queue")
        }
        Ok(false) => {
            tracing::warn!(queue = %d.part, job_id = %env.id, "stopping: a job read but not started was reclaimed meanwhile; its new owner decides")
        }
        Err(e) => {
            tracing::warn!(queue = %d.part, error = %e, "stopping: cannot give a read job back; it will be reclaimed")
        }
    }
}

/// The reader of one queue partition: permits, then a read, as long as reading is on.
fn reader(run: Arc<Run>, q: Part, pause: Duration) -> BoxStream<'static, Delivered> {
    struct State {
        run: Arc<Run>,
        q: Part,
        conn: Option<crate::RedisConn>,
        busy: bool,
        /// Before the first read (a restarted backend).
        pause: Duration,
        ready: std::vec::IntoIter<Delivered>,
    }
    let state = State {
        run,
        q,
        conn: None,
        busy: false,
        pause,
        ready: Vec::new().into_iter(),
    };
    stream::unfold(state, |mut s| async move {
        let pause = std::mem::take(&mut s.pause);
        if !pause.is_zero() && !sleep_or_stop(pause, &s.run.reading).await {
            return None;
        }
        loop {
            if let Some(d) = s.ready.next() {
                return Some((d, s));
            }
            let core = &s.run.core;
            // Busy: take the free permits, then read as many entries without blocking. Idle:
            // wait for a free slot, but block on the read *without* holding it, so a worker's
            // idle readers (one per queue partition) never take its jobs' slots; the entry the
            // read brings then takes a permit (`permit_for`).
            let mut permits = if s.busy {
                take_permits(&core.semaphore, MAX_BATCH, &s.run.reading).await?
            } else {
                drop(take_permits(&core.semaphore, 1, &s.run.reading).await?);
                Vec::new()
            };
            let want = permits.len().max(1);
            let conn = match s.conn.as_mut() {
                Some(c) => c,
                None => match core.bus.redis().blocking_conn().await {
                    Ok(c) => s.conn.insert(c),
                    Err(e) => {
                        tracing::warn!(queue = %s.q, error = %e, "cannot connect for reading; retrying");
                        drop(permits);
                        if !sleep_or_stop(Duration::from_millis(500), &s.run.reading).await {
                            return None;
                        }
                        continue;
                    }
                },
            };
            if s.run.reading.is_cancelled() {
                return None;
            }
            let block = (!s.busy).then_some(core.opts.read_block);
            // The blocking connection has no reply timeout; bound the read here so that a
            // connection that died silently cannot hang the reader.
            let read = tokio::time::timeout(
                core.opts.read_block + READ_SLACK,
                core.bus.read(conn, s.q, &core.consumer, want, block),
            )
            .await
            .unwrap_or_else(|_| Err(BusError::Stalled));
            match read {
                Ok(mut deliveries) => {
                    s.busy = !deliveries.is_empty();
                    if permits.is_empty()
                        && let Some(d) = deliveries.pop()
                    {
                        // the idle read's one entry (COUNT 1)
                        match permit_for(&s.run, &d).await {
                            Claimed::Permit(p) => permits.push(p),
                            Claimed::Lost => continue,
                            Claimed::Stopping => {
                                give_back(&s.run, &d).await;
                                return None;
                            }
                        }
                        deliveries.push(d);
                    }
                    // COUNT bounds the reply by the permits held
                    let paired: Vec<Delivered> = deliveries
                        .into_iter()
                        .filter_map(|d| permits.pop().map(|p| (d, p)))
                        .collect();
                    s.ready = paired.into_iter();
                }
                Err(e) => {
                    s.busy = false;
                    s.conn = None;
                    drop(permits);
                    if is_nogroup(&e) {
                        let _ = core.bus.ensure_group(s.q).await;
                    } else {
                        tracing::warn!(queue = %s.q, error = %e, "read failed; retrying");
                    }
                    if !sleep_or_stop(Duration::from_millis(200), &s.run.reading).await {
                        return None;
                    }
                }
            }
        }
    })
    .boxed()
}

/// What waiting for a permit for a read entry came to.
enum Claimed {
    Permit(OwnedSemaphorePermit),
    /// The entry was reclaimed by another worker meanwhile: it is theirs now.
    Lost,
    /// The worker is stopping: the entry goes back to its queue.
    Stopping,
}

/// A permit for an entry read by an idle reader: at once when a slot is free (the usual case:
/// the reader waited for one before reading); else waits for one, touching the entry every
/// third of the visibility timeout so that no other worker reclaims it meanwhile.
async fn permit_for(run: &Run, d: &Delivery) -> Claimed {
    let core = &run.core;
    if let Ok(p) = core.semaphore.clone().try_acquire_owned() {
        return Claimed::Permit(p);
    }
    let visibility = Duration::from_secs(core.bus.settings(d.part.queue).visibility_timeout_secs);
    let every = (visibility / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            biased;
            _ = run.reading.cancelled() => return Claimed::Stopping,
            p = core.semaphore.clone().acquire_owned() => {
                return match p {
                    Ok(p) => Claimed::Permit(p),
                    Err(_) => Claimed::Stopping,
                };
            }
            _ = tokio::time::sleep(every) => {
                if let Ok(false) = core.bus.touch(d.part, &d.consumer, &d.entry_id).await {
                    return Claimed::Lost;
                }
            }
        }
    }
}

fn is_nogroup(e: &BusError) -> bool {
    matches!(e, BusError::Redis(r) if r.code() == Some("NOGROUP"))
}

/// The reclaimer of one queue partition: entries idle past the visibility timeout (their worker
/// died or stalled), each under a consumer name of its own.
fn reclaimer(run: Arc<Run>, q: Part) -> BoxStream<'static, Delivered> {
    struct State {
        run: Arc<Run>,
        q: Part,
        last_prune: Instant,
        /// The `XAUTOCLAIM` cursor while a pass goes on; `None` between passes.
        cursor: Option<String>,
        ready: std::vec::IntoIter<Delivered>,
    }
    let state = State {
        run,
        q,
        last_prune: Instant::now(),
        cursor: None,
        ready: Vec::new().into_iter(),
    };
    stream::unfold(state, |mut s| async move {
        let core = s.run.core.clone();
        let visibility =
            Duration::from_secs(core.bus.settings(s.q.queue).visibility_timeout_secs);
        let period = (visibility / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            if let Some(d) = s.ready.next() {
                return Some((d, s));
            }
            let cursor = match s.cursor.take() {
                Some(c) => c,
                None => {
                    if !sleep_or_stop(period, &s.run.reading).await {
                        return None;
                    }
                    if s.last_prune.elapsed() >= PRUNE_EVERY {
                        s.last_prune = Instant::now();
                        prune(&s.run, s.q).await;
                    }
                    "0-0".to_owned()
                }
            };
            let mut permits = take_permits(&core.semaphore, MAX_BATCH, &s.run.reading).await?;
            // A name of its own per reclaim: an entry of this very process that went idle (a
            // stalled handler) is then no longer owned by the name its first run acks under,
            // so one entry never runs twice under one owner. (Nothing is claimed, and no name
            // is created, when no entry is idle.)
            let reclaimer = format!("{}~r{}", core.consumer, core.counters.next_reclaim());
            match core
                .bus
                .reclaim(s.q, &reclaimer, visibility, &cursor, permits.len())
                .await
            {
                Ok((next, deliveries)) => {
                    if !deliveries.is_empty() {
                        tracing::info!(queue = %s.q, count = deliveries.len(), "reclaimed jobs idle past the visibility timeout");
                        core.counters.reclaimed(deliveries.len() as u64);
                    }
                    let paired: Vec<Delivered> = deliveries
                        .into_iter()
                        .filter_map(|d| permits.pop().map(|p| (d, p)))
                        .collect();
                    s.ready = paired.into_iter();
                    if next != "0-0" && !s.run.reading.is_cancelled() {
                        s.cursor = Some(next);
                    }
                }
                Err(e) => {
                    if !is_nogroup(&e) {
                        tracing::warn!(queue = %s.q, error = %e, "reclaim failed");
                    }
                }
            }
        }
    })
    .boxed()
}

async fn prune(run: &Run, q: Part) {
    let core = &run.core;
    match core
        .bus
        .prune_consumers(q, &core.consumer, PRUNE_IDLE)
        .await
    {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(queue = %q, removed = n, "removed the names of consumers gone for good")
        }
        Err(e) => tracing::warn!(queue = %q, error = %e, "cannot prune consumers"),
    }
}
