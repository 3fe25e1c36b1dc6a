//! Starting a turn: the user's message and its response in one statement, gated on the
//! conversation being the caller's, and idempotency keys that let a retried request find it.

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{MESSAGE_COLS, Message, RESPONSE_COLS, Response, response_cols_of, sql};
use crate::StoreError;

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
