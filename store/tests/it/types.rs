//! Typed ids and text enums against real PostgreSQL: an id binds and decodes as `uuid` (and a
//! `Vec` of ids as `uuid[]`), an enum as its `text`, and a value outside the set fails to decode.

use store::{
    ActionStatus, ConversationId, DocumentStatus, ErrorCode, OrgId, ProjectId, ResponseStatus,
    Role, TaskStatus, Visibility,
};
use testkit::TestDb;
use uuid::Uuid;

#[tokio::test]
async fn ids_round_trip_as_uuid_and_uuid_arrays() {
    let db = TestDb::new().await;
    let org = OrgId::new_v7();

    let (back, text): (OrgId, String) = sqlx::query_as("SELECT $1, $1::text")
        .bind(org)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(back, org);
    assert_eq!(text, org.to_string());

    // a bare uuid column decodes into any id, and the newtype binds where a uuid is expected
    let as_uuid: Uuid = sqlx::query_scalar("SELECT $1::uuid")
        .bind(org)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(as_uuid, org.into_uuid());
    let conversation: ConversationId = sqlx::query_scalar("SELECT $1::uuid")
        .bind(as_uuid)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(conversation.into_uuid(), as_uuid);

    let projects = vec![ProjectId::new_v7(), ProjectId::new_v7()];
    let (back, n): (Vec<ProjectId>, i32) =
        sqlx::query_as("SELECT $1::uuid[], cardinality($1::uuid[])")
            .bind(&projects)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(back, projects);
    assert_eq!(n, 2);

    let none: Option<OrgId> = sqlx::query_scalar("SELECT NULL::uuid")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(none, None);
}

async fn round_trip<T>(db: &TestDb, all: &[T])
where
    T: Copy + PartialEq + std::fmt::Debug + std::fmt::Display + Send + Sync + Unpin + 'static,
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    T: for<'q> sqlx::Encode<'q, sqlx::Postgres>,
{
    for &v in all {
        let (back, text): (T, String) = sqlx::query_as("SELECT $1, $1::text")
            .bind(v)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(back, v);
        assert_eq!(text, v.to_string());
    }
    let unknown = sqlx::query_scalar::<_, T>("SELECT 'no_such_value'::text")
        .fetch_one(&db.pool)
        .await;
    assert!(unknown.is_err(), "an unknown value must not decode");
}

#[tokio::test]
async fn enums_round_trip_as_text() {
    let db = TestDb::new().await;
    round_trip(&db, Role::ALL).await;
    round_trip(&db, Visibility::ALL).await;
    round_trip(&db, TaskStatus::ALL).await;
    round_trip(&db, ResponseStatus::ALL).await;
    round_trip(&db, ActionStatus::ALL).await;
    round_trip(&db, DocumentStatus::ALL).await;
    round_trip(&db, ErrorCode::ALL).await;
}

/// The CHECK constraints of the schema and the Rust sets agree: every value of an enum is
/// accepted by its column.
#[tokio::test]
async fn every_status_is_allowed_by_its_column() {
    let db = TestDb::new().await;
    let checks: Vec<String> = sqlx::query_scalar(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint
         WHERE contype = 'c' AND conrelid IN ('responses'::regclass, 'proposed_actions'::regclass,
                                              'documents'::regclass, 'tasks'::regclass)",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let all = checks.join("\n");
    let names = ResponseStatus::ALL
        .iter()
        .map(|s| s.as_str())
        .chain(ActionStatus::ALL.iter().map(|s| s.as_str()))
        .chain(DocumentStatus::ALL.iter().map(|s| s.as_str()))
        .chain(TaskStatus::ALL.iter().map(|s| s.as_str()));
    for name in names {
        assert!(
            all.contains(&format!("'{name}'::text")),
            "{name} is not in a CHECK constraint: {all}"
        );
    }
}
