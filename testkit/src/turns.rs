//! Turns as tests need them: an answer stored the way a chat run stores it.

use sqlx::PgConnection;
use store::conversations::{Answer, Completion, Message};
use uuid::Uuid;

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
