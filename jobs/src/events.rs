//! Response events: how a worker's answer reaches SSE clients through Redis.
//!
//! A worker [`EventPublisher::publish`]es each event of a response (`token`, `message.completed`,
//! ...). One Lua script appends it to the response's capped replay stream (its entry id becomes
//! the event id, the SSE `id:`), refreshes the stream's retention TTL, and `PUBLISH`es it — in
//! one atomic step, so the live copy and the replayable copy always carry the same id.
//!
//! Each API process runs one [`EventHub`]: a single pattern subscription for all responses,
//! fanned out in-process to the SSE streams that listen (not one Redis connection per client).
//! [`EventHub::events`] registers the listener first, then replays from the replay stream after
//! the client's `Last-Event-ID`, then follows live events, skipping ids it already sent: nothing
//! lost or repeated across the hand-over, after a reconnect of the hub, or when a slow client's
//! buffer overflowed (it re-reads the replay stream). The stream ends after a terminal event
//! (`message.completed`, `error`) or when the hub shuts down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use redis::AsyncCommands as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::RedisHandle;

/// Buffered live events per listener before it falls back to re-reading the replay stream
/// (nothing is lost past it: the listener re-reads the replay stream). Tokens are coalesced by
/// the worker while a publish is in flight, so a response rarely has many events queued.
const LISTENER_BUFFER: usize = 64;
/// How often the hub checks its subscription connection, and how long it waits for the answer.
const HUB_PING_EVERY: Duration = Duration::from_secs(15);
const HUB_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// The events of one response, as API.md names them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", content = "data")]
pub enum ResponseEvent {
    #[serde(rename = "message.created")]
    MessageCreated { message_id: Uuid, response_id: Uuid },
    #[serde(rename = "token")]
    Token { text: String },
    #[serde(rename = "action.proposed")]
    ActionProposed { action: Value },
    #[serde(rename = "message.completed")]
    MessageCompleted {
        message: Value,
        model: String,
        usage: Value,
    },
    #[serde(rename = "response.restarted")]
    ResponseRestarted { reason: String },
    #[serde(rename = "error")]
    Error { code: String, message: String },
}

impl ResponseEvent {
    /// `message.completed` from a stored answer's public fields (`store::public::Outcome`).
    pub fn completed(message: Value, model: String, usage: Value) -> Self {
        ResponseEvent::MessageCompleted {
            message,
            model,
            usage,
        }
    }

    /// `error` with its code and message.
    pub fn error(code: String, message: String) -> Self {
        ResponseEvent::Error { code, message }
    }

    /// The SSE `event:` name.
    pub fn name(&self) -> &'static str {
        match self {
            ResponseEvent::MessageCreated { .. } => "message.created",
            ResponseEvent::Token { .. } => "token",
            ResponseEvent::ActionProposed { .. } => "action.proposed",
            ResponseEvent::MessageCompleted { .. } => "message.completed",
            ResponseEvent::ResponseRestarted { .. } => "response.restarted",
            ResponseEvent::Error { .. } => "error",
        }
    }

    /// The SSE `data:` payload (the event's fields).
    pub fn data(&self) -> Value {
        serde_json::to_value(self)
            .ok()
            .and_then(|mut v| v.get_mut("data").map(Value::take))
            .unwrap_or(Value::Null)
    }

    /// The last event of a response.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            ResponseEvent::MessageCompleted { .. } | ResponseEvent::Error { .. }
        )
    }
}

/// A Redis stream entry id (`<ms>-<seq>`), ordered numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub ms: u64,
    pub seq: u64,
}

impl EventId {
    pub fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.trim().split_once('-')?;
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// An event with its id.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub id: EventId,
    pub event: ResponseEvent,
}

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("bad event payload: {0}")]
    Payload(String),
}

/// Key and channel names of the response events (all under `REDIS_PREFIX`).
#[derive(Debug, Clone)]
pub struct EventKeys {
    prefix: String,
}

impl EventKeys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }
    /// The capped replay stream of one response (its own hash slot).
    pub fn replay(&self, response_id: Uuid) -> String {
        format!("{}:{{resp:{response_id}}}:events", self.prefix)
    }
    /// The fence of one response, beside its replay stream (same slot): a hash with `run`, the
    /// run allowed to publish, and `done`, the id of its terminal event once published.
    pub fn fence(&self, response_id: Uuid) -> String {
        format!("{}:{{resp:{response_id}}}:fence", self.prefix)
    }
    /// The live channel of one response.
    pub fn channel(&self, response_id: Uuid) -> String {
        format!("{}:events:{response_id}", self.prefix)
    }
    /// The pattern the hub subscribes to.
    pub fn pattern(&self) -> String {
        format!("{}:events:*", self.prefix)
    }
    fn response_of(&self, channel: &str) -> Option<Uuid> {
        channel
            .strip_prefix(&format!("{}:events:", self.prefix))
            .and_then(|s| Uuid::parse_str(s).ok())
    }
}

/// Append one event to the replay stream, refresh the retention, and publish it live, in one
/// step. A run's events (ARGV[5] = its number) go out only while no later run holds the fence
/// (a fence left behind a run is moved forward to it) and no terminal event went out; a terminal event goes out once per response (`done`).
/// KEYS: replay, fence. ARGV: max_len, payload, retention_ms, channel, run ('' = unfenced),
/// terminal ('1' or '0'). Returns `{1, id}` (sent), `{2, id}` (the terminal event was sent
/// before, as `id`), `{0, 'nofence'|'fenced'|'finished'}` (refused).
const PUBLISH_LUA: &str = r#"
if ARGV[5] ~= '' then
  local run = redis.call('HGET', KEYS[2], 'run')
  if not run then return {0, 'nofence'} end
  if tonumber(run) > tonumber(ARGV[5]) then return {0, 'fenced'} end
  -- (lower: the fence's own write was lost, e.g. the last second of an AOF): forward again
  if tonumber(run) < tonumber(ARGV[5]) then redis.call('HSET', KEYS[2], 'run', ARGV[5]) end
end
local done = redis.call('HGET', KEYS[2], 'done')
if done then
  if ARGV[6] == '1' then return {2, done} end
  if ARGV[5] ~= '' then return {0, 'finished'} end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2], 'r', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[6] == '1' then redis.call('HSET', KEYS[2], 'done', id) end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
redis.call('PUBLISH', ARGV[4], id .. '\t' .. ARGV[2])
return {1, id}
"#;

/// Let run ARGV[1] publish (only forward: an older run never takes the fence back).
/// KEYS: fence. ARGV: run, retention_ms. Returns the run the fence names afterwards.
const FENCE_LUA: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], 'run') or '0')
local run = tonumber(ARGV[1])
if cur < run then
  redis.call('HSET', KEYS[1], 'run', ARGV[1])
  cur = run
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return cur
"#;

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Sent with this id.
    Sent(EventId),
    /// A terminal event: one was sent before (its id); this one was not.
    AlreadyFinished(EventId),
    /// Refused: the fence names another run, or the response's terminal event went out.
    Fenced,
    /// Refused: the response has no fence (Redis lost it): the run re-asserts its lease and
    /// its fence, then publishes again.
    NoFence,
}

impl Published {
    /// The id of the event as sent (or of the terminal event sent before).
    pub fn id(self) -> Option<EventId> {
        match self {
            Published::Sent(id) | Published::AlreadyFinished(id) => Some(id),
            Published::Fenced | Published::NoFence => None,
        }
    }
}

/// Publishes response events (workers).
#[derive(Clone)]
pub struct EventPublisher {
    redis: Arc<RedisHandle>,
    keys: EventKeys,
    max_len: u64,
    retention: Duration,
    script: Arc<redis::Script>,
    fence_script: Arc<redis::Script>,
}

impl EventPublisher {
    pub fn new(redis: Arc<RedisHandle>, settings: &config::EventsSettings) -> Self {
        let keys = EventKeys::new(redis.prefix());
        Self {
            redis,
            keys,
            max_len: settings.replay_max_len,
            retention: Duration::from_secs(settings.retention_secs),
            script: Arc::new(redis::Script::new(PUBLISH_LUA)),
            fence_script: Arc::new(redis::Script::new(FENCE_LUA)),
        }
    }

    /// Append to the replay stream and publish live, atomically, outside any run (the API's
    /// `message.created`; the terminal event of a response ended from what is stored). A
    /// terminal event goes out once per response: a second one is not sent.
    pub async fn publish(
        &self,
        response_id: Uuid,
        event: &ResponseEvent,
    ) -> Result<Published, EventsError> {
        self.send(response_id, None, event).await
    }

    /// Publish as run `run` of the response: refused unless the fence names that run (see
    /// [`EventPublisher::fence`]) and the response's terminal event has not gone out.
    pub async fn publish_as(
        &self,
        response_id: Uuid,
        run: i32,
        event: &ResponseEvent,
    ) -> Result<Published, EventsError> {
        self.send(response_id, Some(run), event).await
    }

    /// Let run `run` publish from now on: the fence moves forward to it (never back), so the
    /// events of any earlier run are refused. Returns the run the fence names afterwards (a
    /// later one than `run` when another run took over meanwhile).
    pub async fn fence(&self, response_id: Uuid, run: i32) -> Result<i32, EventsError> {
        let mut conn = self.redis.conn().await?;
        Ok(self
            .fence_script
            .key(self.keys.fence(response_id))
            .arg(run)
            .arg(self.retention.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?)
    }

    async fn send(
        &self,
        response_id: Uuid,
        run: Option<i32>,
        event: &ResponseEvent,
    ) -> Result<Published, EventsError> {
        let payload =
            serde_json::to_string(event).map_err(|e| EventsError::Payload(e.to_string()))?;
        let mut conn = self.redis.conn().await?;
        let (status, value): (i64, String) = self
            .script
            .key(self.keys.replay(response_id))
            .key(self.keys.fence(response_id))
            .arg(self.max_len)
            .arg(&payload)
            .arg(self.retention.as_millis() as u64)
            .arg(self.keys.channel(response_id))
            .arg(run.map(|r| r.to_string()).unwrap_or_default())
            .arg(if event.is_terminal() { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await?;
        let id = || {
            EventId::parse(&value)
                .ok_or_else(|| EventsError::Payload(format!("bad stream id {value}")))
        };
        match (status, value.as_str()) {
            (1, _) => Ok(Published::Sent(id()?)),
            (2, _) => Ok(Published::AlreadyFinished(id()?)),
            (_, "nofence") => Ok(Published::NoFence),
            _ => Ok(Published::Fenced),
        }
    }
}

enum HubMsg {
    /// Behind an `Arc`: fanning out to several listeners of the same response does not copy
    /// the event, and a queued message stays small.
    Event(Arc<StoredEvent>),
    /// The hub reconnected: live events may have been missed; re-read the replay stream.
    Resync,
}

struct Listener {
    id: u64,
    tx: mpsc::Sender<HubMsg>,
    lagged: Arc<AtomicBool>,
}

struct HubInner {
    redis: Arc<RedisHandle>,
    keys: EventKeys,
    listeners: Mutex<HashMap<Uuid, Vec<Listener>>>,
    next_id: AtomicU64,
    connected: tokio::sync::watch::Sender<bool>,
    /// Subscriptions made (1 after the first connect; more after reconnects).
    subscriptions: AtomicU64,
    ping_every: Duration,
}

impl HubInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Vec<Listener>>> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dispatch(&self, response_id: Uuid, ev: StoredEvent) {
        let mut map = self.lock();
        if let Some(ls) = map.get_mut(&response_id) {
            let ev = Arc::new(ev);
            for l in ls {
                if l.tx.try_send(HubMsg::Event(ev.clone())).is_err() {
                    l.lagged.store(true, Ordering::Release);
                }
            }
        }
    }

    fn resync_all(&self) {
        let mut map = self.lock();
        for l in map.values_mut().flatten() {
            if l.tx.try_send(HubMsg::Resync).is_err() {
                l.lagged.store(true, Ordering::Release);
            }
        }
    }

    /// Drop every listener: their streams end (shutdown).
    fn close_all(&self) {
        self.lock().clear();
    }
}

/// One per API process: a single pattern subscription fanned out to SSE streams.
#[derive(Clone)]
pub struct EventHub {
    inner: Arc<HubInner>,
}

/// Removes its listener when the SSE stream is dropped (client gone).
struct ListenerGuard {
    inner: Arc<HubInner>,
    response_id: Uuid,
    id: u64,
}

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        let mut map = self.inner.lock();
        if let Some(ls) = map.get_mut(&self.response_id) {
            ls.retain(|l| l.id != self.id);
            if ls.is_empty() {
                map.remove(&self.response_id);
            }
        }
    }
}

impl EventHub {
    pub fn new(redis: Arc<RedisHandle>) -> Self {
        let keys = EventKeys::new(redis.prefix());
        let (connected, _) = tokio::sync::watch::channel(false);
        Self {
            inner: Arc::new(HubInner {
                redis,
                keys,
                listeners: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                connected,
                subscriptions: AtomicU64::new(0),
                ping_every: HUB_PING_EVERY,
            }),
        }
    }

    /// The same hub checking its connection every `every` (tests).
    pub fn with_ping_every(redis: Arc<RedisHandle>, every: Duration) -> Self {
        let mut hub = Self::new(redis);
        if let Some(inner) = Arc::get_mut(&mut hub.inner) {
            inner.ping_every = every;
        }
        hub
    }

    /// How many times the hub has subscribed (1 + reconnects).
    pub fn subscriptions(&self) -> u64 {
        self.inner.subscriptions.load(Ordering::Relaxed)
    }

    /// Number of live listeners (open SSE streams).
    pub fn listeners(&self) -> usize {
        self.inner.lock().values().map(Vec::len).sum()
    }

    /// Wait until the pattern subscription is active (at most `timeout`).
    pub async fn ready(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.connected.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The subscription loop; run it once per process, owned by the caller's task tracker.
    /// Reconnects with backoff; on `shutdown` it ends every listener's stream.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.inner.redis.pubsub().await {
                Ok(mut pubsub) => match pubsub.psubscribe(self.inner.keys.pattern()).await {
                    Ok(()) => {
                        delay = Duration::from_millis(100);
                        self.inner.subscriptions.fetch_add(1, Ordering::Relaxed);
                        self.inner.connected.send_replace(true);
                        // Anything published while we were not subscribed is in the replay streams.
                        self.inner.resync_all();
                        let (mut sink, mut messages) = pubsub.split();
                        // A half-open connection (no RST after a failover or a NAT timeout)
                        // would never end the message stream: ping it, and reconnect when the
                        // ping does not come back.
                        let mut watchdog = tokio::time::interval(self.inner.ping_every);
                        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        watchdog.tick().await;
                        loop {
                            tokio::select! {
                                _ = shutdown.cancelled() => break,
                                _ = watchdog.tick() => {
                                    let ping = tokio::time::timeout(HUB_PING_TIMEOUT, sink.ping::<redis::Value>()).await;
                                    if !matches!(ping, Ok(Ok(_))) {
                                        tracing::warn!("event hub: pub/sub connection does not answer; reconnecting");
                                        break;
                                    }
                                }
                                msg = messages.next() => match msg {
                                    Some(msg) => self.on_message(msg.get_channel_name(), msg.get_payload::<String>().ok()),
                                    None => {
                                        tracing::warn!("event hub: pub/sub connection lost; reconnecting");
                                        break;
                                    }
                                }
                            }
                        }
                        self.inner.connected.send_replace(false);
                    }
                    Err(e) => tracing::warn!(error = %e, "event hub: PSUBSCRIBE failed"),
                },
                Err(e) => tracing::warn!(error = %e, "event hub: cannot connect to Redis"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        self.inner.close_all();
    }

    fn on_message(&self, channel: &str, payload: Option<String>) {
        let Some(response_id) = self.inner.keys.response_of(channel) else {
            return;
        };
        let Some(payload) = payload else { return };
        let Some((id, json)) = payload.split_once('\t') else {
            return;
        };
        let (Some(id), Ok(event)) = (
            EventId::parse(id),
            serde_json::from_str::<ResponseEvent>(json),
        ) else {
            tracing::warn!(%channel, "event hub: unreadable event");
            return;
        };
        self.inner.dispatch(response_id, StoredEvent { id, event });
    }

    /// The events of a response recorded after `after` (all when `None`), from the replay stream.
    pub async fn replay(
        &self,
        response_id: Uuid,
        after: Option<EventId>,
    ) -> Result<Vec<StoredEvent>, EventsError> {
        let mut conn = self.inner.redis.conn().await?;
        let start = match after {
            Some(id) => format!("({id}"),
            None => "-".to_owned(),
        };
        let reply: redis::streams::StreamRangeReply = conn
            .xrange(self.inner.keys.replay(response_id), start, "+")
            .await?;
        let mut out = Vec::with_capacity(reply.ids.len());
        for entry in reply.ids {
            let Some(id) = EventId::parse(&entry.id) else {
                continue;
            };
            let Some(json) = entry.get::<String>("e") else {
                continue;
            };
            let event =
                serde_json::from_str(&json).map_err(|e| EventsError::Payload(e.to_string()))?;
            out.push(StoredEvent { id, event });
        }
        Ok(out)
    }

    /// Whether a replay stream exists for this response (within the retention window).
    pub async fn exists(&self, response_id: Uuid) -> Result<bool, EventsError> {
        let mut conn = self.inner.redis.conn().await?;
        Ok(conn.exists(self.inner.keys.replay(response_id)).await?)
    }

    /// The events of a response after `after`, replayed then live, each exactly once, ending
    /// after a terminal event or at shutdown.
    pub fn events(
        &self,
        response_id: Uuid,
        after: Option<EventId>,
    ) -> impl Stream<Item = Result<StoredEvent, EventsError>> + Send + 'static {
        // Register before reading the replay stream so that nothing published in between is lost.
        // futures' channel, not tokio's: tokio's allocates its state and a first block of 32
        // slots up front (~700 B per open stream, heaptrack); futures' allocates per queued
        // message, and an open stream spends its life with nothing queued.
        let (tx, rx) = mpsc::channel(LISTENER_BUFFER);
        let lagged = Arc::new(AtomicBool::new(false));
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner
            .lock()
            .entry(response_id)
            .or_default()
            .push(Listener {
                id,
                tx,
                lagged: lagged.clone(),
            });
        let guard = ListenerGuard {
            inner: self.inner.clone(),
            response_id,
            id,
        };
        let hub = self.clone();
        struct St {
            hub: EventHub,
            rx: mpsc::Receiver<HubMsg>,
            lagged: Arc<AtomicBool>,
            last: Option<EventId>,
            queue: std::collections::VecDeque<StoredEvent>,
            need_replay: bool,
            done: bool,
            response_id: Uuid,
            _guard: ListenerGuard,
        }
        let st = St {
            hub,
            rx,
            lagged,
            last: after,
            queue: Default::default(),
            need_replay: true,
            done: false,
            response_id,
            _guard: guard,
        };
        futures::stream::unfold(st, |mut st| async move {
            loop {
                if st.done {
                    return None;
                }
                if let Some(ev) = st.queue.pop_front() {
                    if st.last.is_some_and(|l| ev.id <= l) {
                        continue;
                    }
                    st.last = Some(ev.id);
                    st.done = ev.event.is_terminal();
                    return Some((Ok(ev), st));
                }
                if st.need_replay || st.lagged.swap(false, Ordering::AcqRel) {
                    st.need_replay = false;
                    // boxed: a stream spends its life waiting on `recv`, and an inline replay
                    // future would size every open stream's state for the Redis call
                    match Box::pin(st.hub.replay(st.response_id, st.last)).await {
                        Ok(evs) => st.queue.extend(evs),
                        Err(e) => {
                            st.done = true;
                            return Some((Err(e), st));
                        }
                    }
                    continue;
                }
                match st.rx.next().await {
                    Some(HubMsg::Event(ev)) => st.queue.push_back(Arc::unwrap_or_clone(ev)),
                    Some(HubMsg::Resync) => st.need_replay = true,
                    None => return None, // hub shut down
                }
            }
        })
    }
}
