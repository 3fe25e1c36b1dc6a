//! Redis connections.
//!
//! Two kinds: a shared, auto-reconnecting [`ConnectionManager`] for ordinary commands (with a
//! reply timeout so a stuck server fails fast), and dedicated connections without a reply
//! timeout for blocking reads (`XREADGROUP ... BLOCK`), which would otherwise be cut off by
//! redis 1.x's default 500 ms timeout.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client};
use secrecy::ExposeSecret;
use tokio::sync::OnceCell;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A lazily connected Redis handle. Creating one never touches the network, so processes start
/// while Redis is down and report it through readiness instead of crashing.
pub struct RedisHandle {
    client: Client,
    prefix: String,
    manager: OnceCell<ConnectionManager>,
}

impl RedisHandle {
    pub fn new(settings: &config::RedisSettings) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: Client::open(settings.url.expose_secret())?,
            prefix: settings.prefix.clone(),
            manager: OnceCell::new(),
        })
    }

    /// The prefix of every key and channel (`REDIS_PREFIX`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The shared connection (connects on first use; reconnects by itself afterwards).
    pub async fn conn(&self) -> Result<ConnectionManager, redis::RedisError> {
        self.manager
            .get_or_try_init(|| async {
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(REPLY_TIMEOUT))
                    .set_number_of_retries(2);
                ConnectionManager::new_with_config(self.client.clone(), cfg).await
            })
            .await
            .cloned()
    }

    /// A new connection with no reply timeout, for blocking commands only.
    pub async fn blocking_conn(&self) -> Result<MultiplexedConnection, redis::RedisError> {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None);
        self.client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
    }

    /// A dedicated pub/sub connection.
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, redis::RedisError> {
        self.client.get_async_pubsub().await
    }

    /// `PING`, bounded in time: used by readiness checks.
    pub async fn ping(&self) -> Result<(), redis::RedisError> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }
}
