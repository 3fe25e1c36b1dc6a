//! The consuming side's atomic steps: read, ack, retry, dead-letter, move due entries back,
//! reclaim from lost consumers. The loop that drives them is in [`crate::worker`].

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use uuid::Uuid;

use super::{Bus, DeadReason, Delivery, field};
use crate::envelope::Envelope;
use crate::error::BusError;
use crate::metrics;
use crate::queue::{GROUP, Part, Queue};
use crate::scripts;

impl Bus {
    /// Read new entries for `consumer` on a dedicated connection: `XREADGROUP COUNT n
    /// [BLOCK ms]`. `block` = `None` returns at once.
    pub async fn read(
        &self,
        conn: &mut crate::RedisConn,
        p: impl Into<Part>,
        consumer: &str,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Delivery>, BusError> {
        let p = p.into();
        // the chat queue: this read's jobs move from the orgs' lists first, in their turn (a
        // failure here is no reason not to read what the stream holds)
        if let Err(e) = self.admit(conn, p, count).await {
            tracing::warn!(queue = %p, error = %e, "cannot admit waiting jobs; reading the stream");
        }
        let mut opts = StreamReadOptions::default()
            .group(GROUP, consumer)
            .count(count);
        if let Some(b) = block {
            opts = opts.block(usize::try_from(b.as_millis()).unwrap_or(usize::MAX));
        }
        let reply: Option<StreamReadReply> = conn
            .xread_options(&[&self.keys(p).stream], &[">"], &opts)
            .await?;
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                let body = field(&entry.map, "j");
                out.push(Delivery {
                    part: p,
                    entry_id: entry.id,
                    body,
                    deliveries: 1,
                    consumer: Arc::from(consumer),
                });
            }
        }
        Ok(out)
    }

    /// Acknowledge handled entries (`XACK` + `XDEL` and the job's marker, atomically) that
    /// `consumer` still owns: `(entry id, job id)` pairs. Returns how many.
    pub async fn ack(
        &self,
        p: impl Into<Part>,
        consumer: &str,
        entries: &[(&str, Uuid)],
    ) -> Result<u64, BusError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let p = p.into();
        let keys = self.keys(p);
        let mut conn = self.conn().await?;
        let mut inv = scripts::ACK.key(&keys.stream);
        inv.key(&keys.marks);
        // (only a fair queue's jobs may hold a slot of their org's concurrency cap)
        if p.queue == Queue::Chat {
            inv.key(&keys.fair_run_orgs);
        }
        inv.arg(GROUP).arg(consumer).arg(entries.len());
        for (entry, _) in entries {
            inv.arg(*entry);
        }
        for (_, job) in entries {
            inv.arg(job.to_string());
        }
        let (acked, freed): (u64, u64) = inv.invoke_async(&mut conn).await?;
        self.admit_freed(&mut conn, p, freed).await;
        Ok(acked)
    }

    /// Settling took `freed` jobs out of their orgs' concurrency caps: an org held back at its
    /// cap may go now, so admit at once rather than at a consumer's next read (an idle one
    /// blocks for up to `read_block` first). A failure is logged: the next read admits.
    async fn admit_freed(&self, conn: &mut crate::RedisConn, p: Part, freed: u64) {
        if freed == 0 {
            return;
        }
        let n = usize::try_from(freed).unwrap_or(usize::MAX);
        if let Err(e) = self.admit(conn, p, n).await {
            tracing::warn!(queue = %p, error = %e, "cannot admit waiting jobs after settling");
        }
    }

    /// Schedule `next` (the following attempt) at `due` and acknowledge `entry_id`, atomically,
    /// if `consumer` still owns the entry. Returns false when it no longer does.
    pub async fn retry(
        &self,
        p: impl Into<Part>,
        consumer: &str,
        entry_id: &str,
        next: &Envelope,
        due: DateTime<Utc>,
    ) -> Result<bool, BusError> {
        let keys = self.keys(p);
        let mut conn = self.conn().await?;
        let n: i64 = scripts::RETRY
            .key(&keys.stream)
            .key(&keys.delayed)
            .arg(GROUP)
            .arg(consumer)
            .arg(entry_id)
            .arg(due.timestamp_millis())
            .arg(next.to_json()?)
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// Reset the idle time of an entry `consumer` is still handling, so that reclaimers leave
    /// it alone (the heartbeat of long handlers). Returns false when `consumer` no longer owns it.
    pub async fn touch(
        &self,
        p: impl Into<Part>,
        consumer: &str,
        entry_id: &str,
    ) -> Result<bool, BusError> {
        let keys = self.keys(p);
        let mut conn = self.conn().await?;
        let n: i64 = scripts::TOUCH
            .key(&keys.stream)
            .arg(GROUP)
            .arg(consumer)
            .arg(entry_id)
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// Move a delivered entry to the dead letters with its last error and acknowledge it (and
    /// clear the marker of its job, `job_id` when the envelope could be read), atomically, if
    /// `consumer` still owns it.
    #[allow(clippy::too_many_arguments)]
    pub async fn dead_letter(
        &self,
        p: impl Into<Part>,
        consumer: &str,
        entry_id: &str,
        body: &str,
        error: &str,
        reason: DeadReason,
        job_id: Option<Uuid>,
    ) -> Result<bool, BusError> {
        let p = p.into();
        let keys = self.keys(p);
        let mut conn = self.conn().await?;
        let n: i64 = scripts::DEAD
            .key(&keys.stream)
            .key(&keys.dead)
            .key(&keys.marks)
            .key(&keys.fair_run_orgs)
            .arg(GROUP)
            .arg(consumer)
            .arg(entry_id)
            .arg(body)
            .arg(error)
            .arg(reason.as_str())
            .arg(Utc::now().timestamp_millis())
            .arg(job_id.map(|j| j.to_string()).unwrap_or_default())
            .invoke_async(&mut conn)
            .await?;
        if n == 2 {
            self.admit_freed(&mut conn, p, 1).await;
        }
        Ok(n >= 1)
    }

    /// Move up to `limit` due delayed envelopes to the stream. Returns how many moved and when
    /// the next one is due (ms since the epoch), if any.
    pub async fn move_due(
        &self,
        p: impl Into<Part>,
        limit: usize,
    ) -> Result<(u64, Option<i64>), BusError> {
        let keys = self.keys(p);
        let mut conn = self.conn().await?;
        let (moved, next): (u64, i64) = scripts::MOVE_DUE
            .key(&keys.stream)
            .key(&keys.delayed)
            .arg(Utc::now().timestamp_millis())
            .arg(limit)
            .invoke_async(&mut conn)
            .await?;
        Ok((moved, (next >= 0).then_some(next)))
    }

    /// Claim for `consumer` up to `count` entries idle longer than `min_idle` (`XAUTOCLAIM`
    /// from `cursor`). Returns the next cursor and the claimed deliveries with their counts.
    pub async fn reclaim(
        &self,
        p: impl Into<Part>,
        consumer: &str,
        min_idle: Duration,
        cursor: &str,
        count: usize,
    ) -> Result<(String, Vec<Delivery>), BusError> {
        let p = p.into();
        let mut conn = self.conn().await?;
        let (next, claimed): (String, Vec<(String, String, u32)>) = scripts::RECLAIM
            .key(&self.keys(p).stream)
            .arg(GROUP)
            .arg(consumer)
            .arg(u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX))
            .arg(cursor)
            .arg(count)
            .invoke_async(&mut conn)
            .await?;
        if !claimed.is_empty() {
            metrics::reclaimed(p.queue, claimed.len() as u64);
        }
        let out = claimed
            .into_iter()
            .map(|(entry_id, body, deliveries)| Delivery {
                part: p,
                entry_id,
                body,
                deliveries,
                consumer: Arc::from(consumer),
            })
            .collect();
        Ok((next, out))
    }
}
