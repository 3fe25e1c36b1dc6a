//! Redis connections, to one node or to a Redis Cluster (`REDIS_CLUSTER`).
//!
//! Two kinds: a shared, auto-reconnecting connection for ordinary commands (with a reply timeout
//! so a stuck server fails fast), and dedicated connections without a reply timeout for blocking
//! reads (`XREADGROUP ... BLOCK`), which would otherwise be cut off by redis 1.x's default
//! 500 ms timeout. Both come as a [`RedisConn`], which every caller drives through
//! `redis::AsyncCommands` whatever the topology. In cluster mode the redis crate routes each
//! command, script and transaction by its keys' slot; one that spans slots fails with
//! `CROSSSLOT` (every key of one queue or one response shares a hash tag: `crate::queue`,
//! `crate::events`).

use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisFuture, Value};
use tokio::sync::OnceCell;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// A blocking read's connection in cluster mode: the cluster client needs some reply timeout;
/// the reader bounds each read itself (`crate::worker`), well below this.
const BLOCKING_REPLY_TIMEOUT: Duration = Duration::from_secs(3600);

/// A connection to one node or to the cluster; cheap to clone (all kinds are multiplexed).
#[derive(Clone)]
pub enum RedisConn {
    /// The shared, reconnecting connection to one node.
    Manager(ConnectionManager),
    /// A dedicated connection to one node (blocking reads).
    Multiplexed(MultiplexedConnection),
    /// A cluster connection: one connection per node, commands routed by slot.
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Manager(c) => c.req_packed_command(cmd),
            RedisConn::Multiplexed(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Manager(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Multiplexed(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Manager(c) => c.get_db(),
            RedisConn::Multiplexed(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

enum Topology {
    Single(Box<Client>),
    Cluster(Box<ClusterClients>),
}

struct ClusterClients {
    /// Ordinary commands (reply timeout [`REPLY_TIMEOUT`]).
    shared: ClusterClient,
    /// Blocking reads.
    blocking: ClusterClient,
    /// The seeds, for the pub/sub client (built per subscriber: it carries its sender).
    seeds: Vec<String>,
}

/// A lazily connected Redis handle. Creating one never touches the network, so processes start
/// while Redis is down and report it through readiness instead of crashing.
pub struct RedisHandle {
    topology: Topology,
    prefix: String,
    shared: OnceCell<RedisConn>,
}

impl RedisHandle {
    pub fn new(settings: &config::RedisSettings) -> Result<Self, redis::RedisError> {
        let urls = settings.urls();
        let topology = if settings.cluster {
            let builder = || {
                ClusterClientBuilder::new(urls.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .retries(4)
            };
            Topology::Cluster(Box::new(ClusterClients {
                shared: builder().response_timeout(REPLY_TIMEOUT).build()?,
                blocking: builder().response_timeout(BLOCKING_REPLY_TIMEOUT).build()?,
                seeds: urls,
            }))
        } else {
            let url = urls.into_iter().next().unwrap_or_default();
            Topology::Single(Box::new(Client::open(url)?))
        };
        Ok(Self {
            topology,
            prefix: settings.prefix.clone(),
            shared: OnceCell::new(),
        })
    }

    /// The prefix of every key and channel (`REDIS_PREFIX`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether this handle speaks Redis Cluster (`REDIS_CLUSTER`).
    pub fn is_cluster(&self) -> bool {
        matches!(self.topology, Topology::Cluster(_))
    }

    /// The shared connection (connects on first use; reconnects by itself afterwards).
    pub async fn conn(&self) -> Result<RedisConn, redis::RedisError> {
        self.shared
            .get_or_try_init(|| async {
                match &self.topology {
                    Topology::Single(client) => {
                        let cfg = ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(CONNECT_TIMEOUT))
                            .set_response_timeout(Some(REPLY_TIMEOUT))
                            .set_number_of_retries(2);
                        ConnectionManager::new_with_config(Client::clone(client), cfg)
                            .await
                            .map(RedisConn::Manager)
                    }
                    Topology::Cluster(c) => c
                        .shared
                        .get_async_connection()
                        .await
                        .map(RedisConn::Cluster),
                }
            })
            .await
            .cloned()
    }

    /// A new connection with no reply timeout, for blocking commands only.
    pub async fn blocking_conn(&self) -> Result<RedisConn, redis::RedisError> {
        match &self.topology {
            Topology::Single(client) => {
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(None);
                client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .map(RedisConn::Multiplexed)
            }
            Topology::Cluster(c) => c
                .blocking
                .get_async_connection()
                .await
                .map(RedisConn::Cluster),
        }
    }

    /// A dedicated pub/sub connection to one node (single-node mode; `None` in cluster mode,
    /// where [`RedisHandle::cluster_pubsub`] serves).
    pub async fn pubsub(&self) -> Option<Result<redis::aio::PubSub, redis::RedisError>> {
        match &self.topology {
            Topology::Single(client) => Some(client.get_async_pubsub().await),
            Topology::Cluster(_) => None,
        }
    }

    /// A cluster connection speaking RESP3 whose pushes (sharded messages, and a
    /// `Disconnection` when a node's connection drops) go to `sender`. It keeps one connection
    /// per node, subscribes each `SSUBSCRIBE` on the node owning the channel's slot, and
    /// resubscribes by itself after a reconnect, a failover or a slot move. `None` on a single node.
    pub async fn cluster_pubsub(
        &self,
        sender: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
    ) -> Option<Result<ClusterConnection, redis::RedisError>> {
        let Topology::Cluster(c) = &self.topology else {
            return None;
        };
        let client = ClusterClientBuilder::new(c.seeds.clone())
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(REPLY_TIMEOUT)
            .retries(4)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(sender)
            .build();
        Some(match client {
            Ok(c) => c.get_async_connection().await,
            Err(e) => Err(e),
        })
    }

    /// `PING`, bounded in time: used by readiness checks. In cluster mode the redis crate
    /// sends it to every primary and answers only when all do: a process is ready only while
    /// every shard is reachable (with a shard down, some queues and responses cannot be served).
    pub async fn ping(&self) -> Result<(), redis::RedisError> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }
}
