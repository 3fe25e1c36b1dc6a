//! The indexing outbox (SPEC §4): every change to an indexed source writes a row here in the
//! same transaction as the change, so the `index` job (workers) can never miss one. The job
//! claims rows with `FOR UPDATE SKIP LOCKED` and deletes them in the transaction that writes
//! the new chunks.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::StoreError;

/// The kind of an indexed source (`index_outbox.source_kind`, `embeddings.source_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceKind {
    Document,
    Project,
    Task,
    Message,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Document => "document",
            SourceKind::Project => "project",
            SourceKind::Task => "task",
            SourceKind::Message => "message",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "document" => Some(SourceKind::Document),
            "project" => Some(SourceKind::Project),
            "task" => Some(SourceKind::Task),
            "message" => Some(SourceKind::Message),
            _ => None,
        }
    }
}

/// Record that `(kind, source_id)` of `org_id` changed, in the caller's transaction.
pub async fn record(
    conn: &mut PgConnection,
    org_id: Uuid,
    kind: SourceKind,
    source_id: Uuid,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO index_outbox (org_id, source_kind, source_id) VALUES ($1, $2, $3)")
        .bind(org_id)
        .bind(kind.as_str())
        .bind(source_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Record that a message changed; its org is its conversation's.
pub async fn record_message(
    conn: &mut PgConnection,
    conversation_id: Uuid,
    message_id: Uuid,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO index_outbox (org_id, source_kind, source_id)
         SELECT org_id, 'message', $2 FROM conversations WHERE id = $1",
    )
    .bind(conversation_id)
    .bind(message_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// One claimed outbox row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub org_id: Uuid,
    pub source_kind: String,
    pub source_id: Uuid,
}

/// Claim up to `limit` of the oldest outbox rows nobody else holds, plus every other unlocked
/// row for the same sources (duplicates are coalesced: a source is processed once per batch).
/// The rows stay locked until the caller's transaction ends; rows another transaction holds
/// are skipped, never waited for.
pub async fn claim(conn: &mut PgConnection, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
    let mut rows = sqlx::query_as::<_, OutboxRow>(
        "SELECT id, org_id, source_kind, source_id FROM index_outbox
         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        return Ok(rows);
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| r.source_kind.as_str()).collect();
    let sources: Vec<Uuid> = rows.iter().map(|r| r.source_id).collect();
    let more = sqlx::query_as::<_, OutboxRow>(
        "SELECT o.id, o.org_id, o.source_kind, o.source_id FROM index_outbox o
         JOIN unnest($1::text[], $2::uuid[]) AS s(kind, id)
           ON o.source_kind = s.kind AND o.source_id = s.id
         WHERE o.id <> ALL($3)
         ORDER BY o.id FOR UPDATE OF o SKIP LOCKED",
    )
    .bind(&kinds)
    .bind(&sources)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    rows.extend(more);
    rows.sort_by_key(|r| r.id);
    rows.dedup_by_key(|r| r.id);
    Ok(rows)
}

/// Take the per-source lock of `(kind, source_id)` for the rest of the caller's transaction, if
/// no other transaction holds it. Two index runs that both hold outbox rows for one source
/// (written after the first one claimed) never process it at the same time: the second skips
/// it and leaves its rows for later.
pub async fn try_lock_source(
    conn: &mut PgConnection,
    kind: SourceKind,
    source_id: Uuid,
) -> Result<bool, StoreError> {
    let got = sqlx::query_scalar::<_, bool>(
        "SELECT pg_try_advisory_xact_lock(hashtextextended('index:' || $1 || ':' || $2::text, 0))",
    )
    .bind(kind.as_str())
    .bind(source_id)
    .fetch_one(conn)
    .await?;
    Ok(got)
}

/// Delete processed outbox rows (in the transaction that claimed them).
pub async fn delete(conn: &mut PgConnection, ids: &[i64]) -> Result<u64, StoreError> {
    let done = sqlx::query("DELETE FROM index_outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// Rows waiting in the outbox (an estimate is not needed: the table is small once drained).
pub async fn depth(conn: &mut PgConnection) -> Result<i64, StoreError> {
    let n = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM index_outbox")
        .fetch_one(conn)
        .await?;
    Ok(n)
}

/// Queue every indexable source for re-indexing (after a change of embedding model, or to
/// rebuild the index): one outbox row per live document, project, task and user/assistant
/// message. Unchanged chunks of the current model cost no embedding call. Returns the rows
/// written.
pub async fn requeue_all(conn: &mut PgConnection) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "INSERT INTO index_outbox (org_id, source_kind, source_id)
         SELECT org_id, 'document', id FROM documents WHERE deleted_at IS NULL
         UNION ALL SELECT org_id, 'project', id FROM projects
         UNION ALL SELECT org_id, 'task', id FROM tasks
         UNION ALL SELECT c.org_id, 'message', m.id
                   FROM messages m JOIN conversations c ON c.id = m.conversation_id
                   WHERE m.role IN ('user', 'assistant') AND m.tool_calls IS NULL",
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
