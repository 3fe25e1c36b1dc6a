//! Turns as tests need them: a turn started the way the API starts one, and an answer stored
//! the way a chat run stores it.

use sqlx::PgConnection;
use store::conversations::{Answer, Completion, Message, NewTurn, Response, TurnStarted};
use uuid::Uuid;

/// Start a turn in `conversation_id` as its owner, through the very function the API uses
/// (`store::conversations::start_own_turn`: the user's message with its indexing outbox row,
/// the queued response), inside the caller's transaction. Returns the user's message and the
/// response.
pub async fn start(
    conn: &mut PgConnection,
    conversation_id: Uuid,
    content: &str,
) -> (Message, Response) {
    let user_id: Uuid = sqlx::query_scalar("SELECT user_id FROM conversations WHERE id = $1")
        .bind(conversation_id)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let turn = NewTurn {
        user_id,
        conversation_id,
        content,
        message_id: Uuid::now_v7(),
        response_id: Uuid::now_v7(),
        job_id: Uuid::now_v7(),
        key: None,
    };
    let response = match store::conversations::start_own_turn(&mut *conn, &turn)
        .await
        .unwrap()
    {
        Some(TurnStarted::New(r)) => r,
        other => panic!("the turn did not start: {other:?}"),
    };
    let response = sqlx::query_as::<_, Response>(
        "UPDATE responses SET job_id = NULL, enqueued_at = NULL WHERE id = $1
         RETURNING id, conversation_id, user_message_id, status, model, error_code,
                   error_message, starts, run, job_id, fallback_only, created_at, completed_at",
    )
    .bind(response.id)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let message =
        store::conversations::recent_messages(&mut *conn, conversation_id, turn.message_id, 1)
            .await
            .unwrap()
            .pop()
            .unwrap();
    (message, response)
}

/// Store `answer` as the answer of `response_id`, inside the caller's transaction, as a run of
/// the chat handler does: take the response (a new run), then complete it. Returns the stored
/// message and whether this call stored it (`false`: it had an answer already).
pub async fn answer(
    conn: &mut PgConnection,
    response_id: Uuid,
    answer: &Answer<'_>,
) -> (Message, bool) {
    let run: i32 = sqlx::query_scalar(
        "UPDATE responses SET status = 'running', run = run + 1,
                              leased_until = now() + interval '1 minute'
         WHERE id = $1 AND status IN ('queued', 'running') RETURNING run",
    )
    .bind(response_id)
    .fetch_optional(&mut *conn)
    .await
    .unwrap()
    .unwrap_or(0);
    match store::conversations::complete(conn, response_id, run, answer)
        .await
        .unwrap()
    {
        Completion::Done { message, stored } => (*message, stored),
        Completion::NotHeld => panic!("the response {response_id} could not be completed"),
    }
}
