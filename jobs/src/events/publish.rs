//! Publishing: one Lua script appends an event to the response's replay stream and
//! `PUBLISH`es it (`SPUBLISH` on its shard channel in cluster mode) in one atomic step; a fence
//! keeps a superseded run from publishing.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::{EventId, EventKeys, EventsError, ResponseEvent};
use crate::RedisHandle;

/// Append one event to the replay stream, refresh the retention, and publish it live, in one
/// step. A run's events (ARGV[5] = its number) go out only while no later run holds the fence
/// (a fence left behind a run is moved forward to it) and no terminal event went out; a terminal event goes out once per response (`done`), and no event
/// at all follows it.
/// KEYS: replay, fence. ARGV: max_len, payload, retention_ms, channel, run ('' = unfenced),
/// terminal ('1' or '0'), how ('S': `SPUBLISH` on a shard channel of the same slot; else
/// `PUBLISH`). Returns `{1, id}` (sent), `{2, id}` (the terminal event was sent
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
  -- nothing follows the terminal event (a late `queued` included)
  return {0, 'finished'}
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2], 'r', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[6] == '1' then redis.call('HSET', KEYS[2], 'done', id) end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
if ARGV[7] == 'S' then
  redis.call('SPUBLISH', ARGV[4], id .. '\t' .. ARGV[2])
else
  redis.call('PUBLISH', ARGV[4], id .. '\t' .. ARGV[2])
end
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
    /// Cluster mode: publish on the response's shard channel.
    sharded: bool,
    max_len: u64,
    retention: Duration,
    script: Arc<redis::Script>,
    fence_script: Arc<redis::Script>,
}

impl EventPublisher {
    pub fn new(redis: Arc<RedisHandle>, settings: &config::EventsSettings) -> Self {
        let keys = EventKeys::new(redis.prefix());
        Self {
            sharded: redis.is_cluster(),
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
            .arg(if self.sharded {
                self.keys.shard_channel(response_id)
            } else {
                self.keys.channel(response_id)
            })
            .arg(run.map(|r| r.to_string()).unwrap_or_default())
            .arg(if event.is_terminal() { "1" } else { "0" })
            .arg(if self.sharded { "S" } else { "" })
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
