//! Hostile input against indexing: one org's document that cannot be indexed fails alone, and
//! never holds another org's documents back. Uploads go through HTTP, indexing through the
//! `index` job as the worker runs it, embeddings through LiteLLM to the fake upstream.

use std::time::Duration;

use jobs::{Queue, Worker, WorkerOptions};
use serde_json::{Value, json};
use testkit::{Behaviour, FakeClient, unique_model, via_litellm};
use workers::handlers::index::Indexer;

use crate::helpers::{Account, TestApp, email, spawn_app_with};

async fn app_with(extra: &[(&str, &str)]) -> (TestApp, String) {
    let model = unique_model("embed");
    let litellm_name = via_litellm(&model);
    let mut vars: Vec<(&str, &str)> = vec![("EMBEDDING_MODEL", litellm_name.as_str())];
    vars.extend_from_slice(extra);
    (spawn_app_with(&vars).await, model)
}

async fn project(app: &TestApp, owner: &Account) -> String {
    let r = app
        .post(
            "/v1/projects",
            &owner.token,
            json!({"name": "Apollo", "description": "", "visibility": "org"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

async fn upload(app: &TestApp, owner: &Account, pid: &str, ctype: &str, content: &str) -> String {
    let r = app
        .post(
            &format!("/v1/projects/{pid}/documents"),
            &owner.token,
            json!({"title": "doc", "content": content, "content_type": ctype}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

async fn document(app: &TestApp, owner: &Account, id: &str) -> Value {
    let r = app.get(&format!("/v1/documents/{id}"), &owner.token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

/// Run the `index` jobs waiting on the bus the way a worker does, until none is left.
async fn run_index_jobs(app: &TestApp) -> jobs::RunReport {
    let redis = std::sync::Arc::new(jobs::RedisHandle::new(&app.settings.redis).unwrap());
    let bus = jobs::Bus::new(redis, &app.settings.queues);
    let mut registry = jobs::Registry::new();
    Indexer::new(app.db.pool.clone(), &app.settings)
        .unwrap()
        .register(&mut registry);
    let mut opts = WorkerOptions::from_settings(&app.settings, vec![Queue::Index]);
    opts.read_block = Duration::from_millis(100);
    Worker::new(bus, registry, opts)
        .drain_until_empty(Duration::from_secs(120))
        .await
        .unwrap()
}

/// ~1.2 MB of distinct words (the same word repeated makes a small tsvector).
fn megabyte_of_words() -> String {
    let mut s = String::with_capacity(1_300_000);
    let mut i: u64 = 0;
    while s.len() < 1_200_000 {
        let mut n = i;
        s.push_str("qz");
        for _ in 0..6 {
            s.push(char::from(b'a' + (n % 26) as u8));
            n /= 26;
        }
        s.push(' ');
        i += 1;
    }
    s
}

/// The reproduction of the report: a Markdown document whose first heading is ~1 MB of
/// words. Its heading path was copied into every chunk's title, the generated `tsv` passed
/// PostgreSQL's 1 MB tsvector limit and the whole batch — every org's rows — failed, again and
/// again. Now the title is bounded: the document is indexed (its words kept in the body), and
/// so is the other org's document of the same batch.
#[tokio::test]
async fn a_markdown_document_with_a_megabyte_heading_is_indexed_with_every_other_orgs_document() {
    let (app, model) = app_with(&[]).await;
    let a = app.register(&email("poison-a"), "Org A").await;
    let b = app.register(&email("poison-b"), "Org B").await;
    let (pa, pb) = (project(&app, &a).await, project(&app, &b).await);
    let words = megabyte_of_words();
    let poison = upload(
        &app,
        &a,
        &pa,
        "text/markdown",
        &format!("# {words}\nthe body of the section\n"),
    )
    .await;
    let plain = upload(&app, &b, &pb, "text/plain", "an ordinary document").await;

    let report = run_index_jobs(&app).await;
    assert_eq!(
        (report.completed, report.retried, report.dead),
        (1, 0, 0),
        "{report:?}"
    );
    assert_eq!(document(&app, &b, &plain).await["status"], "indexed");
    assert_eq!(document(&app, &a, &poison).await["status"], "indexed");
    let titles: Vec<String> =
        sqlx::query_scalar("SELECT title FROM embeddings WHERE source_id = $1::uuid")
            .bind(&poison)
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert!(
        titles.len() > 100,
        "the words are in the body: {}",
        titles.len()
    );
    assert!(
        titles.iter().all(|t| t.chars().count() <= 300),
        "bounded titles"
    );
    // what the embedder was sent is bounded too
    let inputs = FakeClient::shared().requests(&model).await.unwrap();
    assert!(inputs.iter().all(|r| r.body.to_string().len() < 200_000));
    assert_eq!(app.count("index_outbox").await, 0);
}

/// Refuse the chunks of one document in the database (a trigger standing for any row
/// PostgreSQL will not store: a value too long, a limit), with `sqlstate`.
async fn refuse_chunks_containing(app: &TestApp, marker: &str, sqlstate: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.content LIKE '%{marker}%' THEN
                 RAISE EXCEPTION 'refused by the test' USING ERRCODE = '{sqlstate}';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON embeddings
             FOR EACH ROW EXECUTE FUNCTION refuse_poison();"
    )))
    .execute(&app.db.pool)
    .await
    .unwrap();
}

/// The outbox rows of a source: (attempts, dead).
async fn outbox_of(app: &TestApp, source: &str) -> Vec<(i32, bool)> {
    sqlx::query_as(
        "SELECT attempts, dead_at IS NOT NULL FROM index_outbox
         WHERE source_id = $1::uuid ORDER BY id",
    )
    .bind(source)
    .fetch_all(&app.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_document_the_database_refuses_fails_alone_and_the_batch_goes_on() {
    let (app, _) = app_with(&[]).await;
    let a = app.register(&email("refused-a"), "Org A").await;
    let b = app.register(&email("refused-b"), "Org B").await;
    let (pa, pb) = (project(&app, &a).await, project(&app, &b).await);
    // program_limit_exceeded: what a tsvector over 1 MB raises
    refuse_chunks_containing(&app, "POISON-PILL", "54000").await;
    let poison = upload(&app, &a, &pa, "text/plain", "a POISON-PILL document").await;
    let plain = upload(&app, &b, &pb, "text/plain", "an ordinary document").await;

    let report = run_index_jobs(&app).await;
    // one job, one run: no retry of the batch for everyone
    assert_eq!(
        (report.completed, report.retried, report.dead),
        (1, 0, 0),
        "{report:?}"
    );
    assert_eq!(document(&app, &b, &plain).await["status"], "indexed");
    let doc = document(&app, &a, &poison).await;
    assert_eq!(doc["status"], "failed", "{doc}");
    let reason = doc["failure_reason"].as_str().unwrap();
    assert!(
        reason.contains("split it into smaller documents"),
        "{reason}"
    );
    assert!(
        !reason.contains("refused by the test"),
        "no database text: {reason}"
    );
    // dead-lettered at once (retrying cannot help), kept for operators
    assert_eq!(outbox_of(&app, &poison).await, [(1, true)]);
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM index_outbox WHERE dead_at IS NULL")
            .fetch_one(&app.db.pool)
            .await
            .unwrap(),
        0
    );
    // the other sources' chunks are there, the poison's are not
    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT source_kind FROM embeddings WHERE source_id <> $1::uuid ORDER BY 1",
    )
    .bind(&poison)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(kinds, ["document", "project"]);
}

#[tokio::test]
async fn a_source_failing_now_and_then_is_retried_then_dead_lettered_after_its_attempts() {
    let (mut app, _) = app_with(&[]).await;
    app.settings.index.source_retry_secs = 0;
    app.settings.index.source_max_attempts = 3;
    let a = app.register(&email("flaky-a"), "Org A").await;
    let pa = project(&app, &a).await;
    // raise_exception: not a refusal of the data, so it is tried again
    refuse_chunks_containing(&app, "FLAKY", "P0001").await;
    let flaky = upload(&app, &a, &pa, "text/plain", "a FLAKY document").await;

    let indexer = Indexer::new(app.db.pool.clone(), &app.settings).unwrap();
    let r = indexer.run_pass(false).await.unwrap();
    // three attempts (each in its own batch, the rows ready again at once), then dead
    assert_eq!((r.sources_failed, r.sources_dead), (3, 1), "{r:?}");
    assert_eq!(outbox_of(&app, &flaky).await, [(3, true)]);
    let doc = document(&app, &a, &flaky).await;
    assert_eq!(doc["status"], "failed");
    assert!(
        doc["failure_reason"]
            .as_str()
            .unwrap()
            .contains("failed 3 times"),
        "{doc}"
    );
    // once the cause is fixed, the same content uploaded again is indexed
    sqlx::query("DROP TRIGGER refuse_poison ON embeddings")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let again = upload(&app, &a, &pa, "text/plain", "a FLAKY document").await;
    indexer.run_pass(false).await.unwrap();
    assert_eq!(document(&app, &a, &again).await["status"], "indexed");
}

/// An org with a backlog (or poison) never starves another: with small batches, the other
/// org's document is in the first batch even though every row of the backlog is older. The
/// embedder fails after the first batch's requests, so only the first batch commits.
#[tokio::test]
async fn the_outbox_claim_takes_the_orgs_in_turn() {
    let (app, model) = app_with(&[("INDEX_BATCH_SOURCES", "4")]).await;
    let a = app.register(&email("busy-a"), "Busy Org").await;
    let pa = project(&app, &a).await;
    for i in 0..30 {
        let r = app
            .post(
                &format!("/v1/projects/{pa}/tasks"),
                &a.token,
                json!({"title": format!("backlog task {i}")}),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    let b = app.register(&email("quiet-b"), "Quiet Org").await;
    let pb = project(&app, &b).await;
    let doc = upload(&app, &b, &pb, "text/plain", "the quiet org's document").await;
    // the first batch's requests succeed (one per org: a request carries one org's chunks),
    // every later one fails
    FakeClient::shared()
        .script(&model, vec![Behaviour::reply("ok"), Behaviour::reply("ok")])
        .await
        .unwrap();
    FakeClient::shared()
        .set_default(&model, Behaviour::status(500))
        .await
        .unwrap();
    let indexer = Indexer::new(app.db.pool.clone(), &app.settings).unwrap();
    let mut batches = 0;
    let r = indexer.run_pass_with(false, |_| batches += 1).await;
    assert!(r.is_err(), "the second batch meets the failing embedder");
    assert_eq!(batches, 1);
    assert_eq!(document(&app, &b, &doc).await["status"], "indexed");
}

/// `<p>&aaaaaaaaaaé</p>` used to panic the extractor (a byte slice inside `é`): a 500.
#[tokio::test]
async fn html_whose_entities_end_in_a_multibyte_character_is_accepted() {
    let (app, _) = app_with(&[]).await;
    let a = app.register(&email("html-a"), "Org A").await;
    let pa = project(&app, &a).await;
    for html in ["<p>&aaaaaaaaaaé</p>", "&日本語です"] {
        let id = upload(&app, &a, &pa, "text/html", html).await;
        let r = app.get(&format!("/v1/documents/{id}"), &a.token).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
}
