//! `worker index --now` (one pass inline, figures on stdout), `worker index` (enqueue) and the
//! `worker` binary's `index` handler, against LiteLLM in front of the fake upstream.

use std::process::{Output, Stdio};

use testkit::{FakeClient, TestDb, TestRedis, unique_model, via_litellm};

use crate::process::command;

fn worker(db: &TestDb, redis: &TestRedis, model: &str, args: &[&str]) -> Output {
    let mut cmd = command(env!("CARGO_BIN_EXE_worker"), db, redis);
    cmd.env("EMBEDDING_MODEL", model);
    if let Ok(url) = std::env::var("LITELLM_BASE_URL") {
        cmd.env("LITELLM_BASE_URL", url);
    }
    if let Ok(key) = std::env::var("LITELLM_API_KEY") {
        cmd.env("LITELLM_API_KEY", key);
    }
    let out = cmd.args(args).stdout(Stdio::piped()).output().unwrap();
    assert!(
        out.status.success(),
        "worker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A project (its creation writes the outbox row).
async fn project(db: &TestDb, name: &str) {
    let mut tx = db.pool.begin().await.unwrap();
    let org = store::tenancy::insert_org(&mut tx, "o").await.unwrap().id;
    let user = store::tenancy::insert_user(&mut tx, &format!("{name}@x.io"), "u", "h")
        .await
        .unwrap()
        .id;
    store::tenancy::insert_membership(&mut tx, org, user, store::Role::Owner)
        .await
        .unwrap();
    store::projects::insert_project(
        &mut tx,
        &store::projects::NewProject {
            org_id: org,
            created_by: user,
            name,
            description: "indexed by the worker",
            visibility: store::Visibility::Org,
            team_id: None,
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// source_id, owner_user_id, project_id, title, content
type MessageChunk = (
    uuid::Uuid,
    Option<uuid::Uuid>,
    Option<uuid::Uuid>,
    String,
    String,
);

async fn chunks(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM embeddings")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn index_now_runs_a_pass_inline_and_prints_its_figures() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let model = unique_model("embed");
    project(&db, "apollo").await;
    let out = worker(&db, &redis, &via_litellm(&model), &["index", "--now"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = text.lines().last().unwrap_or_default();
    assert!(last.starts_with("index: batches=1 sources=1 "), "{text}");
    assert!(
        text.contains("index: batch=1 sources=1 chunks_embedded=1 "),
        "{text}"
    );
    assert!(
        last.contains("chunks_embedded=1 chunks_skipped=0"),
        "{text}"
    );
    assert_eq!(chunks(&db).await, 1);
    assert_eq!(
        FakeClient::shared().requests(&model).await.unwrap().len(),
        1
    );
    // nothing left: a second pass does nothing
    let out = worker(&db, &redis, &via_litellm(&model), &["index", "--now"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("sources=0 "), "{text}");
    // --all queues every source again: nothing changed, so nothing is embedded
    let out = worker(
        &db,
        &redis,
        &via_litellm(&model),
        &["index", "--now", "--all"],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("index: queued 1 sources"), "{text}");
    assert!(
        text.contains("chunks_embedded=0 chunks_skipped=1"),
        "{text}"
    );
    assert_eq!(
        FakeClient::shared().requests(&model).await.unwrap().len(),
        1
    );
}

#[tokio::test]
async fn an_enqueued_index_job_is_handled_by_the_worker_binary() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let model = unique_model("embed");
    project(&db, "gemini").await;
    let out = worker(&db, &redis, &via_litellm(&model), &["index"]);
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    assert_eq!(chunks(&db).await, 0, "enqueueing does not index");
    worker(
        &db,
        &redis,
        &via_litellm(&model),
        &["--queues", "index", "--until-empty", "--timeout-secs", "60"],
    );
    assert_eq!(chunks(&db).await, 1);
}

#[tokio::test]
async fn embedding_tokens_count_in_the_usage_of_the_orgs_whose_sources_were_embedded() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let model = unique_model("embed");
    // two orgs' projects, indexed in one batch
    let names = [
        "hermes",
        "a-project-with-a-much-longer-name-and-so-more-tokens",
    ];
    for name in names {
        project(&db, name).await;
    }
    worker(&db, &redis, &via_litellm(&model), &["index"]);
    worker(
        &db,
        &redis,
        &via_litellm(&model),
        &["--queues", "index", "--until-empty", "--timeout-secs", "60"],
    );
    assert_eq!(chunks(&db).await, 2);
    // each request carries one org's chunks: what the upstream reported for it (the fake counts
    // len / 4 + 1 per input) is that org's, and no other's
    let requests = FakeClient::shared().requests(&model).await.unwrap();
    assert_eq!(requests.len(), 2, "one request per org");
    for name in names {
        let org: uuid::Uuid = sqlx::query_scalar("SELECT org_id FROM projects WHERE name = $1")
            .bind(name)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let inputs: Vec<String> = requests
            .iter()
            .map(|r| r.body["input"].as_array().cloned().unwrap_or_default())
            .find(|inputs| inputs.iter().any(|t| t.as_str().unwrap().contains(name)))
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_owned())
            .collect();
        assert!(
            names
                .iter()
                .all(|n| *n == name || !inputs.iter().any(|t| t.contains(n)))
        );
        let reported: i64 = inputs.iter().map(|t| t.len() as i64 / 4 + 1).sum();
        let counted: (i64, i64, i64) = sqlx::query_as(
            "SELECT requests, prompt_tokens, completion_tokens FROM usage_daily
             WHERE org_id = $1 AND model = $2",
        )
        .bind(org)
        .bind(via_litellm(&model))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(counted, (1, reported, 0), "{name}");
    }
}

#[tokio::test]
async fn user_and_assistant_messages_are_indexed_for_their_owner_only() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let model = unique_model("embed");
    let embedding_model = via_litellm(&model);
    let settings = testkit::test_settings(&db, &redis, &[("EMBEDDING_MODEL", &embedding_model)]);
    let mut tx = db.pool.begin().await.unwrap();
    let org = store::tenancy::insert_org(&mut tx, "o").await.unwrap().id;
    let user = store::tenancy::insert_user(&mut tx, "talker@x.io", "u", "h")
        .await
        .unwrap()
        .id;
    store::tenancy::insert_membership(&mut tx, org, user, store::Role::Member)
        .await
        .unwrap();
    let conv = store::conversations::create(&mut tx, org.into(), user.into(), "Launch talk", None)
        .await
        .unwrap();
    let (question, response) = testkit::turns::start(&mut tx, conv.id, "when is launch?").await;
    let answer = store::conversations::Answer {
        content: "launch is on friday",
        model: "m",
        prompt_tokens: None,
        completion_tokens: None,
        latency_ms: 1,
        citations: serde_json::json!([]),
        sources: Default::default(),
    };
    let (reply, stored) = testkit::turns::answer(&mut tx, response.id, &answer).await;
    assert!(stored);
    tx.commit().await.unwrap();

    let indexer = workers::handlers::index::Indexer::new(db.pool.clone(), &settings).unwrap();
    let r = indexer.run_pass(false).await.unwrap();
    assert_eq!((r.sources, r.chunks_embedded), (2, 2), "{r:?}");
    let rows: Vec<MessageChunk> = sqlx::query_as(
        "SELECT source_id, owner_user_id, project_id, title, content FROM embeddings
             WHERE source_kind = 'message' ORDER BY content DESC",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].0, question.id);
    assert_eq!(rows[1].0, reply.id);
    for (_, owner, project, title, _) in &rows {
        assert_eq!(*owner, Some(Into::into(user)));
        assert_eq!(*project, None);
        assert!(title.starts_with("Launch talk ("), "{title}");
    }
    assert_eq!(rows[0].4, "when is launch?");
    assert_eq!(rows[1].4, "launch is on friday");
    // a redelivered completion stores nothing new and queues nothing
    let mut tx = db.pool.begin().await.unwrap();
    let (_, stored) = testkit::turns::answer(&mut tx, response.id, &answer).await;
    tx.commit().await.unwrap();
    assert!(!stored);
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM index_outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(queued, 0);
}
