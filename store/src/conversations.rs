//! Conversations, messages and responses.
//!
//! A conversation is readable only by its owner: every read takes the caller's user id and
//! answers `None` for anything else (missing, another user's, another org's alike). The
//! projects a conversation may draw on are computed at query time by
//! `conversation_projects_visible(user, conversation)` — live memberships, live narrowing.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::StoreError;
use crate::projects::Cursor;
use crate::provenance::Provenance;
use crate::types::{DocumentId, ProjectId, ResponseStatus};

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

/// The ids a new turn gets (chosen by the caller, so that it can read the turn back when it
/// cannot tell whether its write committed), and what it was asked with.
#[derive(Debug, Clone, Copy)]
pub struct NewTurn<'a> {
    pub user_id: Uuid,
    pub conversation_id: Uuid,
    pub content: &'a str,
    pub message_id: Uuid,
    pub response_id: Uuid,
    /// The `chat` job that will run the response (enqueued after the commit).
    pub job_id: Uuid,
    /// The client's `Idempotency-Key` and the hash of the request it came with.
    pub key: Option<TurnKey<'a>>,
}

#[derive(Debug, Clone, Copy)]
pub struct TurnKey<'a> {
    pub key: &'a str,
    pub request_hash: &'a [u8],
}

/// What [`start_own_turn`] did.
#[derive(Debug)]
pub enum TurnStarted {
    /// A new turn: its response (which names the user's message).
    New(Response),
    /// The idempotency key was used before for the same request: that turn's response.
    Existing(Response),
    /// The idempotency key was used before for another request.
    KeyConflict,
}

/// A user turn in the caller's own conversation, in ONE autocommitted statement (the chat
/// path's latency: no `BEGIN`/`COMMIT`, no separate ownership read): the conversation's
/// `updated_at`, the user's message with its indexing outbox row (so past conversations are
/// searchable by what the user said, not only by the answers), the response (handed to
/// `job_id`), and the idempotency key when there is one, all or nothing. The only way a turn
/// starts — the API's and the tests' (`testkit::turns::start`). `None` when the conversation is not the
/// user's (missing, another user's, another org's alike). With a key already used: the turn
/// it started, or a conflict when it came with another request.
pub async fn start_own_turn(
    conn: &mut PgConnection,
    turn: &NewTurn<'_>,
) -> Result<Option<TurnStarted>, StoreError> {
    use sqlx::{FromRow as _, Row as _};
    if let Some(key) = turn.key
        && let Some(found) = keyed_turn(&mut *conn, turn.user_id, key).await?
    {
        return Ok(Some(found));
    }
    // With a key, the key's row goes in first: a concurrent request with the same key finds
    // it taken (ON CONFLICT) and writes nothing else.
    let (key_cte, gate) = if turn.key.is_some() {
        (
            "k AS (
                 INSERT INTO turn_requests (user_id, key, request_hash, conversation_id,
                                            response_id)
                 SELECT $2, $7, $8, c.id, $5 FROM c
                 ON CONFLICT (user_id, key) DO NOTHING RETURNING conversation_id
             ), ",
            "k",
        )
    } else {
        ("", "c")
    };
    let row = sqlx::query(sql(format!(
        "WITH c AS (
             UPDATE conversations SET updated_at = now()
             WHERE id = $1 AND user_id = $2 RETURNING id, org_id
         ), {key_cte}m AS (
             INSERT INTO messages (id, conversation_id, role, content)
             SELECT $3, g.conversation_id, 'user', $4
             FROM (SELECT {gate_col} AS conversation_id FROM {gate}) g RETURNING {MESSAGE_COLS}
         ), o AS (
             INSERT INTO index_outbox (org_id, source_kind, source_id)
             SELECT c.org_id, 'message', m.id FROM m, c
         ), r AS (
             INSERT INTO responses (id, conversation_id, user_message_id, job_id, enqueued_at)
             SELECT $5, m.conversation_id, m.id, $6, now() FROM m RETURNING {RESPONSE_COLS}
         )
         SELECT m.*, r.id AS r_id, r.status AS r_status, r.model AS r_model,
                r.error_code AS r_error_code, r.error_message AS r_error_message,
                r.starts AS r_starts, r.run AS r_run, r.job_id AS r_job_id,
                r.fallback_only AS r_fallback_only, r.created_at AS r_created_at,
                r.completed_at AS r_completed_at
         FROM m, r",
        gate_col = if turn.key.is_some() {
            "conversation_id"
        } else {
            "id"
        },
    )))
    .bind(turn.conversation_id)
    .bind(turn.user_id)
    .bind(turn.message_id)
    .bind(turn.content)
    .bind(turn.response_id)
    .bind(turn.job_id);
    let row = match turn.key {
        Some(k) => row.bind(k.key).bind(k.request_hash),
        None => row,
    }
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        // Not the user's conversation — or the key was taken by a concurrent request.
        if let Some(key) = turn.key {
            return keyed_turn(&mut *conn, turn.user_id, key).await;
        }
        return Ok(None);
    };
    let message = Message::from_row(&row)?;
    let response = Response {
        id: row.try_get("r_id")?,
        conversation_id: message.conversation_id,
        user_message_id: message.id,
        status: row.try_get("r_status")?,
        model: row.try_get("r_model")?,
        error_code: row.try_get("r_error_code")?,
        error_message: row.try_get("r_error_message")?,
        starts: row.try_get("r_starts")?,
        run: row.try_get("r_run")?,
        job_id: row.try_get("r_job_id")?,
        fallback_only: row.try_get("r_fallback_only")?,
        created_at: row.try_get("r_created_at")?,
        completed_at: row.try_get("r_completed_at")?,
    };
    Ok(Some(TurnStarted::New(response)))
}

/// The turn an idempotency key of the user's started (`Existing`), or `KeyConflict` when the
/// key came with another request; `None` when the key is new.
pub async fn keyed_turn(
    conn: &mut PgConnection,
    user_id: Uuid,
    key: TurnKey<'_>,
) -> Result<Option<TurnStarted>, StoreError> {
    #[derive(sqlx::FromRow)]
    struct Keyed {
        request_hash: Vec<u8>,
        #[sqlx(flatten)]
        response: Response,
    }
    let found = sqlx::query_as::<_, Keyed>(sql(format!(
        "SELECT k.request_hash, {} FROM turn_requests k
         JOIN responses r ON r.id = k.response_id
         WHERE k.user_id = $1 AND k.key = $2",
        response_cols_of("r")
    )))
    .bind(user_id)
    .bind(key.key)
    .fetch_optional(conn)
    .await?;
    Ok(found.map(|k| {
        if k.request_hash == key.request_hash {
            TurnStarted::Existing(k.response)
        } else {
            TurnStarted::KeyConflict
        }
    }))
}

/// Forget idempotency keys older than `older_than` (the reconciler); how many.
pub async fn purge_turn_keys(
    pool: &PgPool,
    older_than: std::time::Duration,
) -> Result<u64, StoreError> {
    Ok(sqlx::query(
        "DELETE FROM turn_requests WHERE created_at < now() - make_interval(secs => $1)",
    )
    .bind(older_than.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected())
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

/// The final answer of a response.
pub struct Answer<'a> {
    pub content: &'a str,
    pub model: &'a str,
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub latency_ms: i32,
    pub citations: Value,
    /// What the turn drew on besides its tool results (added by [`complete`]).
    pub sources: AnswerSources<'a>,
}

/// The provenance of an answer as the worker knows it: what retrieval, memory and the summary
/// gave the model, and the messages of the prompt's window (whose own provenance the answer
/// inherits). The tool results of the response are read by [`complete`] itself.
#[derive(Debug, Clone, Default)]
pub struct AnswerSources<'a> {
    pub provenance: Provenance,
    /// `messages.sources`: what was given (a JSON array; `Null` counts as empty).
    pub given: Value,
    /// The prompt's recent window.
    pub context_message_ids: &'a [Uuid],
}

/// The provenance an answer inherits from the messages of its prompt's window and from the
/// tool results it was given — its response's, and those of earlier rounds in the window
/// (projects and documents they named, earlier messages a search found) — and the record of
/// those tool results. In the caller's transaction.
async fn inherited(
    conn: &mut PgConnection,
    conversation_id: Uuid,
    response_id: Uuid,
    context: &[Uuid],
) -> Result<(Provenance, Value), StoreError> {
    let (projects, documents, narrow, tools): (Vec<ProjectId>, Vec<DocumentId>, bool, Value) =
        sqlx::query_as(
            "WITH ctx AS (
                 SELECT m.source_project_ids, m.source_document_ids, m.narrow FROM messages m
                 WHERE m.conversation_id = $1 AND m.id = ANY($3)),
             tools AS (
                 SELECT DISTINCT t.kind, t.id
                 FROM (SELECT $2::uuid AS response_id
                       UNION
                       SELECT m.response_id FROM messages m
                       WHERE m.conversation_id = $1 AND m.id = ANY($3) AND m.role = 'tool'
                         AND m.response_id IS NOT NULL) r,
                      tool_result_sources(r.response_id) t),
             found AS (
                 SELECT m.source_project_ids, m.source_document_ids, m.narrow
                 FROM messages m JOIN conversations c ON c.id = m.conversation_id
                 JOIN conversations mine ON mine.id = $1 AND mine.user_id = c.user_id
                 JOIN tools t ON t.kind = 'message' AND t.id = m.id),
             docs AS (
                 SELECT d.id, d.project_id,
                        (d.visible_to_user_ids <> '{}' OR d.visible_to_team_ids <> '{}') AS restricted
                 FROM documents d JOIN tools t ON t.kind = 'document' AND t.id = d.id),
             projects AS (
                 SELECT x FROM ctx, unnest(ctx.source_project_ids) x
                 UNION SELECT x FROM found, unnest(found.source_project_ids) x
                 UNION SELECT id FROM tools WHERE kind = 'project'
                 UNION SELECT project_id FROM docs),
             documents AS (
                 SELECT x FROM ctx, unnest(ctx.source_document_ids) x
                 UNION SELECT x FROM found, unnest(found.source_document_ids) x
                 UNION SELECT id FROM docs)
             SELECT coalesce((SELECT array_agg(x ORDER BY x) FROM projects), '{}'),
                    coalesce((SELECT array_agg(x ORDER BY x) FROM documents), '{}'),
                    coalesce((SELECT bool_or(narrow) FROM ctx), false)
                      OR coalesce((SELECT bool_or(narrow) FROM found), false)
                      OR coalesce((SELECT bool_or(restricted) FROM docs), false),
                    coalesce((SELECT jsonb_agg(jsonb_build_object(
                                  'kind', 'tool_result', 'source_kind', kind, 'id', id)
                                  ORDER BY kind, id) FROM tools), '[]')",
        )
        .bind(conversation_id)
        .bind(response_id)
        .bind(context)
        .fetch_one(conn)
        .await?;
    Ok((
        Provenance {
            source_project_ids: projects,
            source_document_ids: documents,
            narrow,
        },
        tools,
    ))
}

/// Two provenances together.
fn union(a: &Provenance, b: &Provenance) -> Provenance {
    let mut projects: Vec<ProjectId> = a
        .source_project_ids
        .iter()
        .chain(&b.source_project_ids)
        .copied()
        .collect();
    projects.sort();
    projects.dedup();
    let mut documents: Vec<DocumentId> = a
        .source_document_ids
        .iter()
        .chain(&b.source_document_ids)
        .copied()
        .collect();
    documents.sort();
    documents.dedup();
    Provenance {
        source_project_ids: projects,
        source_document_ids: documents,
        narrow: a.narrow || b.narrow,
    }
}

/// What [`complete`] did.
#[derive(Debug)]
pub enum Completion {
    /// The answer is stored, by this call (`stored`) or by an earlier one of the same run (a
    /// commit whose acknowledgement was lost).
    Done { message: Box<Message>, stored: bool },
    /// The run no longer holds the response (taken over, or failed meanwhile): nothing written.
    NotHeld,
}

/// Inside the caller's transaction: store run `run`'s final assistant message and complete
/// the response — only while that run holds it (the response row is locked first). One answer
/// per response: an answer already stored is returned instead (`stored: false`), so that
/// effects that must happen once per answer (usage) commit with it in the caller's
/// transaction; the message's indexing outbox row is written here when this call stored it.
pub async fn complete(
    conn: &mut PgConnection,
    response_id: Uuid,
    run: i32,
    answer: &Answer<'_>,
) -> Result<Completion, StoreError> {
    let Some(locked) = lock_response(&mut *conn, response_id).await? else {
        return Ok(Completion::NotHeld);
    };
    if locked.status == ResponseStatus::Completed {
        return Ok(match answer_of(&mut *conn, response_id).await? {
            Some(message) => Completion::Done {
                message: Box::new(message),
                stored: false,
            },
            None => Completion::NotHeld,
        });
    }
    if locked.status != ResponseStatus::Running || locked.run != run {
        return Ok(Completion::NotHeld);
    }
    let (from_context, tools) = inherited(
        &mut *conn,
        locked.conversation_id,
        response_id,
        answer.sources.context_message_ids,
    )
    .await?;
    let provenance = union(&answer.sources.provenance, &from_context);
    let mut given = match &answer.sources.given {
        Value::Array(items) => items.clone(),
        _ => Vec::new(),
    };
    if let Value::Array(items) = tools {
        given.extend(items);
    }
    let inserted = sqlx::query_as::<_, Message>(sql(format!(
        "INSERT INTO messages (id, conversation_id, role, content, response_id, model,
                               prompt_tokens, completion_tokens, latency_ms, citations,
                               source_project_ids, source_document_ids, narrow, sources)
         VALUES ($1, $2, 'assistant', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         ON CONFLICT (response_id) WHERE role = 'assistant' AND tool_calls IS NULL DO NOTHING
         RETURNING {MESSAGE_COLS}"
    )))
    .bind(Uuid::now_v7())
    .bind(locked.conversation_id)
    .bind(answer.content)
    .bind(response_id)
    .bind(answer.model)
    .bind(answer.prompt_tokens)
    .bind(answer.completion_tokens)
    .bind(answer.latency_ms)
    .bind(&answer.citations)
    .bind(&provenance.source_project_ids)
    .bind(&provenance.source_document_ids)
    .bind(provenance.narrow)
    .bind(Value::Array(given))
    .fetch_optional(&mut *conn)
    .await?;
    let (message, stored) = match inserted {
        Some(m) => {
            crate::outbox::record_message(&mut *conn, m.conversation_id.into(), m.id.into())
                .await?;
            (m, true)
        }
        None => (
            answer_of(&mut *conn, response_id)
                .await?
                .ok_or(StoreError::Conflict {
                    message: "the response's answer disappeared",
                })?,
            false,
        ),
    };
    sqlx::query(
        "UPDATE responses SET status = 'completed', model = $2, leased_until = NULL,
                              completed_at = coalesce(completed_at, now()),
                              error_code = NULL, error_message = NULL
         WHERE id = $1",
    )
    .bind(response_id)
    .bind(&message.model)
    .execute(&mut *conn)
    .await?;
    Ok(Completion::Done {
        message: Box::new(message),
        stored,
    })
}

/// The final assistant message of a response, if stored.
pub async fn answer_of(
    conn: &mut PgConnection,
    response_id: Uuid,
) -> Result<Option<Message>, StoreError> {
    Ok(sqlx::query_as::<_, Message>(sql(format!(
        "SELECT {MESSAGE_COLS} FROM messages
         WHERE response_id = $1 AND role = 'assistant' AND tool_calls IS NULL"
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
