//! The environment variables that override settings, by fixed name.

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
    ("REDIS_CLUSTER", "redis.cluster", Kind::Bool),
    ("QUEUE_PARTITIONS", "queues.partitions", Kind::Int),
    ("CHAT_FAIR_QUEUEING", "queues.chat.fair", Kind::Bool),
    (
        "CHAT_ORG_CONCURRENCY",
        "queues.chat.org_concurrency",
        Kind::Int,
    ),
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
    (
        "CORS_ALLOWED_ORIGINS",
        "api.cors_allowed_origins",
        Kind::Str,
    ),
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
    (
        "BUDGET_TURN_RESERVE_TOKENS",
        "budget.turn_reserve_tokens",
        Kind::Int,
    ),
    (
        "BUDGET_DEFAULT_DAILY_TOKENS",
        "budget.default_daily_tokens",
        Kind::Int,
    ),
    (
        "BUDGET_DEFAULT_MONTHLY_TOKENS",
        "budget.default_monthly_tokens",
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
    /// `true`/`false` (also `1`/`0`, `yes`/`no`, any case).
    Bool,
}

/// The environment variable that sets a settings path, if any.
pub fn env_name(path: &str) -> Option<&'static str> {
    ENV_MAP
        .iter()
        .find(|(_, p, _)| *p == path)
        .map(|(n, _, _)| *n)
}
