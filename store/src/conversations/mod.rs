//! Conversations, messages and responses.
//!
//! A conversation is readable only by its owner: every read takes the caller's user id and
//! answers `None` for anything else (missing, another user's, another org's alike). The
//! projects a conversation may draw on are computed at query time by
//! `conversation_projects_visible(user, conversation)` — live memberships, live narrowing.

mod answer;
mod turn;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::StoreError;
use crate::projects::Cursor;
use crate::types::ResponseStatus;

pub use answer::{Answer, AnswerSources, Completion, answer_of, complete};
pub use turn::{NewTurn, TurnKey, TurnStarted, keyed_turn, purge_turn_keys, start_own_turn};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Conversation {
    pub id: Uuid,
    pub org_id: Uuid,
    pub user_id: Uuid,
    pub title: String,
    pub scoped: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Message {
    pub id: Uuid,
    pub conversation_id: Uuid,
    pub seq: i64,
    pub role: String,
    pub content: String,
    pub response_id: Option<Uuid>,
    pub model: Option<String>,
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub latency_ms: Option<i32>,
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<String>,
    pub citations: Value,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Response {
    pub id: Uuid,
    pub conversation_id: Uuid,
    pub user_message_id: Uuid,
    pub status: ResponseStatus,
    pub model: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// How many runs started streaming it (> 1 after a restart).
    pub starts: i32,
    /// The run that holds (or last held) it (`store::responses`).
    pub run: i32,
    /// The job that may run it (`None`: nothing due yet).
    pub job_id: Option<Uuid>,
    /// The primary failed in an earlier run: only the fallback is left.
    pub fallback_only: bool,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// Statements here only splice in the constant column lists above, never input.
fn sql(s: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(s)
}

const CONVERSATION_COLS: &str = "id, org_id, user_id, title, scoped, created_at, updated_at";
const MESSAGE_COLS: &str = "id, conversation_id, seq, role, content, response_id, model, prompt_tokens, \
     completion_tokens, latency_ms, tool_calls, tool_call_id, citations, created_at";
pub(crate) const RESPONSE_COLS: &str = "id, conversation_id, user_message_id, status, model, \
     error_code, error_message, starts, run, job_id, fallback_only, created_at, completed_at";

/// [`RESPONSE_COLS`] qualified by a table alias (`r.id, r.conversation_id, ..`).
pub(crate) fn response_cols_of(alias: &str) -> String {
    RESPONSE_COLS
        .split(',')
        .map(|c| format!("{alias}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Create a conversation for `user_id`; with `project_ids`, narrowed to those projects, each of
/// which the user must be able to see now (else `InvalidReference` on `project_ids`).
pub async fn create(
    conn: &mut PgConnection,
    org_id: Uuid,
    user_id: Uuid,
    title: &str,
    project_ids: Option<&[Uuid]>,
) -> Result<Conversation, StoreError> {
    if let Some(ids) = project_ids {
        let visible: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT v.project_id) FROM visible_projects($1) v
             WHERE v.project_id = ANY($2)",
        )
        .bind(user_id)
        .bind(ids)
        .fetch_one(&mut *conn)
        .await?;
        let distinct = {
            let mut d = ids.to_vec();
            d.sort();
            d.dedup();
            d.len()
        };
        if visible as usize != distinct {
            return Err(StoreError::InvalidReference {
                field: "project_ids",
                message: "names a project that does not exist or that you cannot see",
            });
        }
    }
    let conversation = sqlx::query_as::<_, Conversation>(sql(format!(
        "INSERT INTO conversations (id, org_id, user_id, title, scoped)
         VALUES ($1, $2, $3, $4, $5) RETURNING {CONVERSATION_COLS}"
    )))
    .bind(Uuid::now_v7())
    .bind(org_id)
    .bind(user_id)
    .bind(title)
    .bind(project_ids.is_some())
    .fetch_one(&mut *conn)
    .await?;
    if let Some(ids) = project_ids {
        sqlx::query(
            "INSERT INTO conversation_projects (conversation_id, project_id)
             SELECT $1, unnest($2::uuid[]) ON CONFLICT DO NOTHING",
        )
        .bind(conversation.id)
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    }
    Ok(conversation)
}

/// The caller's own conversation; `None` for anything else.
pub async fn get_own(
    conn: &mut PgConnection,
    user_id: Uuid,
    id: Uuid,
) -> Result<Option<Conversation>, StoreError> {
    Ok(sqlx::query_as::<_, Conversation>(sql(format!(
        "SELECT {CONVERSATION_COLS} FROM conversations WHERE id = $1 AND user_id = $2"
    )))
    .bind(id)
    .bind(user_id)
    .fetch_optional(conn)
    .await?)
}

/// A conversation by id (workers, which act for its owner).
pub async fn get(conn: &mut PgConnection, id: Uuid) -> Result<Option<Conversation>, StoreError> {
    Ok(sqlx::query_as::<_, Conversation>(sql(format!(
        "SELECT {CONVERSATION_COLS} FROM conversations WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// The caller's conversations, oldest first, after `cursor`.
pub async fn list_own(
    pool: &PgPool,
    user_id: Uuid,
    after: Option<Cursor>,
    limit: i64,
) -> Result<Vec<Conversation>, StoreError> {
    Ok(sqlx::query_as::<_, Conversation>(sql(format!(
        "SELECT {CONVERSATION_COLS} FROM conversations
         WHERE user_id = $1 AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
         ORDER BY created_at, id LIMIT $4"
    )))
    .bind(user_id)
    .bind(after.map(|c| c.0))
    .bind(after.map(|c| c.1))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// The projects the conversation was narrowed to (empty when not scoped), as stored.
pub async fn scope(
    conn: &mut PgConnection,
    conversation_id: Uuid,
) -> Result<Vec<Uuid>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT project_id FROM conversation_projects WHERE conversation_id = $1 ORDER BY project_id",
    )
    .bind(conversation_id)
    .fetch_all(conn)
    .await?)
}

/// The stored narrowing of several conversations at once: `(conversation_id, project_id)` pairs.
pub async fn scopes(
    conn: &mut PgConnection,
    conversation_ids: &[Uuid],
) -> Result<Vec<(Uuid, Uuid)>, StoreError> {
    Ok(sqlx::query_as::<_, (Uuid, Uuid)>(
        "SELECT conversation_id, project_id FROM conversation_projects
         WHERE conversation_id = ANY($1) ORDER BY conversation_id, project_id",
    )
    .bind(conversation_ids)
    .fetch_all(conn)
    .await?)
}

/// The projects the conversation may draw on for its owner right now (live visibility ∩ scope).
pub async fn usable_projects(
    conn: &mut PgConnection,
    user_id: Uuid,
    conversation_id: Uuid,
) -> Result<Vec<Uuid>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT project_id FROM conversation_projects_visible($1, $2) ORDER BY project_id",
    )
    .bind(user_id)
    .bind(conversation_id)
    .fetch_all(conn)
    .await?)
}
/// Messages of a conversation in order, after `after_seq`.
pub async fn list_messages(
    pool: &PgPool,
    conversation_id: Uuid,
    after_seq: Option<i64>,
    limit: i64,
) -> Result<Vec<Message>, StoreError> {
    Ok(sqlx::query_as::<_, Message>(sql(format!(
        "SELECT {MESSAGE_COLS} FROM messages
         WHERE conversation_id = $1 AND ($2::bigint IS NULL OR seq > $2)
         ORDER BY seq LIMIT $3"
    )))
    .bind(conversation_id)
    .bind(after_seq)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// The last `n` messages of a conversation up to and including `up_to` (a message id), in
/// order: what a prompt carries in full.
pub async fn recent_messages(
    conn: &mut PgConnection,
    conversation_id: Uuid,
    up_to: Uuid,
    n: i64,
) -> Result<Vec<Message>, StoreError> {
    let mut rows = sqlx::query_as::<_, Message>(sql(format!(
        "SELECT {MESSAGE_COLS} FROM messages
         WHERE conversation_id = $1
           AND seq <= (SELECT seq FROM messages WHERE id = $2)
         ORDER BY seq DESC LIMIT $3"
    )))
    .bind(conversation_id)
    .bind(up_to)
    .bind(n)
    .fetch_all(conn)
    .await?;
    rows.reverse();
    Ok(rows)
}

/// A response of the caller's own conversation.
pub async fn get_response_own(
    conn: &mut PgConnection,
    user_id: Uuid,
    conversation_id: Uuid,
    response_id: Uuid,
) -> Result<Option<Response>, StoreError> {
    Ok(sqlx::query_as::<_, Response>(sql(format!(
        "SELECT {} FROM responses r
         JOIN conversations c ON c.id = r.conversation_id
         WHERE r.id = $1 AND r.conversation_id = $2 AND c.user_id = $3",
        response_cols_of("r")
    )))
    .bind(response_id)
    .bind(conversation_id)
    .bind(user_id)
    .fetch_optional(conn)
    .await?)
}

/// A response by id, locked for the rest of the caller's transaction (workers).
pub async fn lock_response(
    conn: &mut PgConnection,
    response_id: Uuid,
) -> Result<Option<Response>, StoreError> {
    Ok(sqlx::query_as::<_, Response>(sql(format!(
        "SELECT {RESPONSE_COLS} FROM responses WHERE id = $1 FOR UPDATE"
    )))
    .bind(response_id)
    .fetch_optional(conn)
    .await?)
}
/// An organization's chat models (`None` until the org sets them).
pub async fn org_models(
    pool: &PgPool,
    org_id: Uuid,
) -> Result<(Option<String>, Option<String>), StoreError> {
    Ok(sqlx::query_as::<_, (Option<String>, Option<String>)>(
        "SELECT model, fallback_model FROM organizations WHERE id = $1",
    )
    .bind(org_id)
    .fetch_optional(pool)
    .await?
    .unwrap_or((None, None)))
}

/// Set an organization's chat models.
pub async fn set_org_models(
    pool: &PgPool,
    org_id: Uuid,
    model: &str,
    fallback_model: &str,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE organizations SET model = $2, fallback_model = $3 WHERE id = $1")
        .bind(org_id)
        .bind(model)
        .bind(fallback_model)
        .execute(pool)
        .await?;
    Ok(())
}
