//! Typed settings for every Switchboard process.
//!
//! Layers, later ones win: the defaults compiled in from `config/default.toml` → the file
//! named by `SWITCHBOARD_CONFIG` (or `config/default.toml` in the working directory, when it
//! exists) → environment variables with the fixed names of [`ENV_MAP`].
//!
//! Secrets are [`secrecy::SecretString`]s: their `Debug` prints `[REDACTED]`, so a settings
//! dump in a log never carries them. Every error names the setting (and the environment variable
//! that set it) so that a bad deployment fails at start with a message an operator can act on.

mod api;
mod assistant;
mod auth;
mod env;
mod load;
mod runtime;
mod services;
mod validate;

#[cfg(test)]
mod tests;

use serde::Deserialize;
use std::path::PathBuf;

pub use api::{ApiSettings, IpNet, parse_ip_nets, parse_origins};
pub use assistant::{
    ChatSettings, EmbeddingSettings, IndexSettings, MAX_CHUNK_TOKENS, MemorySettings,
    RetrievalSettings, ToolsSettings,
};
pub use auth::{AuthSettings, JwtAlgorithm};
pub use env::{ENV_MAP, Kind, env_name};
pub use runtime::{
    BudgetSettings, EventsSettings, Jitter, LedgerSettings, LogFormat, LogSettings,
    MAX_ORG_CONCURRENCY, MAX_PARTITIONS, QueueSettings, QueuesSettings, SchedulerSettings,
    WorkerSettings,
};
pub use services::{DatabaseSettings, LitellmSettings, RedisSettings};

/// The largest token limit a budget may have (an org's or the operator's default).
pub const MAX_BUDGET_TOKENS: u64 = 1_000_000_000_000_000;

/// The compiled-in defaults: the repository's `config/default.toml`.
pub const DEFAULTS_TOML: &str = include_str!("../default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {origin} is not valid TOML: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid setting {setting}: {message}")]
    Invalid { setting: String, message: String },
}

impl ConfigError {
    pub(crate) fn invalid(setting: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            setting: setting.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub litellm: LitellmSettings,
    pub auth: AuthSettings,
    pub api: ApiSettings,
    pub worker: WorkerSettings,
    pub scheduler: SchedulerSettings,
    pub index: IndexSettings,
    pub chat: ChatSettings,
    pub embedding: EmbeddingSettings,
    pub retrieval: RetrievalSettings,
    pub memory: MemorySettings,
    pub events: EventsSettings,
    pub log: LogSettings,
    pub queues: QueuesSettings,
    pub tools: ToolsSettings,
    pub ledger: LedgerSettings,
    pub budget: BudgetSettings,
}
