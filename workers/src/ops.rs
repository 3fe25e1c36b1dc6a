//! Operator commands of the `worker` binary, returning the text to print: the bus's (Redis
//! only; here) and conversation memory's ([`memory`]: PostgreSQL, and the model proxy to embed
//! an entry).

pub mod memory;

use std::fmt::Write as _;
use std::sync::Arc;

use jobs::kinds::Probe;
use jobs::{Bus, BusError, Envelope, Queue};

/// A bus for operator commands (Redis only; no database).
pub fn bus(settings: &config::Settings) -> Result<Bus, redis::RedisError> {
    let redis = Arc::new(jobs::RedisHandle::new(&settings.redis)?);
    Ok(Bus::new(redis, &settings.queues))
}

fn selected(queue: Option<Queue>) -> Vec<Queue> {
    queue.map_or_else(|| Queue::ALL.to_vec(), |q| vec![q])
}

/// `worker queues`: one line per queue.
pub async fn queues_table(bus: &Bus) -> Result<String, BusError> {
    let mut out = format!(
        "{:<8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}\n",
        "queue", "length", "pending", "delayed", "dead", "consumers", "waiting"
    );
    for q in Queue::ALL {
        let s = bus.stats(q).await?;
        let _ = writeln!(
            out,
            "{:<8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}",
            q.as_str(),
            s.length,
            s.pending,
            s.delayed,
            s.dead,
            s.consumers,
            s.waiting
        );
    }
    Ok(out)
}

/// `worker dead list`: the oldest dead letters, one per line.
pub async fn dead_list(bus: &Bus, queue: Option<Queue>, limit: usize) -> Result<String, BusError> {
    let mut out = String::new();
    let mut total = 0;
    for q in selected(queue) {
        for d in bus.dead_list(q, limit).await? {
            total += 1;
            let (kind, job_id, attempt) = match &d.envelope {
                Some(e) => (e.job.name(), e.id.to_string(), e.attempt.to_string()),
                None => ("?", "?".to_owned(), "?".to_owned()),
            };
            let failed_at = d
                .failed_at
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{}\t{}\t{kind}\tjob={job_id}\tattempt={attempt}\t{}\t{failed_at}\t{}",
                q.as_str(),
                d.id,
                d.reason,
                d.error.replace('\n', " ")
            );
        }
    }
    if total == 0 {
        out.push_str("no dead letters\n");
    }
    Ok(out)
}

/// `worker dead replay <id>`: the dead letter `id` back on its queue (searched in `queue`, or
/// in every queue). Returns the queue it went back to.
pub async fn dead_replay(
    bus: &Bus,
    queue: Option<Queue>,
    id: &str,
) -> Result<Option<Queue>, BusError> {
    for q in selected(queue) {
        if bus.replay(q, id).await? {
            return Ok(Some(q));
        }
    }
    Ok(None)
}

/// `worker dead replay --all`: every dead letter back. Returns how many per queue.
pub async fn dead_replay_all(
    bus: &Bus,
    queue: Option<Queue>,
) -> Result<Vec<(Queue, u64)>, BusError> {
    let mut out = Vec::new();
    for q in selected(queue) {
        out.push((q, bus.replay_all(q).await?));
    }
    Ok(out)
}

/// `worker enqueue-probe`: `count` probe jobs. Returns their ids.
pub async fn enqueue_probes(
    bus: &Bus,
    probe: &Probe,
    count: usize,
) -> Result<Vec<uuid::Uuid>, BusError> {
    let envs: Vec<Envelope> = (0..count).map(|_| Envelope::new(probe.clone())).collect();
    for chunk in envs.chunks(1000) {
        bus.enqueue_many(chunk).await?;
    }
    Ok(envs.iter().map(|e| e.id).collect())
}
