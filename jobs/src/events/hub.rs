//! The API process's hub: one pattern subscription fanned out to the SSE streams that listen,
//! replay after `Last-Event-ID`, then live events without loss or repetition.
//!
//! In cluster mode (`REDIS_CLUSTER`) there is no pattern subscription across shards: the hub
//! holds one RESP3 cluster connection (one connection per node inside it) and `SSUBSCRIBE`s the
//! shard channel of each response that has a listener, before that listener reads the replay
//! stream; the last listener to leave unsubscribes. Subscribing and unsubscribing go through
//! the hub's task one at a time, so an unsubscribe can never overtake a newer subscribe. The
//! redis crate resubscribes by itself after a reconnect, a failover or a slot move; every
//! dropped node connection makes the listeners re-read their replay streams.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use redis::AsyncCommands as _;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{EventId, EventKeys, EventsError, ResponseEvent, StoredEvent};
use crate::RedisHandle;

/// Buffered live events per listener before it falls back to re-reading the replay stream
/// (nothing is lost past it: the listener re-reads the replay stream). Tokens are coalesced by
/// the worker while a publish is in flight, so a response rarely has many events queued.
const LISTENER_BUFFER: usize = 64;
/// How often the hub checks its subscription connection, and how long it waits for the answer.
const HUB_PING_EVERY: Duration = Duration::from_secs(15);
const HUB_PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Cluster mode: how long a new listener waits for its shard channel's subscription.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Cluster mode: requests to the hub's task, handled one at a time in order.
enum SubCmd {
    /// Subscribe the response's shard channel; answers whether it is subscribed.
    Subscribe(Uuid, tokio::sync::oneshot::Sender<bool>),
    /// The response's last listener left: unsubscribe unless a new one came meanwhile.
    Release(Uuid),
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
    /// Cluster mode: per-response shard channels instead of one pattern.
    sharded: bool,
    sub_tx: tokio::sync::mpsc::UnboundedSender<SubCmd>,
    sub_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<SubCmd>>>,
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

    /// The listeners of one response re-read its replay stream.
    fn resync(&self, response_id: Uuid) {
        let mut map = self.lock();
        for l in map.get_mut(&response_id).into_iter().flatten() {
            if l.tx.try_send(HubMsg::Resync).is_err() {
                l.lagged.store(true, Ordering::Release);
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
                if self.inner.sharded {
                    // the hub is gone at shutdown: nothing to unsubscribe then
                    let _ = self.inner.sub_tx.send(SubCmd::Release(self.response_id));
                }
            }
        }
    }
}

impl EventHub {
    pub fn new(redis: Arc<RedisHandle>) -> Self {
        let keys = EventKeys::new(redis.prefix());
        let (connected, _) = tokio::sync::watch::channel(false);
        let (sub_tx, sub_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            inner: Arc::new(HubInner {
                sharded: redis.is_cluster(),
                sub_tx,
                sub_rx: Mutex::new(Some(sub_rx)),
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
        if self.inner.sharded {
            return self.run_sharded(shutdown).await;
        }
        let mut delay = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.inner.redis.pubsub().await {
                None => break, // not reached: a single-node handle always has pub/sub
                Some(Ok(mut pubsub)) => match pubsub.psubscribe(self.inner.keys.pattern()).await {
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
                Some(Err(e)) => tracing::warn!(error = %e, "event hub: cannot connect to Redis"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        self.inner.close_all();
    }

    /// The cluster-mode subscription loop: one RESP3 cluster connection whose pushes carry the
    /// shard channels' messages; subscribe and release requests are handled in order.
    async fn run_sharded(self, shutdown: CancellationToken) {
        let taken = self
            .inner
            .sub_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(mut requests) = taken else {
            tracing::error!("event hub: run called twice");
            return;
        };
        let mut delay = Duration::from_millis(100);
        'connect: while !shutdown.is_cancelled() {
            let (push_tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
            match self.inner.redis.cluster_pubsub(push_tx).await {
                None => break, // not reached: a cluster handle always has it
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "event hub: cannot connect to the Redis Cluster");
                }
                Some(Ok(mut conn)) => {
                    // a new connection: subscribe every response that has a listener
                    let open: Vec<Uuid> = self.inner.lock().keys().copied().collect();
                    for rid in open {
                        if let Err(e) = conn.ssubscribe(self.inner.keys.shard_channel(rid)).await {
                            tracing::warn!(error = %e, "event hub: SSUBSCRIBE failed; reconnecting");
                            tokio::select! {
                                _ = shutdown.cancelled() => {}
                                _ = tokio::time::sleep(delay) => {}
                            }
                            continue 'connect;
                        }
                    }
                    delay = Duration::from_millis(100);
                    self.inner.subscriptions.fetch_add(1, Ordering::Relaxed);
                    self.inner.connected.send_replace(true);
                    self.inner.resync_all();
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => break 'connect,
                            req = requests.recv() => match req {
                                Some(SubCmd::Subscribe(rid, done)) => {
                                    let r = conn.ssubscribe(self.inner.keys.shard_channel(rid)).await;
                                    if let Err(e) = &r {
                                        tracing::warn!(error = %e, response_id = %rid, "event hub: SSUBSCRIBE failed");
                                    }
                                    let _ = done.send(r.is_ok());
                                }
                                Some(SubCmd::Release(rid)) => {
                                    if !self.inner.lock().contains_key(&rid) {
                                        let channel = self.inner.keys.shard_channel(rid);
                                        if let Err(e) = conn.sunsubscribe(channel).await {
                                            tracing::debug!(error = %e, response_id = %rid, "event hub: SUNSUBSCRIBE failed");
                                        }
                                    }
                                }
                                None => break 'connect,
                            },
                            push = pushes.recv() => match push {
                                Some(push) => self.on_push(push),
                                None => {
                                    tracing::warn!("event hub: cluster connection ended; reconnecting");
                                    break;
                                }
                            },
                        }
                    }
                    self.inner.connected.send_replace(false);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        self.inner.connected.send_replace(false);
        self.inner.close_all();
    }

    fn on_push(&self, push: redis::PushInfo) {
        match push.kind {
            redis::PushKind::SMessage => {
                let mut data = push.data.into_iter();
                let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
                    return;
                };
                let (Ok(channel), Ok(payload)) = (
                    redis::from_redis_value::<String>(channel),
                    redis::from_redis_value::<String>(payload),
                ) else {
                    return;
                };
                if let Some(rid) = self.inner.keys.response_of_shard(&channel) {
                    self.on_event(rid, &channel, Some(payload));
                }
            }
            // A node's connection dropped: the redis crate reconnects and resubscribes (each
            // resubscription is confirmed by an `SSubscribe` push, below), and what was
            // published meanwhile is in the replay streams.
            redis::PushKind::Disconnection => {
                tracing::warn!("event hub: a cluster node's connection dropped; listeners re-read");
                self.inner.resync_all();
            }
            // A subscription confirmed — ours, or the redis crate's after a reconnect, a
            // failover or a slot move: the response's listeners re-read what was published
            // while it was not subscribed (a no-op for a new listener, which reads next anyway).
            redis::PushKind::SSubscribe => {
                if let Some(rid) = self.shard_response(push.data.first()) {
                    self.inner.resync(rid);
                }
            }
            // Unsubscribed — by us (the last listener left), or by the server when the slot
            // moved away from the node (a resharding, a manual `CLUSTER FAILOVER`), which the
            // redis crate does not undo: subscribe again while the response has listeners.
            redis::PushKind::SUnsubscribe => {
                if let Some(rid) = self.shard_response(push.data.first())
                    && self.inner.lock().contains_key(&rid)
                {
                    tracing::info!(response_id = %rid, "event hub: shard channel unsubscribed by the server; subscribing again");
                    let (done, _) = tokio::sync::oneshot::channel();
                    let _ = self.inner.sub_tx.send(SubCmd::Subscribe(rid, done));
                }
            }
            _ => {}
        }
    }

    fn shard_response(&self, channel: Option<&redis::Value>) -> Option<Uuid> {
        let channel = redis::from_redis_value_ref::<String>(channel?).ok()?;
        self.inner.keys.response_of_shard(&channel)
    }

    /// Cluster mode: subscribe the response's shard channel through the hub's task (a no-op
    /// on a single node, where the pattern covers every response).
    async fn subscribe(&self, response_id: Uuid) -> Result<(), EventsError> {
        if !self.inner.sharded {
            return Ok(());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inner
            .sub_tx
            .send(SubCmd::Subscribe(response_id, tx))
            .map_err(|_| EventsError::Subscribe("the event hub has stopped"))?;
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, rx).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(EventsError::Subscribe("Redis refused the subscription")),
            Ok(Err(_)) => Err(EventsError::Subscribe("the event hub has stopped")),
            Err(_) => Err(EventsError::Subscribe("Redis did not answer in time")),
        }
    }

    fn on_message(&self, channel: &str, payload: Option<String>) {
        let Some(response_id) = self.inner.keys.response_of(channel) else {
            return;
        };
        self.on_event(response_id, channel, payload);
    }

    fn on_event(&self, response_id: Uuid, channel: &str, payload: Option<String>) {
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
            /// Cluster mode: the shard channel is to be subscribed before the first replay.
            need_subscribe: bool,
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
            need_subscribe: self.inner.sharded,
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
                if st.need_subscribe {
                    st.need_subscribe = false;
                    if let Err(e) = Box::pin(st.hub.subscribe(st.response_id)).await {
                        st.done = true;
                        return Some((Err(e), st));
                    }
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
