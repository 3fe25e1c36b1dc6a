//! A worker process exposes Prometheus metrics: bus counters and histograms by queue and kind,
//! and queue depths refreshed at scrape time.

use std::sync::Arc;
use std::time::Duration;

use jobs::kinds::Probe;
use testkit::{TestDb, TestRedis};

use crate::process::{command, lines, sigterm, wait_exit, wait_for};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn a_worker_serves_bus_metrics() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let port = free_port();
    let mut child = command(env!("CARGO_BIN_EXE_worker"), &db, &redis)
        .env("WORKER_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .spawn()
        .unwrap();
    let rx = lines(&mut child);
    wait_for(&rx, "worker ready", Duration::from_secs(20));

    let handle = Arc::new(jobs::RedisHandle::new(&redis.settings()).unwrap());
    let settings = testkit::test_settings(&db, &redis, &[]);
    let bus = jobs::Bus::new(handle, &settings.queues);
    for i in 0..3 {
        bus.enqueue(Probe::new(format!("m{i}"))).await.unwrap();
    }
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = http.get(&url).send().await.unwrap().text().await.unwrap();
        if text
            .lines()
            .any(|l| l.starts_with("bus_jobs_completed_total") && l.trim_end().ends_with(" 3"))
        {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "probes not completed; metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let completed = text
        .lines()
        .find(|l| l.starts_with("bus_jobs_completed_total"))
        .unwrap();
    assert!(
        completed.contains(r#"kind="probe""#) && completed.contains(r#"queue="actions""#),
        "{completed}"
    );
    assert!(text.contains("bus_job_pickup_seconds_bucket"), "{text}");
    assert!(text.contains("bus_job_duration_seconds_bucket"), "{text}");
    for q in ["chat", "memory", "index", "actions"] {
        for gauge in ["bus_queue_length", "bus_queue_lag"] {
            let series = format!(r#"{gauge}{{queue="{q}"}}"#);
            assert!(text.contains(&series), "{series} missing:\n{text}");
        }
    }
    let dead_line = text
        .lines()
        .find(|l| l.starts_with(r#"bus_queue_dead{queue="actions"}"#))
        .unwrap();
    assert!(dead_line.trim_end().ends_with(" 0"), "{dead_line}");
    assert!(
        !text.contains(&redis.prefix),
        "no key names or ids in labels"
    );

    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(20)).success());
}

/// The trace context travels in the envelope: the worker's log lines for a job carry its
/// trace id (the API puts the request's trace there; see api's e2e tests).
#[tokio::test]
async fn a_jobs_log_lines_carry_the_trace_id_of_its_envelope() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let mut child = command(env!("CARGO_BIN_EXE_worker"), &db, &redis)
        .env("LOG_FILTER", "info,jobs=debug")
        .spawn()
        .unwrap();
    let rx = lines(&mut child);
    wait_for(&rx, "worker ready", Duration::from_secs(20));
    let handle = Arc::new(jobs::RedisHandle::new(&redis.settings()).unwrap());
    let settings = testkit::test_settings(&db, &redis, &[]);
    let bus = jobs::Bus::new(handle, &settings.queues);
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let env = jobs::Envelope::new(Probe::new("traced"))
        .with_trace(Some(format!("00-{trace_id}-00f067aa0ba902b7-01")));
    bus.enqueue_envelope(&env).await.unwrap();
    let seen = wait_for(&rx, "job done", Duration::from_secs(20));
    let line: serde_json::Value = serde_json::from_str(seen.last().unwrap()).unwrap();
    let spans = line["spans"].as_array().expect("span list in JSON logs");
    let job = spans
        .iter()
        .find(|s| s["name"] == "job")
        .expect("the job span");
    assert_eq!(job["trace_id"], trace_id.as_str(), "{line}");
    assert_eq!(job["job_id"], env.id.to_string().as_str(), "{line}");
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(20)).success());
}
