//! Model policy: which models a call uses ([`Models`]: the org's, defaulting to the
//! configured ones, and the fallback tried once), and when waiting on rate limits turns into an
//! error ([`rate_limit_decision`]).

use std::time::Duration;

use chrono::{DateTime, Utc};

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
