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

#[test]
fn redis_cluster_takes_seed_nodes_and_a_clear_boolean() {
    let s = load(&[]).unwrap();
    assert!(!s.redis.cluster);
    assert_eq!(s.redis.urls(), vec!["redis://127.0.0.1:6379".to_owned()]);
    let s = load(&[
        ("REDIS_CLUSTER", "true"),
        ("REDIS_URL", "redis://a:7001, redis://b:7002,"),
    ])
    .unwrap();
    assert!(s.redis.cluster);
    assert_eq!(s.redis.urls(), vec!["redis://a:7001", "redis://b:7002"]);
    let e = load(&[("REDIS_CLUSTER", "maybe")]).unwrap_err().to_string();
    assert!(e.contains("REDIS_CLUSTER"), "{e}");
    let e = load(&[
        ("REDIS_CLUSTER", "1"),
        ("REDIS_URL", "redis://a:1,http://b:2"),
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("REDIS_URL"), "{e}");
    let e = load(&[("REDIS_CLUSTER", "yes"), ("REDIS_URL", " , ")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("REDIS_URL"), "{e}");
}

#[test]
fn cors_origins_are_empty_by_default_and_validated() {
    assert!(load(&[]).unwrap().api.cors_origins().is_empty());
    let s = load(&[(
        "CORS_ALLOWED_ORIGINS",
        " https://App.Example.com , http://127.0.0.1:5173,https://b.example:443",
    )])
    .unwrap();
    assert_eq!(
        s.api.cors_origins(),
        [
            "https://app.example.com",
            "http://127.0.0.1:5173",
            "https://b.example"
        ]
    );
    for bad in [
        "*",
        "app.example.com",
        "ftp://files.example",
        "https://app.example.com/",
        "https://app.example.com/console",
        "https://app.example.com?x=1",
        "https://user@app.example.com",
        "https://ok.example,null",
        "https://*.example.com",
    ] {
        let e = load(&[("CORS_ALLOWED_ORIGINS", bad)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("CORS_ALLOWED_ORIGINS"), "{bad}: {e}");
    }
}

#[test]
fn budget_settings_default_and_are_checked() {
    let s = load(&[]).unwrap();
    assert_eq!(s.budget.turn_reserve_tokens, 8000);
    assert_eq!(
        (
            s.budget.default_daily_tokens,
            s.budget.default_monthly_tokens
        ),
        (0, 0)
    );
    let s = load(&[
        ("BUDGET_TURN_RESERVE_TOKENS", "500"),
        ("BUDGET_DEFAULT_DAILY_TOKENS", "100000"),
        ("BUDGET_DEFAULT_MONTHLY_TOKENS", "2000000"),
    ])
    .unwrap();
    assert_eq!(
        (
            s.budget.turn_reserve_tokens,
            s.budget.default_daily_tokens,
            s.budget.default_monthly_tokens
        ),
        (500, 100_000, 2_000_000)
    );
    for (name, bad) in [
        ("BUDGET_TURN_RESERVE_TOKENS", "0"),
        ("BUDGET_TURN_RESERVE_TOKENS", "2147483648"),
        ("BUDGET_TURN_RESERVE_TOKENS", "-1"),
        ("BUDGET_DEFAULT_DAILY_TOKENS", "1000000000000000001"),
        ("BUDGET_DEFAULT_MONTHLY_TOKENS", "lots"),
    ] {
        let e = load(&[(name, bad)]).unwrap_err().to_string();
        assert!(e.contains(name), "{name}={bad}: {e}");
    }
}

#[test]
fn the_org_concurrency_cap_defaults_to_none_and_is_checked() {
    let s = load(&[]).unwrap();
    assert_eq!(s.queues.chat.org_concurrency, 0);
    let s = load(&[("CHAT_ORG_CONCURRENCY", "3")]).unwrap();
    assert_eq!(s.queues.chat.org_concurrency, 3);
    for bad in ["10001", "-1", "many"] {
        let e = load(&[("CHAT_ORG_CONCURRENCY", bad)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("CHAT_ORG_CONCURRENCY"), "{bad}: {e}");
    }
}
