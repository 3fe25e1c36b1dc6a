//! Proposed actions (supervised writes), their audit records, and the tool-exchange messages
//! of a turn (docs/ARCHITECTURE.md, "Scope and tools").
//!
//! A proposal belongs to its conversation's owner: every user-facing read and decision takes
//! the caller's user id and answers `None` for anything else (missing, another user's, another
//! org's alike). Status transitions are single guarded statements on a locked row, so that two
//! concurrent confirms cannot both win and an execution happens exactly once.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::StoreError;
use crate::conversations::{Message, Response};
use crate::types::{ActionId, ConversationId, JobId, MessageId, OrgId, ResponseId, TaskId, UserId};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Action {
    pub id: ActionId,
    pub org_id: OrgId,
    pub conversation_id: ConversationId,
    pub user_id: UserId,
    pub response_id: ResponseId,
    pub tool_call_id: String,
    pub tool: String,
    pub arguments: Value,
    pub summary: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
    /// As stored, except that a pending proposal past its expiry reads as `expired` (the
    /// scheduler's sweep writes that down later).
    pub status: String,
    pub result: Option<Value>,
    pub failure_reason: Option<String>,
    pub continuation_response_id: Option<ResponseId>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    pub executed_at: Option<DateTime<Utc>>,
}

/// Statements here only splice in the constant column lists below, never input.
fn sql(s: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(s)
}

const ACTION_COLS: &str = "a.id, a.org_id, a.conversation_id, a.user_id, a.response_id, \
     a.tool_call_id, a.tool, a.arguments, a.summary, a.before, a.after, \
     CASE WHEN a.status = 'pending' AND a.expires_at <= now() THEN 'expired' ELSE a.status END \
     AS status, a.result, a.failure_reason, a.continuation_response_id, a.created_at, \
     a.expires_at, a.decided_at, a.executed_at";
const MESSAGE_COLS: &str = "id, conversation_id, seq, role, content, response_id, model, prompt_tokens, \
     completion_tokens, latency_ms, tool_calls, tool_call_id, citations, created_at";

/// A proposal as a write tool call makes it.
pub struct NewProposal<'a> {
    pub org_id: OrgId,
    pub conversation_id: ConversationId,
    pub user_id: UserId,
    pub response_id: ResponseId,
    pub tool_call_id: &'a str,
    pub tool: &'a str,
    pub arguments: &'a Value,
    pub summary: &'a str,
    pub before: Option<&'a Value>,
    pub after: &'a Value,
    pub expires_at: DateTime<Utc>,
}

/// Store a proposal once per (response, tool call): a restarted turn gets the stored one back.
/// The flag says whether this call stored it.
pub async fn insert_proposal(
    conn: &mut PgConnection,
    new: &NewProposal<'_>,
) -> Result<(Action, bool), StoreError> {
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO proposed_actions (id, org_id, conversation_id, user_id, response_id,
                                       tool_call_id, tool, arguments, summary, before, after,
                                       expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT ON CONSTRAINT proposed_actions_one_per_call DO NOTHING
         RETURNING id",
    )
    .bind(ActionId::new_v7())
    .bind(new.org_id)
    .bind(new.conversation_id)
    .bind(new.user_id)
    .bind(new.response_id)
    .bind(new.tool_call_id)
    .bind(new.tool)
    .bind(new.arguments)
    .bind(new.summary)
    .bind(new.before)
    .bind(new.after)
    .bind(new.expires_at)
    .fetch_optional(&mut *conn)
    .await?;
    let action = sqlx::query_as::<_, Action>(sql(format!(
        "SELECT {ACTION_COLS} FROM proposed_actions a WHERE a.response_id = $1 AND a.tool_call_id = $2"
    )))
    .bind(new.response_id)
    .bind(new.tool_call_id)
    .fetch_one(&mut *conn)
    .await?;
    Ok((action, inserted.is_some()))
}

/// The caller's own proposal; `None` for anything else.
pub async fn get_own(
    conn: &mut PgConnection,
    user_id: UserId,
    id: ActionId,
) -> Result<Option<Action>, StoreError> {
    Ok(sqlx::query_as::<_, Action>(sql(format!(
        "SELECT {ACTION_COLS} FROM proposed_actions a
         JOIN conversations c ON c.id = a.conversation_id
         WHERE a.id = $1 AND c.user_id = $2 AND a.user_id = $2"
    )))
    .bind(id)
    .bind(user_id)
    .fetch_optional(conn)
    .await?)
}

/// The proposals of the caller's own conversation, oldest first (at most `limit`).
pub async fn list_own(
    conn: &mut PgConnection,
    user_id: UserId,
    conversation_id: ConversationId,
    limit: i64,
) -> Result<Vec<Action>, StoreError> {
    Ok(sqlx::query_as::<_, Action>(sql(format!(
        "SELECT {ACTION_COLS} FROM proposed_actions a
         JOIN conversations c ON c.id = a.conversation_id
         WHERE a.conversation_id = $1 AND c.user_id = $2
         ORDER BY a.created_at, a.id LIMIT $3"
    )))
    .bind(conversation_id)
    .bind(user_id)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// The proposals one response (turn) made, oldest first.
pub async fn list_for_response(
    conn: &mut PgConnection,
    response_id: ResponseId,
) -> Result<Vec<Action>, StoreError> {
    Ok(sqlx::query_as::<_, Action>(sql(format!(
        "SELECT {ACTION_COLS} FROM proposed_actions a WHERE a.response_id = $1
         ORDER BY a.created_at, a.id"
    )))
    .bind(response_id)
    .fetch_all(conn)
    .await?)
}

/// A proposal by id, locked for the rest of the caller's transaction (workers).
pub async fn lock(conn: &mut PgConnection, id: ActionId) -> Result<Option<Action>, StoreError> {
    Ok(sqlx::query_as::<_, Action>(sql(format!(
        "SELECT {ACTION_COLS} FROM proposed_actions a WHERE a.id = $1 FOR UPDATE"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// The outcome of a user's decision on a proposal.
#[derive(Debug)]
pub enum Decision<T> {
    Done(T),
    /// No proposal of this user by that id.
    NotFound,
    /// The proposal is no longer pending (its current status).
    NotPending(String),
}

/// The call id of the assistant message that stands for a decided proposal in the history.
pub fn decision_call_id(action_id: ActionId) -> String {
    format!("decided-{}", action_id.as_uuid().simple())
}

/// Lock the caller's own proposal and move it out of `pending`.
async fn decide(
    conn: &mut PgConnection,
    user_id: UserId,
    id: ActionId,
    to: &str,
) -> Result<Decision<Action>, StoreError> {
    let locked = sqlx::query_as::<_, Action>(sql(format!(
        "SELECT {ACTION_COLS} FROM proposed_actions a
         JOIN conversations c ON c.id = a.conversation_id
         WHERE a.id = $1 AND c.user_id = $2 AND a.user_id = $2
         FOR UPDATE OF a"
    )))
    .bind(id)
    .bind(user_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(action) = locked else {
        return Ok(Decision::NotFound);
    };
    if action.status != "pending" {
        return Ok(Decision::NotPending(action.status));
    }
    let updated = sqlx::query_as::<_, Action>(sql(format!(
        "UPDATE proposed_actions a SET status = $2, decided_at = now()
         WHERE a.id = $1 AND a.status = 'pending' AND a.expires_at > now()
         RETURNING {ACTION_COLS}"
    )))
    .bind(id)
    .bind(to)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match updated {
        Some(a) => Decision::Done(a),
        None => Decision::NotPending("expired".into()),
    })
}

/// The assistant message that stands for a decided proposal: one tool call with the
/// proposal's tool and arguments (its result follows as a `tool` message).
async fn insert_decision_call(
    conn: &mut PgConnection,
    action: &Action,
    response_id: Option<ResponseId>,
) -> Result<Message, StoreError> {
    let calls = json!([{
        "id": decision_call_id(action.id),
        "type": "function",
        "function": {"name": action.tool, "arguments": action.arguments.to_string()},
    }]);
    insert_message(
        conn,
        action.conversation_id,
        response_id,
        "assistant",
        "",
        Some(&calls),
        None,
    )
    .await
}

/// Confirm the caller's pending proposal: `pending → confirmed` (one winner among concurrent
/// confirms), and the continuation response that will answer once it ran, whose "user message"
/// is the assistant call standing for the confirmed action. The execution is handed to job
/// `job_id`, which the caller enqueues after the commit (the reconciler does, should that be
/// lost). The caller owns the transaction.
pub async fn confirm(
    conn: &mut PgConnection,
    user_id: UserId,
    id: ActionId,
    job_id: JobId,
) -> Result<Decision<(Action, Response)>, StoreError> {
    let action = match decide(&mut *conn, user_id, id, "confirmed").await? {
        Decision::Done(a) => a,
        Decision::NotFound => return Ok(Decision::NotFound),
        Decision::NotPending(s) => return Ok(Decision::NotPending(s)),
    };
    let response_id = ResponseId::new_v7();
    // the message first (the response references it), then the response
    let call = insert_decision_call(&mut *conn, &action, None).await?;
    let response = sqlx::query_as::<_, Response>(
        "INSERT INTO responses (id, conversation_id, user_message_id)
         VALUES ($1, $2, $3)
         RETURNING id, conversation_id, user_message_id, status, model, error_code,
                   error_message, starts, run, job_id, fallback_only, created_at, completed_at",
    )
    .bind(response_id)
    .bind(action.conversation_id)
    .bind(call.id)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query("UPDATE messages SET response_id = $2 WHERE id = $1")
        .bind(call.id)
        .bind(response_id)
        .execute(&mut *conn)
        .await?;
    let action = sqlx::query_as::<_, Action>(sql(format!(
        "UPDATE proposed_actions a SET continuation_response_id = $2, job_id = $3 WHERE a.id = $1
         RETURNING {ACTION_COLS}"
    )))
    .bind(action.id)
    .bind(response_id)
    .bind(job_id)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Decision::Done((action, response)))
}

/// Reject the caller's pending proposal. The model is told through the history: the call
/// standing for the proposal and a `tool` result saying the user rejected it (the next turn's
/// prompt carries both). Nothing else is written.
pub async fn reject(
    conn: &mut PgConnection,
    user_id: UserId,
    id: ActionId,
) -> Result<Decision<Action>, StoreError> {
    let action = match decide(&mut *conn, user_id, id, "rejected").await? {
        Decision::Done(a) => a,
        other => return Ok(other),
    };
    insert_decision_call(&mut *conn, &action, None).await?;
    let result = json!({"status": "rejected", "action_id": action.id,
                        "message": "The user rejected this proposal; nothing was changed."});
    insert_message(
        &mut *conn,
        action.conversation_id,
        None,
        "tool",
        &result.to_string(),
        None,
        Some(&decision_call_id(action.id)),
    )
    .await?;
    Ok(Decision::Done(action))
}

/// `confirmed → executed` with its result, once: `false` when it was not `confirmed`.
pub async fn mark_executed(
    conn: &mut PgConnection,
    id: ActionId,
    result: &Value,
) -> Result<bool, StoreError> {
    let n = sqlx::query(
        "UPDATE proposed_actions SET status = 'executed', result = $2, executed_at = now()
         WHERE id = $1 AND status = 'confirmed'",
    )
    .bind(id)
    .bind(result)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// `confirmed → failed` with a reason: nothing was written.
pub async fn mark_failed(
    conn: &mut PgConnection,
    id: ActionId,
    reason: &str,
) -> Result<bool, StoreError> {
    let n = sqlx::query(
        "UPDATE proposed_actions SET status = 'failed', failure_reason = $2, executed_at = now()
         WHERE id = $1 AND status = 'confirmed'",
    )
    .bind(id)
    .bind(reason)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// The audit record of an executed action.
pub struct Audit<'a> {
    pub action: &'a Action,
    pub task_id: TaskId,
    pub before: Option<&'a Value>,
    pub after: &'a Value,
}

pub async fn insert_audit(conn: &mut PgConnection, audit: &Audit<'_>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO action_audit (id, action_id, org_id, confirmed_by, confirmed_at, tool,
                                   task_id, before, after)
         VALUES ($1, $2, $3, $4, coalesce($5, now()), $6, $7, $8, $9)",
    )
    .bind(Uuid::now_v7())
    .bind(audit.action.id)
    .bind(audit.action.org_id)
    .bind(audit.action.user_id)
    .bind(audit.action.decided_at)
    .bind(&audit.action.tool)
    .bind(audit.task_id)
    .bind(audit.before)
    .bind(audit.after)
    .execute(conn)
    .await?;
    Ok(())
}

/// `pending → expired` for every proposal past its expiry; how many. Idempotent (the
/// scheduler's sweep).
pub async fn expire_due(pool: &PgPool) -> Result<u64, StoreError> {
    Ok(sqlx::query(
        "UPDATE proposed_actions SET status = 'expired', decided_at = now()
         WHERE status = 'pending' AND expires_at <= now()",
    )
    .execute(pool)
    .await?
    .rows_affected())
}

/// A confirmed proposal not executed yet, as the reconciler sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Confirmed {
    pub id: ActionId,
    /// The `execute_action` job that may run it (`None`: confirmed before the ledger).
    pub job_id: Option<JobId>,
    pub recoveries: i32,
    pub continuation_response_id: Option<ResponseId>,
}

/// Proposals confirmed more than `grace` ago and not executed yet (whether their job still
/// exists is Redis's to say), oldest first.
pub async fn confirmed_waiting(
    pool: &PgPool,
    grace: std::time::Duration,
    limit: i64,
) -> Result<Vec<Confirmed>, StoreError> {
    Ok(sqlx::query_as::<_, Confirmed>(
        "SELECT id, job_id, recoveries, continuation_response_id FROM proposed_actions
         WHERE status = 'confirmed' AND decided_at < now() - make_interval(secs => $1)
         ORDER BY decided_at LIMIT $2",
    )
    .bind(grace.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Hand a confirmed proposal whose job was lost to a new job (`old_job` → `new_job`), counting
/// one recovery; `false` when it changed meanwhile (executed, or recovered by another pass).
pub async fn recover(
    pool: &PgPool,
    id: ActionId,
    old_job: Option<JobId>,
    new_job: JobId,
) -> Result<bool, StoreError> {
    let n = sqlx::query(
        "UPDATE proposed_actions SET job_id = $3, recoveries = recoveries + 1
         WHERE id = $1 AND status = 'confirmed' AND job_id IS NOT DISTINCT FROM $2",
    )
    .bind(id)
    .bind(old_job)
    .bind(new_job)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Insert a message of the tool exchange (round `None`: not part of a turn's rounds).
pub async fn insert_message(
    conn: &mut PgConnection,
    conversation_id: ConversationId,
    response_id: Option<ResponseId>,
    role: &str,
    content: &str,
    tool_calls: Option<&Value>,
    tool_call_id: Option<&str>,
) -> Result<Message, StoreError> {
    Ok(sqlx::query_as::<_, Message>(sql(format!(
        "INSERT INTO messages (id, conversation_id, role, content, response_id, tool_calls,
                               tool_call_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {MESSAGE_COLS}"
    )))
    .bind(MessageId::new_v7())
    .bind(conversation_id)
    .bind(role)
    .bind(content)
    .bind(response_id)
    .bind(tool_calls)
    .bind(tool_call_id)
    .fetch_one(conn)
    .await?)
}

/// One tool-call round of a turn: the assistant's calls and one result per call.
pub struct Round<'a> {
    pub conversation_id: ConversationId,
    pub response_id: ResponseId,
    pub round: i32,
    /// Text the model sent along with its calls (usually empty).
    pub content: &'a str,
    pub model: &'a str,
    /// OpenAI `tool_calls` of the assistant message.
    pub tool_calls: &'a Value,
    /// `(tool_call_id, content)` of each result.
    pub results: &'a [(String, String)],
}

/// Store a round once: `false` when this round of this response was already stored (another
/// run of the same turn); then nothing is written.
pub async fn insert_round(conn: &mut PgConnection, r: &Round<'_>) -> Result<bool, StoreError> {
    let first: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO messages (id, conversation_id, role, content, response_id, model,
                               tool_calls, tool_round)
         VALUES ($1, $2, 'assistant', $3, $4, $5, $6, $7)
         ON CONFLICT (response_id, tool_round, role, (coalesce(tool_call_id, '')))
             WHERE tool_round IS NOT NULL DO NOTHING
         RETURNING id",
    )
    .bind(MessageId::new_v7())
    .bind(r.conversation_id)
    .bind(r.content)
    .bind(r.response_id)
    .bind(r.model)
    .bind(r.tool_calls)
    .bind(r.round)
    .fetch_optional(&mut *conn)
    .await?;
    if first.is_none() {
        return Ok(false);
    }
    for (call_id, content) in r.results {
        sqlx::query(
            "INSERT INTO messages (id, conversation_id, role, content, response_id,
                                   tool_call_id, tool_round)
             VALUES ($1, $2, 'tool', $3, $4, $5, $6)",
        )
        .bind(MessageId::new_v7())
        .bind(r.conversation_id)
        .bind(content)
        .bind(r.response_id)
        .bind(call_id)
        .bind(r.round)
        .execute(&mut *conn)
        .await?;
    }
    Ok(true)
}

/// The tool exchange already stored for a response (its rounds, or the decision call and its
/// result for a continuation), in order, and the number of the last round (0: none).
pub async fn response_exchange(
    conn: &mut PgConnection,
    response_id: ResponseId,
) -> Result<(Vec<Message>, i32), StoreError> {
    let messages = sqlx::query_as::<_, Message>(sql(format!(
        "SELECT {MESSAGE_COLS} FROM messages
         WHERE response_id = $1 AND (tool_calls IS NOT NULL OR role = 'tool')
         ORDER BY seq"
    )))
    .bind(response_id)
    .fetch_all(&mut *conn)
    .await?;
    let rounds: i32 = sqlx::query_scalar(
        "SELECT coalesce(max(tool_round), 0) FROM messages WHERE response_id = $1",
    )
    .bind(response_id)
    .fetch_one(&mut *conn)
    .await?;
    Ok((messages, rounds))
}
