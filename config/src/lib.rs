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
    ("REGISTER_IP_MAX", "auth.register_ip_max", Kind::Int),
    (
        "REGISTER_WINDOW_SECS",
        "auth.register_window_secs",
        Kind::Int,
    ),
    (
        "PASSWORD_HASH_CONCURRENCY",
        "auth.password_hash_concurrency",
        Kind::Int,
    ),
    ("PASSWORD_HASH_QUEUE", "auth.password_hash_queue", Kind::Int),
    ("TRUSTED_PROXIES", "api.trusted_proxies", Kind::Str),
    ("API_ADDR", "api.addr", Kind::Str),
    ("MAX_BODY_BYTES", "api.max_body_bytes", Kind::Int),
    ("MAX_UPLOAD_BYTES", "api.max_upload_bytes", Kind::Int),
    (
        "API_SHUTDOWN_TIMEOUT_SECS",
        "api.shutdown_timeout_secs",
        Kind::Int,
    ),
    ("MAX_HEADER_BYTES", "api.max_header_bytes", Kind::Int),
    (
        "HEADER_READ_TIMEOUT_SECS",
        "api.header_read_timeout_secs",
        Kind::Int,
    ),
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
    ("INDEX_CHUNK_TOKENS", "index.chunk_tokens", Kind::Int),
    (
        "INDEX_CHUNK_OVERLAP_TOKENS",
        "index.chunk_overlap_tokens",
        Kind::Int,
    ),
    ("INDEX_BATCH_SOURCES", "index.batch_sources", Kind::Int),
    ("INDEX_EMBED_BATCH", "index.embed_batch", Kind::Int),
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
    (
        "SUMMARIZE_THRESHOLD",
        "memory.summarize_threshold",
        Kind::Int,
    ),
    ("MEMORY_TOKEN_BUDGET", "memory.token_budget", Kind::Int),
    ("MEMORY_CAPACITY_ORG", "memory.capacity_org", Kind::Int),
    (
        "MEMORY_CAPACITY_PROJECT",
        "memory.capacity_project",
        Kind::Int,
    ),
    ("MEMORY_CAPACITY_USER", "memory.capacity_user", Kind::Int),
    (
        "MEMORY_CAPACITY_PROJECT_PER_AUTHOR",
        "memory.capacity_project_per_author",
        Kind::Int,
    ),
    ("EMBEDDING_MODEL", "embedding.model", Kind::Str),
    ("EMBEDDING_DIM", "embedding.dim", Kind::Int),
    ("RETRIEVAL_TOP_K", "retrieval.top_k", Kind::Int),
    (
        "RETRIEVAL_TOKEN_BUDGET",
        "retrieval.token_budget",
        Kind::Int,
    ),
    ("RETRIEVAL_EF_SEARCH", "retrieval.ef_search", Kind::Int),
    (
        "RETRIEVAL_MAX_SCAN_TUPLES",
        "retrieval.max_scan_tuples",
        Kind::Int,
    ),
    (
        "RETRIEVAL_EXACT_MAX_ROWS",
        "retrieval.exact_max_rows",
        Kind::Int,
    ),
    (
        "RETRIEVAL_STOPWORD_MIN_ROWS",
        "retrieval.stopword_min_rows",
        Kind::Int,
    ),
    ("EVENTS_RETENTION_SECS", "events.retention_secs", Kind::Int),
    ("TOOL_MAX_ROUNDS", "tools.max_rounds", Kind::Int),
    ("ACTION_EXPIRY_SECS", "tools.action_expiry_secs", Kind::Int),
    ("LEDGER_LEASE_SECS", "ledger.lease_secs", Kind::Int),
    (
        "RECONCILE_INTERVAL_MS",
        "ledger.reconcile_interval_ms",
        Kind::Int,
    ),
    ("RECONCILE_GRACE_SECS", "ledger.grace_secs", Kind::Int),
    ("MAX_RECOVERIES", "ledger.max_recoveries", Kind::Int),
    (
        "IDEMPOTENCY_RETENTION_SECS",
        "ledger.idempotency_retention_secs",
        Kind::Int,
    ),
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
    pub retrieval: RetrievalSettings,
    pub memory: MemorySettings,
    pub events: EventsSettings,
    pub log: LogSettings,
    pub queues: QueuesSettings,
    pub tools: ToolsSettings,
    pub ledger: LedgerSettings,
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
    /// Registrations allowed per client IP within `register_window_secs` before 429.
    pub register_ip_max: u32,
    /// Length of the registration-throttling window, in seconds.
    pub register_window_secs: u64,
    /// Password hashes (argon2) computed at once; 0: one per CPU core.
    pub password_hash_concurrency: usize,
    /// Requests that may wait for a hashing slot; past that, 503 with `Retry-After`.
    pub password_hash_queue: usize,
}

impl AuthSettings {
    /// [`AuthSettings::password_hash_concurrency`], with 0 resolved to the machine's cores.
    pub fn hash_slots(&self) -> usize {
        match self.password_hash_concurrency {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// An IP network (`10.0.0.0/8`, `::1/128`; a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn parse(s: &str) -> Option<Self> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.trim(), Some(p.trim())),
            None => (s.trim(), None),
        };
        let addr: std::net::IpAddr = addr.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Self { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Parse a comma-separated list of IP networks (`TRUSTED_PROXIES`).
pub fn parse_ip_nets(list: &str) -> Result<Vec<IpNet>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| IpNet::parse(s).ok_or_else(|| format!("{s:?} is not an IP address or network")))
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    pub addr: String,
    pub max_body_bytes: usize,
    pub max_upload_bytes: usize,
    /// How long a stopping API lets in-flight requests finish before it closes their
    /// connections (`API_SHUTDOWN_TIMEOUT_SECS`).
    pub shutdown_timeout_secs: u64,
    /// Longest request head (request line and headers) accepted (`MAX_HEADER_BYTES`); longer
    /// ones are answered 431.
    pub max_header_bytes: usize,
    /// A connection that takes longer to send a request head, or stays idle between requests
    /// that long, is closed (`HEADER_READ_TIMEOUT_SECS`).
    pub header_read_timeout_secs: u64,
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
    /// Peers (IP addresses or networks, comma-separated) whose `X-Forwarded-For` is believed:
    /// a request from one of them is attributed to the client that header names (per-IP
    /// throttles). Empty: the socket's peer is the client.
    #[serde(default)]
    pub trusted_proxies: String,
}

impl ApiSettings {
    /// [`ApiSettings::trusted_proxies`], parsed (validated at load).
    pub fn trusted_proxy_nets(&self) -> Vec<IpNet> {
        parse_ip_nets(&self.trusted_proxies).unwrap_or_default()
    }
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
    /// Token budget of one chunk; tokens are approximated as characters / 4.
    pub chunk_tokens: usize,
    /// Tokens (characters / 4) repeated from the end of a chunk at the start of the next one.
    pub chunk_overlap_tokens: usize,
    /// Outbox sources one index batch (one transaction) processes.
    pub batch_sources: usize,
    /// Inputs per embedding request.
    pub embed_batch: usize,
    /// Attempts at indexing one source before its outbox rows are dead-lettered.
    pub source_max_attempts: u32,
    /// Seconds a source that failed waits before its next attempt (doubling per attempt).
    pub source_retry_secs: u64,
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

/// The assistant's tools and supervised writes (docs/ARCHITECTURE.md, "Scope and tools").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolsSettings {
    /// Tool-call rounds one turn may run; then the model must answer without tools.
    pub max_rounds: u32,
    /// A pending proposal expires this long after it was made.
    pub action_expiry_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSettings {
    pub model: String,
    pub dim: u32,
}

/// Retrieval in the chat turn (store::retrieval; docs/ARCHITECTURE.md, "Retrieval").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalSettings {
    /// Chunks retrieved per turn (after fusion), at most.
    pub top_k: u32,
    /// Rows taken from each list (vector, full text) before reciprocal rank fusion.
    pub candidates: u32,
    /// Estimated tokens (4 characters each) of the prompt's workspace-data section, at most.
    pub token_budget: u32,
    /// `hnsw.ef_search` of the vector scan.
    pub ef_search: u32,
    /// `hnsw.max_scan_tuples`: how far an iterative scan walks for a restrictive filter.
    pub max_scan_tuples: u32,
    /// A user who sees at most this many chunks is searched exactly (no HNSW); 0: never.
    pub exact_max_rows: u32,
    /// A question's term found in more than 2 % of all chunks and in more than this many is
    /// left out of the full-text query (a corpus stopword); 0: never.
    pub stopword_min_rows: u32,
    /// The query's embedding call gives up after this; the turn then uses full text only.
    pub embed_timeout_ms: u64,
}

/// Conversation memory (`[memory]`): summary + recent, and the hierarchical memory entries
/// (docs/ARCHITECTURE.md, "Memory").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySettings {
    /// Messages older than the `RECENT_MESSAGES` window and not yet summarized; at this many a
    /// finished turn enqueues a `summarize` job (`SUMMARIZE_THRESHOLD`).
    pub summarize_threshold: usize,
    /// Messages one summarize run folds at most (the rest waits for the next run).
    pub summarize_batch: usize,
    /// The running summary is cut to this many characters.
    pub summary_max_chars: usize,
    /// Tokens (estimated as characters / 4) the memory entries may take in a prompt
    /// (`MEMORY_TOKEN_BUDGET`).
    pub token_budget: usize,
    /// Entries kept per owner and tier; the oldest go beyond (`MEMORY_CAPACITY_ORG`, ...).
    pub capacity_org: u32,
    pub capacity_project: u32,
    pub capacity_user: u32,
    /// Project entries one author may hold in one project; their oldest go beyond, so one
    /// member cannot fill a project's capacity and evict the others' facts
    /// (`MEMORY_CAPACITY_PROJECT_PER_AUTHOR`).
    pub capacity_project_per_author: u32,
    /// A new fact closer than this cosine distance to an entry of the same owner refreshes
    /// that entry instead of adding one.
    pub dedup_distance: f64,
    /// Whether finished turns enqueue a `remember` job (fact extraction).
    pub remember: bool,
}

impl MemorySettings {
    /// The capacity of a tier (`org`, `project`, `user`).
    pub fn capacity(&self, tier: &str) -> u32 {
        match tier {
            "org" => self.capacity_org,
            "project" => self.capacity_project,
            _ => self.capacity_user,
        }
    }
}

/// PostgreSQL as the ledger of in-flight work (docs/ARCHITECTURE.md, "The ledger"): run leases
/// and the scheduler's reconciler.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSettings {
    /// A running response's lease; its run renews it every third of this. A run that stops
    /// renewing (its worker died) is taken over after at most this long.
    pub lease_secs: u64,
    /// How often the reconciler (in the scheduler leader) looks for lost work.
    pub reconcile_interval_ms: u64,
    /// Work handed to a job this long ago whose job is not on the bus any more is re-enqueued
    /// (the time an API process has between its commit and its enqueue).
    pub grace_secs: u64,
    /// Re-enqueues of one response (or action, or summary fold) before it fails for good.
    pub max_recoveries: u32,
    /// How long an `Idempotency-Key` of `POST .../messages` is kept (at least).
    pub idempotency_retention_secs: u64,
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
            self.api.header_read_timeout_secs,
            "HEADER_READ_TIMEOUT_SECS",
        )?;
        if self.api.max_header_bytes < 1024 {
            return Err(ConfigError::invalid(
                "MAX_HEADER_BYTES",
                "must be at least 1024",
            ));
        }
        positive(
            self.api.sse_max_streams_per_user as u64,
            "SSE_MAX_STREAMS_PER_USER",
        )?;
        positive(self.index.interval_secs, "INDEX_INTERVAL_SECS")?;
        positive(self.ledger.lease_secs, "LEDGER_LEASE_SECS")?;
        positive(self.ledger.reconcile_interval_ms, "RECONCILE_INTERVAL_MS")?;
        positive(self.ledger.grace_secs, "RECONCILE_GRACE_SECS")?;
        positive(u64::from(self.ledger.max_recoveries), "MAX_RECOVERIES")?;
        if self.ledger.idempotency_retention_secs < 86_400 {
            return Err(ConfigError::invalid(
                "IDEMPOTENCY_RETENTION_SECS",
                "must be at least 86400 (a day): clients retry with the same key for that long",
            ));
        }
        positive(self.index.chunk_tokens as u64, "INDEX_CHUNK_TOKENS")?;
        if self.index.chunk_overlap_tokens >= self.index.chunk_tokens {
            return Err(ConfigError::invalid(
                "INDEX_CHUNK_OVERLAP_TOKENS",
                "must be smaller than INDEX_CHUNK_TOKENS",
            ));
        }
        if self.index.chunk_tokens > MAX_CHUNK_TOKENS {
            // a chunk's text feeds the `embeddings.tsv` column (PostgreSQL: 1 MB at most)
            return Err(ConfigError::invalid(
                "INDEX_CHUNK_TOKENS",
                format!("must be at most {MAX_CHUNK_TOKENS}"),
            ));
        }
        positive(
            u64::from(self.index.source_max_attempts),
            "index.source_max_attempts",
        )?;
        positive(self.index.batch_sources as u64, "INDEX_BATCH_SOURCES")?;
        positive(self.index.embed_batch as u64, "INDEX_EMBED_BATCH")?;
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
        positive(
            self.memory.summarize_threshold as u64,
            "SUMMARIZE_THRESHOLD",
        )?;
        positive(self.memory.summarize_batch as u64, "memory.summarize_batch")?;
        positive(
            self.memory.summary_max_chars as u64,
            "memory.summary_max_chars",
        )?;
        for (name, v) in [
            ("MEMORY_CAPACITY_ORG", self.memory.capacity_org),
            ("MEMORY_CAPACITY_PROJECT", self.memory.capacity_project),
            ("MEMORY_CAPACITY_USER", self.memory.capacity_user),
            (
                "MEMORY_CAPACITY_PROJECT_PER_AUTHOR",
                self.memory.capacity_project_per_author,
            ),
        ] {
            positive(u64::from(v), name)?;
        }
        if self.memory.capacity_project_per_author > self.memory.capacity_project {
            return Err(ConfigError::invalid(
                "MEMORY_CAPACITY_PROJECT_PER_AUTHOR",
                format!(
                    "must be at most MEMORY_CAPACITY_PROJECT ({}), got {}",
                    self.memory.capacity_project, self.memory.capacity_project_per_author
                ),
            ));
        }
        if !(0.0..=2.0).contains(&self.memory.dedup_distance) {
            return Err(ConfigError::invalid(
                "memory.dedup_distance",
                "must be a cosine distance between 0 and 2",
            ));
        }
        positive(self.events.replay_max_len, "events.replay_max_len")?;
        positive(u64::from(self.tools.max_rounds), "TOOL_MAX_ROUNDS")?;
        positive(self.tools.action_expiry_secs, "ACTION_EXPIRY_SECS")?;
        positive(
            u64::from(self.auth.login_max_failures),
            "LOGIN_MAX_FAILURES",
        )?;
        positive(
            u64::from(self.auth.login_ip_max_failures),
            "LOGIN_IP_MAX_FAILURES",
        )?;
        positive(self.auth.login_window_secs, "LOGIN_WINDOW_SECS")?;
        positive(u64::from(self.auth.register_ip_max), "REGISTER_IP_MAX")?;
        positive(self.auth.register_window_secs, "REGISTER_WINDOW_SECS")?;
        parse_ip_nets(&self.api.trusted_proxies)
            .map_err(|e| ConfigError::invalid("TRUSTED_PROXIES", e))?;
        positive(u64::from(self.retrieval.candidates), "retrieval.candidates")?;
        positive(
            u64::from(self.retrieval.token_budget),
            "RETRIEVAL_TOKEN_BUDGET",
        )?;
        positive(
            self.retrieval.embed_timeout_ms,
            "retrieval.embed_timeout_ms",
        )?;
        if self.retrieval.top_k > 100 {
            return Err(ConfigError::invalid(
                "RETRIEVAL_TOP_K",
                "must be at most 100",
            ));
        }
        if !(1..=1000).contains(&self.retrieval.ef_search) {
            return Err(ConfigError::invalid(
                "RETRIEVAL_EF_SEARCH",
                "must be between 1 and 1000",
            ));
        }
        positive(
            u64::from(self.retrieval.max_scan_tuples),
            "RETRIEVAL_MAX_SCAN_TUPLES",
        )?;
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

/// Bound on `INDEX_CHUNK_TOKENS` (32 KiB of text per chunk).
pub const MAX_CHUNK_TOKENS: usize = 8192;

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
        assert_eq!(s.retrieval.top_k, 6);
        assert_eq!(s.retrieval.token_budget, 1500);
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
    fn tool_settings_default_and_override() {
        let s = load(&[]).unwrap();
        assert_eq!(s.tools.max_rounds, 4);
        assert_eq!(s.tools.action_expiry_secs, 86400);
        let s = load(&[("TOOL_MAX_ROUNDS", "2"), ("ACTION_EXPIRY_SECS", "60")]).unwrap();
        assert_eq!((s.tools.max_rounds, s.tools.action_expiry_secs), (2, 60));
        let e = load(&[("ACTION_EXPIRY_SECS", "0")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ACTION_EXPIRY_SECS"), "{e}");
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
    fn index_chunking_settings_load_and_are_checked() {
        let s = load(&[
            ("INDEX_CHUNK_TOKENS", "100"),
            ("INDEX_CHUNK_OVERLAP_TOKENS", "10"),
            ("INDEX_BATCH_SOURCES", "16"),
            ("INDEX_EMBED_BATCH", "8"),
        ])
        .unwrap();
        assert_eq!(s.index.chunk_tokens, 100);
        assert_eq!(s.index.chunk_overlap_tokens, 10);
        assert_eq!(s.index.batch_sources, 16);
        assert_eq!(s.index.embed_batch, 8);
        let e = load(&[
            ("INDEX_CHUNK_TOKENS", "10"),
            ("INDEX_CHUNK_OVERLAP_TOKENS", "10"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("INDEX_CHUNK_OVERLAP_TOKENS"), "{e}");
        let e = load(&[("INDEX_EMBED_BATCH", "0")]).unwrap_err().to_string();
        assert!(e.contains("INDEX_EMBED_BATCH"), "{e}");
    }

    #[test]
    fn retrieval_settings_load_from_the_environment_and_are_checked() {
        let s = load(&[
            ("RETRIEVAL_TOP_K", "3"),
            ("RETRIEVAL_TOKEN_BUDGET", "800"),
            ("RETRIEVAL_EF_SEARCH", "64"),
            ("RETRIEVAL_MAX_SCAN_TUPLES", "5000"),
            ("RETRIEVAL_EXACT_MAX_ROWS", "0"),
            ("RETRIEVAL_STOPWORD_MIN_ROWS", "500"),
        ])
        .unwrap();
        assert_eq!(s.retrieval.exact_max_rows, 0);
        assert_eq!(s.retrieval.stopword_min_rows, 500);
        assert_eq!(s.retrieval.top_k, 3);
        assert_eq!(s.retrieval.token_budget, 800);
        assert_eq!(s.retrieval.ef_search, 64);
        assert_eq!(s.retrieval.max_scan_tuples, 5000);
        for (name, bad) in [
            ("RETRIEVAL_TOP_K", "101"),
            ("RETRIEVAL_TOKEN_BUDGET", "0"),
            ("RETRIEVAL_EF_SEARCH", "5000"),
            ("RETRIEVAL_MAX_SCAN_TUPLES", "0"),
        ] {
            let e = load(&[(name, bad)]).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }

    #[test]
    fn memory_settings_load_from_env_and_are_checked() {
        let s = load(&[]).unwrap();
        assert_eq!(s.memory.summarize_threshold, 6);
        assert_eq!(s.memory.capacity("user"), 50);
        assert_eq!(s.memory.capacity_project_per_author, 20);
        assert!((s.memory.dedup_distance - 0.1).abs() < 1e-9);
        let s = load(&[
            ("SUMMARIZE_THRESHOLD", "3"),
            ("MEMORY_TOKEN_BUDGET", "100"),
            ("MEMORY_CAPACITY_ORG", "7"),
            ("MEMORY_CAPACITY_PROJECT", "8"),
            ("MEMORY_CAPACITY_USER", "9"),
            ("MEMORY_CAPACITY_PROJECT_PER_AUTHOR", "4"),
        ])
        .unwrap();
        assert_eq!(s.memory.capacity_project_per_author, 4);
        assert_eq!(s.memory.summarize_threshold, 3);
        assert_eq!(s.memory.token_budget, 100);
        assert_eq!(
            (
                s.memory.capacity("org"),
                s.memory.capacity("project"),
                s.memory.capacity("user")
            ),
            (7, 8, 9)
        );
        for name in [
            "SUMMARIZE_THRESHOLD",
            "MEMORY_CAPACITY_USER",
            "MEMORY_CAPACITY_PROJECT_PER_AUTHOR",
        ] {
            let e = load(&[(name, "0")]).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
        let e = load(&[
            ("MEMORY_CAPACITY_PROJECT", "10"),
            ("MEMORY_CAPACITY_PROJECT_PER_AUTHOR", "11"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("MEMORY_CAPACITY_PROJECT_PER_AUTHOR") && e.contains("at most"),
            "{e}"
        );
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
