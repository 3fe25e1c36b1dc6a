//! The indexing outbox (docs/architecture/indexing.md): every change to an indexed source writes a
//! row here in the same transaction as the change, so the `index` job (workers) can never miss one.
//! The job claims rows with `FOR UPDATE SKIP LOCKED` and deletes them in the transaction that
//! writes the new chunks.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::StoreError;
use crate::types::{ConversationId, MessageId, OrgId};

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
    org_id: OrgId,
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
    conversation_id: ConversationId,
    message_id: MessageId,
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
    pub org_id: OrgId,
    pub source_kind: String,
    pub source_id: Uuid,
    /// Failed attempts so far at indexing this row's source.
    pub attempts: i32,
}

/// Claim up to `limit` outbox rows nobody else holds, taking the orgs in turn: each org with
/// rows ready gets an equal share of the batch (its oldest rows), starting the round at a
/// point that moves with `turn` (the caller passes a fresh random id per batch), so neither
/// one org's backlog nor its failing rows hold another org's changes back. Plus every other
/// unlocked, live row for the same sources (duplicates are coalesced: a source is processed
/// once per batch). Dead rows and rows waiting for a retry are not claimed. The rows stay
/// locked until the caller's transaction ends; rows another transaction holds are skipped,
/// never waited for.
pub async fn claim(
    conn: &mut PgConnection,
    limit: i64,
    turn: OrgId,
) -> Result<Vec<OutboxRow>, StoreError> {
    // `orgs`: a loose index scan over index_outbox_org_idx (one probe per distinct org).
    let mut rows = sqlx::query_as::<_, OutboxRow>(
        "WITH RECURSIVE orgs(org_id) AS (
             (SELECT org_id FROM index_outbox WHERE dead_at IS NULL ORDER BY org_id LIMIT 1)
             UNION ALL
             SELECT (SELECT o.org_id FROM index_outbox o
                     WHERE o.dead_at IS NULL AND o.org_id > orgs.org_id
                     ORDER BY o.org_id LIMIT 1)
             FROM orgs WHERE orgs.org_id IS NOT NULL
         ),
         round AS MATERIALIZED (
             SELECT org_id, count(*) OVER () AS n FROM orgs WHERE org_id IS NOT NULL
             ORDER BY org_id <= $2, org_id
         )
         SELECT c.id, c.org_id, c.source_kind, c.source_id, c.attempts
         FROM round CROSS JOIN LATERAL (
             SELECT o.id, o.org_id, o.source_kind, o.source_id, o.attempts
             FROM index_outbox o
             WHERE o.org_id = round.org_id AND o.dead_at IS NULL
               AND (o.retry_at IS NULL OR o.retry_at <= now())
             ORDER BY o.id
             LIMIT greatest(1, ceil($1::numeric / round.n))::bigint
             FOR UPDATE SKIP LOCKED
         ) c
         LIMIT $1",
    )
    .bind(limit)
    .bind(turn)
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        return Ok(rows);
    }
    // Orgs with less than their share leave room: the oldest other ready rows fill it.
    let room = limit - rows.len() as i64;
    if room > 0 {
        let taken: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let fill = sqlx::query_as::<_, OutboxRow>(
            "SELECT id, org_id, source_kind, source_id, attempts FROM index_outbox
             WHERE dead_at IS NULL AND (retry_at IS NULL OR retry_at <= now())
               AND id <> ALL($2)
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(room)
        .bind(&taken)
        .fetch_all(&mut *conn)
        .await?;
        rows.extend(fill);
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| r.source_kind.as_str()).collect();
    let sources: Vec<Uuid> = rows.iter().map(|r| r.source_id).collect();
    let more = sqlx::query_as::<_, OutboxRow>(
        "SELECT o.id, o.org_id, o.source_kind, o.source_id, o.attempts FROM index_outbox o
         JOIN unnest($1::text[], $2::uuid[]) AS s(kind, id)
           ON o.source_kind = s.kind AND o.source_id = s.id
         WHERE o.id <> ALL($3) AND o.dead_at IS NULL
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

/// How a failed attempt at a source's rows ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// The rows wait until `retry_at` for another attempt.
    Retry,
    /// The rows are dead-lettered.
    Dead,
}

/// Record a failed attempt at indexing the source of the outbox rows `ids` (claimed by the
/// caller's transaction): every row gets the source's attempt count (the highest among them,
/// plus one) and `error`, then waits `retry_secs`; the rows are dead-lettered when the count
/// reaches `max_attempts`, or at once when `permanent`.
pub async fn fail(
    conn: &mut PgConnection,
    ids: &[i64],
    error: &str,
    retry_secs: u64,
    max_attempts: u32,
    permanent: bool,
) -> Result<FailOutcome, StoreError> {
    let dead = sqlx::query_scalar::<_, bool>(
        "WITH s AS (SELECT max(attempts) + 1 AS attempts FROM index_outbox WHERE id = ANY($1))
         UPDATE index_outbox o
         SET attempts = s.attempts, last_error = $2,
             retry_at = now() + make_interval(secs => $3),
             dead_at = CASE WHEN $5 OR s.attempts >= $4 THEN now() END
         FROM s WHERE o.id = ANY($1)
         RETURNING o.dead_at IS NOT NULL",
    )
    .bind(ids)
    .bind(error)
    .bind(retry_secs as f64)
    .bind(i64::from(max_attempts))
    .bind(permanent)
    .fetch_all(conn)
    .await?;
    Ok(if dead.iter().any(|d| *d) {
        FailOutcome::Dead
    } else {
        FailOutcome::Retry
    })
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

/// Delete processed outbox rows (in the transaction that claimed them), and the dead rows of
/// the sources given (they were indexed now, so their earlier failures are moot).
pub async fn delete(
    conn: &mut PgConnection,
    ids: &[i64],
    indexed: &[(SourceKind, Uuid)],
) -> Result<u64, StoreError> {
    let kinds: Vec<&str> = indexed.iter().map(|(k, _)| k.as_str()).collect();
    let sources: Vec<Uuid> = indexed.iter().map(|(_, id)| *id).collect();
    let done = sqlx::query(
        "DELETE FROM index_outbox WHERE id = ANY($1)
            OR (dead_at IS NOT NULL AND (source_kind, source_id) IN
                (SELECT kind, id FROM unnest($2::text[], $3::uuid[]) AS s(kind, id)))",
    )
    .bind(ids)
    .bind(&kinds)
    .bind(&sources)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Live rows waiting in the outbox, dead rows excluded (the table is small once drained).
pub async fn depth(conn: &mut PgConnection) -> Result<i64, StoreError> {
    let n = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM index_outbox WHERE dead_at IS NULL")
        .fetch_one(conn)
        .await?;
    Ok(n)
}

/// Dead-lettered outbox rows.
pub async fn dead_count(conn: &mut PgConnection) -> Result<i64, StoreError> {
    let n =
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM index_outbox WHERE dead_at IS NOT NULL")
            .fetch_one(conn)
            .await?;
    Ok(n)
}

/// A dead-lettered outbox row, for operators.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadRow {
    pub id: i64,
    pub org_id: OrgId,
    pub source_kind: String,
    pub source_id: Uuid,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub dead_at: chrono::DateTime<chrono::Utc>,
}

/// The newest `limit` dead-lettered rows.
pub async fn dead(conn: &mut PgConnection, limit: i64) -> Result<Vec<DeadRow>, StoreError> {
    let rows = sqlx::query_as::<_, DeadRow>(
        "SELECT id, org_id, source_kind, source_id, attempts, last_error, dead_at
         FROM index_outbox WHERE dead_at IS NOT NULL ORDER BY dead_at DESC, id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(rows)
}

/// Give every dead-lettered row a fresh start (after fixing what made them fail); returns the
/// rows revived.
pub async fn revive_dead(conn: &mut PgConnection) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "UPDATE index_outbox SET dead_at = NULL, attempts = 0, retry_at = NULL, last_error = NULL
         WHERE dead_at IS NOT NULL",
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
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
