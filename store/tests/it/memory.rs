//! Memory entries: capacity retention per owner and tier (also under concurrent inserts),
//! near-duplicate refresh, and the owner shape.

use store::memory::{self, Inserted, NewEntry, Owner, Tier};
use store::{Role, StoreError};
use testkit::TestDb;
use uuid::Uuid;

async fn org_and_user(db: &TestDb) -> (Uuid, Uuid) {
    let mut c = db.pool.acquire().await.unwrap();
    let org = store::tenancy::insert_org(&mut c, "acme").await.unwrap().id;
    let user = store::tenancy::insert_user(
        &mut c,
        &format!("u-{}@x.io", Uuid::new_v4().simple()),
        "U",
        "x",
    )
    .await
    .unwrap()
    .id;
    store::tenancy::insert_membership(&mut c, org, user, Role::Member)
        .await
        .unwrap();
    (org.into(), user.into())
}

fn entry(owner: Owner, content: &str, embedding: Option<Vec<f32>>) -> NewEntry {
    NewEntry {
        owner,
        content: content.into(),
        source_conversation_id: None,
        source_message_ids: vec![],
        author_user_id: None,
        provenance: Default::default(),
        embedding: embedding.map(|v| ("m".to_owned(), v)),
    }
}

async fn insert(db: &TestDb, e: &NewEntry, capacity: u32) -> Result<Inserted, StoreError> {
    let mut tx = db.pool.begin().await.unwrap();
    let r = memory::insert(&mut tx, e, capacity, 0.1).await?;
    tx.commit().await.unwrap();
    Ok(r)
}

async fn contents(db: &TestDb, org: Uuid, tier: Tier) -> Vec<String> {
    let mut c = db.pool.acquire().await.unwrap();
    memory::list(&mut c, org, Some(tier), None, None, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.content)
        .collect()
}

#[tokio::test]
async fn capacity_plus_one_inserts_keep_the_newest_n_per_owner() {
    let db = TestDb::new().await;
    let (org, user) = org_and_user(&db).await;
    let owner = Owner::user(org, user);
    for i in 1..=4 {
        let r = insert(&db, &entry(owner, &format!("fact {i}"), None), 3)
            .await
            .unwrap();
        let removed = match r {
            Inserted::New { removed, .. } => removed,
            other => panic!("{other:?}"),
        };
        assert_eq!(removed, u64::from(i == 4));
    }
    // newest first
    assert_eq!(
        contents(&db, org, Tier::User).await,
        ["fact 4", "fact 3", "fact 2"]
    );
    // other owners and tiers are not trimmed by this owner's capacity
    insert(&db, &entry(Owner::org(org), "org fact", None), 3)
        .await
        .unwrap();
    assert_eq!(contents(&db, org, Tier::Org).await, ["org fact"]);
    assert_eq!(contents(&db, org, Tier::User).await.len(), 3);
}

#[tokio::test]
async fn concurrent_inserts_never_leave_more_than_the_capacity() {
    let db = TestDb::new().await;
    let (org, user) = org_and_user(&db).await;
    let owner = Owner::user(org, user);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..24 {
        let pool = db.pool.clone();
        tasks.spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            let r = memory::insert(&mut tx, &entry(owner, &format!("fact {i}"), None), 5, 0.1)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            match r {
                Inserted::New { removed, .. } => removed,
                other => panic!("{other:?}"),
            }
        });
    }
    let mut removed = Vec::new();
    while let Some(r) = tasks.join_next().await {
        removed.push(r.unwrap());
    }
    let kept = contents(&db, org, Tier::User).await;
    assert_eq!(kept.len(), 5, "{kept:?}");
    // one after the other under the owner's lock: the first five removed nothing, each later
    // insert removed exactly the oldest one
    removed.sort();
    assert_eq!(removed, [vec![0u64; 5], vec![1u64; 19]].concat());
}

#[tokio::test]
async fn a_near_duplicate_refreshes_instead_of_adding() {
    let db = TestDb::new().await;
    let (org, user) = org_and_user(&db).await;
    let owner = Owner::user(org, user);
    let a = vec![1.0, 0.0, 0.0];
    let first = insert(&db, &entry(owner, "likes tea", Some(a.clone())), 10)
        .await
        .unwrap();
    let Inserted::New { id, .. } = first else {
        panic!("{first:?}")
    };
    // almost the same direction: refreshed with the new wording
    let again = insert(
        &db,
        &entry(owner, "likes green tea", Some(vec![0.99, 0.05, 0.0])),
        10,
    )
    .await
    .unwrap();
    assert_eq!(again, Inserted::Refreshed { id });
    assert_eq!(contents(&db, org, Tier::User).await, ["likes green tea"]);
    // far apart, a different dimension, or no embedding: new entries
    for e in [
        entry(owner, "ships on Fridays", Some(vec![0.0, 1.0, 0.0])),
        entry(owner, "other model", Some(vec![1.0, 0.0])),
        entry(owner, "no vector", None),
    ] {
        assert!(matches!(
            insert(&db, &e, 10).await.unwrap(),
            Inserted::New { .. }
        ));
    }
    // the same vector for another owner is not a duplicate
    let other = Owner::org(org);
    assert!(matches!(
        insert(&db, &entry(other, "likes tea", Some(a)), 10)
            .await
            .unwrap(),
        Inserted::New { .. }
    ));
    assert_eq!(contents(&db, org, Tier::User).await.len(), 4);
}

#[tokio::test]
async fn a_project_entry_must_name_a_project_of_its_org() {
    let db = TestDb::new().await;
    let (org, _) = org_and_user(&db).await;
    let e = insert(
        &db,
        &entry(Owner::project(org, Uuid::now_v7()), "x", None),
        10,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::InvalidReference {
                field: "project",
                ..
            }
        ),
        "{e:?}"
    );
    let mut c = db.pool.acquire().await.unwrap();
    assert!(!memory::delete(&mut c, org, Uuid::now_v7()).await.unwrap());
}

/// `claim_summary` as `Ok(summarized_up_to)` when claimed, else `Err("busy" | "gone")`.
async fn claim(
    c: &mut sqlx::PgConnection,
    conv: Uuid,
    job: Uuid,
    lease: std::time::Duration,
) -> Result<i64, &'static str> {
    match memory::claim_summary(c, conv, job, lease).await.unwrap() {
        memory::SummaryClaim::Claimed(s) => Ok(s.summarized_up_to),
        memory::SummaryClaim::Busy => Err("busy"),
        memory::SummaryClaim::Gone => Err("gone"),
    }
}

/// `save_summary` of `job` folding `from..up_to` into the summary `text`: whether it wrote.
async fn save(
    c: &mut sqlx::PgConnection,
    conv: Uuid,
    job: Uuid,
    from: i64,
    up_to: i64,
    text: &str,
) -> bool {
    memory::save_summary(c, conv, job, from, text, up_to, "m", &[])
        .await
        .unwrap()
}

/// A summary's claim (the summarize runs' lease) is one job's until that job writes, releases
/// it or lets it expire; the same job (redelivered) takes its own claim back; a write of a job
/// whose claim passed to another is refused.
#[tokio::test]
async fn a_summary_claim_is_one_jobs_until_written_released_or_expired() {
    use std::time::Duration;
    let db = TestDb::new().await;
    let (org, user) = org_and_user(&db).await;
    let mut c = db.pool.acquire().await.unwrap();
    let conv = store::conversations::create(&mut c, org, user, "c", None)
        .await
        .unwrap()
        .id;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let (long, short) = (Duration::from_secs(60), Duration::from_millis(200));

    assert_eq!(claim(&mut c, conv, a, long).await, Ok(0));
    assert_eq!(claim(&mut c, conv, b, long).await, Err("busy"));
    // redelivered: the same job takes its claim back
    assert_eq!(claim(&mut c, conv, a, long).await, Ok(0));
    // another job's release does nothing; the holder's frees the claim
    memory::release_summary(&mut c, conv, b).await.unwrap();
    assert_eq!(claim(&mut c, conv, b, long).await, Err("busy"));
    memory::release_summary(&mut c, conv, a).await.unwrap();

    // b claims briefly; once that expires, a takes over
    assert_eq!(claim(&mut c, conv, b, short).await, Ok(0));
    assert_eq!(claim(&mut c, conv, a, long).await, Err("busy"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(claim(&mut c, conv, a, long).await, Ok(0));
    // b's late write is refused; a's is taken and ends the claim
    assert!(!save(&mut c, conv, b, 0, 5, "B").await);
    assert!(save(&mut c, conv, a, 0, 5, "A").await);
    assert_eq!(claim(&mut c, conv, b, long).await, Ok(5));
    // a write from a stale starting point is refused too
    assert!(!save(&mut c, conv, b, 0, 9, "B").await);
    let s = memory::summary(&mut c, conv).await.unwrap().unwrap();
    assert_eq!((s.summary.as_str(), s.summarized_up_to), ("A", 5));

    assert_eq!(claim(&mut c, Uuid::now_v7(), a, long).await, Err("gone"));
}

async fn member(db: &TestDb, org: Uuid) -> Uuid {
    let mut c = db.pool.acquire().await.unwrap();
    let user = store::tenancy::insert_user(
        &mut c,
        &format!("m-{}@x.io", Uuid::new_v4().simple()),
        "M",
        "x",
    )
    .await
    .unwrap()
    .id;
    store::tenancy::insert_membership(&mut c, org.into(), user, Role::Member)
        .await
        .unwrap();
    user.into()
}

/// A project fact by `author`, with `embedding`.
fn authored(owner: Owner, author: Uuid, content: &str, embedding: Option<Vec<f32>>) -> NewEntry {
    NewEntry {
        author_user_id: Some(author),
        ..entry(owner, content, embedding)
    }
}

async fn insert_authored(db: &TestDb, e: &NewEntry, capacity: u32, share: u32) -> Inserted {
    let mut tx = db.pool.begin().await.unwrap();
    let r = memory::insert_with(&mut tx, e, capacity, Some(share), 0.1)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    r
}

async fn authors(db: &TestDb, project: Uuid) -> Vec<(Uuid, String)> {
    sqlx::query_as(
        "SELECT author_user_id, content FROM conversation_memories
         WHERE tier = 'project' AND project_id = $1 ORDER BY updated_at, id",
    )
    .bind(project)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn one_author_cannot_fill_a_project_or_refresh_anothers_facts() {
    let db = TestDb::new().await;
    let (org, alice) = org_and_user(&db).await;
    let bob = member(&db, org).await;
    let mut c = db.pool.acquire().await.unwrap();
    let project = store::projects::insert_project(
        &mut c,
        &store::projects::NewProject {
            org_id: org.into(),
            created_by: alice.into(),
            name: "Apollo",
            description: "",
            visibility: store::Visibility::Org,
            team_id: None,
        },
    )
    .await
    .unwrap()
    .id;
    drop(c);
    let owner = Owner::project(org, project.into());

    // bob's two facts, then alice tries to fill the project (capacity 5, 2 per author)
    for i in 0..2 {
        insert_authored(&db, &authored(owner, bob, &format!("bob {i}"), None), 5, 2).await;
    }
    for i in 0..6 {
        insert_authored(
            &db,
            &authored(owner, alice, &format!("alice {i}"), None),
            5,
            2,
        )
        .await;
    }
    let kept = authors(&db, project.into()).await;
    assert_eq!(
        kept,
        vec![
            (bob, "bob 0".to_owned()),
            (bob, "bob 1".to_owned()),
            (alice, "alice 4".to_owned()),
            (alice, "alice 5".to_owned()),
        ],
        "alice's oldest went, bob's stayed"
    );

    // a near-duplicate of bob's fact by alice is a fact of her own: bob's is not refreshed
    let v = vec![1.0_f32, 0.0, 0.0];
    let first = insert_authored(
        &db,
        &authored(owner, bob, "ships friday", Some(v.clone())),
        5,
        2,
    )
    .await;
    let again = insert_authored(
        &db,
        &authored(owner, alice, "ships on friday", Some(v.clone())),
        5,
        2,
    )
    .await;
    assert!(matches!(first, Inserted::New { .. }));
    assert!(matches!(again, Inserted::New { .. }), "{again:?}");
    // the same author's near-duplicate refreshes
    let third = insert_authored(&db, &authored(owner, bob, "ships fridays", Some(v)), 5, 2).await;
    match (first, third) {
        (Inserted::New { id, .. }, Inserted::Refreshed { id: refreshed }) => {
            assert_eq!(id, refreshed)
        }
        other => panic!("{other:?}"),
    }
    let kept = authors(&db, project.into()).await;
    assert_eq!(kept.iter().filter(|(a, _)| *a == bob).count(), 2);
    assert_eq!(kept.iter().filter(|(a, _)| *a == alice).count(), 2);
    assert!(kept.len() <= 5);
}

/// A private project of `org` created by `creator` (its first member).
async fn private_project(db: &TestDb, org: Uuid, creator: Uuid, name: &str) -> Uuid {
    let mut c = db.pool.acquire().await.unwrap();
    store::projects::insert_project(
        &mut c,
        &store::projects::NewProject {
            org_id: org.into(),
            created_by: creator.into(),
            name,
            description: "",
            visibility: store::Visibility::Private,
            team_id: None,
        },
    )
    .await
    .unwrap()
    .id
    .into()
}

async fn prompt_contents(db: &TestDb, user: Uuid, conversation: Uuid) -> Vec<String> {
    let mut c = db.pool.acquire().await.unwrap();
    let mut v: Vec<String> = memory::for_prompt(&mut c, user, conversation, None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.content)
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn derived_memory_and_summaries_follow_their_sources_live() {
    use store::provenance::Provenance;
    let db = TestDb::new().await;
    let (org, author) = org_and_user(&db).await;
    let other = member(&db, org).await;
    let p = private_project(&db, org, author, "Apollo").await;
    store::projects::add_member(
        &mut db.pool.acquire().await.unwrap(),
        org.into(),
        p.into(),
        other.into(),
    )
    .await
    .unwrap();
    // an unrestricted document of the project, and the facts derived from it
    let mut c = db.pool.acquire().await.unwrap();
    let doc = testkit::retrieval::document(&mut c, org, p, "Plan").await;
    drop(c);
    let from_doc = Provenance {
        source_project_ids: vec![p.into()],
        source_document_ids: vec![doc.into()],
        narrow: false,
    };
    let mut mine = authored(Owner::project(org, p), author, "project fact", None);
    mine.provenance = from_doc.clone();
    insert_authored(&db, &mine, 10, 10).await;
    let mut own = entry(Owner::user(org, other), "other's own fact", None);
    own.author_user_id = Some(other);
    own.provenance = from_doc.clone();
    insert(&db, &own, 10).await.unwrap();

    let mut c = db.pool.acquire().await.unwrap();
    let conv_author = store::conversations::create(&mut c, org, author, "a", None)
        .await
        .unwrap()
        .id;
    let conv_other = store::conversations::create(&mut c, org, other, "o", None)
        .await
        .unwrap()
        .id;
    drop(c);
    assert_eq!(
        prompt_contents(&db, author, conv_author).await,
        ["project fact"]
    );
    assert_eq!(
        prompt_contents(&db, other, conv_other).await,
        ["other's own fact", "project fact"]
    );

    // the document restricted to its author since: the project fact is the author's alone
    sqlx::query("UPDATE documents SET visible_to_user_ids = $2 WHERE id = $1")
        .bind(doc)
        .bind(vec![author])
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        prompt_contents(&db, author, conv_author).await,
        ["project fact"]
    );
    assert!(prompt_contents(&db, other, conv_other).await.is_empty());
    sqlx::query("UPDATE documents SET visible_to_user_ids = '{}' WHERE id = $1")
        .bind(doc)
        .execute(&db.pool)
        .await
        .unwrap();

    // a summary that drew on the project: withheld once the member leaves it, then reset
    sqlx::query(
        "INSERT INTO conversation_summaries (conversation_id, summary, summarized_up_to,
                                             source_project_ids)
         VALUES ($1, 'the plan', 3, $2)",
    )
    .bind(conv_other)
    .bind(vec![p])
    .execute(&db.pool)
    .await
    .unwrap();
    let mut c = db.pool.acquire().await.unwrap();
    let start = memory::prompt_start(&mut c, other, conv_other)
        .await
        .unwrap();
    assert_eq!(start.summary.as_deref(), Some("the plan"));
    assert!(!start.summary_hidden && start.any_entry);
    store::projects::remove_member(&mut c, p.into(), other.into())
        .await
        .unwrap();
    let start = memory::prompt_start(&mut c, other, conv_other)
        .await
        .unwrap();
    assert_eq!(start.summary, None);
    assert!(start.summary_hidden);
    assert!(
        !start.any_entry,
        "the facts drawn from the project are gone with it"
    );
    assert!(
        memory::reset_hidden_summary(&mut c, other, conv_other)
            .await
            .unwrap()
    );
    let s = memory::summary(&mut c, conv_other).await.unwrap().unwrap();
    assert_eq!((s.summary.as_str(), s.summarized_up_to), ("", 0));
    let start = memory::prompt_start(&mut c, other, conv_other)
        .await
        .unwrap();
    assert!(!start.summary_hidden);

    // deleting the document deletes what was derived from it
    let d = store::documents::get_accessible(&mut c, author.into(), doc.into(), true)
        .await
        .unwrap()
        .unwrap();
    assert!(d.can_read && !d.org_admin);
    assert!(store::documents::delete(&mut c, &d.document).await.unwrap());
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM conversation_memories")
        .fetch_one(&mut *c)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

/// The set-based provenance rule of memory reads (`provenance::visible_sql`) keeps
/// `can_see_document`'s meaning for a document restricted to a team: a user's own fact drawn
/// from it is in their prompt while they are in the team, and out once they leave it.
#[tokio::test]
async fn a_fact_from_a_team_restricted_document_follows_the_team() {
    use store::provenance::Provenance;
    let db = TestDb::new().await;
    let (org, user) = org_and_user(&db).await;
    let p = private_project(&db, org, user, "Apollo").await;
    let mut c = db.pool.acquire().await.unwrap();
    let team = store::tenancy::insert_team(&mut c, org.into(), "core")
        .await
        .unwrap()
        .id;
    store::tenancy::add_team_member(&db.pool, org.into(), team, user.into())
        .await
        .unwrap();
    let doc = testkit::retrieval::document(&mut c, org, p, "Plan").await;
    sqlx::query("UPDATE documents SET visible_to_team_ids = $2 WHERE id = $1")
        .bind(doc)
        .bind(vec![team])
        .execute(&mut *c)
        .await
        .unwrap();
    let conv = store::conversations::create(&mut c, org, user, "c", None)
        .await
        .unwrap()
        .id;
    drop(c);
    let mut own = entry(Owner::user(org, user), "from the team's plan", None);
    own.author_user_id = Some(user);
    own.provenance = Provenance {
        source_project_ids: vec![p.into()],
        source_document_ids: vec![doc.into()],
        narrow: true,
    };
    insert(&db, &own, 10).await.unwrap();
    assert_eq!(
        prompt_contents(&db, user, conv).await,
        ["from the team's plan"]
    );
    store::tenancy::remove_team_member(&db.pool, org.into(), team, user.into())
        .await
        .unwrap();
    assert!(prompt_contents(&db, user, conv).await.is_empty());
}
