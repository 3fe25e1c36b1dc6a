//! Conversations: owner-only reads, live narrowing to visible projects, and an idempotent
//! completion (one answer per response, whatever the redeliveries).

use store::conversations::{self, Answer};
use store::projects::NewProject;
use store::{Role, StoreError, Visibility};
use testkit::TestDb;
use uuid::Uuid;

struct World {
    db: TestDb,
    org: Uuid,
    alice: Uuid,
    bob: Uuid,
    private_p: Uuid,
    open_p: Uuid,
}

async fn world() -> World {
    let db = TestDb::new().await;
    let mut c = db.pool.acquire().await.unwrap();
    let org = store::tenancy::insert_org(&mut c, "o").await.unwrap();
    let mut users = Vec::new();
    for (i, role) in [Role::Member, Role::Member].iter().enumerate() {
        let u = store::tenancy::insert_user(
            &mut c,
            &format!("u{i}-{}@x.io", Uuid::new_v4().simple()),
            "U",
            "x",
        )
        .await
        .unwrap();
        store::tenancy::insert_membership(&mut c, org.id, u.id, *role)
            .await
            .unwrap();
        users.push(u.id);
    }
    let private_p = store::projects::insert_project(
        &mut c,
        &NewProject {
            org_id: org.id,
            created_by: users[0],
            name: "secret",
            description: "",
            visibility: Visibility::Private,
            team_id: None,
        },
    )
    .await
    .unwrap()
    .id;
    let open_p = store::projects::insert_project(
        &mut c,
        &NewProject {
            org_id: org.id,
            created_by: users[0],
            name: "open",
            description: "",
            visibility: Visibility::Org,
            team_id: None,
        },
    )
    .await
    .unwrap()
    .id;
    drop(c);
    World {
        db,
        org: org.id,
        alice: users[0],
        bob: users[1],
        private_p,
        open_p,
    }
}

#[tokio::test]
async fn only_the_owner_reads_a_conversation() {
    let w = world().await;
    let mut c = w.db.pool.acquire().await.unwrap();
    let conv = conversations::create(&mut c, w.org, w.alice, "t", None)
        .await
        .unwrap();
    assert!(
        conversations::get_own(&mut c, w.alice, conv.id)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        conversations::get_own(&mut c, w.bob, conv.id)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        conversations::list_own(&w.db.pool, w.bob, None, 10)
            .await
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        conversations::list_own(&w.db.pool, w.alice, None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn narrowing_accepts_only_visible_projects_and_follows_live_membership() {
    let w = world().await;
    let mut c = w.db.pool.acquire().await.unwrap();
    // bob cannot see alice's private project: refused, nothing written
    let err = conversations::create(&mut c, w.org, w.bob, "t", Some(&[w.private_p]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::InvalidReference {
                field: "project_ids",
                ..
            }
        ),
        "{err:?}"
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
        .fetch_one(&mut *c)
        .await
        .unwrap();
    assert_eq!(n, 0);

    let all = conversations::create(&mut c, w.org, w.alice, "all", None)
        .await
        .unwrap();
    let narrow = conversations::create(&mut c, w.org, w.alice, "n", Some(&[w.private_p]))
        .await
        .unwrap();
    let mut both = vec![w.private_p, w.open_p];
    both.sort();
    assert_eq!(
        conversations::usable_projects(&mut c, w.alice, all.id)
            .await
            .unwrap(),
        both
    );
    assert_eq!(
        conversations::usable_projects(&mut c, w.alice, narrow.id)
            .await
            .unwrap(),
        vec![w.private_p]
    );
    assert_eq!(
        conversations::scope(&mut c, narrow.id).await.unwrap(),
        vec![w.private_p]
    );
    // another user asking about alice's conversation gets nothing
    assert!(
        conversations::usable_projects(&mut c, w.bob, all.id)
            .await
            .unwrap()
            .is_empty()
    );

    // alice loses the private project: it is gone from both at once
    store::projects::remove_member(&mut c, w.private_p, w.alice)
        .await
        .unwrap();
    assert_eq!(
        conversations::usable_projects(&mut c, w.alice, all.id)
            .await
            .unwrap(),
        vec![w.open_p]
    );
    assert!(
        conversations::usable_projects(&mut c, w.alice, narrow.id)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn recent_messages_are_the_last_n_in_order() {
    let w = world().await;
    let mut c = w.db.pool.acquire().await.unwrap();
    let conv = conversations::create(&mut c, w.org, w.alice, "t", None)
        .await
        .unwrap();
    let mut last = None;
    for i in 0..10 {
        let (m, _) = conversations::start_turn(&mut c, conv.id, &format!("m{i}"))
            .await
            .unwrap();
        last = Some(m.id);
    }
    let recent = conversations::recent_messages(&mut c, conv.id, last.unwrap(), 4)
        .await
        .unwrap();
    let texts: Vec<&str> = recent.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(texts, vec!["m6", "m7", "m8", "m9"]);
}

#[tokio::test]
async fn a_response_completes_once() {
    let w = world().await;
    let mut c = w.db.pool.acquire().await.unwrap();
    let conv = conversations::create(&mut c, w.org, w.alice, "t", None)
        .await
        .unwrap();
    let (_, response) = conversations::start_turn(&mut c, conv.id, "hi")
        .await
        .unwrap();
    assert_eq!(
        conversations::mark_streaming(&mut c, response.id)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        conversations::mark_streaming(&mut c, response.id)
            .await
            .unwrap(),
        1,
        "a restart is counted"
    );
    let answer = |text: &'static str| Answer {
        content: text,
        model: "m1",
        prompt_tokens: Some(3),
        completion_tokens: Some(2),
        latency_ms: 5,
        citations: serde_json::json!([]),
    };
    let (first, stored) = conversations::complete(&mut c, &response, &answer("first"))
        .await
        .unwrap();
    assert!(stored, "the first call stores the answer");
    let (second, stored) = conversations::complete(&mut c, &response, &answer("second"))
        .await
        .unwrap();
    assert!(!stored, "a second call stores nothing");
    assert_eq!(first.id, second.id);
    assert_eq!(second.content, "first");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE role = 'assistant'")
        .fetch_one(&mut *c)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let r = conversations::get_response_own(&mut c, w.alice, conv.id, response.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, "completed");
    assert_eq!(r.model.as_deref(), Some("m1"));
    // failing after completion changes nothing
    conversations::fail(&mut c, response.id, "x", "y")
        .await
        .unwrap();
    let r = conversations::get_response_own(&mut c, w.alice, conv.id, response.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, "completed");
    assert!(
        conversations::get_response_own(&mut c, w.bob, conv.id, response.id)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        conversations::mark_streaming(&mut c, response.id)
            .await
            .unwrap(),
        -1,
        "no restart after completion"
    );
}

#[tokio::test]
async fn start_own_turn_writes_all_for_the_owner_and_nothing_for_anyone_else() {
    let w = world().await;
    let mut c = w.db.pool.acquire().await.unwrap();
    let conv = conversations::create(&mut c, w.org, w.alice, "t", None)
        .await
        .unwrap();
    let (m, r) = conversations::start_own_turn(&mut c, w.alice, conv.id, "hello")
        .await
        .unwrap()
        .expect("alice's conversation");
    assert_eq!((m.role.as_str(), m.content.as_str()), ("user", "hello"));
    assert_eq!(m.conversation_id, conv.id);
    assert_eq!((r.user_message_id, r.conversation_id), (m.id, conv.id));
    assert_eq!((r.status.as_str(), r.starts), ("queued", 0));
    // what was returned is what is stored
    let stored = conversations::get_response_own(&mut c, w.alice, conv.id, r.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((stored.id, stored.user_message_id), (r.id, m.id));
    assert_eq!(stored.created_at, r.created_at);
    let recent = conversations::recent_messages(&mut c, conv.id, m.id, 5)
        .await
        .unwrap();
    assert_eq!(recent.last().map(|x| (x.id, x.seq)), Some((m.id, m.seq)));
    let updated = conversations::get_own(&mut c, w.alice, conv.id)
        .await
        .unwrap()
        .unwrap()
        .updated_at;
    assert!(updated >= conv.updated_at);

    // bob (same org) and a missing id: nothing written
    let count = |table: &'static str| {
        let pool = w.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM {table}"
            )))
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let (msgs, resps) = (count("messages").await, count("responses").await);
    assert!(
        conversations::start_own_turn(&mut c, w.bob, conv.id, "sneaky")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        conversations::start_own_turn(&mut c, w.alice, uuid::Uuid::now_v7(), "lost")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        (count("messages").await, count("responses").await),
        (msgs, resps)
    );
}
