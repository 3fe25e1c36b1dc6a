//! Partitioned queues (`QUEUE_PARTITIONS`): a job's partition follows its key, workers read
//! every partition (retries, dead letters and markers stay in the job's own), and lowering the
//! setting keeps the jobs already in the higher partitions reachable.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobs::kinds::Probe;
use jobs::{Bus, JobError, Part, Queue, RedisHandle, Registry, Worker, WorkerOptions};
use testkit::TestRedis;

fn bus_with(redis: &TestRedis, partitions: u16) -> Bus {
    let handle = Arc::new(RedisHandle::new(&redis.settings()).unwrap());
    Bus::new(
        handle,
        &crate::queues(|q| {
            q.partitions = partitions;
            q.actions.backoff_base_ms = 50;
            q.actions.backoff_cap_ms = 50;
            q.actions.jitter = config::Jitter::None;
            q.actions.max_attempts = 2;
        }),
    )
}

/// A registry whose probe handler records each key it ran and fails `fail_times` runs.
fn recording(handled: Arc<Mutex<Vec<String>>>) -> Registry {
    let mut registry = Registry::new();
    registry.register::<Probe, _, _>(move |ctx, job| {
        handled.lock().unwrap().push(job.key.clone());
        async move {
            if ctx.attempt <= job.fail_times {
                return Err(JobError::retryable("failing on purpose"));
            }
            Ok(())
        }
    });
    registry
}

async fn drain(bus: &Bus, registry: Registry) -> jobs::RunReport {
    Worker::new(
        bus.clone(),
        registry,
        WorkerOptions {
            queues: vec![Queue::Actions],
            concurrency: 8,
            consumer: format!("w-{:08x}", rand::random::<u32>()),
            read_block: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(5),
        },
    )
    .drain_until_empty(Duration::from_secs(30))
    .await
    .unwrap()
}

#[tokio::test]
async fn jobs_spread_over_the_partitions_by_key_and_all_are_handled() {
    let redis = TestRedis::new();
    let bus = bus_with(&redis, 3);
    bus.record_partitions().await.unwrap();
    for p in bus.parts(Queue::Actions) {
        bus.ensure_group(p).await.unwrap();
    }
    let keys: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
    let mut parts = HashSet::new();
    for k in &keys {
        let env = bus.enqueue(Probe::new(k)).await.unwrap();
        // the same key always lands in the same partition
        assert_eq!(
            bus.part_of(&env),
            bus.part_of(&jobs::Envelope::new(Probe::new(k)))
        );
        parts.insert(bus.part_of(&env));
    }
    assert_eq!(parts.len(), 3, "30 keys use every partition");
    for p in &parts {
        assert!(
            bus.part_stats(*p).await.unwrap().length > 0,
            "{p} holds its jobs"
        );
    }
    // one job fails once: its retry goes through its own partition's delayed set
    let retried = bus
        .enqueue(Probe {
            fail_times: 1,
            ..Probe::new("k-retry")
        })
        .await
        .unwrap();
    assert_eq!(bus.stats(Queue::Actions).await.unwrap().length, 31);

    let handled = Arc::new(Mutex::new(Vec::new()));
    let report = drain(&bus, recording(handled.clone())).await;
    assert_eq!((report.completed, report.retried), (31, 1));
    let handled: HashSet<String> = handled.lock().unwrap().iter().cloned().collect();
    assert!(keys.iter().all(|k| handled.contains(k)));
    assert_eq!(
        bus.markers(Queue::Actions, &[retried.id]).await.unwrap(),
        [false],
        "acked: no marker left in any partition"
    );
    assert!(bus.is_empty(&[Queue::Actions]).await.unwrap());
}

#[tokio::test]
async fn lowering_the_partition_count_leaves_no_job_behind() {
    let redis = TestRedis::new();
    let wide = bus_with(&redis, 4);
    wide.record_partitions().await.unwrap();
    let mut ids = Vec::new();
    let mut high = 0;
    for i in 0..20 {
        let env = wide.enqueue(Probe::new(format!("j{i}"))).await.unwrap();
        if wide.part_of(&env).index > 0 {
            high += 1;
        }
        ids.push(env.id);
    }
    assert!(high > 0, "some jobs went above partition 0");

    // the setting goes down to 1: a worker started now still reads all four
    let narrow = bus_with(&redis, 1);
    assert_eq!(narrow.parts(Queue::Actions).count(), 1);
    narrow.record_partitions().await.unwrap();
    assert_eq!(narrow.parts(Queue::Actions).count(), 4);
    assert_eq!(
        narrow.markers(Queue::Actions, &ids).await.unwrap(),
        vec![true; 20],
        "the reconciler sees every job's marker"
    );
    let handled = Arc::new(Mutex::new(Vec::new()));
    let report = drain(&narrow, recording(handled.clone())).await;
    assert_eq!(report.completed, 20);
    // and new jobs go to partition 0 only
    let env = narrow.enqueue(Probe::new("after")).await.unwrap();
    assert_eq!(narrow.part_of(&env), Part::new(Queue::Actions, 0));
}

#[tokio::test]
async fn a_dead_letter_of_a_higher_partition_is_listed_and_replayed_there() {
    let redis = TestRedis::new();
    let bus = bus_with(&redis, 3);
    bus.record_partitions().await.unwrap();
    // a key that lands above partition 0
    let key = (0..)
        .map(|i| format!("dead{i}"))
        .find(|k| bus.part_of(&jobs::Envelope::new(Probe::new(k))).index > 0)
        .unwrap();
    let part = bus.part_of(&jobs::Envelope::new(Probe::new(&key)));
    bus.enqueue(Probe {
        fail_times: 5,
        ..Probe::new(&key)
    })
    .await
    .unwrap();
    let handled = Arc::new(Mutex::new(Vec::new()));
    let report = drain(&bus, recording(handled.clone())).await;
    assert_eq!(report.dead, 1);
    let dead = bus.dead_list(Queue::Actions, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].id.starts_with(&format!("{}/", part.index)),
        "{}",
        dead[0].id
    );
    assert_eq!(bus.part_stats(part).await.unwrap().dead, 1);
    assert!(bus.replay(Queue::Actions, &dead[0].id).await.unwrap());
    assert_eq!(bus.part_stats(part).await.unwrap().length, 1);
    assert!(!bus.replay(Queue::Actions, "99/1-1").await.unwrap());
}

/// A worker already running with one partition comes to read the partitions another process
/// records later (it re-reads the record every 10 s), without a restart.
#[tokio::test]
async fn a_running_worker_takes_up_partitions_recorded_after_it_started() {
    let redis = TestRedis::new();
    let narrow = bus_with(&redis, 1);
    let handled = Arc::new(Mutex::new(Vec::new()));
    let worker = Worker::new(
        narrow.clone(),
        recording(handled.clone()),
        WorkerOptions {
            queues: vec![Queue::Actions],
            concurrency: 4,
            consumer: format!("w-{:08x}", rand::random::<u32>()),
            read_block: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(5),
        },
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { worker.run(stop).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // another process, set to 3, enqueues (its first enqueue records the 3)
    let wide = bus_with(&redis, 3);
    let mut high = 0;
    for i in 0..12 {
        let env = wide.enqueue(Probe::new(format!("late{i}"))).await.unwrap();
        high += usize::from(wide.part_of(&env).index > 0);
    }
    assert!(high > 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    while handled.lock().unwrap().len() < 12 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(handled.lock().unwrap().len(), 12, "every job handled");
    stop.cancel();
    task.await.unwrap().unwrap();
}
