use pgvector::Vector;
use testkit::{TestDb, TestRedis};

#[tokio::test]
async fn vector_round_trip_with_hnsw_index() {
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE items (id bigserial PRIMARY KEY, label text NOT NULL, embedding vector(3) NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("CREATE INDEX ON items USING hnsw (embedding vector_cosine_ops)")
        .execute(&db.pool)
        .await
        .unwrap();
    for (label, v) in [
        ("x", [1.0, 0.0, 0.0]),
        ("y", [0.0, 1.0, 0.0]),
        ("xy", [0.7, 0.7, 0.0]),
    ] {
        sqlx::query("INSERT INTO items (label, embedding) VALUES ($1, $2)")
            .bind(label)
            .bind(Vector::from(v.to_vec()))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    // Force the index so the test proves HNSW is usable, not just the sequential scan.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL enable_seqscan = off")
        .execute(&mut *tx)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT label FROM items ORDER BY embedding <=> '[0.9,0.1,0]' LIMIT 2",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert!(
        plan.iter().any(|l| l.contains("items_embedding_idx")),
        "plan: {plan:?}"
    );
    let rows: Vec<(String, Vector)> =
        sqlx::query_as("SELECT label, embedding FROM items ORDER BY embedding <=> $1 LIMIT 2")
            .bind(Vector::from(vec![0.9, 0.1, 0.0]))
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    assert_eq!(rows[0].0, "x");
    assert_eq!(rows[1].0, "xy");
    assert_eq!(rows[0].1.to_vec(), vec![1.0, 0.0, 0.0]);
    let version: String =
        sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert!(version.starts_with("0.8"), "pgvector {version}");
}

#[tokio::test]
async fn each_test_gets_its_own_database() {
    let a = TestDb::new().await;
    let b = TestDb::new().await;
    assert_ne!(a.name, b.name);
    sqlx::query("CREATE TABLE only_in_a (id int)")
        .execute(&a.pool)
        .await
        .unwrap();
    let in_b: Option<String> = sqlx::query_scalar("SELECT to_regclass('only_in_a')::text")
        .fetch_one(&b.pool)
        .await
        .unwrap();
    assert_eq!(in_b, None);
    // migrations are applied in the template
    let migrated: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&b.pool)
        .await
        .unwrap();
    assert_eq!(migrated as usize, store::MIGRATOR.iter().count());
}

#[tokio::test]
async fn redis_stream_round_trip_with_blocking_read() {
    let r = TestRedis::new();
    let handle = jobs::RedisHandle::new(&r.settings()).unwrap();
    let stream = format!("{}:roundtrip", r.prefix);
    let mut conn = handle.conn().await.unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap();

    // A blocking read longer than redis' default 500 ms reply timeout must not be cut off.
    let mut blocking = handle.blocking_conn().await.unwrap();
    let s2 = stream.clone();
    let reader = tokio::spawn(async move {
        let reply: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c1")
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(5000)
            .arg("STREAMS")
            .arg(&s2)
            .arg(">")
            .query_async(&mut blocking)
            .await
            .unwrap();
        reply
    });
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let id: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("payload")
        .arg("hello")
        .query_async(&mut conn)
        .await
        .unwrap();
    let reply = reader.await.unwrap();
    let text = format!("{reply:?}");
    assert!(text.contains("hello") && text.contains(&id), "{text}");
    let acked: i64 = redis::cmd("XACK")
        .arg(&stream)
        .arg("g")
        .arg(&id)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(acked, 1);
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("g")
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis::Value::Array(summary) = pending else {
        panic!("XPENDING reply {pending:?}")
    };
    assert_eq!(summary[0], redis::Value::Int(0), "nothing left pending");
}
