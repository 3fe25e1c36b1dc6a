//! The per-user limit on posting messages: `api.message_rate_limit` (`MESSAGE_RATE_LIMIT`) per
//! fixed one-minute window, counted in Redis under `{REDIS_PREFIX}:ratelimit:messages:{user_id}`.
//! Past the limit: 429 `rate_limited` with `Retry-After` (the seconds left in the window).

use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

const WINDOW_SECS: u64 = 60;

/// Count one message of `user_id`; 429 when over the limit.
pub async fn message_posted(state: &AppState, user_id: Uuid) -> Result<(), ApiError> {
    let key = format!("{}:ratelimit:messages:{user_id}", state.redis.prefix());
    let unavailable = |e: redis::RedisError| {
        tracing::error!(error = %e, "redis unavailable for the message rate limit");
        ApiError::Unavailable("messaging is temporarily unavailable".into())
    };
    let mut conn = state.redis.conn().await.map_err(unavailable)?;
    let (count, ttl): (u64, i64) = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg(&key)
        .arg(0)
        .arg("EX")
        .arg(WINDOW_SECS)
        .arg("NX")
        .ignore()
        .cmd("INCR")
        .arg(&key)
        .cmd("TTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .map_err(unavailable)?;
    if count > u64::from(state.settings.api.message_rate_limit) {
        let retry_after_secs = u64::try_from(ttl).unwrap_or(WINDOW_SECS).max(1);
        return Err(ApiError::TooManyRequests { retry_after_secs });
    }
    Ok(())
}
