//! Model-wide cooldowns after a 429, shared by every worker through Redis: admission, and the
//! one probe after a cooldown.

use std::sync::Arc;
use std::time::Duration;

use jobs::RedisHandle;

/// Cooldown after a 429 that named no `Retry-After`.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(2);

/// Model-wide cooldowns in Redis, shared by every worker so that a rate-limited model is not
/// hammered by the others. Three keys per model, one slot (`<prefix>:{model:<model>}:…`):
/// - `cooldown`: set by a 429 for its `Retry-After`; nobody calls the model while it lasts;
/// - `probation`: set with it, and kept until a call goes through again: when the cooldown is
///   over, ONE call (the probe) tries the model while the others wait — a model that is still
///   rate limited gets about one call per cooldown, not one per waiting job;
/// - `probe`: the probe in flight (expires after `probe_limit`, should its caller die).
#[derive(Clone)]
pub struct Cooldowns {
    redis: Arc<RedisHandle>,
    start: Arc<redis::Script>,
    admit: Arc<redis::Script>,
    probe_limit: Duration,
}

/// How long a model stays on probation after its cooldown, at most, without a call.
const PROBATION: Duration = Duration::from_secs(60);
/// While another job's probe is in flight, look again after at most this long.
const PROBE_POLL: Duration = Duration::from_millis(500);

/// Extend, never shorten: a later, shorter `Retry-After` does not cut an earlier cooldown. The
/// probe in flight (if the 429 was its answer) is over.
/// KEYS: cooldown, probation, probe. ARGV: cooldown_ms, probation_ms.
const START_LUA: &str = r#"
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
end
redis.call('DEL', KEYS[3])
return 1
"#;

/// May a job call the model now? `{0, wait_ms}`: no (cooling down, or another job's probe is in
/// flight); `{1, 0}`: yes; `{2, 0}`: yes, as the probe after a cooldown.
/// KEYS: cooldown, probation, probe. ARGV: probe_ms, poll_ms.
const ADMIT_LUA: &str = r#"
local left = redis.call('PTTL', KEYS[1])
if left > 0 then return {0, left} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {1, 0} end
if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[1]) then return {2, 0} end
local p = redis.call('PTTL', KEYS[3])
if p <= 0 or p > tonumber(ARGV[2]) then p = tonumber(ARGV[2]) end
return {0, p}
"#;

/// What [`Cooldowns::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Call the model. `probe`: the first call after a cooldown — report its outcome
    /// ([`Cooldowns::start`] on a 429, else [`Cooldowns::recovered`]).
    Call { probe: bool },
    /// Do not call it yet: look again after this long.
    Wait(Duration),
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Cooldowns {
    /// `probe_limit`: how long a probe may take before another job may probe (the first-token
    /// limit of a model call, `MODEL_TIMEOUT_SECS`).
    pub fn new(redis: Arc<RedisHandle>, probe_limit: Duration) -> Self {
        Self {
            redis,
            start: Arc::new(redis::Script::new(START_LUA)),
            admit: Arc::new(redis::Script::new(ADMIT_LUA)),
            probe_limit,
        }
    }

    fn keys(&self, model: &str) -> [String; 3] {
        let base = format!("{}:{{model:{model}}}", self.redis.prefix());
        [
            format!("{base}:cooldown"),
            format!("{base}:probation"),
            format!("{base}:probe"),
        ]
    }

    /// The cooldown key of `model` (tests end a cooldown by deleting it).
    pub fn key(&self, model: &str) -> String {
        let [cooldown, _, _] = self.keys(model);
        cooldown
    }

    /// How long `model` still cools down (`None`: it does not).
    pub async fn remaining(&self, model: &str) -> Result<Option<Duration>, redis::RedisError> {
        let mut conn = self.redis.conn().await?;
        let ms: i64 = redis::cmd("PTTL")
            .arg(self.key(model))
            .query_async(&mut conn)
            .await?;
        Ok((ms > 0).then(|| Duration::from_millis(ms as u64)))
    }

    /// Whether a job may call `model` now (see [`Admission`]).
    pub async fn admit(&self, model: &str) -> Result<Admission, redis::RedisError> {
        let [cooldown, probation, probe] = self.keys(model);
        let mut conn = self.redis.conn().await?;
        let (verdict, wait): (i64, i64) = self
            .admit
            .key(cooldown)
            .key(probation)
            .key(probe)
            .arg(ms(self.probe_limit))
            .arg(ms(PROBE_POLL))
            .invoke_async(&mut conn)
            .await?;
        Ok(match verdict {
            1 => Admission::Call { probe: false },
            2 => Admission::Call { probe: true },
            // (jittered: the jobs waiting for a probe do not all look again at once)
            _ => Admission::Wait(Duration::from_millis(
                u64::try_from(wait)
                    .unwrap_or(1)
                    .max(1)
                    .saturating_add(rand::random_range(0..=PROBE_POLL.as_millis() as u64 / 2)),
            )),
        })
    }

    /// Start (or extend) the cooldown of `model` for `for_` (a 429), with its probation.
    pub async fn start(&self, model: &str, for_: Duration) -> Result<(), redis::RedisError> {
        let [cooldown, probation, probe] = self.keys(model);
        let mut conn = self.redis.conn().await?;
        let _: i64 = self
            .start
            .key(cooldown)
            .key(probation)
            .key(probe)
            .arg(ms(for_))
            .arg(ms(for_ + PROBATION))
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The probe's call was not rate limited: everyone may call `model` again.
    pub async fn recovered(&self, model: &str) -> Result<(), redis::RedisError> {
        let [_, probation, probe] = self.keys(model);
        let mut conn = self.redis.conn().await?;
        let _: i64 = redis::cmd("DEL")
            .arg(probation)
            .arg(probe)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    /// After a cooldown, one job probes the model while the others wait; once the probe went
    /// through, everyone calls again (against the real Redis).
    #[tokio::test]
    async fn after_a_cooldown_one_probe_goes_first() {
        let redis = testkit::TestRedis::new();
        let handle = Arc::new(RedisHandle::new(&redis.settings()).unwrap());
        let c = Cooldowns::new(handle, Duration::from_secs(30));
        let model = "m";
        assert_eq!(
            c.admit(model).await.unwrap(),
            Admission::Call { probe: false }
        );
        c.start(model, Duration::from_millis(200)).await.unwrap();
        assert!(matches!(c.admit(model).await.unwrap(), Admission::Wait(_)));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            c.admit(model).await.unwrap(),
            Admission::Call { probe: true }
        );
        let Admission::Wait(poll) = c.admit(model).await.unwrap() else {
            panic!("a second job must wait for the probe");
        };
        assert!(poll <= PROBE_POLL * 3 / 2, "{poll:?}");
        // the probe is rate limited again: a new cooldown, and a new probe after it
        c.start(model, Duration::from_millis(100)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            c.admit(model).await.unwrap(),
            Admission::Call { probe: true }
        );
        c.recovered(model).await.unwrap();
        for _ in 0..3 {
            assert_eq!(
                c.admit(model).await.unwrap(),
                Admission::Call { probe: false }
            );
        }
    }
}
