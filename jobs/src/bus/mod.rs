//! The bus: enqueue (here), the atomic ack / retry / dead-letter steps, delayed moves, reclaims
//! (`delivery`), and the operator views (`admin`: stats, dead letters, replay). The consuming
//! loop is in [`crate::worker`].

mod admin;
mod delivery;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU16, Ordering};
use std::time::Duration;

use chrono::Utc;
use redis::{AsyncCommands, Value};
use uuid::Uuid;

use crate::RedisHandle;
use crate::envelope::Envelope;
use crate::error::BusError;
use crate::kinds::Job;
use crate::metrics;
use crate::queue::{GROUP, Part, Queue, QueueKeys, partition_index};
use crate::scripts;
use config::MAX_PARTITIONS;

pub use admin::{DeadLetter, QueueStats};

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
    /// The queue partition (stream) it was read from: every step of its settling goes there.
    pub part: Part,
    pub entry_id: String,
    pub body: String,
    /// 1 for a fresh read; more when reclaimed from another consumer.
    pub deliveries: u32,
    /// The consumer name that owns the entry now: the process's own for a read, a name of
    /// its own for each reclaim (so that a process never runs one entry twice under one name).
    pub consumer: Arc<str>,
}
/// The job bus over one Redis and one key prefix.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Arc<RedisHandle>,
    queues: config::QueuesSettings,
    /// The keys of every partition a queue may have: `[queue.index() * MAX_PARTITIONS + i]`.
    keys: Vec<QueueKeys>,
    /// The partitions read, per queue: at least `queues.partitions`, and as many as the
    /// largest setting ever recorded ([`Bus::record_partitions`]).
    readable: [AtomicU16; 4],
    /// This process's setting is in the record (enqueues make sure of it before their first
    /// job, so workers come to read every partition jobs go to).
    recorded: AtomicBool,
    /// When `readable` was last read from the record (ms since the epoch; 0: never).
    refreshed_ms: AtomicI64,
}

/// How long a capped org's admitted job counts against its cap at most, should neither its
/// ack nor its dead letter ever take it out (a job Redis lost with its marker kept, say): as
/// long as its every attempt could take, at least a day (a rate limit's `Retry-After` may
/// exceed the backoff cap), at most 30 days.
fn run_set_ttl_ms(s: &config::QueueSettings) -> u64 {
    const DAY_MS: u64 = 86_400_000;
    let attempt_ms = s
        .run_timeout_secs
        .saturating_add(s.visibility_timeout_secs)
        .saturating_mul(1000)
        .saturating_add(s.backoff_cap_ms);
    attempt_ms
        .saturating_mul(u64::from(s.max_attempts.max(1)))
        .clamp(DAY_MS, 30 * DAY_MS)
}

/// How long a process's view of the recorded partitions is trusted before `markers`, `stats`
/// and `jobs_on_bus` read it again (another process may have raised it).
const PARTITIONS_FRESH_MS: i64 = 10_000;

/// Keeps the record of a queue's partitions at its largest. KEYS: the record. ARGV: this
/// process's setting. Returns the record afterwards.
const RECORD_PARTITIONS_LUA: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local mine = tonumber(ARGV[1])
if mine > cur then
  redis.call('SET', KEYS[1], ARGV[1])
  cur = mine
end
return cur
"#;

impl Bus {
    pub fn new(redis: Arc<RedisHandle>, queues: &config::QueuesSettings) -> Self {
        let keys = Queue::ALL
            .into_iter()
            .flat_map(|q| Part::all(q, MAX_PARTITIONS))
            .map(|p| QueueKeys::new(redis.prefix(), p))
            .collect();
        let n = queues.partitions.clamp(1, MAX_PARTITIONS);
        Self {
            inner: Arc::new(Inner {
                redis,
                queues: queues.clone(),
                keys,
                readable: std::array::from_fn(|_| AtomicU16::new(n)),
                // one partition: nothing to record
                recorded: AtomicBool::new(n == 1),
                refreshed_ms: AtomicI64::new(0),
            }),
        }
    }

    pub fn redis(&self) -> &RedisHandle {
        &self.inner.redis
    }

    /// The keys of a queue partition (a queue alone: its partition 0).
    pub fn keys(&self, p: impl Into<Part>) -> &QueueKeys {
        let p = p.into();
        let i = p.queue.index() * usize::from(MAX_PARTITIONS)
            + usize::from(p.index.min(MAX_PARTITIONS - 1));
        // every partition below MAX_PARTITIONS of every queue has its keys (built in `new`)
        &self.inner.keys[i]
    }

    /// The partitions of `q` that enqueues go to (`queues.partitions`).
    pub fn partitions(&self) -> u16 {
        self.inner.queues.partitions.clamp(1, MAX_PARTITIONS)
    }

    /// The partitions of `q` to read, drain and count: see [`Bus::record_partitions`].
    pub fn parts(&self, q: Queue) -> impl Iterator<Item = Part> + use<> {
        let n = self.inner.readable[q.index()].load(Ordering::Relaxed);
        Part::all(q, n)
    }

    /// The partition a job goes to: its partition key ([`Job::partition_hash`]), or its id,
    /// among `queues.partitions`.
    pub fn part_of(&self, env: &Envelope) -> Part {
        let hash = env
            .job
            .partition_hash()
            .unwrap_or_else(|| crate::kinds::fnv1a(env.id.as_bytes()));
        Part::new(env.job.queue(), partition_index(hash, self.partitions()))
    }

    /// Record this process's `queues.partitions` in Redis when larger than what is recorded,
    /// and read from now on as many partitions as the record says: jobs enqueued under a larger
    /// setting stay reachable after it is lowered. Called at the start of every process that
    /// enqueues or consumes.
    pub async fn record_partitions(&self) -> Result<(), BusError> {
        let mut conn = self.conn().await?;
        let script = redis::Script::new(RECORD_PARTITIONS_LUA);
        for q in Queue::ALL {
            let recorded: i64 = script
                .key(QueueKeys::partitions_record(self.inner.redis.prefix(), q))
                .arg(self.partitions())
                .invoke_async(&mut conn)
                .await?;
            let n = u16::try_from(recorded)
                .unwrap_or(MAX_PARTITIONS)
                .clamp(self.partitions(), MAX_PARTITIONS);
            // only grows: a lost record never hides partitions this process knew
            self.inner.readable[q.index()].fetch_max(n, Ordering::Relaxed);
        }
        self.inner.recorded.store(true, Ordering::Relaxed);
        self.inner
            .refreshed_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
        Ok(())
    }

    /// Re-read the record when this process's view of it is older than
    /// [`PARTITIONS_FRESH_MS`] (a failure keeps the view it has).
    async fn refresh_partitions(&self) {
        let last = self.inner.refreshed_ms.load(Ordering::Relaxed);
        if Utc::now().timestamp_millis() - last >= PARTITIONS_FRESH_MS
            && let Err(e) = self.record_partitions().await
        {
            tracing::debug!(error = %e, "cannot re-read the recorded queue partitions");
        }
    }

    /// Before an enqueue of a process with several partitions: its setting must be in the
    /// record, or workers with a smaller one might never read the partition the job goes to.
    /// A job bound for partition 0 (always read) goes anyway.
    async fn ensure_recorded(&self, part: Part) -> Result<(), BusError> {
        if self.inner.recorded.load(Ordering::Relaxed) {
            return Ok(());
        }
        match self.record_partitions().await {
            Ok(()) => Ok(()),
            Err(_) if part.index == 0 => Ok(()),
            Err(e) => Err(BusError::Unrecorded(e.to_string())),
        }
    }

    pub fn settings(&self, q: Queue) -> &config::QueueSettings {
        q.settings(&self.inner.queues)
    }

    async fn conn(&self) -> Result<crate::RedisConn, BusError> {
        Ok(self.inner.redis.conn().await?)
    }

    /// Create the queue's stream and consumer group if missing. The group starts at the
    /// beginning of the stream, so jobs enqueued before any worker existed are not skipped.
    pub async fn ensure_group(&self, p: impl Into<Part>) -> Result<(), BusError> {
        let mut conn = self.conn().await?;
        let r: Result<(), redis::RedisError> = conn
            .xgroup_create_mkstream(&self.keys(p).stream, GROUP, "0")
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
        let part = self.part_of(env);
        self.ensure_recorded(part).await?;
        let q = env.job.queue();
        let keys = self.keys(part);
        let now = Utc::now().timestamp_millis();
        if let Some(org) = self.fair_key(env, now) {
            self.enqueue_fair(env, part, &org, false, now).await?;
            return Ok(());
        }
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
        let part = self.part_of(env);
        self.ensure_recorded(part).await?;
        let q = env.job.queue();
        let keys = self.keys(part);
        let now = Utc::now().timestamp_millis();
        if let Some(org) = self.fair_key(env, now) {
            return self.enqueue_fair(env, part, &org, true, now).await;
        }
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

    /// Which of the jobs `ids` of queue `q` are still on the bus (their markers exist, in any
    /// partition read).
    pub async fn markers(&self, q: Queue, ids: &[Uuid]) -> Result<Vec<bool>, BusError> {
        let mut out = vec![false; ids.len()];
        if ids.is_empty() {
            return Ok(out);
        }
        self.refresh_partitions().await;
        let mut conn = self.conn().await?;
        let fields: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        for p in self.parts(q) {
            let found: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(&self.keys(p).marks)
                .arg(&fields)
                .query_async(&mut conn)
                .await?;
            for (o, f) in out.iter_mut().zip(found) {
                *o |= f.is_some();
            }
        }
        Ok(out)
    }

    /// How many jobs of queue `q` are on the bus (waiting, delayed or being handled).
    pub async fn jobs_on_bus(&self, q: Queue) -> Result<u64, BusError> {
        self.refresh_partitions().await;
        let mut conn = self.conn().await?;
        let mut n = 0;
        for p in self.parts(q) {
            let len: u64 = conn.hlen(&self.keys(p).marks).await?;
            n += len;
        }
        Ok(n)
    }

    /// Enqueue many due envelopes in one pipeline (bulk loads, tests, the benchmark), each with
    /// its marker.
    pub async fn enqueue_many(&self, envs: &[Envelope]) -> Result<(), BusError> {
        if envs.is_empty() {
            return Ok(());
        }
        let now = Utc::now().timestamp_millis();
        let mut conn = self.conn().await?;
        // one MULTI/EXEC per partition (a partition's keys share one slot, two partitions'
        // need not): a marker never stands without its entry; a fair queue's jobs one by one
        let mut by_part: std::collections::BTreeMap<Part, Vec<&Envelope>> = Default::default();
        for env in envs {
            if self.fair_key(env, now).is_some() {
                self.enqueue_envelope(env).await?;
                continue;
            }
            by_part.entry(self.part_of(env)).or_default().push(env);
        }
        // the highest partition index decides whether the record must be written first
        if let Some(top) = by_part.keys().max_by_key(|p| p.index) {
            self.ensure_recorded(*top).await?;
        }
        for (part, group) in by_part {
            let keys = self.keys(part);
            let mut pipe = redis::pipe();
            pipe.atomic();
            for env in group {
                pipe.hset(&keys.marks, env.id.to_string(), now)
                    .ignore()
                    .xadd(&keys.stream, "*", &[("j", env.to_json()?)])
                    .ignore();
            }
            let () = pipe.query_async(&mut conn).await?;
        }
        for env in envs.iter().filter(|e| self.fair_key(e, now).is_none()) {
            metrics::enqueued(env.job.queue(), env.job.name(), 1);
        }
        Ok(())
    }

    /// The org a job waits for its turn under, when its queue admits fairly and it is due
    /// (a job due later waits in the delayed set, and then goes to the stream directly).
    fn fair_key(&self, env: &Envelope, now_ms: i64) -> Option<String> {
        if !self.settings(env.job.queue()).fair
            || env
                .not_before
                .is_some_and(|nb| nb.timestamp_millis() > now_ms)
        {
            return None;
        }
        env.job.fair_key()
    }

    /// A job of a fair queue into its org's list, with its marker, in one step
    /// ([`scripts::ENQUEUE_FAIR`]; with `once`, not when its marker exists). Returns whether it
    /// was enqueued now.
    async fn enqueue_fair(
        &self,
        env: &Envelope,
        part: Part,
        org: &str,
        once: bool,
        now_ms: i64,
    ) -> Result<bool, BusError> {
        let keys = self.keys(part);
        let mut conn = self.conn().await?;
        let mut inv = self.fair_invocation(&scripts::ENQUEUE_FAIR, part, keys, now_ms);
        let n: i64 = inv
            .arg(env.id.to_string())
            .arg(org)
            .arg(env.to_json()?)
            .arg(i32::from(once))
            .invoke_async(&mut conn)
            .await?;
        if n == 1 {
            metrics::enqueued(env.job.queue(), env.job.name(), 1);
        }
        Ok(n == 1)
    }

    /// Admit up to `n` jobs waiting in a chat partition's fair lists into its stream (a
    /// consumer about to read `n`, or jobs just settled). Whatever this process's `fair`
    /// setting: a job another process put in the lists is never left there (turning fair
    /// admission off drains them).
    pub async fn admit(
        &self,
        conn: &mut crate::RedisConn,
        p: Part,
        n: usize,
    ) -> Result<u64, BusError> {
        if p.queue != Queue::Chat {
            return Ok(0);
        }
        let keys = self.keys(p);
        let now = Utc::now().timestamp_millis();
        Ok(self
            .fair_invocation(&scripts::ADMIT_FAIR, p, keys, now)
            .arg(n)
            .invoke_async(conn)
            .await?)
    }

    /// A fair-admission script with the keys and arguments its helpers share
    /// (`scripts::FAIR_LUA`'s `fair(1, 1)`); the script's own arguments follow.
    fn fair_invocation<'a>(
        &self,
        script: &'a redis::Script,
        p: Part,
        keys: &QueueKeys,
        now_ms: i64,
    ) -> redis::ScriptInvocation<'a> {
        let settings = self.settings(p.queue);
        let mut inv = script.key(&keys.fair);
        inv.key(&keys.fair_vt)
            .key(&keys.fair_weights)
            .key(&keys.stream)
            .key(&keys.marks)
            .key(&keys.fair_caps)
            .key(&keys.fair_run_orgs)
            .arg(&keys.fair_lists)
            .arg(GROUP)
            .arg(&keys.fair_runs)
            .arg(settings.org_concurrency)
            .arg(now_ms)
            .arg(run_set_ttl_ms(settings));
        inv
    }

    /// Where a job waiting for fair admission stands: 1 when it goes next; `None` once it
    /// waits no more (admitted to the stream, or not a job of a fair queue).
    pub async fn fair_position(&self, env: &Envelope) -> Result<Option<u64>, BusError> {
        let now = Utc::now().timestamp_millis();
        let Some(org) = self.fair_key(env, now) else {
            return Ok(None);
        };
        let keys = self.keys(self.part_of(env));
        let mut conn = self.conn().await?;
        let n: i64 = scripts::FAIR_POSITION
            .key(&keys.fair)
            .key(&keys.fair_weights)
            .key(&keys.stream)
            .arg(org)
            .arg(env.to_json()?)
            .arg(&keys.fair_lists)
            .arg(GROUP)
            .invoke_async(&mut conn)
            .await?;
        Ok(u64::try_from(n).ok())
    }

    /// Set the weight of `key` (an org) in fair queue `q`'s admission, in every partition (1
    /// is the default: an org of weight 2 gets twice the turns of an org of weight 1 when
    /// both wait).
    pub async fn set_fair_weight(&self, q: Queue, key: &str, weight: u32) -> Result<(), BusError> {
        self.set_fair_field(q, |k| &k.fair_weights, key, (weight != 1).then_some(weight))
            .await
    }

    /// Set the concurrency cap of `key` (an org) in fair queue `q`'s admission, in every
    /// partition: `Some(n)` its own (0: none), `None` the queue's `org_concurrency`.
    pub async fn set_fair_cap(
        &self,
        q: Queue,
        key: &str,
        cap: Option<u32>,
    ) -> Result<(), BusError> {
        self.set_fair_field(q, |k| &k.fair_caps, key, cap).await
    }

    /// Set (`Some`) or clear (`None`: the default) `key`'s field of a fair-admission hash in
    /// every partition of `q`.
    async fn set_fair_field(
        &self,
        q: Queue,
        hash: fn(&QueueKeys) -> &String,
        key: &str,
        value: Option<u32>,
    ) -> Result<(), BusError> {
        let mut conn = self.conn().await?;
        for p in self.parts(q) {
            let hash = hash(self.keys(p));
            let _: i64 = match value {
                Some(v) => conn.hset(hash, key, v).await?,
                None => conn.hdel(hash, key).await?,
            };
        }
        Ok(())
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
        // the tick's marker lives beside partition 0 (a fixed slot): a tick fires once
        // whatever partition its job lands in — so the job goes to partition 0 too
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
