//! Login throttling: failed logins are counted in Redis per email address and per client IP
//! within a window (`auth.login_window_secs`); past the limit, logins answer 429 with
//! `Retry-After` until the window ends — even with the right password.
//!
//! Keys: `{REDIS_PREFIX}:login:fail:email:{sha256(lowercased email)}` and
//! `{REDIS_PREFIX}:login:fail:ip:{ip}`.

use std::net::IpAddr;

use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

pub struct LoginThrottle<'a> {
    state: &'a AppState,
    email_key: String,
    ip_key: Option<String>,
}

fn unavailable(e: redis::RedisError) -> ApiError {
    tracing::error!(error = %e, "redis unavailable for login throttling");
    ApiError::Unavailable("login is temporarily unavailable".into())
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

    fn limits(&self) -> [(Option<&String>, u32); 2] {
        let auth = &self.state.settings.auth;
        [
            (Some(&self.email_key), auth.login_max_failures),
            (self.ip_key.as_ref(), auth.login_ip_max_failures),
        ]
    }

    /// 429 when the email or the IP is over its limit.
    pub async fn check(&self) -> Result<(), ApiError> {
        let mut conn = self.state.redis.conn().await.map_err(unavailable)?;
        for (key, max) in self.limits() {
            let Some(key) = key else { continue };
            let count: Option<u64> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if count.unwrap_or(0) >= u64::from(max) {
                let ttl: i64 = redis::cmd("TTL")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                let retry_after_secs = u64::try_from(ttl)
                    .unwrap_or(self.state.settings.auth.login_window_secs)
                    .max(1);
                return Err(ApiError::TooManyRequests { retry_after_secs });
            }
        }
        Ok(())
    }

    /// Count a failure against the email and the IP; the window starts with the first one.
    pub async fn record_failure(&self) -> Result<(), ApiError> {
        let mut conn = self.state.redis.conn().await.map_err(unavailable)?;
        let window = self.state.settings.auth.login_window_secs;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (key, _) in self.limits() {
            let Some(key) = key else { continue };
            pipe.cmd("SET")
                .arg(key)
                .arg(0)
                .arg("EX")
                .arg(window)
                .arg("NX")
                .ignore();
            pipe.cmd("INCR").arg(key).ignore();
        }
        let () = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(())
    }

    /// A successful login clears the email's failures (the IP's stay: they may be someone
    /// else's guesses).
    pub async fn clear(&self) -> Result<(), ApiError> {
        let mut conn = self.state.redis.conn().await.map_err(unavailable)?;
        let () = redis::cmd("DEL")
            .arg(&self.email_key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
