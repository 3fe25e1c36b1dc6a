//! The bus: enqueue, the atomic ack / retry / dead-letter steps, delayed moves, reclaims, and
//! the operator views (stats, dead letters, replay). The consuming loop is in [`crate::worker`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::streams::{StreamRangeReply, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, Value};
use uuid::Uuid;

use crate::RedisHandle;
use crate::envelope::Envelope;
use crate::error::BusError;
use crate::kinds::Job;
use crate::metrics;
use crate::queue::{GROUP, Queue, QueueKeys};
use crate::scripts;

/// How many more of its own pending entries than the batch holds an ack's range scan reads
/// before checking the rest one by one (`scripts::ACK`): a consumer's in-flight entries
/// between a batch's lowest and highest id are at most its concurrency.
const ACK_SCAN_SLACK: usize = 512;

/// Why a job went to the dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// The handler said it can never succeed.
    Permanent,
    /// Retryable failures used up `max_attempts`.
    Exhausted,
    /// Delivered `max_attempts` times without an answer (workers lost or stalled).
    Lost,
    /// The entry is not a valid envelope (or names a kind this build does not know).
    Malformed,
}

impl DeadReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Permanent => "permanent",
            DeadReason::Exhausted => "exhausted",
            DeadReason::Lost => "lost",
            DeadReason::Malformed => "malformed",
        }
    }
}

/// An entry handed to a consumer: the raw envelope and how many times it was delivered.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub queue: Queue,
    pub entry_id: String,
    pub body: String,
    /// 1 for a fresh read; more when reclaimed from another consumer.
    pub deliveries: u32,
    /// The consumer name that owns the entry now: the process's own for a read, a name of
    /// its own for each reclaim (so that a process never runs one entry twice under one name).
    pub consumer: Arc<str>,
}

/// Counts for `worker queues`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Entries in the stream: waiting plus being handled (acknowledged ones are deleted).
    pub length: u64,
    /// Delivered and not yet acknowledged.
    pub pending: u64,
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

/// The job bus over one Redis and one key prefix.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Arc<RedisHandle>,
    queues: config::QueuesSettings,
    keys: HashMap<Queue, QueueKeys>,
}

impl Bus {
    pub fn new(redis: Arc<RedisHandle>, queues: &config::QueuesSettings) -> Self {
        let keys = Queue::ALL
            .into_iter()
            .map(|q| (q, QueueKeys::new(redis.prefix(), q)))
            .collect();
        Self {
            inner: Arc::new(Inner {
                redis,
                queues: queues.clone(),
                keys,
            }),
        }
    }

    pub fn redis(&self) -> &RedisHandle {
        &self.inner.redis
    }

    pub fn keys(&self, q: Queue) -> &QueueKeys {
        // every queue has its keys (built from Queue::ALL in `new`)
        &self.inner.keys[&q]
    }

    pub fn settings(&self, q: Queue) -> &config::QueueSettings {
        q.settings(&self.inner.queues)
    }

    async fn conn(&self) -> Result<redis::aio::ConnectionManager, BusError> {
        Ok(self.inner.redis.conn().await?)
    }

    /// Create the queue's stream and consumer group if missing. The group starts at the
    /// beginning of the stream, so jobs enqueued before any worker existed are not skipped.
    pub async fn ensure_group(&self, q: Queue) -> Result<(), BusError> {
        let mut conn = self.conn().await?;
        let r: Result<(), redis::RedisError> = conn
            .xgroup_create_mkstream(&self.keys(q).stream, GROUP, "0")
            .await;
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Enqueue a job for a first attempt, due now. Returns its envelope (with its id).
    pub async fn enqueue(&self, job: impl Into<Job>) -> Result<Envelope, BusError> {
        let env = Envelope::new(job);
        self.enqueue_envelope(&env).await?;
        Ok(env)
    }

    /// Enqueue a prepared envelope: on the stream when due, else in the delayed set, with its
    /// marker (`XADD`/`ZADD` + `HSET` in one `MULTI`/`EXEC`; should it fail, the marker is
    /// cleared, so a marker never stands without its entry). No check for an existing marker: a job id enqueued twice this way runs twice
    /// (handlers are idempotent); the reconciler's re-enqueues use `enqueue_once`.
    /// (A transaction costs Redis about half of what the `ENQUEUE` script does: `bench bus`.)
    pub async fn enqueue_envelope(&self, env: &Envelope) -> Result<(), BusError> {
        let q = env.job.queue();
        let keys = self.keys(q);
        let now = Utc::now().timestamp_millis();
        let body = env.to_json()?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        match env.not_before.map(|nb| nb.timestamp_millis()) {
            Some(due) if due > now => pipe.zadd(&keys.delayed, body, due).ignore(),
            _ => pipe.xadd(&keys.stream, "*", &[("j", body)]).ignore(),
        };
        let id = env.id.to_string();
        pipe.hset(&keys.marks, &id, now).ignore();
        let mut conn = self.conn().await?;
        let r: Result<(), redis::RedisError> = pipe.query_async(&mut conn).await;
        if let Err(e) = r {
            // A transaction does not roll back: an `XADD` that failed inside it (the key holds
            // another type, say) leaves the marker standing without its entry, and a job the
            // bus claims to hold is never re-enqueued. So the marker goes, in doubt too (a
            // lost reply): an entry without its marker costs at most a duplicate run, which
            // the job's lease fences.
            let cleared: Result<i64, _> = conn.hdel(&keys.marks, &id).await;
            if let Err(e2) = cleared {
                tracing::warn!(job_id = %id, error = %e2, "cannot clear the marker of a failed enqueue");
            }
            return Err(e.into());
        }
        metrics::enqueued(q, env.job.name(), 1);
        Ok(())
    }

    /// Enqueue a prepared envelope with its marker, in one step — unless a job with its id is
    /// still on the bus (its marker exists). Returns whether it was enqueued now.
    pub async fn enqueue_once(&self, env: &Envelope) -> Result<bool, BusError> {
        let q = env.job.queue();
        let keys = self.keys(q);
        let now = Utc::now().timestamp_millis();
        let due = env
            .not_before
            .map(|nb| nb.timestamp_millis())
            .filter(|d| *d > now)
            .unwrap_or(0);
        let mut conn = self.conn().await?;
        let n: i64 = scripts::ENQUEUE
            .key(&keys.stream)
            .key(&keys.delayed)
            .key(&keys.marks)
            .arg(env.id.to_string())
            .arg(now)
            .arg(due)
            .arg(env.to_json()?)
            .invoke_async(&mut conn)
            .await?;
        if n == 1 {
            metrics::enqueued(q, env.job.name(), 1);
        }
        Ok(n == 1)
    }

    /// Which of the jobs `ids` of queue `q` are still on the bus (their markers exist).
    pub async fn markers(&self, q: Queue, ids: &[Uuid]) -> Result<Vec<bool>, BusError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let fields: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let found: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&self.keys(q).marks)
            .arg(&fields)
            .query_async(&mut conn)
            .await?;
        Ok(found.into_iter().map(|f| f.is_some()).collect())
    }

    /// How many jobs of queue `q` are on the bus (waiting, delayed or being handled).
    pub async fn jobs_on_bus(&self, q: Queue) -> Result<u64, BusError> {
        let mut conn = self.conn().await?;
        Ok(conn.hlen(&self.keys(q).marks).await?)
    }

    /// Enqueue many due envelopes in one pipeline (bulk loads, tests, the benchmark), each with
    /// its marker.
    pub async fn enqueue_many(&self, envs: &[Envelope]) -> Result<(), BusError> {
        if envs.is_empty() {
            return Ok(());
        }
        let now = Utc::now().timestamp_millis();
        let mut pipe = redis::pipe();
        // MULTI/EXEC: a marker never stands without its entry
        pipe.atomic();
        for env in envs {
            let keys = self.keys(env.job.queue());
            pipe.hset(&keys.marks, env.id.to_string(), now)
                .ignore()
                .xadd(&keys.stream, "*", &[("j", env.to_json()?)])
                .ignore();
        }
        let mut conn = self.conn().await?;
        let () = pipe.query_async(&mut conn).await?;
        for env in envs {
            metrics::enqueued(env.job.queue(), env.job.name(), 1);
        }
        Ok(())
    }

    /// Read new entries for `consumer` on a dedicated connection: `XREADGROUP COUNT n
    /// [BLOCK ms]`. `block` = `None` returns at once.
    pub async fn read(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        q: Queue,
        consumer: &str,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Delivery>, BusError> {
        let mut opts = StreamReadOptions::default()
            .group(GROUP, consumer)
            .count(count);
        if let Some(b) = block {
            opts = opts.block(usize::try_from(b.as_millis()).unwrap_or(usize::MAX));
        }
        let reply: Option<StreamReadReply> = conn
            .xread_options(&[&self.keys(q).stream], &[">"], &opts)
            .await?;
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                let body = field(&entry.map, "j");
                out.push(Delivery {
                    queue: q,
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
    /// `consumer` still owns: `(entry id, job id)` pairs.
    pub async fn ack(
        &self,
        q: Queue,
        consumer: &str,
        entries: &[(&str, Uuid)],
    ) -> Result<u64, BusError> {
        let keys = self.keys(q);
        let mut conn = self.conn().await?;
        let mut inv = scripts::ACK.key(&keys.stream);
        // the scan cap: this batch plus what else the consumer may hold in its range
        inv.key(&keys.marks)
            .arg(GROUP)
            .arg(consumer)
            .arg(entries.len() + ACK_SCAN_SLACK);
        for (entry, job) in entries {
            inv.arg(*entry).arg(job.to_string());
        }
        Ok(inv.invoke_async(&mut conn).await?)
    }

    /// Schedule `next` (the following attempt) at `due` and acknowledge `entry_id`, atomically,
    /// if `consumer` still owns the entry. Returns false when it no longer does.
    pub async fn retry(
        &self,
        q: Queue,
        consumer: &str,
        entry_id: &str,
        next: &Envelope,
        due: DateTime<Utc>,
    ) -> Result<bool, BusError> {
        let keys = self.keys(q);
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
    pub async fn touch(&self, q: Queue, consumer: &str, entry_id: &str) -> Result<bool, BusError> {
        let keys = self.keys(q);
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
        q: Queue,
        consumer: &str,
        entry_id: &str,
        body: &str,
        error: &str,
        reason: DeadReason,
        job_id: Option<Uuid>,
    ) -> Result<bool, BusError> {
        let keys = self.keys(q);
        let mut conn = self.conn().await?;
        let n: i64 = scripts::DEAD
            .key(&keys.stream)
            .key(&keys.dead)
            .key(&keys.marks)
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
        Ok(n == 1)
    }

    /// Move up to `limit` due delayed envelopes to the stream. Returns how many moved and when
    /// the next one is due (ms since the epoch), if any.
    pub async fn move_due(&self, q: Queue, limit: usize) -> Result<(u64, Option<i64>), BusError> {
        let keys = self.keys(q);
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
        q: Queue,
        consumer: &str,
        min_idle: Duration,
        cursor: &str,
        count: usize,
    ) -> Result<(String, Vec<Delivery>), BusError> {
        let mut conn = self.conn().await?;
        let (next, claimed): (String, Vec<(String, String, u32)>) = scripts::RECLAIM
            .key(&self.keys(q).stream)
            .arg(GROUP)
            .arg(consumer)
            .arg(u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX))
            .arg(cursor)
            .arg(count)
            .invoke_async(&mut conn)
            .await?;
        if !claimed.is_empty() {
            metrics::reclaimed(q, claimed.len() as u64);
        }
        let out = claimed
            .into_iter()
            .map(|(entry_id, body, deliveries)| Delivery {
                queue: q,
                entry_id,
                body,
                deliveries,
                consumer: Arc::from(consumer),
            })
            .collect();
        Ok((next, out))
    }

    /// Length, pending, delayed and dead counts of a queue.
    pub async fn stats(&self, q: Queue) -> Result<QueueStats, BusError> {
        let keys = self.keys(q);
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
        let (mut pending, mut consumers) = (0, 0);
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
                }
            }
        }
        Ok(QueueStats {
            length,
            pending,
            delayed,
            dead,
            consumers,
        })
    }

    /// True when none of `queues` has work left: nothing in a stream (acknowledged entries are
    /// deleted, so this covers pending ones too) and nothing delayed. Dead letters do not count.
    pub async fn is_empty(&self, queues: &[Queue]) -> Result<bool, BusError> {
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for q in queues {
            let keys = self.keys(*q);
            pipe.xlen(&keys.stream).zcard(&keys.delayed);
        }
        let counts: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(counts.iter().all(|n| *n == 0))
    }

    /// The pending entries `consumer` holds in `q`.
    pub async fn pending_of(&self, q: Queue, consumer: &str) -> Result<u64, BusError> {
        let mut conn = self.conn().await?;
        let reply: Result<Value, redis::RedisError> = redis::cmd("XPENDING")
            .arg(&self.keys(q).stream)
            .arg(GROUP)
            .arg("-")
            .arg("+")
            .arg(1000)
            .arg(consumer)
            .query_async(&mut conn)
            .await;
        match reply {
            Ok(Value::Array(v)) => Ok(v.len() as u64),
            Ok(_) => Ok(0),
            Err(e) if e.code() == Some("NOGROUP") => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Remove `consumer` from the group when it holds nothing (a stopped worker tidies up;
    /// `XGROUP DELCONSUMER` would drop pending entries, so it is never used on a busy one).
    pub async fn remove_consumer_if_idle(
        &self,
        q: Queue,
        consumer: &str,
    ) -> Result<bool, BusError> {
        if self.pending_of(q, consumer).await? > 0 {
            return Ok(false);
        }
        let mut conn = self.conn().await?;
        let _: i64 = redis::cmd("XGROUP")
            .arg("DELCONSUMER")
            .arg(&self.keys(q).stream)
            .arg(GROUP)
            .arg(consumer)
            .query_async(&mut conn)
            .await?;
        Ok(true)
    }

    /// Remove consumers (other than `me`) that hold nothing and were not seen for `idle_over`:
    /// the names of workers that died, once their entries were reclaimed. Harmless for a live
    /// one (a consumer is recreated by its next read). Returns how many were removed.
    pub async fn prune_consumers(
        &self,
        q: Queue,
        me: &str,
        idle_over: Duration,
    ) -> Result<u64, BusError> {
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
            let n: i64 = redis::cmd("XGROUP")
                .arg("DELCONSUMER")
                .arg(stream)
                .arg(GROUP)
                .arg(&name)
                .query_async(&mut conn)
                .await?;
            // DELCONSUMER answers the pending count it dropped: 0 by the check above
            if n == 0 {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The oldest `limit` dead letters of a queue.
    pub async fn dead_list(&self, q: Queue, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        let mut conn = self.conn().await?;
        let reply: StreamRangeReply = conn
            .xrange_count(&self.keys(q).dead, "-", "+", limit)
            .await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|e| {
                let body = field(&e.map, "j");
                DeadLetter {
                    queue: q,
                    envelope: Envelope::from_json(&body).ok(),
                    error: field(&e.map, "error"),
                    reason: field(&e.map, "reason"),
                    failed_at: field(&e.map, "failed_at")
                        .parse::<i64>()
                        .ok()
                        .and_then(DateTime::from_timestamp_millis),
                    id: e.id,
                    body,
                }
            })
            .collect())
    }

    /// Put one dead letter back on its stream: same job id (handlers stay idempotent), attempt 1,
    /// due now. Returns false when no such dead letter exists (already replayed).
    pub async fn replay(&self, q: Queue, dead_id: &str) -> Result<bool, BusError> {
        let keys = self.keys(q);
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

    /// Enqueue `job` for scheduler interval `n` of the series `name` unless that interval
    /// already fired (marker + enqueue in one step). Returns true when this call fired it.
    pub async fn enqueue_tick(
        &self,
        name: &str,
        n: u64,
        owner: &str,
        marker_ttl: Duration,
        job: impl Into<Job>,
    ) -> Result<Option<Envelope>, BusError> {
        let env = Envelope::new(job);
        let q = env.job.queue();
        let keys = self.keys(q);
        let mut conn = self.conn().await?;
        let fired: i64 = scripts::TICK
            .key(keys.tick(name, n))
            .key(&keys.stream)
            .key(&keys.marks)
            .arg(owner)
            .arg(u64::try_from(marker_ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(env.to_json()?)
            .arg(env.id.to_string())
            .arg(Utc::now().timestamp_millis())
            .invoke_async(&mut conn)
            .await?;
        if fired == 1 {
            metrics::enqueued(q, env.job.name(), 1);
            Ok(Some(env))
        } else {
            Ok(None)
        }
    }
}

fn field(map: &HashMap<String, Value>, name: &str) -> String {
    match map.get(name) {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(Value::SimpleString(s)) => s.clone(),
        Some(Value::Int(i)) => i.to_string(),
        _ => String::new(),
    }
}

/// A flat `[k1, v1, k2, v2, ...]` reply (XINFO) as a map of strings.
fn kv(v: &Value) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let items: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        Value::Map(m) => m.iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => return out,
    };
    for pair in items.chunks(2) {
        if let [k, v] = pair {
            out.insert(scalar(k), scalar(v));
        }
    }
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}
