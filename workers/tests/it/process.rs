use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use testkit::{TestDb, TestRedis};

pub(crate) fn command(bin: &str, db: &TestDb, redis: &TestRedis) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", &redis.url)
        .env("REDIS_CLUSTER", redis.cluster_env())
        .env(
            "QUEUE_PARTITIONS",
            std::env::var("QUEUE_PARTITIONS").unwrap_or_else(|_| "1".into()),
        )
        .env("REDIS_PREFIX", &redis.prefix)
        .env("LOG_FORMAT", "json")
        .env("LOG_FILTER", "info")
        // no config/default.toml there: built-in defaults + environment only
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Collect stderr lines on a thread; return the receiver.
pub(crate) fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

pub(crate) fn wait_for(
    rx: &mpsc::Receiver<String>,
    needle: &str,
    timeout: Duration,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(needle);
                seen.push(line);
                if hit {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!("did not see {needle:?} within {timeout:?}; got: {seen:#?}");
}

pub(crate) fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
}

pub(crate) fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().ok();
            panic!("process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn starts_and_stops_on_sigterm(bin: &str, ready: &str) {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let mut child = command(bin, &db, &redis).spawn().unwrap();
    let rx = lines(&mut child);
    let seen = wait_for(&rx, ready, Duration::from_secs(20));
    // JSON logs when LOG_FORMAT=json
    let last: serde_json::Value = serde_json::from_str(seen.last().unwrap()).unwrap();
    assert_eq!(last["level"], "INFO");
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn worker_starts_and_stops_cleanly_on_sigterm() {
    starts_and_stops_on_sigterm(env!("CARGO_BIN_EXE_worker"), "worker ready").await;
}

#[tokio::test]
async fn scheduler_starts_and_stops_cleanly_on_sigterm() {
    starts_and_stops_on_sigterm(env!("CARGO_BIN_EXE_scheduler"), "scheduler ready").await;
}

#[tokio::test]
async fn invalid_setting_exits_with_a_message_naming_it() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let out = command(env!("CARGO_BIN_EXE_worker"), &db, &redis)
        .env("WORKER_CONCURRENCY", "many")
        .env("REDIS_URL", "redis://:hunter2-secret@127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WORKER_CONCURRENCY"), "{stderr}");
    assert!(
        !stderr.contains("hunter2-secret"),
        "secret printed: {stderr}"
    );
}
