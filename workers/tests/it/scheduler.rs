//! Two schedulers enqueue the periodic index job once per interval between them.

use std::collections::HashSet;
use std::time::Duration;

use jobs::kinds::{Index, IndexReason};
use jobs::{Envelope, Job, Queue};
use redis::AsyncCommands;
use testkit::{TestDb, TestRedis, test_settings};

use crate::bus::bus_for;
use crate::crash::{command_with, eventually};
use crate::process::{lines, sigterm, wait_exit, wait_for};

#[tokio::test]
async fn two_schedulers_fire_each_interval_once() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[]);
    let bus = bus_for(&settings);
    let overlay = "[scheduler]\nlease_secs = 2\n";
    let bin = env!("CARGO_BIN_EXE_scheduler");
    let mut procs = Vec::new();
    for _ in 0..2 {
        let mut c = command_with(bin, &db, &redis, overlay)
            .env("INDEX_INTERVAL_SECS", "1")
            .spawn()
            .unwrap();
        let rx = lines(&mut c);
        wait_for(&rx, "scheduler ready", Duration::from_secs(20));
        procs.push((c, rx));
    }
    let stream = bus.keys(Queue::Index).stream.clone();
    let mut conn = bus.redis().conn().await.unwrap();
    eventually("five index jobs", Duration::from_secs(20), || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move { conn.xlen::<_, u64>(&stream).await.unwrap() >= 5 }
    })
    .await;
    // stop one of them (perhaps the leader): the other carries on
    sigterm(&procs[0].0);
    assert!(wait_exit(&mut procs[0].0, Duration::from_secs(20)).success());
    let before: u64 = conn.xlen(&stream).await.unwrap();
    eventually("three more index jobs", Duration::from_secs(20), || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move { conn.xlen::<_, u64>(&stream).await.unwrap() >= before + 3 }
    })
    .await;
    sigterm(&procs[1].0);
    assert!(wait_exit(&mut procs[1].0, Duration::from_secs(20)).success());

    let entries: redis::streams::StreamRangeReply = conn.xrange_all(&stream).await.unwrap();
    let ticks: Vec<u64> = entries
        .ids
        .iter()
        .map(|e| {
            let body: String = e.get("j").unwrap();
            match Envelope::from_json(&body).unwrap().job {
                Job::Index(Index {
                    reason: IndexReason::Scheduled { tick },
                }) => tick,
                other => panic!("unexpected job {other:?}"),
            }
        })
        .collect();
    let distinct: HashSet<u64> = ticks.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        ticks.len(),
        "an interval fired twice: {ticks:?}"
    );
    assert!(ticks.windows(2).all(|w| w[1] > w[0]), "in order: {ticks:?}");
    let span = ticks.last().unwrap() - ticks.first().unwrap() + 1;
    // one missed interval is tolerated around the hand-over on a loaded machine
    assert!(
        ticks.len() as u64 + 1 >= span,
        "intervals were skipped: {ticks:?}"
    );
    let lease: Option<String> = conn
        .get(format!("{}:lease:scheduler", redis.prefix))
        .await
        .unwrap();
    assert_eq!(lease, None, "the lease was released on shutdown");
}
