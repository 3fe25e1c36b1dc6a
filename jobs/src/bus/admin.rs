//! The operator views: queue counts, consumers, dead letters and their replay.

use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::streams::StreamRangeReply;
use redis::{AsyncCommands, Value};

use super::{Bus, field, kv};
use crate::envelope::Envelope;
use crate::error::BusError;
use crate::queue::{GROUP, Part, Queue};
use crate::scripts;
use config::MAX_PARTITIONS;

/// Counts for `worker queues`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Entries in the stream: waiting plus being handled (acknowledged ones are deleted).
    pub length: u64,
    /// Delivered and not yet acknowledged.
    pub pending: u64,
    /// Entries not yet delivered to any worker (the group's `lag`, Redis 7+; `length -
    /// pending` when Redis cannot tell), plus the jobs waiting for fair admission: what
    /// autoscaling looks at.
    pub lag: u64,
    /// Jobs waiting in the orgs' lists of a fair queue (not yet in the stream).
    pub waiting: u64,
    /// Waiting in the delayed set for their due time.
    pub delayed: u64,
    pub dead: u64,
    /// Consumers registered in the group.
    pub consumers: u64,
}

/// One dead letter.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub queue: Queue,
    /// The id of the dead-stream entry (what `worker dead replay` takes).
    pub id: String,
    pub envelope: Option<Envelope>,
    pub body: String,
    pub error: String,
    pub reason: String,
    pub failed_at: Option<DateTime<Utc>>,
}

impl Bus {
    /// Length, pending, lag, delayed and dead counts of a queue: the sums over its partitions
    /// (consumers: the most any partition has).
    pub async fn stats(&self, q: Queue) -> Result<QueueStats, BusError> {
        self.refresh_partitions().await;
        let mut total = QueueStats::default();
        for p in self.parts(q) {
            let s = self.part_stats(p).await?;
            total.length += s.length;
            total.pending += s.pending;
            total.lag += s.lag;
            total.waiting += s.waiting;
            total.delayed += s.delayed;
            total.dead += s.dead;
            total.consumers = total.consumers.max(s.consumers);
        }
        Ok(total)
    }

    /// The counts of one queue partition.
    pub async fn part_stats(&self, p: impl Into<Part>) -> Result<QueueStats, BusError> {
        let keys = self.keys(p);
        let mut conn = self.conn().await?;
        let (length, delayed, dead): (u64, u64, u64) = redis::pipe()
            .xlen(&keys.stream)
            .zcard(&keys.delayed)
            .xlen(&keys.dead)
            .query_async(&mut conn)
            .await?;
        let groups: Result<Value, redis::RedisError> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&keys.stream)
            .query_async(&mut conn)
            .await;
        let (mut pending, mut consumers, mut lag) = (0, 0, None);
        if let Ok(Value::Array(groups)) = groups {
            for g in groups {
                let info = kv(&g);
                if info.get("name").map(String::as_str) == Some(GROUP) {
                    pending = info
                        .get("pending")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    consumers = info
                        .get("consumers")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    lag = info.get("lag").and_then(|v| v.parse().ok());
                }
            }
        }
        let waiting = self.fair_waiting(&mut conn, keys).await?;
        Ok(QueueStats {
            length,
            pending,
            lag: lag.unwrap_or(length.saturating_sub(pending)) + waiting,
            waiting,
            delayed,
            dead,
            consumers,
        })
    }

    /// True when none of `queues` has work left: nothing in a stream (acknowledged entries are
    /// deleted, so this covers pending ones too) and nothing delayed. Dead letters do not count.
    pub async fn is_empty(&self, queues: &[Queue]) -> Result<bool, BusError> {
        let mut conn = self.conn().await?;
        for p in queues.iter().flat_map(|q| self.parts(*q)) {
            // one transaction per partition: its keys share one slot, two partitions' need not
            let keys = self.keys(p);
            let (length, delayed, fair): (u64, u64, u64) = redis::pipe()
                .atomic()
                .xlen(&keys.stream)
                .zcard(&keys.delayed)
                .zcard(&keys.fair)
                .query_async(&mut conn)
                .await?;
            if length + delayed + fair > 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The jobs waiting in the orgs' lists of one partition of a fair queue (0 for the others).
    async fn fair_waiting(
        &self,
        conn: &mut crate::RedisConn,
        keys: &crate::queue::QueueKeys,
    ) -> Result<u64, BusError> {
        let orgs: Vec<String> = conn.zrange(&keys.fair, 0, -1).await?;
        if orgs.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for org in &orgs {
            pipe.llen(format!("{}{org}", keys.fair_lists));
        }
        let lens: Vec<u64> = pipe.query_async(conn).await?;
        Ok(lens.iter().sum())
    }

    /// Remove `consumer` from the group when it holds nothing (a stopped worker tidies up):
    /// checked and removed in one step (`scripts::DELETE_IDLE_CONSUMER`), so an entry it was
    /// given meanwhile is never dropped.
    pub async fn remove_consumer_if_idle(
        &self,
        q: impl Into<Part>,
        consumer: &str,
    ) -> Result<bool, BusError> {
        let mut conn = self.conn().await?;
        self.delete_idle_consumer(&mut conn, q.into(), consumer)
            .await
    }

    async fn delete_idle_consumer(
        &self,
        conn: &mut crate::RedisConn,
        q: Part,
        consumer: &str,
    ) -> Result<bool, BusError> {
        let removed: i64 = scripts::DELETE_IDLE_CONSUMER
            .key(&self.keys(q).stream)
            .arg(GROUP)
            .arg(consumer)
            .invoke_async(conn)
            .await?;
        Ok(removed == 1)
    }

    /// Remove consumers (other than `me`) that hold nothing and were not seen for `idle_over`:
    /// the names of workers that died, once their entries were reclaimed. Harmless for a live
    /// one (a consumer is recreated by its next read). Returns how many were removed.
    pub async fn prune_consumers(
        &self,
        q: impl Into<Part>,
        me: &str,
        idle_over: Duration,
    ) -> Result<u64, BusError> {
        let q = q.into();
        let stream = &self.keys(q).stream;
        let mut conn = self.conn().await?;
        let reply: Result<Value, redis::RedisError> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(stream)
            .arg(GROUP)
            .query_async(&mut conn)
            .await;
        let Ok(Value::Array(consumers)) = reply else {
            return Ok(0);
        };
        let idle_ms = u64::try_from(idle_over.as_millis()).unwrap_or(u64::MAX);
        let mut removed = 0;
        for c in consumers {
            let info = kv(&c);
            let name = info.get("name").cloned().unwrap_or_default();
            let pending: u64 = info
                .get("pending")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            let idle: u64 = info.get("idle").and_then(|v| v.parse().ok()).unwrap_or(0);
            if name.is_empty() || name == me || pending > 0 || idle < idle_ms {
                continue;
            }
            // (the pending count above may be stale by now: the step checks again)
            if self.delete_idle_consumer(&mut conn, q, &name).await? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The oldest `limit` dead letters of each partition of a queue. A dead letter of
    /// partition `i > 0` has the id `<i>/<entry id>` ([`Bus::replay`] takes it so).
    pub async fn dead_list(&self, q: Queue, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        let mut out = Vec::new();
        for p in self.parts(q) {
            out.extend(
                self.part_dead_list(p, limit.saturating_sub(out.len()))
                    .await?,
            );
        }
        Ok(out)
    }

    async fn part_dead_list(&self, p: Part, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let reply: StreamRangeReply = conn
            .xrange_count(&self.keys(p).dead, "-", "+", limit)
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|e| {
                let body = field(&e.map, "j");
                DeadLetter {
                    queue: p.queue,
                    envelope: Envelope::from_json(&body).ok(),
                    error: field(&e.map, "error"),
                    reason: field(&e.map, "reason"),
                    failed_at: field(&e.map, "failed_at")
                        .parse::<i64>()
                        .ok()
                        .and_then(DateTime::from_timestamp_millis),
                    id: match p.index {
                        0 => e.id,
                        i => format!("{i}/{}", e.id),
                    },
                    body,
                }
            })
            .collect())
    }

    /// Put one dead letter back on its stream: same job id (handlers stay idempotent), attempt 1,
    /// due now. Returns false when no such dead letter exists (already replayed).
    pub async fn replay(&self, q: Queue, dead_id: &str) -> Result<bool, BusError> {
        // `<i>/<entry id>` names partition i (see `dead_list`)
        let (part, dead_id) = match dead_id.split_once('/') {
            Some((i, id)) => match i.parse::<u16>() {
                Ok(i) if i < MAX_PARTITIONS => (Part::new(q, i), id),
                _ => return Ok(false),
            },
            None => (Part::from(q), dead_id),
        };
        let keys = self.keys(part);
        let mut conn = self.conn().await?;
        let reply: StreamRangeReply = conn.xrange(&keys.dead, dead_id, dead_id).await?;
        let Some(entry) = reply.ids.into_iter().next() else {
            return Ok(false);
        };
        let body = field(&entry.map, "j");
        let (fresh, job_id) = match Envelope::from_json(&body) {
            Ok(mut env) => {
                env.attempt = 1;
                env.not_before = None;
                env.enqueued_at = Utc::now();
                (env.to_json()?, env.id.to_string())
            }
            // a malformed entry goes back as it was (a newer build may know it)
            Err(_) => (body, String::new()),
        };
        let n: i64 = scripts::REPLAY
            .key(&keys.stream)
            .key(&keys.dead)
            .key(&keys.marks)
            .arg(dead_id)
            .arg(fresh)
            .arg(job_id)
            .arg(Utc::now().timestamp_millis())
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// Replay every dead letter of a queue. Returns how many went back.
    pub async fn replay_all(&self, q: Queue) -> Result<u64, BusError> {
        let mut total = 0;
        loop {
            let batch = self.dead_list(q, 500).await?;
            if batch.is_empty() {
                return Ok(total);
            }
            for d in batch {
                if self.replay(q, &d.id).await? {
                    total += 1;
                }
            }
        }
    }
}
