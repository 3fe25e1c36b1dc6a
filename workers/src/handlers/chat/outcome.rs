//! How a turn ends: completed (commit the answer, then publish `message.completed`, then the
//! follow-ups), failed (mark the response failed, then publish `error`), or given up after its
//! job's last attempt; and the terminal event of a response found finished, from what is stored
//! (`store::public::Outcome`, the one builder the API's replay uses too).

use chrono::Utc;
use jobs::JobError;
use jobs::events::ResponseEvent;
use jobs::kinds::Chat;
use jobs::worker::HandlerResult;
use store::conversations::{self as conv, Answer, Completion, Response};
use store::{ErrorCode, responses};
use uuid::Uuid;

use super::context::TurnRecord;
use crate::follow_ups::FollowUps;
use crate::handlers::db_error;
use crate::ledger::{Fence, Ledger};
use crate::model::Answered;

pub(super) const UNAVAILABLE_MESSAGE: &str = store::public::UNAVAILABLE_MESSAGE;
pub(super) const STREAM_FAILED_MESSAGE: &str =
    "The answer was interrupted by a model error. Please ask again.";
const INTERNAL_MESSAGE: &str = "The answer failed because of an internal error. Please ask again.";
pub(super) const RATE_LIMITED_MESSAGE: &str =
    "The assistant is too busy to answer right now. Please try again in a few minutes.";

/// Ends chat turns: the database, the ledger (publishes), the follow-ups of an answer.
pub struct Outcome {
    db: sqlx::PgPool,
    ledger: Ledger,
    follow_ups: FollowUps,
}

impl Outcome {
    pub fn new(db: sqlx::PgPool, ledger: Ledger, follow_ups: FollowUps) -> Self {
        Self {
            db,
            ledger,
            follow_ups,
        }
    }

    /// Store the answer with its `citations` and provenance (once per response, only while this
    /// run holds it) and, when it was new, count its usage for the conversation's org; commit;
    /// then publish `message.completed`; then enqueue the follow-ups.
    pub async fn complete(&self, fence: &Fence, a: Answered, record: &TurnRecord) -> HandlerResult {
        let mut tx = self.db.begin().await.map_err(db_error)?;
        let to_i32 = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        let completion = conv::complete(
            &mut tx,
            fence.response_id,
            fence.run,
            &Answer {
                content: &a.text,
                model: &a.model,
                prompt_tokens: a.usage.map(|u| to_i32(u.prompt_tokens)),
                completion_tokens: a.usage.map(|u| to_i32(u.completion_tokens)),
                latency_ms: i32::try_from(a.latency.as_millis()).unwrap_or(i32::MAX),
                citations: record.citations.clone(),
                sources: conv::AnswerSources {
                    provenance: record.provenance.clone(),
                    given: record.given.clone(),
                    context_message_ids: &record.context,
                },
            },
        )
        .await
        .map_err(db_error)?;
        let Completion::Done { message, stored } = completion else {
            // Taken over, or failed meanwhile (the client was told so with an `error` event):
            // do not turn it into a success the client never sees.
            tracing::warn!("the run no longer holds the response; dropping this answer");
            fence.lost.cancel();
            return Ok(());
        };
        let mut follow_up = None;
        if stored {
            // The org of the conversation (not the job's payload) pays. A call whose answer was
            // not stored (a failed attempt, or a stalled run that lost the race) is not counted.
            let conversation = conv::get(&mut tx, message.conversation_id)
                .await
                .map_err(db_error)?
                .ok_or_else(|| JobError::permanent("the conversation disappeared"))?;
            let (prompt, completion) = a.usage.map_or((0, 0), |u| {
                (i64::from(u.prompt_tokens), i64::from(u.completion_tokens))
            });
            store::usage::record(
                &mut tx,
                conversation.org_id.into(),
                &a.model,
                prompt,
                completion,
                Utc::now(),
            )
            .await
            .map_err(db_error)?;
            follow_up = Some((conversation.id, conversation.user_id, conversation.org_id));
        } else {
            tracing::info!("the answer was already stored; usage not counted again");
        }
        tx.commit().await.map_err(db_error)?;
        // `message.completed` in the one public shape of a message (`store::public`): the same
        // as the messages listing and the JSON-mode answer.
        let c = store::public::PublicMessage::from((*message).clone()).completed();
        let event = ResponseEvent::completed(c.message, c.model, c.usage);
        self.ledger.publish_once(fence.response_id, &event).await?;
        tracing::info!(model = %a.model, "answered");
        if let Some((conversation_id, user_id, org_id)) = follow_up {
            self.follow_ups
                .after_answer(conversation_id, user_id, org_id, message.id)
                .await;
        }
        Ok(())
    }

    /// Mark the response failed (only while this run holds it), then publish the `error`
    /// event. The job itself succeeded: the user has their answer (an error), nothing is
    /// retried.
    pub async fn fail(&self, fence: &Fence, code: ErrorCode, message: &str) -> HandlerResult {
        let mut conn = self.db.acquire().await.map_err(db_error)?;
        let failed = responses::fail_run(
            &mut conn,
            fence.response_id.into(),
            fence.run,
            code,
            message,
        )
        .await
        .map_err(db_error)?;
        drop(conn);
        if !failed {
            fence.lost.cancel();
            return Ok(());
        }
        let event = ResponseEvent::error(code.to_string(), message.to_owned());
        self.ledger.publish_once(fence.response_id, &event).await?;
        tracing::warn!(%code, "the turn failed");
        Ok(())
    }

    /// Best effort after the last attempt (or from the dead-letter hook): fail the response if
    /// it is unfinished and still this job's, and publish its terminal event from what is
    /// stored.
    pub async fn give_up(&self, job_id: Uuid, job: &Chat) {
        let attempt = async {
            let mut conn = self.db.acquire().await.map_err(db_error)?;
            responses::fail_unfinished(
                &mut conn,
                job.response_id,
                Some(job_id.into()),
                ErrorCode::InternalError,
                INTERNAL_MESSAGE,
            )
            .await
            .map_err(db_error)?;
            drop(conn);
            self.finished(job).await
        };
        if let Err(e) = attempt.await {
            tracing::error!(error = %e, "cannot end the turn with an error either");
        }
    }

    /// The response of `job` as stored now, with its terminal event published if it finished.
    async fn finished(&self, job: &Chat) -> HandlerResult {
        let mut conn = self.db.acquire().await.map_err(db_error)?;
        let response = conv::get_response_own(
            &mut conn,
            job.user_id.into(),
            job.conversation_id.into(),
            job.response_id.into(),
        )
        .await
        .map_err(db_error)?
        .ok_or_else(|| JobError::permanent("the response disappeared"))?;
        drop(conn);
        self.publish_terminal(&response).await
    }

    /// The terminal event of a finished response, from what is stored — once per response (a
    /// run that crashed between its commit and its publish left it missing; if it went out,
    /// this publishes nothing).
    pub async fn publish_terminal(&self, response: &Response) -> HandlerResult {
        let mut conn = self.db.acquire().await.map_err(db_error)?;
        let outcome = store::public::Outcome::of(&mut conn, response)
            .await
            .map_err(db_error)?;
        drop(conn);
        let Some(outcome) = outcome else {
            return Ok(());
        };
        let Some(event) = outcome.event(ResponseEvent::completed, |code, message| {
            ResponseEvent::error(code.to_string(), message)
        }) else {
            return Err(JobError::permanent(
                "a completed response without an answer",
            ));
        };
        self.ledger.publish_once(response.id, &event).await
    }
}
