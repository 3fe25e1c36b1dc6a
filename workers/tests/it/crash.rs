//! Worker processes: a `kill -9` loses nothing and duplicates nothing; SIGTERM finishes the job
//! in flight and leaves nothing pending.

use std::process::Command;
use std::time::{Duration, Instant};

use jobs::kinds::Probe;
use jobs::{Bus, Queue};
use testkit::{TestDb, TestRedis, test_settings};

use crate::bus::bus_for;
use crate::process::{command, lines, sigterm, wait_exit, wait_for};

/// A worker-side process with a configuration file overlay (`SWITCHBOARD_CONFIG`).
pub fn command_with(bin: &str, db: &TestDb, redis: &TestRedis, overlay: &str) -> Command {
    let path = std::env::temp_dir().join(format!("sb-{}.toml", redis.prefix));
    std::fs::write(&path, overlay).unwrap();
    let mut cmd = command(bin, db, redis);
    cmd.env("SWITCHBOARD_CONFIG", path);
    cmd
}

/// Wait (bounded) until `check` holds; fail with `what`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

fn consumer_of(ready: &[String]) -> String {
    let line = ready.last().unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["consumer"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn jobs_of_a_killed_worker_are_reclaimed_and_take_effect_exactly_once() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[]);
    let bus: Bus = bus_for(&settings);
    let overlay = "[queues.actions]\nvisibility_timeout_secs = 2\n";
    let bin = env!("CARGO_BIN_EXE_worker");

    let mut a = command_with(bin, &db, &redis, overlay)
        .env("WORKER_CONCURRENCY", "8")
        .spawn()
        .unwrap();
    let a_lines = lines(&mut a);
    let a_name = consumer_of(&wait_for(&a_lines, "worker ready", Duration::from_secs(20)));

    // six slow jobs, all taken by A
    let probe = Probe {
        sleep_ms: 1500,
        ..Probe::new("crash")
    };
    workers::ops::enqueue_probes(&bus, &probe, 6).await.unwrap();
    eventually("A holds all six jobs", Duration::from_secs(15), || async {
        bus.stats(Queue::Actions).await.unwrap().pending == 6
    })
    .await;
    a.kill().unwrap(); // SIGKILL: no clean-up at all
    a.wait().unwrap();

    // more work arrives meanwhile
    workers::ops::enqueue_probes(&bus, &Probe::new("crash"), 10)
        .await
        .unwrap();
    let mut others = Vec::new();
    for _ in 0..2 {
        let mut c = command_with(bin, &db, &redis, overlay).spawn().unwrap();
        let rx = lines(&mut c);
        wait_for(&rx, "worker ready", Duration::from_secs(20));
        others.push((c, rx));
    }
    eventually(
        "all 16 jobs took effect",
        Duration::from_secs(45),
        || async {
            count(
                &db,
                "SELECT count(*) FROM bus_probe_effects WHERE key = 'crash'",
            )
            .await
                == 16
        },
    )
    .await;
    eventually("the bus is empty", Duration::from_secs(15), || async {
        bus.is_empty(&[Queue::Actions]).await.unwrap()
    })
    .await;

    assert_eq!(
        count(
            &db,
            "SELECT count(DISTINCT job_id) FROM bus_probe_effects WHERE key = 'crash'"
        )
        .await,
        16
    );
    assert_eq!(
        count(
            &db,
            "SELECT handled FROM bus_probe_totals WHERE key = 'crash'"
        )
        .await,
        16,
        "each effect exactly once"
    );
    let by_a = count(
        &db,
        &format!("SELECT count(*) FROM bus_probe_effects WHERE consumer = '{a_name}'"),
    )
    .await;
    assert_eq!(by_a, 0, "the killed worker finished nothing");
    let s = bus.stats(Queue::Actions).await.unwrap();
    assert_eq!((s.length, s.pending, s.delayed, s.dead), (0, 0, 0, 0));

    for (c, _) in &others {
        sigterm(c);
    }
    for (mut c, _) in others {
        assert!(wait_exit(&mut c, Duration::from_secs(20)).success());
    }
}

#[tokio::test]
async fn sigterm_finishes_the_job_in_flight_and_leaves_nothing_pending() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[]);
    let bus = bus_for(&settings);
    let mut w = command(env!("CARGO_BIN_EXE_worker"), &db, &redis)
        .spawn()
        .unwrap();
    let rx = lines(&mut w);
    wait_for(&rx, "worker ready", Duration::from_secs(20));

    let probe = Probe {
        sleep_ms: 2000,
        ..Probe::new("term")
    };
    bus.enqueue(probe).await.unwrap();
    eventually("the job is picked up", Duration::from_secs(10), || async {
        bus.stats(Queue::Actions).await.unwrap().pending == 1
    })
    .await;
    sigterm(&w);
    wait_for(&rx, "worker stopping", Duration::from_secs(5));
    let status = wait_exit(&mut w, Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");

    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM bus_probe_effects WHERE key = 'term'"
        )
        .await,
        1,
        "the job in flight completed"
    );
    let s = bus.stats(Queue::Actions).await.unwrap();
    assert_eq!(
        (s.length, s.pending, s.delayed, s.dead, s.consumers),
        (0, 0, 0, 0, 0),
        "nothing left pending, and the consumer tidied itself away"
    );
}
