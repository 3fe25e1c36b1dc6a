//! Throttles of the expensive unauthenticated endpoints, counted in Redis.
//!
//! **Login.** Attempts are counted per email address and per client IP within a window
//! (`auth.login_window_secs`). An attempt is counted *before* the password is checked, one
//! atomic step per counter, so concurrent attempts can never all pass a check made before any
//! of them was recorded: of 40 simultaneous wrong logins for one email, at most
//! `LOGIN_MAX_FAILURES` reach the password check, the others answer 429 with `Retry-After`
//! until the window ends — even with the right password. A successful login clears the
//! email's counter and gives its attempt back to the IP's (so the counters hold failures, as
//! configured). Every counter is one key, changed by a single-key script, so this works on
//! Redis Cluster (no transaction spans two keys).
//!
//! **Registration.** Counted per client IP (`auth.register_ip_max` per
//! `auth.register_window_secs`) before the password is hashed.
//!
//! Keys: `{REDIS_PREFIX}:login:fail:email:{sha256(lowercased email)}`,
//! `{REDIS_PREFIX}:login:fail:ip:{ip}`, `{REDIS_PREFIX}:register:ip:{ip}`. The client IP comes
//! from [`crate::client_ip`].

use std::net::IpAddr;
use std::sync::LazyLock;

use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

/// Count one attempt: `INCR`, and start the window on the first one (also when a key lost its
/// expiry). Returns the count and the milliseconds left in the window.
static COUNT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        local n = redis.call('INCR', KEYS[1])
        local ttl = redis.call('PTTL', KEYS[1])
        if ttl < 0 then
            redis.call('PEXPIRE', KEYS[1], ARGV[1])
            ttl = tonumber(ARGV[1])
        end
        return {n, ttl}
        ",
    )
});

/// Give one attempt back (never below zero, never creating the key).
static REFUND: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        local n = tonumber(redis.call('GET', KEYS[1]) or '0')
        if n > 0 then redis.call('DECR', KEYS[1]) end
        return n
        ",
    )
});

fn unavailable(e: redis::RedisError) -> ApiError {
    tracing::error!(error = %e, "redis unavailable for throttling");
    ApiError::Unavailable("sign-in is temporarily unavailable".into())
}

/// Count one attempt on `key`; 429 (with the window's remaining seconds) past `max`.
async fn count(state: &AppState, key: &str, max: u32, window_secs: u64) -> Result<(), ApiError> {
    let mut conn = state.redis.conn().await.map_err(unavailable)?;
    let (n, ttl_ms): (u64, i64) = COUNT
        .key(key)
        .arg(window_secs.saturating_mul(1000))
        .invoke_async(&mut conn)
        .await
        .map_err(unavailable)?;
    if n > u64::from(max) {
        let retry_after_secs = u64::try_from(ttl_ms).unwrap_or(0).div_ceil(1000).max(1);
        return Err(ApiError::TooManyRequests { retry_after_secs });
    }
    Ok(())
}

pub struct LoginThrottle<'a> {
    state: &'a AppState,
    email_key: String,
    ip_key: Option<String>,
}

impl<'a> LoginThrottle<'a> {
    pub fn new(state: &'a AppState, email: &str, ip: Option<IpAddr>) -> Self {
        let prefix = state.redis.prefix();
        let digest = Sha256::digest(email.trim().to_lowercase().as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Self {
            state,
            email_key: format!("{prefix}:login:fail:email:{hex}"),
            ip_key: ip.map(|ip| format!("{prefix}:login:fail:ip:{ip}")),
        }
    }

    /// Count this attempt against the client IP, then the email; 429 when either is over its
    /// limit. Call before checking the password.
    pub async fn attempt(&self) -> Result<(), ApiError> {
        let auth = &self.state.settings.auth;
        if let Some(ip_key) = &self.ip_key {
            count(
                self.state,
                ip_key,
                auth.login_ip_max_failures,
                auth.login_window_secs,
            )
            .await?;
        }
        count(
            self.state,
            &self.email_key,
            auth.login_max_failures,
            auth.login_window_secs,
        )
        .await
    }

    /// The password was right: the email's failures are forgotten, and the IP gets this
    /// attempt back (its other failures stay: they may be someone else's guesses).
    pub async fn succeeded(&self) -> Result<(), ApiError> {
        let mut conn = self.state.redis.conn().await.map_err(unavailable)?;
        let () = redis::cmd("DEL")
            .arg(&self.email_key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if let Some(ip_key) = &self.ip_key {
            let _: i64 = REFUND
                .key(ip_key)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }
}

/// Count one registration from `ip`; 429 past `auth.register_ip_max` in the window.
pub async fn registration(state: &AppState, ip: Option<IpAddr>) -> Result<(), ApiError> {
    let Some(ip) = ip else { return Ok(()) };
    let key = format!("{}:register:ip:{ip}", state.redis.prefix());
    let auth = &state.settings.auth;
    count(state, &key, auth.register_ip_max, auth.register_window_secs).await
}
