//! Typed settings for every Switchboard process.
//!
//! Layers, later ones win: the defaults compiled in from `config/default.toml` → the file
//! named by `SWITCHBOARD_CONFIG` (or `config/default.toml` in the working directory, when it
//! exists) → environment variables with the fixed names of [`ENV_MAP`].
//!
//! Secrets are [`SecretString`]s: their `Debug` prints `[REDACTED]`, so a settings dump in a
//! log never carries them. Every error names the setting (and the environment variable that
//! set it) so that a bad deployment fails at start with a message an operator can act on.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

/// The compiled-in defaults: the repository's `config/default.toml`.
pub const DEFAULTS_TOML: &str = include_str!("../default.toml");

/// Environment variable → settings path, and how its value is read.
pub const ENV_MAP: &[(&str, &str, Kind)] = &[
    ("DATABASE_URL", "database.url", Kind::Str),
    (
        "DATABASE_MAX_CONNECTIONS",
        "database.max_connections",
        Kind::Int,
    ),
    ("REDIS_URL", "redis.url", Kind::Str),
    ("REDIS_PREFIX", "redis.prefix", Kind::Str),
    ("LITELLM_BASE_URL", "litellm.base_url", Kind::Str),
    ("LITELLM_API_KEY", "litellm.api_key", Kind::Str),
    ("JWT_SECRET", "auth.jwt_secret", Kind::Str),
    ("JWT_ALGORITHM", "auth.jwt_algorithm", Kind::Str),
    ("JWT_PUBLIC_KEY_PATH", "auth.jwt_public_key_path", Kind::Str),
    (
        "JWT_PRIVATE_KEY_PATH",
        "auth.jwt_private_key_path",
        Kind::Str,
    ),
    ("JWT_ISSUER", "auth.jwt_issuer", Kind::Str),
    ("JWT_AUDIENCE", "auth.jwt_audience", Kind::Str),
    ("TOKEN_TTL_SECS", "auth.token_ttl_secs", Kind::Int),
    ("LOGIN_MAX_FAILURES", "auth.login_max_failures", Kind::Int),
    (
        "LOGIN_IP_MAX_FAILURES",
        "auth.login_ip_max_failures",
        Kind::Int,
    ),
    ("LOGIN_WINDOW_SECS", "auth.login_window_secs", Kind::Int),
    ("API_ADDR", "api.addr", Kind::Str),
    ("MAX_BODY_BYTES", "api.max_body_bytes", Kind::Int),
    ("MAX_UPLOAD_BYTES", "api.max_upload_bytes", Kind::Int),
    ("JSON_WAIT_SECS", "api.json_wait_secs", Kind::Int),
    ("MESSAGE_RATE_LIMIT", "api.message_rate_limit", Kind::Int),
    ("SSE_KEEP_ALIVE_SECS", "api.sse_keep_alive_secs", Kind::Int),
    (
        "SSE_MAX_STREAMS_PER_USER",
        "api.sse_max_streams_per_user",
        Kind::Int,
    ),
    ("WORKER_CONCURRENCY", "worker.concurrency", Kind::Int),
    ("WORKER_METRICS_ADDR", "worker.metrics_addr", Kind::Str),
    (
        "SCHEDULER_METRICS_ADDR",
        "scheduler.metrics_addr",
        Kind::Str,
    ),
    ("INDEX_INTERVAL_SECS", "index.interval_secs", Kind::Int),
    ("RECENT_MESSAGES", "chat.recent_messages", Kind::Int),
    ("MODEL_TIMEOUT_SECS", "chat.model_timeout_secs", Kind::Int),
    ("DEFAULT_MODEL", "chat.default_model", Kind::Str),
    (
        "DEFAULT_FALLBACK_MODEL",
        "chat.default_fallback_model",
        Kind::Str,
    ),
    (
        "RATE_LIMIT_MAX_WAIT_SECS",
        "chat.rate_limit_max_wait_secs",
        Kind::Int,
    ),
    ("EMBEDDING_MODEL", "embedding.model", Kind::Str),
    ("EMBEDDING_DIM", "embedding.dim", Kind::Int),
    ("EVENTS_RETENTION_SECS", "events.retention_secs", Kind::Int),
    ("LOG_FORMAT", "log.format", Kind::Str),
    ("LOG_FILTER", "log.filter", Kind::Str),
];

/// How an environment value is turned into a TOML value before typing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Str,
    Int,
}

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
    fn invalid(setting: impl Into<String>, message: impl Into<String>) -> Self {
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
    pub events: EventsSettings,
    pub log: LogSettings,
    pub queues: QueuesSettings,
}

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
    pub url: SecretString,
    pub prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LitellmSettings {
    pub base_url: String,
    #[serde(default)]
    pub api_key: Option<SecretString>,
    pub request_timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    #[serde(default)]
    pub jwt_secret: Option<SecretString>,
    pub jwt_algorithm: JwtAlgorithm,
    #[serde(default)]
    pub jwt_public_key_path: Option<PathBuf>,
    #[serde(default)]
    pub jwt_private_key_path: Option<PathBuf>,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    pub token_ttl_secs: u64,
    /// Failed logins allowed per email address within `login_window_secs` before 429.
    pub login_max_failures: u32,
    /// Failed logins allowed per client IP within `login_window_secs` before 429.
    pub login_ip_max_failures: u32,
    /// Length of the login-throttling window, in seconds.
    pub login_window_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    pub addr: String,
    pub max_body_bytes: usize,
    pub max_upload_bytes: usize,
    pub shutdown_timeout_secs: u64,
    pub json_wait_secs: u64,
    /// Messages one user may post per minute (`MESSAGE_RATE_LIMIT`); then 429.
    pub message_rate_limit: u32,
    /// Interval of the SSE keep-alive comments (`SSE_KEEP_ALIVE_SECS`).
    pub sse_keep_alive_secs: u64,
    /// Event streams one user may hold open at once in one API process
    /// (`SSE_MAX_STREAMS_PER_USER`); then 429.
    pub sse_max_streams_per_user: usize,
    /// How long the proxy's model list is cached for model-settings checks.
    pub models_cache_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub concurrency: usize,
    pub shutdown_grace_secs: u64,
    pub metrics_addr: String,
    /// How long one blocking `XREADGROUP` waits for a job; also bounds how long a stopping
    /// worker waits for a read already sent to Redis.
    pub read_block_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSettings {
    pub metrics_addr: String,
    /// Time to live of the leader lease; the leader renews it every third of this.
    pub lease_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexSettings {
    pub interval_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatSettings {
    pub recent_messages: usize,
    pub model_timeout_secs: u64,
    pub default_model: String,
    pub default_fallback_model: String,
    pub temperature: f64,
    pub max_tokens: u32,
    /// How long a chat turn may wait on rate limits (429s and model cooldowns), counted from
    /// the response's creation, before the user gets a `rate_limited` error.
    pub rate_limit_max_wait_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSettings {
    pub model: String,
    pub dim: u32,
}

/// Response events (SSE): the per-response replay stream behind `Last-Event-ID`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSettings {
    /// How long a response's events stay replayable after its last event.
    pub retention_secs: u64,
    /// Cap of one response's replay stream (entries, approximate).
    pub replay_max_len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub filter: String,
}

/// The bus's per-queue knobs (`[queues.<name>]`): retries and crash recovery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuesSettings {
    pub chat: QueueSettings,
    pub memory: QueueSettings,
    pub index: QueueSettings,
    pub actions: QueueSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    /// Attempts in all (first delivery included) before a job goes to the dead letters.
    pub max_attempts: u32,
    /// Backoff before retry n (n >= 1): up to `min(cap, base * 2^(n-1))`.
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    pub jitter: Jitter,
    /// A delivered job not acknowledged for this long is reclaimed by another consumer.
    pub visibility_timeout_secs: u64,
}

/// How a backoff delay is randomised: `full` = uniform in `[0, delay]` (the default), `none` =
/// exactly `delay` (deterministic; for tests and diagnosis).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    Full,
    None,
}

impl QueuesSettings {
    /// The settings of a queue by its name (`chat`, `memory`, `index`, `actions`).
    pub fn get(&self, name: &str) -> Option<&QueueSettings> {
        match name {
            "chat" => Some(&self.chat),
            "memory" => Some(&self.memory),
            "index" => Some(&self.index),
            "actions" => Some(&self.actions),
            _ => None,
        }
    }

    fn all(&self) -> [(&'static str, &QueueSettings); 4] {
        [
            ("chat", &self.chat),
            ("memory", &self.memory),
            ("index", &self.index),
            ("actions", &self.actions),
        ]
    }
}

impl Settings {
    /// Load from the process environment (the normal entry point of every binary).
    pub fn load() -> Result<Self, ConfigError> {
        let file = match std::env::var_os("SWITCHBOARD_CONFIG") {
            Some(p) => Some(PathBuf::from(p)),
            None => {
                let p = Path::new("config/default.toml");
                p.exists().then(|| p.to_path_buf())
            }
        };
        Self::load_from(file.as_deref(), |name| std::env::var(name).ok())
    }

    /// Load with an explicit file and environment lookup (tests use this).
    pub fn load_from(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut table = parse_table(DEFAULTS_TOML, "(built-in defaults)")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
                path: path.to_path_buf(),
                source,
            })?;
            let overlay = parse_table(&text, &path.display().to_string())?;
            merge(&mut table, overlay);
        }
        let mut from_env: Vec<(&str, &str)> = Vec::new();
        for (name, path, kind) in ENV_MAP {
            let Some(raw) = env(name) else { continue };
            let value = match kind {
                Kind::Str => toml::Value::String(raw),
                Kind::Int => raw
                    .trim()
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .map_err(|_| {
                        ConfigError::invalid(*name, format!("expected a whole number, got {raw:?}"))
                    })?,
            };
            set_path(&mut table, path, value);
            from_env.push((name, path));
        }
        let settings: Settings = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let path = e.path().to_string();
                let setting = from_env
                    .iter()
                    .find(|(_, p)| *p == path)
                    .map(|(name, p)| format!("{name} ({p})"))
                    .or_else(|| env_name(&path).map(|n| format!("{path} (env {n})")))
                    .unwrap_or(path);
                ConfigError::invalid(setting, e.into_inner().to_string())
            })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks that need more than a type: ranges, URLs, addresses, key material.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_url(
            self.database.url.expose_secret(),
            "DATABASE_URL",
            &["postgres", "postgresql"],
        )?;
        check_url(
            self.redis.url.expose_secret(),
            "REDIS_URL",
            &["redis", "rediss"],
        )?;
        check_url(
            &self.litellm.base_url,
            "LITELLM_BASE_URL",
            &["http", "https"],
        )?;
        if self.redis.prefix.is_empty()
            || !self
                .redis
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.'))
        {
            return Err(ConfigError::invalid(
                "REDIS_PREFIX",
                "must be non-empty and use only letters, digits, '_', '-', ':' or '.'",
            ));
        }
        parse_addr(&self.api.addr, "API_ADDR")?;
        parse_addr(&self.worker.metrics_addr, "WORKER_METRICS_ADDR")?;
        parse_addr(&self.scheduler.metrics_addr, "SCHEDULER_METRICS_ADDR")?;
        positive(
            self.database.max_connections as u64,
            "DATABASE_MAX_CONNECTIONS",
        )?;
        positive(self.worker.concurrency as u64, "WORKER_CONCURRENCY")?;
        positive(u64::from(self.api.message_rate_limit), "MESSAGE_RATE_LIMIT")?;
        positive(self.api.sse_keep_alive_secs, "SSE_KEEP_ALIVE_SECS")?;
        positive(
            self.api.sse_max_streams_per_user as u64,
            "SSE_MAX_STREAMS_PER_USER",
        )?;
        positive(self.index.interval_secs, "INDEX_INTERVAL_SECS")?;
        positive(self.worker.read_block_ms, "worker.read_block_ms")?;
        positive(self.scheduler.lease_secs, "scheduler.lease_secs")?;
        for (name, q) in self.queues.all() {
            positive(
                q.max_attempts as u64,
                &format!("queues.{name}.max_attempts"),
            )?;
            positive(q.backoff_base_ms, &format!("queues.{name}.backoff_base_ms"))?;
            positive(
                q.visibility_timeout_secs,
                &format!("queues.{name}.visibility_timeout_secs"),
            )?;
            if q.backoff_cap_ms < q.backoff_base_ms {
                return Err(ConfigError::invalid(
                    format!("queues.{name}.backoff_cap_ms"),
                    "must not be smaller than backoff_base_ms",
                ));
            }
        }
        positive(self.chat.recent_messages as u64, "RECENT_MESSAGES")?;
        positive(self.chat.model_timeout_secs, "MODEL_TIMEOUT_SECS")?;
        positive(
            self.chat.rate_limit_max_wait_secs,
            "RATE_LIMIT_MAX_WAIT_SECS",
        )?;
        positive(self.api.max_upload_bytes as u64, "MAX_UPLOAD_BYTES")?;
        positive(self.api.max_body_bytes as u64, "MAX_BODY_BYTES")?;
        positive(self.auth.token_ttl_secs, "TOKEN_TTL_SECS")?;
        positive(self.events.retention_secs, "EVENTS_RETENTION_SECS")?;
        positive(self.events.replay_max_len, "events.replay_max_len")?;
        positive(
            u64::from(self.auth.login_max_failures),
            "LOGIN_MAX_FAILURES",
        )?;
        positive(
            u64::from(self.auth.login_ip_max_failures),
            "LOGIN_IP_MAX_FAILURES",
        )?;
        positive(self.auth.login_window_secs, "LOGIN_WINDOW_SECS")?;
        if !(1..=16_000).contains(&self.embedding.dim) {
            return Err(ConfigError::invalid(
                "EMBEDDING_DIM",
                "must be between 1 and 16000",
            ));
        }
        for (name, value) in [
            ("DEFAULT_MODEL", &self.chat.default_model),
            ("DEFAULT_FALLBACK_MODEL", &self.chat.default_fallback_model),
            ("EMBEDDING_MODEL", &self.embedding.model),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::invalid(name, "must not be empty"));
            }
        }
        if !(0.0..=2.0).contains(&self.chat.temperature) {
            return Err(ConfigError::invalid(
                "chat.temperature",
                "must be between 0 and 2",
            ));
        }
        if let Some(secret) = &self.auth.jwt_secret
            && self.auth.jwt_algorithm == JwtAlgorithm::HS256
            && secret.expose_secret().len() < 32
        {
            return Err(ConfigError::invalid(
                "JWT_SECRET",
                "must be at least 32 characters for HS256",
            ));
        }
        Ok(())
    }

    /// The socket address the API binds.
    pub fn api_addr(&self) -> SocketAddr {
        // validated in `validate`
        parse_addr(&self.api.addr, "API_ADDR")
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    /// What the API needs for signing and verifying tokens; checked when the API starts so
    /// that workers, which never see tokens, do not need a JWT secret.
    pub fn require_jwt(&self) -> Result<(), ConfigError> {
        match self.auth.jwt_algorithm {
            JwtAlgorithm::HS256 if self.auth.jwt_secret.is_none() => Err(ConfigError::invalid(
                "JWT_SECRET",
                "is required (HS256); set it to a random string of at least 32 characters",
            )),
            JwtAlgorithm::RS256 if self.auth.jwt_public_key_path.is_none() => {
                Err(ConfigError::invalid(
                    "JWT_PUBLIC_KEY_PATH",
                    "is required when JWT_ALGORITHM=RS256",
                ))
            }
            _ => Ok(()),
        }
    }
}

/// The environment variable that sets a settings path, if any.
pub fn env_name(path: &str) -> Option<&'static str> {
    ENV_MAP
        .iter()
        .find(|(_, p, _)| *p == path)
        .map(|(n, _, _)| *n)
}

fn parse_table(text: &str, origin: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
        origin: origin.to_owned(),
        message: e.message().to_owned(),
    })
}

fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

fn set_path(table: &mut toml::Table, path: &str, value: toml::Value) {
    let mut parts = path.split('.').peekable();
    let mut current = table;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            current.insert(part.to_owned(), value);
            return;
        }
        let entry = current
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        current = next;
    }
}

fn check_url(raw: &str, name: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let url =
        Url::parse(raw).map_err(|e| ConfigError::invalid(name, format!("not a URL ({e})")))?;
    if !schemes.contains(&url.scheme()) {
        return Err(ConfigError::invalid(
            name,
            format!("scheme must be one of {}", schemes.join(", ")),
        ));
    }
    Ok(())
}

fn parse_addr(raw: &str, name: &str) -> Result<SocketAddr, ConfigError> {
    raw.parse::<SocketAddr>()
        .map_err(|_| ConfigError::invalid(name, format!("expected host:port, got {raw:?}")))
}

fn positive(v: u64, name: &str) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(ConfigError::invalid(name, "must be greater than 0"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::load_from(None, |k| env.get(k).cloned())
    }

    #[test]
    fn defaults_load_and_match_the_contract() {
        let s = load(&[]).unwrap();
        assert_eq!(s.api.addr, "127.0.0.1:8080");
        assert_eq!(s.redis.prefix, "sb");
        assert_eq!(s.index.interval_secs, 300);
        assert_eq!(s.chat.recent_messages, 12);
        assert_eq!(s.api.max_upload_bytes, 10 * 1024 * 1024);
        assert_eq!(s.embedding.dim, 384);
        assert_eq!(s.auth.login_max_failures, 5);
        assert_eq!(s.auth.login_ip_max_failures, 50);
        assert_eq!(s.auth.login_window_secs, 900);
        assert_eq!(s.queues.chat.jitter, Jitter::Full);
        assert_eq!(s.api.sse_max_streams_per_user, 100);
        assert!(s.queues.get("index").is_some());
        assert!(s.queues.get("nope").is_none());
    }

    #[test]
    fn environment_overrides_file_and_defaults() {
        let s = load(&[
            ("API_ADDR", "0.0.0.0:9000"),
            ("RECENT_MESSAGES", "5"),
            ("REDIS_PREFIX", "test_1"),
            ("EMBEDDING_DIM", "768"),
            ("SSE_MAX_STREAMS_PER_USER", "3"),
        ])
        .unwrap();
        assert_eq!(s.api.sse_max_streams_per_user, 3);
        let e = load(&[("SSE_MAX_STREAMS_PER_USER", "0")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("SSE_MAX_STREAMS_PER_USER"), "{e}");
        assert_eq!(s.api.addr, "0.0.0.0:9000");
        assert_eq!(s.chat.recent_messages, 5);
        assert_eq!(s.redis.prefix, "test_1");
        assert_eq!(s.embedding.dim, 768);
    }

    #[test]
    fn file_layer_sits_between_defaults_and_env() {
        let dir = std::env::temp_dir().join(format!("sbcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[chat]\nrecent_messages = 7\nmax_tokens = 99\n").unwrap();
        let s = Settings::load_from(Some(&file), |k| {
            (k == "RECENT_MESSAGES").then(|| "3".to_string())
        })
        .unwrap();
        assert_eq!(s.chat.recent_messages, 3);
        assert_eq!(s.chat.max_tokens, 99);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn errors_name_the_setting() {
        let e = load(&[("RECENT_MESSAGES", "lots")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RECENT_MESSAGES"), "{e}");
        let e = load(&[("API_ADDR", "nowhere")]).unwrap_err().to_string();
        assert!(e.contains("API_ADDR"), "{e}");
        let e = load(&[("DATABASE_URL", "mysql://x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("DATABASE_URL"), "{e}");
        let e = load(&[("JWT_SECRET", "short")]).unwrap_err().to_string();
        assert!(e.contains("JWT_SECRET"), "{e}");
        let e = load(&[("WORKER_CONCURRENCY", "0")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("WORKER_CONCURRENCY"), "{e}");
        let e = load(&[("LOG_FORMAT", "xml")]).unwrap_err().to_string();
        assert!(e.contains("LOG_FORMAT"), "{e}");
        let e = load(&[("LOGIN_MAX_FAILURES", "0")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("LOGIN_MAX_FAILURES"), "{e}");
        let e = load(&[("LOGIN_WINDOW_SECS", "soon")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("LOGIN_WINDOW_SECS"), "{e}");
    }

    #[test]
    fn secrets_are_not_printed() {
        let s = load(&[
            ("JWT_SECRET", "a-very-secret-value-of-enough-length-123"),
            ("LITELLM_API_KEY", "sk-hidden-key"),
            ("DATABASE_URL", "postgres://u:pw-hidden@localhost/db"),
        ])
        .unwrap();
        let dump = format!("{s:?}");
        assert!(!dump.contains("a-very-secret-value"), "{dump}");
        assert!(!dump.contains("sk-hidden-key"), "{dump}");
        assert!(!dump.contains("pw-hidden"), "{dump}");
    }

    #[test]
    fn jwt_is_required_only_when_asked() {
        let s = load(&[]).unwrap();
        let e = s.require_jwt().unwrap_err().to_string();
        assert!(e.contains("JWT_SECRET"), "{e}");
        let s = load(&[("JWT_SECRET", "0123456789abcdef0123456789abcdef")]).unwrap();
        s.require_jwt().unwrap();
    }
}
