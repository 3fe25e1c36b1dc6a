//! The bus's metrics, through the `metrics` facade (the exporter is installed by the process).
//! Labels are bounded: `queue` (4 values), `kind` (the job kinds), `outcome`, `reason`.

use std::time::Duration;

use crate::queue::Queue;

pub const ENQUEUED: &str = "bus_jobs_enqueued_total";
pub const COMPLETED: &str = "bus_jobs_completed_total";
pub const RETRIED: &str = "bus_jobs_retried_total";
pub const DEAD: &str = "bus_jobs_dead_total";
pub const RECLAIMED: &str = "bus_jobs_reclaimed_total";
pub const PICKUP: &str = "bus_job_pickup_seconds";
pub const DURATION: &str = "bus_job_duration_seconds";

/// How a handled job ended, as a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Retry,
    Dead,
    /// The worker stopped (grace period over) before the handler finished.
    Abandoned,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Retry => "retry",
            Outcome::Dead => "dead",
            Outcome::Abandoned => "abandoned",
        }
    }
}

pub fn describe() {
    metrics::describe_gauge!(
        QUEUE_LENGTH,
        "Entries in the queue's stream (waiting + being handled)"
    );
    metrics::describe_gauge!(
        QUEUE_PENDING,
        "Entries delivered to a worker and not yet acknowledged"
    );
    metrics::describe_gauge!(
        QUEUE_DELAYED,
        "Jobs waiting in the delayed set for their retry time"
    );
    metrics::describe_gauge!(QUEUE_DEAD, "Jobs in the dead letters");
    metrics::describe_gauge!(
        QUEUE_LAG,
        "Entries not yet delivered to any worker (the autoscaling signal)"
    );
    metrics::describe_counter!(ENQUEUED, "Jobs put on the bus");
    metrics::describe_counter!(
        COMPLETED,
        "Jobs whose handler succeeded and were acknowledged"
    );
    metrics::describe_counter!(RETRIED, "Jobs scheduled for another attempt");
    metrics::describe_counter!(DEAD, "Jobs moved to the dead letters");
    metrics::describe_counter!(
        RECLAIMED,
        "Entries reclaimed from a lost or stalled consumer"
    );
    metrics::describe_histogram!(
        PICKUP,
        metrics::Unit::Seconds,
        "Time from a job becoming due to a worker picking it up"
    );
    metrics::describe_histogram!(
        DURATION,
        metrics::Unit::Seconds,
        "Handler run time by kind and outcome"
    );
}

pub(crate) fn enqueued(queue: Queue, kind: &'static str, n: u64) {
    metrics::counter!(ENQUEUED, "queue" => queue.as_str(), "kind" => kind).increment(n);
}

pub(crate) fn picked_up(queue: Queue, kind: &'static str, latency: Duration) {
    metrics::histogram!(PICKUP, "queue" => queue.as_str(), "kind" => kind)
        .record(latency.as_secs_f64());
}

pub(crate) fn finished(queue: Queue, kind: &'static str, outcome: Outcome, took: Duration) {
    metrics::histogram!(DURATION, "queue" => queue.as_str(), "kind" => kind, "outcome" => outcome.as_str())
        .record(took.as_secs_f64());
    let name = match outcome {
        Outcome::Ok => COMPLETED,
        Outcome::Retry => RETRIED,
        Outcome::Dead | Outcome::Abandoned => return,
    };
    metrics::counter!(name, "queue" => queue.as_str(), "kind" => kind).increment(1);
}

pub(crate) fn dead(queue: Queue, kind: &'static str, reason: &'static str) {
    metrics::counter!(DEAD, "queue" => queue.as_str(), "kind" => kind, "reason" => reason)
        .increment(1);
}

pub(crate) fn reclaimed(queue: Queue, n: u64) {
    metrics::counter!(RECLAIMED, "queue" => queue.as_str()).increment(n);
}

pub const QUEUE_LENGTH: &str = "bus_queue_length";
pub const QUEUE_PENDING: &str = "bus_queue_pending";
pub const QUEUE_DELAYED: &str = "bus_queue_delayed";
pub const QUEUE_DEAD: &str = "bus_queue_dead";
pub const QUEUE_LAG: &str = "bus_queue_lag";

/// Refresh the per-queue depth gauges from Redis (called when metrics are scraped, so every
/// process that exposes metrics reports the same, current figures). A queue whose stats cannot
/// be read keeps its previous values.
pub async fn refresh_queue_gauges(bus: &crate::Bus) {
    for q in Queue::ALL {
        match bus.stats(q).await {
            Ok(s) => {
                let label = [("queue", q.as_str())];
                metrics::gauge!(QUEUE_LENGTH, &label).set(s.length as f64);
                metrics::gauge!(QUEUE_PENDING, &label).set(s.pending as f64);
                metrics::gauge!(QUEUE_DELAYED, &label).set(s.delayed as f64);
                metrics::gauge!(QUEUE_DEAD, &label).set(s.dead as f64);
                metrics::gauge!(QUEUE_LAG, &label).set(s.lag as f64);
            }
            Err(e) => tracing::warn!(queue = %q, error = %e, "cannot read queue stats for metrics"),
        }
    }
}
