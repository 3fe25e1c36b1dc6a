//! Uploaded documents (docs/architecture/indexing.md). A document belongs to a project and may be
//! restricted inside it to listed users and/or members of listed teams. Reads filter in SQL with
//! `can_see_document(user, document)`: the caller must see the project (`can_see_project`) and,
//! when the document is restricted, be listed, belong to a listed team, or have uploaded it. Org
//! owners and admins may also *manage* every document of their org (list, metadata, delete) without
//! its content reaching their prompts. Missing, deleted, other-org and hidden documents all answer
//! `None`.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::StoreError;
use crate::outbox::SourceKind;
use crate::types::{DocumentId, OrgId, ProjectId, TeamId, UserId};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Document {
    pub id: DocumentId,
    pub org_id: OrgId,
    pub project_id: ProjectId,
    pub uploaded_by: Option<UserId>,
    pub title: String,
    pub content_type: String,
    pub byte_size: i64,
    pub visible_to_user_ids: Vec<UserId>,
    pub visible_to_team_ids: Vec<TeamId>,
    pub status: String,
    pub failure_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub indexed_at: Option<DateTime<Utc>>,
}

const DOCUMENT_COLS: &str = "d.id, d.org_id, d.project_id, d.uploaded_by, d.title, d.content_type, \
     d.byte_size, d.visible_to_user_ids, d.visible_to_team_ids, d.status, d.failure_reason, \
     d.created_at, d.updated_at, d.indexed_at";

/// Statements here only splice in the constant column list above, never input.
fn sql(s: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(s)
}

/// The SQL predicate "user `$1` may see document `d`'s content": the project rule, then the
/// restriction (the uploader counts as listed).
const VISIBLE_TO_CALLER: &str = "can_see_document($1, d.id)";

/// The SQL predicate "user `$1` is an owner or admin of document `d`'s org".
const ADMIN_OF_DOCUMENT: &str = "EXISTS (SELECT 1 FROM org_memberships om
    WHERE om.user_id = $1 AND om.org_id = d.org_id AND om.role IN ('owner', 'admin'))";

/// A document as one user may handle it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DocumentAccess {
    #[sqlx(flatten)]
    pub document: Document,
    /// The user may see its content (and so it may enter their prompts).
    pub can_read: bool,
    /// The user is an owner or admin of its org.
    pub org_admin: bool,
}

impl DocumentAccess {
    /// Delete it: an org owner/admin, or its uploader while they can see it.
    pub fn may_delete(&self, user_id: UserId) -> bool {
        self.org_admin || (self.can_read && self.document.uploaded_by == Some(user_id))
    }
}

pub struct NewDocument<'a> {
    pub org_id: OrgId,
    pub project_id: ProjectId,
    pub uploaded_by: UserId,
    pub title: &'a str,
    pub content_type: &'a str,
    pub byte_size: i64,
    pub content: &'a str,
    pub visible_to_user_ids: &'a [UserId],
    pub visible_to_team_ids: &'a [TeamId],
}

/// Check that every listed user is a member of `org_id` and every listed team one of its teams.
pub async fn check_restrictions(
    conn: &mut PgConnection,
    org_id: OrgId,
    user_ids: &[UserId],
    team_ids: &[TeamId],
) -> Result<(), StoreError> {
    let users_ok = sqlx::query_scalar::<_, bool>(
        "SELECT count(DISTINCT m.user_id) = cardinality(ARRAY(SELECT DISTINCT unnest($2::uuid[])))
         FROM org_memberships m WHERE m.org_id = $1 AND m.user_id = ANY($2)",
    )
    .bind(org_id)
    .bind(user_ids)
    .fetch_one(&mut *conn)
    .await?;
    if !users_ok {
        return Err(StoreError::InvalidReference {
            field: "visible_to_user_ids",
            message: "must name members of the project's organization",
        });
    }
    let teams_ok = sqlx::query_scalar::<_, bool>(
        "SELECT count(DISTINCT t.id) = cardinality(ARRAY(SELECT DISTINCT unnest($2::uuid[])))
         FROM teams t WHERE t.org_id = $1 AND t.id = ANY($2)",
    )
    .bind(org_id)
    .bind(team_ids)
    .fetch_one(&mut *conn)
    .await?;
    if !teams_ok {
        return Err(StoreError::InvalidReference {
            field: "visible_to_team_ids",
            message: "must name teams of the project's organization",
        });
    }
    Ok(())
}

/// Insert a document (status `queued`) and its outbox row, in the caller's transaction. The
/// restriction lists are checked against the project's org.
pub async fn insert(
    conn: &mut PgConnection,
    new: &NewDocument<'_>,
) -> Result<Document, StoreError> {
    check_restrictions(
        &mut *conn,
        new.org_id,
        new.visible_to_user_ids,
        new.visible_to_team_ids,
    )
    .await?;
    let doc = sqlx::query_as::<_, Document>(sql(format!(
        "INSERT INTO documents AS d (id, org_id, project_id, uploaded_by, title, content_type,
                                     byte_size, content, visible_to_user_ids, visible_to_team_ids)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         RETURNING {DOCUMENT_COLS}"
    )))
    .bind(DocumentId::new_v7())
    .bind(new.org_id)
    .bind(new.project_id)
    .bind(new.uploaded_by)
    .bind(new.title)
    .bind(new.content_type)
    .bind(new.byte_size)
    .bind(new.content)
    .bind(new.visible_to_user_ids)
    .bind(new.visible_to_team_ids)
    .fetch_one(&mut *conn)
    .await?;
    crate::outbox::record(conn, doc.org_id, SourceKind::Document, doc.id.into()).await?;
    Ok(doc)
}

/// The document if `user_id` may see it (not deleted); with `lock`, locked for update.
pub async fn get_visible(
    conn: &mut PgConnection,
    user_id: UserId,
    id: DocumentId,
    lock: bool,
) -> Result<Option<Document>, StoreError> {
    let lock = if lock { "FOR UPDATE OF d" } else { "" };
    let row = sqlx::query_as::<_, Document>(sql(format!(
        "SELECT {DOCUMENT_COLS} FROM documents d
         WHERE d.id = $2 AND d.deleted_at IS NULL AND {VISIBLE_TO_CALLER} {lock}"
    )))
    .bind(user_id)
    .bind(id)
    .fetch_optional(conn)
    .await?;
    Ok(row)
}

/// The document if `user_id` may see it or manage it (an org owner/admin), with what they may
/// do; with `lock`, locked for update. `None` for anyone else (and for deleted documents).
pub async fn get_accessible(
    conn: &mut PgConnection,
    user_id: UserId,
    id: DocumentId,
    lock: bool,
) -> Result<Option<DocumentAccess>, StoreError> {
    let lock = if lock { "FOR UPDATE OF d" } else { "" };
    Ok(sqlx::query_as::<_, DocumentAccess>(sql(format!(
        "SELECT {DOCUMENT_COLS}, {VISIBLE_TO_CALLER} AS can_read, {ADMIN_OF_DOCUMENT} AS org_admin
         FROM documents d
         WHERE d.id = $2 AND d.deleted_at IS NULL
           AND ({VISIBLE_TO_CALLER} OR {ADMIN_OF_DOCUMENT}) {lock}"
    )))
    .bind(user_id)
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// The documents of `project_id` that `user_id` may see or manage, oldest first, after
/// `after` (metadata only; the caller checked the project is visible).
pub async fn list_accessible(
    conn: &mut PgConnection,
    user_id: UserId,
    project_id: ProjectId,
    after: Option<crate::projects::Cursor>,
    limit: i64,
) -> Result<Vec<Document>, StoreError> {
    Ok(sqlx::query_as::<_, Document>(sql(format!(
        "SELECT {DOCUMENT_COLS} FROM documents d
         WHERE d.project_id = $2 AND d.deleted_at IS NULL
           AND ($3::timestamptz IS NULL OR (d.created_at, d.id) > ($3, $4))
           AND ({VISIBLE_TO_CALLER} OR {ADMIN_OF_DOCUMENT})
         ORDER BY d.created_at, d.id LIMIT $5"
    )))
    .bind(user_id)
    .bind(project_id)
    .bind(after.map(|c| c.0))
    .bind(after.map(|c| c.1))
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Delete a document: tombstone it, drop its chunks (it stops being retrievable at commit),
/// drop what was derived from it — memory facts and message chunks whose provenance names it
/// go, summaries that drew on it start over (rebuilt without it) — and write its outbox row,
/// all in the caller's transaction, which should have locked the row with
/// [`get_accessible`]. False when it was already deleted.
pub async fn delete(conn: &mut PgConnection, doc: &Document) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE documents SET deleted_at = now(), updated_at = now()
         WHERE id = $1 AND deleted_at IS NULL",
    )
    .bind(doc.id)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    crate::index::delete_source_chunks(&mut *conn, SourceKind::Document, doc.id.into()).await?;
    sqlx::query("DELETE FROM conversation_memories WHERE source_document_ids @> ARRAY[$1::uuid]")
        .bind(doc.id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM embeddings WHERE source_document_ids @> ARRAY[$1::uuid]")
        .bind(doc.id)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "UPDATE conversation_summaries
            SET summary = '', summarized_up_to = 0, source_project_ids = '{}',
                source_document_ids = '{}', narrow = false, updated_at = now()
          WHERE source_document_ids @> ARRAY[$1::uuid]",
    )
    .bind(doc.id)
    .execute(&mut *conn)
    .await?;
    crate::outbox::record(conn, doc.org_id, SourceKind::Document, doc.id.into()).await?;
    Ok(true)
}

/// Whether a document has waited in `queued` for more than `grace` (the reconciler asks for an
/// index run when no index job is on the bus).
pub async fn any_queued_since(
    pool: &sqlx::PgPool,
    grace: std::time::Duration,
) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM documents
                        WHERE status = 'queued' AND deleted_at IS NULL
                          AND updated_at < now() - make_interval(secs => $1))",
    )
    .bind(grace.as_secs_f64())
    .fetch_one(pool)
    .await?)
}
