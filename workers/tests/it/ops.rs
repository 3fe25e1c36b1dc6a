//! The operator commands of the `worker` binary (the bus's, conversation memory's), and its
//! run-until-empty mode.

use std::process::{Output, Stdio};
use std::time::Duration;

use jobs::Queue;
use jobs::kinds::Probe;
use testkit::{TestDb, TestRedis, test_settings};
use uuid::Uuid;

use crate::bus::bus_for;
use crate::process::command;

fn worker(db: &TestDb, redis: &TestRedis, args: &[&str]) -> Output {
    let out = command(env!("CARGO_BIN_EXE_worker"), db, redis)
        .args(args)
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "worker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn row<'a>(table: &'a str, queue: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(queue))
        .unwrap_or_else(|| panic!("no {queue} row in {table}"))
        .split_whitespace()
        .collect()
}

#[tokio::test]
async fn operators_enqueue_inspect_drain_and_replay() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let mut settings = test_settings(&db, &redis, &[]);
    settings.queues.actions.max_attempts = 1;
    let bus = bus_for(&settings);

    let ids = stdout(&worker(
        &db,
        &redis,
        &["enqueue-probe", "--count", "3", "--key", "ops"],
    ));
    assert_eq!(ids.lines().count(), 3, "{ids}");
    let table = stdout(&worker(&db, &redis, &["queues"]));
    assert!(table.starts_with("queue"), "{table}");
    assert_eq!(row(&table, "actions")[1], "3", "{table}");
    assert_eq!(row(&table, "index")[1], "0", "{table}");
    assert_eq!(row(&table, "chat")[6], "0", "{table}");

    // an org's weight in the chat queue's fair admission, in every partition
    let org = uuid::Uuid::now_v7();
    let set = stdout(&worker(
        &db,
        &redis,
        &["fair-weight", "--org", &org.to_string(), "--weight", "3"],
    ));
    assert!(set.contains("weight 3"), "{set}");
    let mut conn = bus.redis().conn().await.unwrap();
    for p in bus.parts(Queue::Chat) {
        let w: Option<u32> =
            redis::AsyncCommands::hget(&mut conn, &bus.keys(p).fair_weights, org.to_string())
                .await
                .unwrap();
        assert_eq!(w, Some(3));
    }
    let refused = command(env!("CARGO_BIN_EXE_worker"), &db, &redis)
        .args(["fair-weight", "--org", &org.to_string(), "--weight", "0"])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a weight of 0 is refused");

    // an org's concurrency cap: its own (0: none), then back to the queue's default
    let set = stdout(&worker(
        &db,
        &redis,
        &["fair-cap", "--org", &org.to_string(), "--cap", "2"],
    ));
    assert!(set.contains("cap 2"), "{set}");
    assert!(fair_caps(&bus, org).await.iter().all(|c| *c == Some(2)));
    let set = stdout(&worker(
        &db,
        &redis,
        &["fair-cap", "--org", &org.to_string(), "--cap", "default"],
    ));
    assert!(set.contains("cap default"), "{set}");
    assert!(fair_caps(&bus, org).await.iter().all(Option::is_none));
    for bad in ["-1", "10001", "lots"] {
        let refused = command(env!("CARGO_BIN_EXE_worker"), &db, &redis)
            .args(["fair-cap", "--org", &org.to_string(), "--cap", bad])
            .output()
            .unwrap();
        assert!(!refused.status.success(), "a cap of {bad} is refused");
    }

    // one job that fails for good at its first attempt (max_attempts = 1 here)
    let w = crate::bus::worker_with(&db, &settings, "w1");
    bus.enqueue(Probe {
        fail_times: 1,
        ..Probe::new("ops-dead")
    })
    .await
    .unwrap();
    w.drain_until_empty(Duration::from_secs(30)).await.unwrap();
    let dead = stdout(&worker(&db, &redis, &["dead", "list"]));
    assert_eq!(dead.lines().count(), 1, "{dead}");
    assert!(dead.contains("probe failure 1 of 1"), "{dead}");
    assert!(dead.contains("exhausted"), "{dead}");
    let dead_id = dead.split('\t').nth(1).unwrap().to_owned();

    let replayed = stdout(&worker(&db, &redis, &["dead", "replay", &dead_id]));
    assert!(replayed.contains("replayed"), "{replayed}");
    assert_eq!(bus.stats(Queue::Actions).await.unwrap().length, 1);
    assert!(stdout(&worker(&db, &redis, &["dead", "list"])).contains("no dead letters"));

    // the binary's run-until-empty mode handles what is left and exits 0
    worker(&db, &redis, &["--until-empty", "--timeout-secs", "60"]);
    let table = stdout(&worker(&db, &redis, &["queues"]));
    let actions = row(&table, "actions");
    assert_eq!(&actions[1..5], &["0", "0", "0", "0"], "{table}");
    let effects: i64 =
        sqlx::query_scalar("SELECT count(*) FROM bus_probe_effects WHERE key LIKE 'ops%'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(effects, 4);
}

fn worker_memory(db: &TestDb, redis: &TestRedis, args: &[&str]) -> Output {
    command(env!("CARGO_BIN_EXE_worker"), db, redis)
        .arg("memory")
        .args(args)
        .env("LOG_FILTER", "warn")
        // no proxy here: entries are stored without a vector
        .env("LITELLM_BASE_URL", "http://127.0.0.1:9")
        .stdout(Stdio::piped())
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "worker memory failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[tokio::test]
async fn operators_list_add_and_delete_memory_with_the_cli() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let mut c = db.pool.acquire().await.unwrap();
    let org = store::tenancy::insert_org(&mut c, "acme").await.unwrap().id;
    let other = store::tenancy::insert_org(&mut c, "other")
        .await
        .unwrap()
        .id;
    let user = store::tenancy::insert_user(&mut c, "op@x.io", "U", "x")
        .await
        .unwrap()
        .id;
    store::tenancy::insert_membership(&mut c, org, user, store::Role::Member)
        .await
        .unwrap();
    drop(c);
    let (org_s, user_s, other_s) = (org.to_string(), user.to_string(), other.to_string());

    let id = ok(&worker_memory(
        &db,
        &redis,
        &[
            "add",
            "--org",
            &org_s,
            "--tier",
            "org",
            "--content",
            "We bill in EUR",
        ],
    ))
    .trim()
    .to_owned();
    let id: Uuid = id.parse().unwrap();
    ok(&worker_memory(
        &db,
        &redis,
        &[
            "add",
            "--org",
            &org_s,
            "--tier",
            "user",
            "--user",
            &user_s,
            "--content",
            "Likes tea",
        ],
    ));

    let all = ok(&worker_memory(&db, &redis, &["list", "--org", &org_s]));
    assert_eq!(all.lines().count(), 3, "{all}");
    assert!(
        all.lines().any(|l| l.starts_with(&id.to_string())
            && l.contains("\torg\t")
            && l.ends_with("We bill in EUR")),
        "{all}"
    );
    let users = ok(&worker_memory(
        &db,
        &redis,
        &["list", "--org", &org_s, "--tier", "user"],
    ));
    assert_eq!(users.lines().count(), 2, "{users}");
    assert!(
        users.contains(&user_s) && users.contains("Likes tea"),
        "{users}"
    );

    // errors name the flag; nothing is stored
    for (args, flag) in [
        (
            vec![
                "add",
                "--org",
                &org_s,
                "--tier",
                "project",
                "--content",
                "x",
            ],
            "--project",
        ),
        (
            vec![
                "add",
                "--org",
                &org_s,
                "--tier",
                "user",
                "--user",
                &other_s,
                "--content",
                "x",
            ],
            "--user",
        ),
        (
            vec![
                "add",
                "--org",
                &org_s,
                "--tier",
                "project",
                "--project",
                &other_s,
                "--content",
                "x",
            ],
            "--project",
        ),
        (
            vec!["add", "--org", &org_s, "--tier", "org", "--content", " "],
            "--content",
        ),
        (
            vec!["delete", "--org", &other_s, "--id", &id.to_string()],
            "--id",
        ),
    ] {
        let out = worker_memory(&db, &redis, &args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{args:?}: {err}");
    }
    assert_eq!(
        ok(&worker_memory(&db, &redis, &["list", "--org", &org_s]))
            .lines()
            .count(),
        3
    );

    ok(&worker_memory(
        &db,
        &redis,
        &["delete", "--org", &org_s, "--id", &id.to_string()],
    ));
    let left = ok(&worker_memory(&db, &redis, &["list", "--org", &org_s]));
    assert_eq!(left.lines().count(), 2, "{left}");
    assert!(!left.contains("We bill in EUR"));
}

/// An org's own concurrency cap in each chat partition (`worker fair-cap`).
async fn fair_caps(bus: &jobs::Bus, org: uuid::Uuid) -> Vec<Option<u32>> {
    let mut conn = bus.redis().conn().await.unwrap();
    let mut out = Vec::new();
    for p in bus.parts(Queue::Chat) {
        out.push(
            redis::AsyncCommands::hget(&mut conn, &bus.keys(p).fair_caps, org.to_string())
                .await
                .unwrap(),
        );
    }
    out
}
