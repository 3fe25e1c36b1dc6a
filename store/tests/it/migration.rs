//! The provenance migration's backfill (`20261204100001_provenance.sql`) on rows of the shape
//! before it: the database is migrated up to the previous migration, legacy rows go in, then
//! the rest runs, as it will on a deployed database.

use serde_json::json;
use store::memory;
use store::{Role, Visibility};
use testkit::TestDb;
use uuid::Uuid;

/// The last migration before provenance.
const BEFORE_PROVENANCE: i64 = 20261203190001;

struct Legacy<'a> {
    c: &'a mut sqlx::PgConnection,
    org: Uuid,
}

impl Legacy<'_> {
    /// A message of the old shape; returns its id.
    async fn message(
        &mut self,
        conversation: Uuid,
        role: &str,
        content: &str,
        response: Option<Uuid>,
        citations: serde_json::Value,
    ) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO messages (id, conversation_id, role, content, response_id, citations)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(conversation)
        .bind(role)
        .bind(content)
        .bind(response)
        .bind(citations)
        .execute(&mut *self.c)
        .await
        .unwrap();
        id
    }

    /// A finished turn: the user's message, its response, the tool results (if any) and the
    /// answer; returns the answer's id.
    async fn turn(
        &mut self,
        conversation: Uuid,
        tool_results: &[serde_json::Value],
        citations: serde_json::Value,
    ) -> Uuid {
        let q = self
            .message(conversation, "user", "q", None, json!([]))
            .await;
        let response = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO responses (id, conversation_id, user_message_id, status)
             VALUES ($1, $2, $3, 'completed')",
        )
        .bind(response)
        .bind(conversation)
        .bind(q)
        .execute(&mut *self.c)
        .await
        .unwrap();
        for r in tool_results {
            self.message(
                conversation,
                "tool",
                &r.to_string(),
                Some(response),
                json!([]),
            )
            .await;
        }
        self.message(conversation, "assistant", "a", Some(response), citations)
            .await
    }

    async fn fact(
        &mut self,
        tier: &str,
        project: Option<Uuid>,
        user: Option<Uuid>,
        content: &str,
        conversation: Option<Uuid>,
        messages: &[Uuid],
    ) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO conversation_memories (id, org_id, tier, project_id, user_id, content,
                                                source_conversation_id, source_message_ids)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(id)
        .bind(self.org)
        .bind(tier)
        .bind(project)
        .bind(user)
        .bind(content)
        .bind(conversation)
        .bind(messages)
        .execute(&mut *self.c)
        .await
        .unwrap();
        id
    }
}

async fn projects_of(c: &mut sqlx::PgConnection, table: &str, id: Uuid) -> (Vec<Uuid>, Vec<Uuid>) {
    let key = if table == "conversation_summaries" {
        "conversation_id"
    } else {
        "id"
    };
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT source_project_ids, source_document_ids FROM {table} WHERE {key} = $1"
    )))
    .bind(id)
    .fetch_one(c)
    .await
    .unwrap()
}

async fn prompt_facts(c: &mut sqlx::PgConnection, user: Uuid, conversation: Uuid) -> Vec<String> {
    let mut v: Vec<String> = memory::for_prompt(c, user, conversation, None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.content)
        .collect();
    v.sort();
    v
}

/// What an earlier answer, summary or fact is known to have drawn on — citations, tool results,
/// cited messages, the conversation's other answers — is backfilled, and what is not known is
/// taken to be every project its conversation could draw on: so a project lost before or after
/// the migration hides it.
#[tokio::test]
async fn the_backfill_records_what_legacy_items_drew_on_and_errs_narrow() {
    let db = TestDb::unmigrated().await;
    store::MIGRATOR
        .run_to(BEFORE_PROVENANCE, &db.pool)
        .await
        .unwrap();
    let mut c = db.pool.acquire().await.unwrap();
    let org = store::tenancy::insert_org(&mut c, "acme").await.unwrap().id;
    let (oe, ue) = (
        format!("o-{}@x.io", Uuid::new_v4().simple()),
        format!("u-{}@x.io", Uuid::new_v4().simple()),
    );
    let owner = store::tenancy::insert_user(&mut c, &oe, "O", "x")
        .await
        .unwrap()
        .id;
    let u = store::tenancy::insert_user(&mut c, &ue, "U", "x")
        .await
        .unwrap()
        .id;
    store::tenancy::insert_membership(&mut c, org, owner, Role::Owner)
        .await
        .unwrap();
    store::tenancy::insert_membership(&mut c, org, u, Role::Member)
        .await
        .unwrap();
    let mut project = async |name: &str| {
        let id = store::projects::insert_project(
            &mut c,
            &store::projects::NewProject {
                org_id: org,
                created_by: owner,
                name,
                description: "",
                visibility: Visibility::Private,
                team_id: None,
            },
        )
        .await
        .unwrap()
        .id;
        store::projects::add_member(&mut c, org, id, u)
            .await
            .unwrap();
        id
    };
    let (p, q, r) = (project("P").await, project("Q").await, project("R").await);
    let doc = testkit::retrieval::document(&mut c, org.into(), q.into(), "Q plan").await;
    let mut conversation = async || {
        store::conversations::create(&mut c, org.into(), u.into(), "c", None)
            .await
            .unwrap()
            .id
    };
    let (c1, c2, c3, c4) = (
        conversation().await,
        conversation().await,
        conversation().await,
        conversation().await,
    );
    let mut l = Legacy {
        c: &mut c,
        org: org.into(),
    };
    // c1: an answer that read a task of Q through a tool
    let a1 = l
        .turn(
            c1,
            &[json!({"task": {"id": Uuid::now_v7(), "project_id": q, "title": "Q secret"}})],
            json!([]),
        )
        .await;
    // c2: an answer citing a1 (a message chunk), then one citing nothing; its summary and a
    // project fact learnt from the second
    let a2 = l
        .turn(
            c2,
            &[],
            json!([{"source_kind": "message", "source_id": a1, "title": "", "chunk": 0}]),
        )
        .await;
    let a3 = l.turn(c2, &[], json!([])).await;
    let f1 = l
        .fact("project", Some(p.into()), None, "from c2", Some(c2), &[a3])
        .await;
    // c3: an answer citing Q's document, and a user fact learnt from it
    let a4 = l
        .turn(
            c3,
            &[],
            json!([{"source_kind": "document", "source_id": doc, "title": "Q plan", "chunk": 0}]),
        )
        .await;
    l.fact("user", None, Some(u.into()), "from c3", Some(c3), &[a4])
        .await;
    // c4: an answer and a fact of unknown origin; an operator's project fact
    let a5 = l.turn(c4, &[], json!([])).await;
    l.fact("user", None, Some(u.into()), "from c4", Some(c4), &[a5])
        .await;
    l.fact("project", Some(p.into()), None, "operator's", None, &[])
        .await;
    let a3_seq: i64 = sqlx::query_scalar("SELECT seq FROM messages WHERE id = $1")
        .bind(a3)
        .fetch_one(&mut *c)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO conversation_summaries (conversation_id, summary, summarized_up_to)
         VALUES ($1, 'the Q secret', $2)",
    )
    .bind(c2)
    .bind(a3_seq)
    .execute(&mut *c)
    .await
    .unwrap();
    // the user left Q before the migration
    store::projects::remove_member(&mut c, q, u).await.unwrap();
    drop(c);

    store::MIGRATOR.run(&db.pool).await.unwrap();

    let mut c = db.pool.acquire().await.unwrap();
    let has = |v: &[Uuid], want: &[Uuid]| want.iter().all(|w| v.contains(w));
    for (what, id, want) in [
        ("a tool result", a1, vec![q, p, r]),
        ("a cited message", a2, vec![q, p, r]),
        ("another answer of its conversation", a3, vec![q, p, r]),
        ("a cited document", a4, vec![q, p, r]),
        ("the conversation's projects", a5, vec![p, r]),
    ] {
        let (projects, _) = projects_of(&mut c, "messages", id).await;
        assert!(
            has(&projects, &store::ProjectId::uuids(&want)),
            "{what}: {projects:?}"
        );
    }
    assert_eq!(projects_of(&mut c, "messages", a4).await.1, vec![doc]);
    let (summary, _) = projects_of(&mut c, "conversation_summaries", c2).await;
    assert!(has(&summary, &[q.into()]), "{summary:?}");
    let (fact, _) = projects_of(&mut c, "conversation_memories", f1).await;
    assert!(has(&fact, &[p.into(), q.into()]), "{fact:?}");
    let (tier, author): (String, Option<Uuid>) =
        sqlx::query_as("SELECT tier, author_user_id FROM conversation_memories WHERE id = $1")
            .bind(f1)
            .fetch_one(&mut *c)
            .await
            .unwrap();
    assert_eq!((tier.as_str(), author), ("user", Some(u.into())));

    // read filters: what drew on Q is gone for the user, the summary withheld
    assert_eq!(
        prompt_facts(&mut c, u.into(), c4).await,
        ["from c4", "operator's"]
    );
    let start = memory::prompt_start(&mut c, u.into(), c2).await.unwrap();
    assert!(start.summary_hidden && start.summary.is_none());
    // and what is not known follows the conversation's projects after the migration
    store::projects::remove_member(&mut c, r, u).await.unwrap();
    assert_eq!(prompt_facts(&mut c, u.into(), c4).await, ["operator's"]);
}
