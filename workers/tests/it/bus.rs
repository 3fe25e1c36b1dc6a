//! The bus with the real probe handler and PostgreSQL, consumers in-process.

use std::sync::Arc;
use std::time::Duration;

use jobs::kinds::Probe;
use jobs::{Bus, Queue, RedisHandle, Worker, WorkerOptions};
use testkit::{TestDb, TestRedis, test_settings};

pub fn bus_for(settings: &config::Settings) -> Bus {
    let handle = Arc::new(RedisHandle::new(&settings.redis).unwrap());
    Bus::new(handle, &settings.queues)
}

pub fn worker_with(db: &TestDb, settings: &config::Settings, name: &str) -> Worker {
    worker(db, settings, name)
}

fn worker(db: &TestDb, settings: &config::Settings, name: &str) -> Worker {
    let mut opts = WorkerOptions::from_settings(settings, vec![Queue::Actions]);
    opts.consumer = name.to_owned();
    opts.read_block = Duration::from_millis(200);
    Worker::new(
        bus_for(settings),
        workers::handlers::registry(db.pool.clone()),
        opts,
    )
}

async fn scalar(db: &TestDb, sql: &str, key: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(key)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn ten_thousand_jobs_over_three_consumers_are_each_handled_exactly_once() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[("WORKER_CONCURRENCY", "8")]);
    let bus = bus_for(&settings);
    let ids = workers::ops::enqueue_probes(&bus, &Probe::new("ten-k"), 10_000)
        .await
        .unwrap();
    assert_eq!(ids.len(), 10_000);

    let (a, b, c) = (
        worker(&db, &settings, "c1"),
        worker(&db, &settings, "c2"),
        worker(&db, &settings, "c3"),
    );
    let limit = Duration::from_secs(240);
    let (ra, rb, rc) = tokio::join!(
        a.drain_until_empty(limit),
        b.drain_until_empty(limit),
        c.drain_until_empty(limit)
    );
    let reports = [ra.unwrap(), rb.unwrap(), rc.unwrap()];
    let completed: u64 = reports.iter().map(|r| r.completed).sum();
    assert_eq!(completed, 10_000, "{reports:?}");
    assert!(
        reports.iter().all(|r| r.completed > 0),
        "every consumer took a share: {reports:?}"
    );
    assert!(reports.iter().all(|r| r.retried == 0 && r.dead == 0));

    let effects = scalar(
        &db,
        "SELECT count(*) FROM bus_probe_effects WHERE key = $1",
        "ten-k",
    )
    .await;
    let distinct = scalar(
        &db,
        "SELECT count(DISTINCT job_id) FROM bus_probe_effects WHERE key = $1",
        "ten-k",
    )
    .await;
    let runs = scalar(
        &db,
        "SELECT count(*) FROM bus_probe_runs WHERE key = $1",
        "ten-k",
    )
    .await;
    let total = scalar(
        &db,
        "SELECT handled FROM bus_probe_totals WHERE key = $1",
        "ten-k",
    )
    .await;
    assert_eq!((effects, distinct, total), (10_000, 10_000, 10_000));
    assert_eq!(runs, 10_000, "no job was even delivered twice");
    let consumers = scalar(
        &db,
        "SELECT count(DISTINCT consumer) FROM bus_probe_effects WHERE key = $1",
        "ten-k",
    )
    .await;
    assert_eq!(consumers, 3);
    let s = bus.stats(Queue::Actions).await.unwrap();
    assert_eq!((s.length, s.pending, s.delayed, s.dead), (0, 0, 0, 0));
}

#[derive(Debug, sqlx::FromRow)]
struct RunRow {
    attempt: i32,
    due_at: chrono::DateTime<chrono::Utc>,
    started_at: chrono::DateTime<chrono::Utc>,
    failed: bool,
}

#[tokio::test]
async fn a_failing_job_backs_off_longer_each_time_dies_with_its_error_and_replays() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let mut settings = test_settings(&db, &redis, &[]);
    settings.queues.actions = config::QueueSettings {
        max_attempts: 4,
        backoff_base_ms: 150,
        backoff_cap_ms: 10_000,
        // deterministic delays, so that growth can be asserted (full jitter is unit-tested)
        jitter: config::Jitter::None,
        visibility_timeout_secs: 30,
        run_timeout_secs: 600,
        fair: false,
        org_concurrency: 0,
    };
    let bus = bus_for(&settings);
    let probe = Probe {
        fail_times: 5,
        ..Probe::new("flaky")
    };
    let env = bus.enqueue(probe).await.unwrap();

    let w = worker(&db, &settings, "w1");
    let report = w.drain_until_empty(Duration::from_secs(60)).await.unwrap();
    assert_eq!((report.retried, report.dead, report.completed), (3, 1, 0));

    let runs: Vec<RunRow> = sqlx::query_as(
        "SELECT attempt, due_at, started_at, failed FROM bus_probe_runs
         WHERE job_id = $1 ORDER BY started_at",
    )
    .bind(env.id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        runs.iter().map(|r| r.attempt).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(runs.iter().all(|r| r.failed));
    // the delay before retry n, from the recorded times: due time of run n+1 - start of run n
    let delays: Vec<i64> = runs
        .windows(2)
        .map(|w| (w[1].due_at - w[0].started_at).num_milliseconds())
        .collect();
    for (i, d) in delays.iter().enumerate() {
        let expected = 150 * (1 << i);
        assert!(
            *d >= expected && *d < expected + 1500,
            "retry {} was due {d} ms after the failure, expected {expected} ms: {delays:?}",
            i + 1
        );
    }
    assert!(
        delays.windows(2).all(|w| w[1] > w[0]),
        "delays grow: {delays:?}"
    );
    assert!(
        runs.iter().all(|r| r.started_at >= r.due_at),
        "none ran early"
    );

    let dead = bus.dead_list(Queue::Actions, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "exhausted");
    assert_eq!(dead[0].error, "probe failure 4 of 5");
    assert_eq!(dead[0].envelope.as_ref().unwrap().id, env.id);
    assert_eq!(dead[0].envelope.as_ref().unwrap().attempt, 4);

    // replay: the fifth run fails, the sixth (attempt 2 of the replay) takes effect
    let replayed = workers::ops::dead_replay(&bus, None, &dead[0].id)
        .await
        .unwrap();
    assert_eq!(replayed, Some(Queue::Actions));
    let report = w.drain_until_empty(Duration::from_secs(60)).await.unwrap();
    assert_eq!((report.retried, report.completed, report.dead), (1, 1, 0));
    let effects = scalar(
        &db,
        "SELECT count(*) FROM bus_probe_effects WHERE key = $1",
        "flaky",
    )
    .await;
    assert_eq!(effects, 1);
    let s = bus.stats(Queue::Actions).await.unwrap();
    assert_eq!((s.length, s.pending, s.delayed, s.dead), (0, 0, 0, 0));
}
