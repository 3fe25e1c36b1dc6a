//! The chat turn's model policy: which models, model-wide cooldowns after a 429, and when
//! waiting on rate limits turns into an error.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use jobs::RedisHandle;

/// Cooldown after a 429 that named no `Retry-After`.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(2);

/// The models of one turn: the primary, and the fallback tried once when the primary fails
/// (absent when it would be the same model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Models {
    pub primary: String,
    pub fallback: Option<String>,
}

impl Models {
    /// The org's choice, each half defaulting to the configured one.
    pub fn choose(org: (Option<String>, Option<String>), chat: &config::ChatSettings) -> Self {
        let non_empty = |m: Option<String>| m.filter(|m| !m.trim().is_empty());
        let primary = non_empty(org.0).unwrap_or_else(|| chat.default_model.clone());
        let fallback = non_empty(org.1)
            .or_else(|| non_empty(Some(chat.default_fallback_model.clone())))
            .filter(|f| *f != primary);
        Self { primary, fallback }
    }
}

/// Model-wide cooldowns in Redis (`<prefix>:cooldown:<model>`, a key with a TTL), shared by
/// every worker so that a rate-limited model is not hammered by the others.
#[derive(Clone)]
pub struct Cooldowns {
    redis: Arc<RedisHandle>,
    script: Arc<redis::Script>,
}

/// Extend, never shorten: a later, shorter `Retry-After` does not cut an earlier cooldown.
const SET_COOLDOWN_LUA: &str = r#"
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 1
"#;

impl Cooldowns {
    pub fn new(redis: Arc<RedisHandle>) -> Self {
        Self {
            redis,
            script: Arc::new(redis::Script::new(SET_COOLDOWN_LUA)),
        }
    }

    pub fn key(&self, model: &str) -> String {
        format!("{}:cooldown:{model}", self.redis.prefix())
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

    /// Start (or extend) the cooldown of `model` for `for_`.
    pub async fn start(&self, model: &str, for_: Duration) -> Result<(), redis::RedisError> {
        let mut conn = self.redis.conn().await?;
        let ms = u64::try_from(for_.as_millis()).unwrap_or(u64::MAX).max(1);
        let _: i64 = self
            .script
            .key(self.key(model))
            .arg(ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }
}

/// What to do about a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitDecision {
    /// Re-queue the job to run after this delay.
    Wait(Duration),
    /// The turn has waited long enough: tell the user.
    GiveUp,
}

/// Decide how a turn rate-limited for `cooldown` goes on. The delay is the cooldown plus a
/// full-jitter backoff (`jitter`, from the queue's settings), so the jobs waiting for the same
/// model do not all come back at the same instant. Waiting is not failing: it uses up no
/// attempt of the job, only time — it gives up when that delay would end past `max_wait` from
/// the turn's start.
pub fn rate_limit_decision(
    cooldown: Duration,
    jitter: Duration,
    turn_started: DateTime<Utc>,
    now: DateTime<Utc>,
    max_wait: Duration,
) -> RateLimitDecision {
    let delay = cooldown + jitter;
    let waited = (now - turn_started).to_std().unwrap_or_default();
    if waited + delay > max_wait {
        RateLimitDecision::GiveUp
    } else {
        RateLimitDecision::Wait(delay)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn chat() -> config::ChatSettings {
        config::ChatSettings {
            recent_messages: 12,
            model_timeout_secs: 30,
            default_model: "d".into(),
            default_fallback_model: "df".into(),
            temperature: 0.2,
            max_tokens: 10,
            rate_limit_max_wait_secs: 120,
        }
    }

    #[test]
    fn org_models_win_and_default_per_half() {
        let m = Models::choose((Some("a".into()), Some("b".into())), &chat());
        assert_eq!(m.primary, "a");
        assert_eq!(m.fallback.as_deref(), Some("b"));
        let m = Models::choose((None, None), &chat());
        assert_eq!(
            (m.primary.as_str(), m.fallback.as_deref()),
            ("d", Some("df"))
        );
        let m = Models::choose((Some("a".into()), None), &chat());
        assert_eq!(m.fallback.as_deref(), Some("df"));
    }

    #[test]
    fn no_fallback_to_the_same_model() {
        let m = Models::choose((Some("a".into()), Some("a".into())), &chat());
        assert_eq!(m.fallback, None);
        let mut c = chat();
        c.default_fallback_model = "d".into();
        assert_eq!(Models::choose((None, None), &c).fallback, None);
    }

    #[test]
    fn waits_within_the_budget_and_gives_up_past_it() {
        let start = Utc::now();
        let s = Duration::from_secs;
        let at = |secs: i64| start + chrono::Duration::seconds(secs);
        assert_eq!(
            rate_limit_decision(s(1), s(1), start, at(0), s(120)),
            RateLimitDecision::Wait(s(2))
        );
        assert_eq!(
            rate_limit_decision(s(1), s(0), start, at(119), s(120)),
            RateLimitDecision::Wait(s(1))
        );
        assert_eq!(
            rate_limit_decision(s(2), s(0), start, at(119), s(120)),
            RateLimitDecision::GiveUp
        );
    }
}
