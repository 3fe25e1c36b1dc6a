//! Where the backing services are: PostgreSQL, Redis, the LiteLLM proxy.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: SecretString,
    pub max_connections: u32,
    pub acquire_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// One URL; in cluster mode, seed nodes separated by commas.
    pub url: SecretString,
    pub prefix: String,
    /// Speak Redis Cluster (`REDIS_CLUSTER`): `url` lists seed nodes.
    #[serde(default)]
    pub cluster: bool,
}

impl RedisSettings {
    /// The URLs of `url`: one, or in cluster mode the comma-separated seeds.
    pub fn urls(&self) -> Vec<String> {
        if self.cluster {
            self.url
                .expose_secret()
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect()
        } else {
            vec![self.url.expose_secret().to_owned()]
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LitellmSettings {
    pub base_url: String,
    #[serde(default)]
    pub api_key: Option<SecretString>,
    pub request_timeout_secs: u64,
}
