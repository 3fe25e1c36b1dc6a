//! The scheduler: interval jobs under a leader lease.
//!
//! Every scheduler process competes for one lease (`<prefix>:lease:scheduler`, `SET NX PX`,
//! renewed every third of `scheduler.lease_secs` by a compare-and-extend script, released on
//! shutdown). The leader fires the periodic re-index once per interval: interval number
//! `n = unix_time / INDEX_INTERVAL_SECS`, and the tick is idempotent — the marker
//! `<prefix>:{q:index}:tick:index:<n>` is `SET NX` in the same Lua step that enqueues the job — so
//! a leader change mid-interval (or two processes both believing they lead) cannot fire `n`
//! twice.
//!
//! The leader also runs the ledger's reconciler ([`crate::reconciler`]) every
//! `RECONCILE_INTERVAL_MS`: it re-enqueues the work PostgreSQL records as unfinished whose job
//! the bus lost. (Its steps are compare-and-sets, so a second process that still believes it
//! leads does no harm.)

use std::time::Duration;

use chrono::Utc;
use jobs::kinds::{Index, IndexReason};
use jobs::lease::Lease;
use jobs::{Bus, BusError};

use crate::reconciler::Reconciler;
use tokio_util::sync::CancellationToken;

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

/// Run until `shutdown`; then give the lease up. The leader runs `reconciler`'s passes.
pub async fn run(
    bus: &Bus,
    opts: &SchedulerOptions,
    reconciler: &Reconciler,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let lease = Lease::new(bus.redis(), "scheduler", opts.owner.clone(), opts.lease_ttl);
    let renew_every = opts.lease_ttl / 3;
    let interval_ms = u64::try_from(opts.index_interval.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let marker_ttl = (opts.index_interval * 3).max(Duration::from_secs(60));
    let mut leader = false;
    let mut next_renew = tokio::time::Instant::now();
    let mut last_fired: Option<u64> = None;
    let mut next_reconcile = tokio::time::Instant::now();
    loop {
        let mut failed = false;
        if tokio::time::Instant::now() >= next_renew {
            let held = match lease.acquire_or_renew(bus.redis()).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the scheduler lease");
                    false
                }
            };
            if held != leader {
                if held {
                    tracing::info!(owner = lease.owner(), "scheduler is the leader");
                } else {
                    tracing::info!(owner = lease.owner(), "scheduler is no longer the leader");
                }
            }
            leader = held;
            next_renew = tokio::time::Instant::now() + renew_every;
        }
        let now_ms = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0);
        let n = now_ms / interval_ms;
        if leader && last_fired != Some(n) {
            let job = Index {
                reason: IndexReason::Scheduled { tick: n },
            };
            match bus
                .enqueue_tick("index", n, lease.owner(), marker_ttl, job)
                .await
            {
                Ok(Some(env)) => {
                    tracing::info!(tick = n, job_id = %env.id, "periodic index job enqueued");
                    last_fired = Some(n);
                }
                Ok(None) => {
                    tracing::debug!(tick = n, "interval already fired");
                    last_fired = Some(n);
                }
                Err(e) => {
                    tracing::warn!(error = %e, tick = n, "cannot enqueue the index job; retrying");
                    failed = true;
                }
            }
        }
        if leader && tokio::time::Instant::now() >= next_reconcile {
            reconciler.pass().await;
            next_reconcile = tokio::time::Instant::now() + opts.reconcile_interval;
        }
        let to_boundary = if failed {
            Duration::from_millis(500)
        } else {
            Duration::from_millis((n + 1) * interval_ms - now_ms + 1)
        };
        let now = tokio::time::Instant::now();
        let to_renew = next_renew.saturating_duration_since(now);
        let mut wait = to_boundary.min(to_renew);
        if leader {
            wait = wait.min(next_reconcile.saturating_duration_since(now));
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    if leader {
        match lease.release(bus.redis()).await {
            Ok(_) => tracing::info!("scheduler lease released"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot release the scheduler lease; it expires by itself")
            }
        }
    }
    Ok(())
}
