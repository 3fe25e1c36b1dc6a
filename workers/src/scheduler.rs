//! The scheduler: periodic jobs on apalis-cron, under our own leader lease.
//!
//! Every scheduler process competes for one lease (`<prefix>:lease:scheduler`, `SET NX PX`,
//! renewed every third of `scheduler.lease_secs` by a compare-and-extend script, released on
//! shutdown); apalis-cron has no leader election, so each periodic job's task function starts
//! its work only while this process holds the lease (a pass under way when it is lost
//! finishes). Two apalis-cron workers run under one apalis `Monitor`, which restarts one that
//! fails, each with an [`Every`] schedule (apalis-cron's `Schedule` trait: any interval in whole
//! seconds, which cron expressions cannot say for, e.g., 420 s):
//!
//! - the periodic re-index, once per `INDEX_INTERVAL_SECS`: interval number
//!   `n = unix_time / INDEX_INTERVAL_SECS`, and the tick is idempotent — the marker
//!   `<prefix>:{q:index}:tick:index:<n>` is `SET NX` in the same Lua step that enqueues the job —
//!   so a leader change mid-interval (or two processes both believing they lead) cannot fire `n`
//!   twice;
//! - the ledger's reconciler ([`crate::reconciler`]) every `RECONCILE_INTERVAL_MS`, rounded up
//!   to whole seconds (apalis-cron ticks are seconds): it re-enqueues the work PostgreSQL records
//!   as unfinished whose job the bus lost. Its steps are compare-and-sets, so a second process
//!   that still believes it leads does no harm; a pass still running when the next tick comes
//!   lets that tick go.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis_core::monitor::Monitor;
use apalis_core::worker::builder::WorkerBuilder;
use apalis_cron::timezone::Utc;
use apalis_cron::{CronScheduler, Schedule, Tick};
use jobs::kinds::{Index, IndexReason};
use jobs::lease::Lease;
use jobs::{Bus, BusError};
use tokio_util::sync::CancellationToken;

use crate::reconciler::Reconciler;

pub struct SchedulerOptions {
    pub owner: String,
    pub lease_ttl: Duration,
    pub index_interval: Duration,
    pub reconcile_interval: Duration,
}

impl SchedulerOptions {
    pub fn from_settings(settings: &config::Settings) -> Self {
        Self {
            owner: jobs::worker::consumer_name(),
            lease_ttl: Duration::from_secs(settings.scheduler.lease_secs),
            index_interval: Duration::from_secs(settings.index.interval_secs),
            reconcile_interval: Duration::from_millis(settings.ledger.reconcile_interval_ms),
        }
    }
}

/// An apalis-cron schedule: every `secs` seconds on the multiples of `secs` since the epoch,
/// starting with the next whole second (so a scheduler that starts mid-interval fires that
/// interval at once, as the marker makes it idempotent).
#[derive(Debug, Clone)]
pub struct Every {
    secs: u64,
    started: bool,
}

impl Every {
    /// `interval` rounded up to whole seconds (at least one).
    pub fn new(interval: Duration) -> Self {
        let secs = interval.as_millis().div_ceil(1000).max(1);
        Self {
            secs: u64::try_from(secs).unwrap_or(u64::MAX),
            started: false,
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Schedule<Utc> for Every {
    fn next_tick(&mut self, _: &Utc) -> Option<Tick<Utc>> {
        // The next multiple after now, never a past one (apalis-cron ends a worker on a tick
        // already gone; should that happen all the same — a late poll, a clock step — the
        // monitor restarts the worker). Counted from now, not from the last tick, so that a
        // clock set back does not stall the schedule.
        let now = unix_now();
        let next = if self.started {
            (now / self.secs + 1) * self.secs
        } else {
            now + 1
        };
        self.started = true;
        Some(Tick::new(next))
    }
}

/// What the periodic jobs share.
struct Shared {
    bus: Bus,
    lease: Lease,
    leader: AtomicBool,
    reconciler: Reconciler,
    index_interval_secs: u64,
    marker_ttl: Duration,
    /// Held by a reconciler pass.
    reconciling: tokio::sync::Mutex<()>,
}

/// Run until `shutdown`; then give the lease up. The leader runs `reconciler`'s passes.
pub async fn run(
    bus: &Bus,
    opts: &SchedulerOptions,
    reconciler: Reconciler,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let index_schedule = Every::new(opts.index_interval);
    let shared = Arc::new(Shared {
        bus: bus.clone(),
        lease: Lease::new(bus.redis(), "scheduler", opts.owner.clone(), opts.lease_ttl),
        leader: AtomicBool::new(false),
        reconciler,
        index_interval_secs: index_schedule.secs,
        marker_ttl: (opts.index_interval * 3).max(Duration::from_secs(60)),
        reconciling: tokio::sync::Mutex::new(()),
    });
    let monitor = Monitor::new()
        .register({
            let shared = shared.clone();
            move |_| {
                let shared = shared.clone();
                WorkerBuilder::new("scheduler:index")
                    .backend(CronScheduler::new(index_schedule.clone()))
                    .build(move |tick: Tick| {
                        let shared = shared.clone();
                        async move { index_tick(&shared, tick, true).await }
                    })
            }
        })
        .register({
            let shared = shared.clone();
            let schedule = Every::new(opts.reconcile_interval);
            move |_| {
                let shared = shared.clone();
                WorkerBuilder::new("scheduler:reconcile")
                    .backend(CronScheduler::new(schedule.clone()))
                    .build(move |_: Tick| {
                        let shared = shared.clone();
                        async move { reconcile(&shared).await }
                    })
            }
        })
        .shutdown_timeout(Duration::from_secs(30))
        // a periodic job that panicked, or a tick apalis-cron found already past, ends its
        // worker: it starts again (the index tick is idempotent, the reconciler's steps are
        // compare-and-sets)
        .should_restart(|w, e| {
            tracing::error!(worker = w.name(), error = %e, "a periodic job's worker failed; restarting it");
            true
        });
    let stop = shutdown.clone();
    // the lease is kept only while the periodic jobs run
    let leasing = shutdown.child_token();
    let monitored = {
        let leasing = leasing.clone();
        async move {
            let r = monitor
                .run_with_signal(async move {
                    stop.cancelled().await;
                    Ok(())
                })
                .await;
            leasing.cancel();
            r
        }
    };
    let (result, ()) = tokio::join!(monitored, keep_lease(&shared, leasing));
    if let Err(e) = result {
        tracing::error!(error = %e, "the scheduler's workers failed");
    }
    let ended_early = !shutdown.is_cancelled();
    if shared.leader.load(Ordering::Relaxed) {
        match shared.lease.release(bus.redis()).await {
            Ok(_) => tracing::info!("scheduler lease released"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot release the scheduler lease; it expires by itself")
            }
        }
    }
    if ended_early {
        return Err(BusError::Ended("scheduler's periodic jobs"));
    }
    Ok(())
}

/// Acquire or renew the lease every third of its time to live, until `shutdown`.
async fn keep_lease(shared: &Shared, shutdown: CancellationToken) {
    let renew_every = shared.lease.ttl() / 3;
    loop {
        let held = match shared.lease.acquire_or_renew(shared.bus.redis()).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the scheduler lease");
                false
            }
        };
        if held != shared.leader.swap(held, Ordering::Relaxed) {
            if held {
                tracing::info!(owner = shared.lease.owner(), "scheduler is the leader");
                // the interval under way may not have fired if the last leader died in it (one
                // try: the lease must be renewed on time)
                index_tick(shared, Tick::new(unix_now()), false).await;
            } else {
                tracing::info!(
                    owner = shared.lease.owner(),
                    "scheduler is no longer the leader"
                );
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(renew_every) => {}
        }
    }
}

/// The periodic re-index (a task function of apalis-cron's tick).
/// With `retry`, Redis errors are retried until the interval is nearly over, each time only
/// while this process still leads.
async fn index_tick(shared: &Shared, tick: Tick, retry: bool) {
    let n = tick.get_timestamp() / shared.index_interval_secs;
    // Redis may be away for a moment: try again until the interval is nearly over.
    let give_up = tokio::time::Instant::now()
        + Duration::from_secs(shared.index_interval_secs.saturating_sub(1).max(1));
    while shared.leader.load(Ordering::Relaxed) {
        let job = Index {
            reason: IndexReason::Scheduled { tick: n },
        };
        match shared
            .bus
            .enqueue_tick("index", n, shared.lease.owner(), shared.marker_ttl, job)
            .await
        {
            Ok(Some(env)) => {
                tracing::info!(tick = n, job_id = %env.id, "periodic index job enqueued");
                return;
            }
            Ok(None) => {
                tracing::debug!(tick = n, "interval already fired");
                return;
            }
            Err(e) if retry && tokio::time::Instant::now() < give_up => {
                tracing::warn!(error = %e, tick = n, "cannot enqueue the index job; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                tracing::error!(error = %e, tick = n, "cannot enqueue the index job; the interval is skipped");
                return;
            }
        }
    }
}

/// A reconciler pass (a task function of apalis-cron's tick), unless one is still running.
async fn reconcile(shared: &Shared) {
    if !shared.leader.load(Ordering::Relaxed) {
        return;
    }
    let Ok(_running) = shared.reconciling.try_lock() else {
        tracing::debug!("a reconciler pass is still running; this tick is skipped");
        return;
    };
    shared.reconciler.pass().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_rounds_up_to_whole_seconds() {
        assert_eq!(Every::new(Duration::from_millis(200)).secs, 1);
        assert_eq!(Every::new(Duration::from_millis(1500)).secs, 2);
        assert_eq!(Every::new(Duration::from_secs(420)).secs, 420);
    }

    #[test]
    fn every_ticks_on_the_multiples_of_its_interval_and_never_in_the_past() {
        let mut s = Every::new(Duration::from_secs(7));
        let now = unix_now();
        let first = s.next_tick(&Utc).unwrap().get_timestamp();
        assert!(
            first > now && first <= now + 2,
            "the first tick comes at once"
        );
        // (apalis-cron asks again when the last tick fires: from then on, the next multiple)
        let second = s.next_tick(&Utc).unwrap().get_timestamp();
        let now = unix_now();
        assert!(second.is_multiple_of(7));
        assert!(second > now && second - now <= 7);
    }
}
