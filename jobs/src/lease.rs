//! A leader lease in Redis: `SET NX PX` to take it, a compare-and-extend script to keep it, a
//! compare-and-delete script to give it up. At most one holder at a time while clocks of Redis
//! hold; the scheduler additionally makes each tick idempotent, so a leader change mid-interval
//! cannot fire an interval twice.

use std::time::Duration;

use crate::RedisHandle;
use crate::error::BusError;
use crate::scripts;

pub struct Lease {
    key: String,
    owner: String,
    ttl: Duration,
}

impl Lease {
    /// The lease `name` under the handle's prefix (`<prefix>:lease:<name>`).
    pub fn new(redis: &RedisHandle, name: &str, owner: impl Into<String>, ttl: Duration) -> Self {
        Self {
            key: format!("{}:lease:{name}", redis.prefix()),
            owner: owner.into(),
            ttl,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Take the lease if free, extend it if ours. Returns whether we hold it now.
    pub async fn acquire_or_renew(&self, redis: &RedisHandle) -> Result<bool, BusError> {
        let mut conn = redis.conn().await?;
        let held: i64 = scripts::LEASE
            .key(&self.key)
            .arg(&self.owner)
            .arg(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX))
            .invoke_async(&mut conn)
            .await?;
        Ok(held == 1)
    }

    /// Give the lease up if ours.
    pub async fn release(&self, redis: &RedisHandle) -> Result<bool, BusError> {
        let mut conn = redis.conn().await?;
        let n: i64 = scripts::RELEASE
            .key(&self.key)
            .arg(&self.owner)
            .invoke_async(&mut conn)
            .await?;
        Ok(n == 1)
    }
}
