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
    let conv = store::conversations::create(&mut *c, org, user, "c", None)
        .await
        .unwrap();
    let (message, _) = store::conversations::start_turn(&mut *c, conv.id, "hello")
        .await
        .unwrap();
    (project.id, task.id, message.id)
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
    let got = outbox::claim(&mut t1, 1).await.unwrap();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|r| r.source_id == a));
    assert!(
        outbox::try_lock_source(&mut t1, SourceKind::Task, a)
            .await
            .unwrap()
    );
    // a second transaction skips them and gets b; it cannot take a's source lock
    let mut t2 = db.pool.begin().await.unwrap();
    let got2 = outbox::claim(&mut t2, 10).await.unwrap();
    assert_eq!(got2.len(), 1);
    assert_eq!(got2[0].source_id, b);
    assert!(
        !outbox::try_lock_source(&mut t2, SourceKind::Task, a)
            .await
            .unwrap()
    );
    let ids: Vec<i64> = got.iter().map(|r| r.id).collect();
    assert_eq!(outbox::delete(&mut t1, &ids).await.unwrap(), 3);
    t1.commit().await.unwrap();
    t2.rollback().await.unwrap();
    assert_eq!(outbox_rows(&db).await, [("task".to_owned(), b)]);
}
