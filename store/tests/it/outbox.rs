//! The indexing outbox is written in the transaction of the change: a rolled-back change leaves
//! no row, a committed one leaves exactly its rows; claims skip rows another transaction holds.

use store::outbox::{self, SourceKind};
use store::{Role, TaskStatus, Visibility};
use testkit::TestDb;
use uuid::Uuid;

async fn outbox_rows(db: &TestDb) -> Vec<(String, Uuid)> {
    sqlx::query_as("SELECT source_kind, source_id FROM index_outbox ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// Project, task, task update and a user message in one transaction; returns their ids.
async fn changes(c: &mut sqlx::PgConnection) -> (Uuid, Uuid, Uuid) {
    let org = store::tenancy::insert_org(&mut *c, "o").await.unwrap().id;
    let user = store::tenancy::insert_user(&mut *c, &format!("{}@x.io", Uuid::new_v4()), "u", "h")
        .await
        .unwrap()
        .id;
    store::tenancy::insert_membership(&mut *c, org, user, Role::Owner)
        .await
        .unwrap();
    let project = store::projects::insert_project(
        &mut *c,
        &store::projects::NewProject {
            org_id: org,
            created_by: user,
            name: "p",
            description: "d",
            visibility: Visibility::Org,
            team_id: None,
        },
    )
    .await
    .unwrap();
    let task = store::tasks::insert_task(
        &mut *c,
        &store::tasks::NewTask {
            org_id: org,
            project_id: project.id,
            created_by: user,
            title: "t",
            description: "",
            status: TaskStatus::Todo,
            assignee_id: None,
        },
    )
    .await
    .unwrap();
    let patch = store::tasks::TaskPatch {
        status: Some(TaskStatus::Done),
        ..Default::default()
    };
    store::tasks::update_visible(&mut *c, user, task.id, &patch)
        .await
        .unwrap()
        .unwrap();
    let conv = store::conversations::create(&mut *c, org.into(), user.into(), "c", None)
        .await
        .unwrap();
    let (message, _) = testkit::turns::start(&mut *c, conv.id, "hello").await;
    (project.id.into(), task.id.into(), message.id)
}

#[tokio::test]
async fn a_rolled_back_change_leaves_no_outbox_row_and_a_committed_one_leaves_its_rows() {
    let db = TestDb::new().await;
    let mut tx = db.pool.begin().await.unwrap();
    changes(&mut tx).await;
    tx.rollback().await.unwrap();
    assert!(outbox_rows(&db).await.is_empty());

    let mut tx = db.pool.begin().await.unwrap();
    let (project, task, message) = changes(&mut tx).await;
    tx.commit().await.unwrap();
    assert_eq!(
        outbox_rows(&db).await,
        [
            ("project".to_owned(), project),
            ("task".to_owned(), task),
            ("task".to_owned(), task),
            ("message".to_owned(), message),
        ]
    );
}

#[tokio::test]
async fn claims_coalesce_a_source_and_skip_rows_held_elsewhere() {
    let db = TestDb::new().await;
    let mut c = db.pool.acquire().await.unwrap();
    let org = store::tenancy::insert_org(&mut c, "o").await.unwrap().id;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for id in [a, b, a, a] {
        outbox::record(&mut c, org, SourceKind::Task, id)
            .await
            .unwrap();
    }
    // the first claim takes the oldest row (a) and every other row of a
    let mut t1 = db.pool.begin().await.unwrap();
    let got = outbox::claim(&mut t1, 1, Uuid::nil().into()).await.unwrap();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|r| r.source_id == a));
    assert!(
        outbox::try_lock_source(&mut t1, SourceKind::Task, a)
            .await
            .unwrap()
    );
    // a second transaction skips them and gets b; it cannot take a's source lock
    let mut t2 = db.pool.begin().await.unwrap();
    let got2 = outbox::claim(&mut t2, 10, Uuid::nil().into())
        .await
        .unwrap();
    assert_eq!(got2.len(), 1);
    assert_eq!(got2[0].source_id, b);
    assert!(
        !outbox::try_lock_source(&mut t2, SourceKind::Task, a)
            .await
            .unwrap()
    );
    let ids: Vec<i64> = got.iter().map(|r| r.id).collect();
    assert_eq!(outbox::delete(&mut t1, &ids, &[]).await.unwrap(), 3);
    t1.commit().await.unwrap();
    t2.rollback().await.unwrap();
    assert_eq!(outbox_rows(&db).await, [("task".to_owned(), b)]);
}

#[tokio::test]
async fn claims_take_the_orgs_in_turn_and_skip_waiting_and_dead_rows() {
    let db = TestDb::new().await;
    let mut c = db.pool.acquire().await.unwrap();
    let busy = store::tenancy::insert_org(&mut c, "busy").await.unwrap().id;
    let quiet = store::tenancy::insert_org(&mut c, "quiet")
        .await
        .unwrap()
        .id;
    // the busy org's backlog is older than the quiet org's one change
    for _ in 0..50 {
        outbox::record(&mut c, busy, SourceKind::Task, Uuid::new_v4())
            .await
            .unwrap();
    }
    let late = Uuid::new_v4();
    outbox::record(&mut c, quiet, SourceKind::Task, late)
        .await
        .unwrap();
    for turn in [Uuid::nil(), Uuid::max(), busy.into(), quiet.into()] {
        let mut t = db.pool.begin().await.unwrap();
        let got = outbox::claim(&mut t, 4, turn.into()).await.unwrap();
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got.iter().any(|r| r.source_id == late), "{turn}: {got:?}");
        t.rollback().await.unwrap();
    }

    // a failed attempt waits; at the last attempt (or a permanent failure) the rows are dead
    let mut t = db.pool.begin().await.unwrap();
    let got = outbox::claim(&mut t, 100, quiet).await.unwrap();
    let row = got.iter().find(|r| r.source_id == late).unwrap().id;
    let out = outbox::fail(&mut t, &[row], "boom", 3600, 3, false)
        .await
        .unwrap();
    assert_eq!(out, outbox::FailOutcome::Retry);
    t.commit().await.unwrap();
    let mut t = db.pool.begin().await.unwrap();
    let got = outbox::claim(&mut t, 100, quiet).await.unwrap();
    assert_eq!(got.len(), 50, "the waiting row is not claimed");
    t.rollback().await.unwrap();
    sqlx::query("UPDATE index_outbox SET retry_at = now() - interval '1 s' WHERE id = $1")
        .bind(row)
        .execute(&mut *c)
        .await
        .unwrap();
    let mut t = db.pool.begin().await.unwrap();
    let got = outbox::claim(&mut t, 100, quiet).await.unwrap();
    let back = got.iter().find(|r| r.id == row).unwrap();
    assert_eq!(back.attempts, 1);
    assert_eq!(
        outbox::fail(&mut t, &[row], "boom", 0, 2, false)
            .await
            .unwrap(),
        outbox::FailOutcome::Dead
    );
    t.commit().await.unwrap();
    assert_eq!(outbox::dead_count(&mut c).await.unwrap(), 1);
    assert_eq!(outbox::depth(&mut c).await.unwrap(), 50);
    let dead = outbox::dead(&mut c, 10).await.unwrap();
    assert_eq!(
        (dead[0].attempts, dead[0].last_error.as_deref()),
        (2, Some("boom"))
    );
    // dead rows are not claimed, not even with a new row of their source; indexing that one
    // removes them
    outbox::record(&mut c, quiet, SourceKind::Task, late)
        .await
        .unwrap();
    let mut t = db.pool.begin().await.unwrap();
    let got = outbox::claim(&mut t, 100, quiet).await.unwrap();
    let mine: Vec<i64> = got
        .iter()
        .filter(|r| r.source_id == late)
        .map(|r| r.id)
        .collect();
    assert_eq!(mine.len(), 1);
    assert_ne!(mine[0], row);
    assert_eq!(
        outbox::delete(&mut t, &mine, &[(SourceKind::Task, late)])
            .await
            .unwrap(),
        2
    );
    t.commit().await.unwrap();
    assert_eq!(outbox::dead_count(&mut c).await.unwrap(), 0);
    // a permanent failure is dead at once; operators may revive dead rows
    let mut t = db.pool.begin().await.unwrap();
    let got = outbox::claim(&mut t, 1, Uuid::nil().into()).await.unwrap();
    assert_eq!(
        outbox::fail(&mut t, &[got[0].id], "refused", 0, 5, true)
            .await
            .unwrap(),
        outbox::FailOutcome::Dead
    );
    t.commit().await.unwrap();
    assert_eq!(outbox::revive_dead(&mut c).await.unwrap(), 1);
    assert_eq!(outbox::depth(&mut c).await.unwrap(), 50);
}

#[tokio::test]
async fn bulk_chunk_writes_keep_each_rows_visibility_facts_and_replace_by_key() {
    use store::embeddings::NewChunk;
    let db = TestDb::new().await;
    let mut c = db.pool.acquire().await.unwrap();
    let (project, _, _) = changes(&mut c).await;
    let org: Uuid = sqlx::query_scalar("SELECT org_id FROM projects WHERE id = $1")
        .bind(project)
        .fetch_one(&mut *c)
        .await
        .unwrap();
    let (doc, task) = (Uuid::new_v4(), Uuid::new_v4());
    let listed = Uuid::new_v4();
    let chunk = |kind: &'static str, source: Uuid, i: i32, allowed: Vec<Uuid>, text: &str| {
        let mut v = vec![0.0f32; 384];
        v[i as usize] = 1.0;
        NewChunk {
            org_id: org.into(),
            source_kind: kind,
            source_id: source,
            chunk_index: i,
            project_id: Some(project.into()),
            owner_user_id: None,
            allowed_user_ids: allowed.into_iter().map(Into::into).collect(),
            allowed_team_ids: vec![],
            title: format!("title {i}"),
            content: text.to_owned(),
            content_hash: text.as_bytes().to_vec(),
            model: "m".into(),
            embedding: pgvector::Vector::from(v),
            provenance: Default::default(),
        }
    };
    store::index::write_chunks(
        &mut c,
        &[
            chunk("document", doc, 0, vec![listed], "d0"),
            chunk("task", task, 0, vec![], "t0"),
            chunk("document", doc, 1, vec![listed], "d1"),
        ],
    )
    .await
    .unwrap();
    store::index::write_chunks(&mut c, &[chunk("task", task, 0, vec![], "t0 new")])
        .await
        .unwrap();
    let rows: Vec<(String, i32, Vec<Uuid>, String, i32)> = sqlx::query_as(
        "SELECT source_kind, chunk_index, allowed_user_ids, content, dim FROM embeddings
         ORDER BY source_kind, chunk_index",
    )
    .fetch_all(&mut *c)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            ("document".to_owned(), 0, vec![listed], "d0".to_owned(), 384),
            ("document".to_owned(), 1, vec![listed], "d1".to_owned(), 384),
            ("task".to_owned(), 0, vec![], "t0 new".to_owned(), 384),
        ]
    );
    let hashes = store::index::chunk_hashes(&mut c, SourceKind::Document, doc, "m")
        .await
        .unwrap();
    assert_eq!(hashes.len(), 2);
}
