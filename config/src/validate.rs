//! Checks that need more than a type, run once at load so a bad deployment fails at start.

use std::net::SocketAddr;

use secrecy::ExposeSecret;
use url::Url;

use crate::{ConfigError, JwtAlgorithm, MAX_CHUNK_TOKENS, Settings, parse_ip_nets};

impl Settings {
    /// Checks that need more than a type: ranges, URLs, addresses, key material.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_url(
            self.database.url.expose_secret(),
            "DATABASE_URL",
            &["postgres", "postgresql"],
        )?;
        let redis_urls = self.redis.urls();
        if redis_urls.is_empty() {
            return Err(ConfigError::invalid("REDIS_URL", "names no node"));
        }
        for url in &redis_urls {
            check_url(url, "REDIS_URL", &["redis", "rediss"])?;
        }
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
        positive(
            self.budget.turn_reserve_tokens,
            "BUDGET_TURN_RESERVE_TOKENS",
        )?;
        if self.budget.turn_reserve_tokens > i32::MAX as u64 {
            return Err(ConfigError::invalid(
                "BUDGET_TURN_RESERVE_TOKENS",
                format!("must be at most {}", i32::MAX),
            ));
        }
        for (v, name) in [
            (
                self.budget.default_daily_tokens,
                "BUDGET_DEFAULT_DAILY_TOKENS",
            ),
            (
                self.budget.default_monthly_tokens,
                "BUDGET_DEFAULT_MONTHLY_TOKENS",
            ),
        ] {
            if v > crate::MAX_BUDGET_TOKENS {
                return Err(ConfigError::invalid(
                    name,
                    format!(
                        "must be at most {} (0: unlimited)",
                        crate::MAX_BUDGET_TOKENS
                    ),
                ));
            }
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
        if self.queues.partitions == 0 || self.queues.partitions > crate::MAX_PARTITIONS {
            return Err(ConfigError::invalid(
                "QUEUE_PARTITIONS",
                format!("must be between 1 and {}", crate::MAX_PARTITIONS),
            ));
        }
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
            positive(
                q.run_timeout_secs,
                &format!("queues.{name}.run_timeout_secs"),
            )?;
            if q.org_concurrency > crate::MAX_ORG_CONCURRENCY {
                let path = format!("queues.{name}.org_concurrency");
                return Err(ConfigError::invalid(
                    crate::env_name(&path).map_or(path.clone(), str::to_owned),
                    format!("must be at most {}", crate::MAX_ORG_CONCURRENCY),
                ));
            }
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
        crate::api::parse_origins(&self.api.cors_allowed_origins)
            .map_err(|e| ConfigError::invalid("CORS_ALLOWED_ORIGINS", e))?;
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
