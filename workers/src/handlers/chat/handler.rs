//! One chat turn: redelivery and restart handling, the primary → fallback policy, rate limits,
//! completion (commit, then publish) and failures (mark failed, then publish).

use std::time::Duration;

use chrono::Utc;
use jobs::events::ResponseEvent;
use jobs::kinds::Chat;
use jobs::worker::HandlerResult;
use jobs::{JobContext, JobError};
use serde_json::Value;
use store::conversations::{self as conv, Answer, Message, Response};

use super::policy::{DEFAULT_COOLDOWN, Models, RateLimitDecision, rate_limit_decision};
use super::prompt::PromptBuilder;
use super::rounds::{ToolTurn, proposal_answer, with_exchange};
use super::stream::{Answered, CallOutcome, Turn};
use super::tools::ToolCtx;
use super::{ChatHandler, codes, metrics};

fn db_error(e: impl std::fmt::Display) -> JobError {
    JobError::retryable(format!("database: {e}"))
}

fn redis_error(e: impl std::fmt::Display) -> JobError {
    JobError::retryable(format!("redis: {e}"))
}

const UNAVAILABLE_MESSAGE: &str =
    "The assistant is unavailable right now. Please try again in a few minutes.";
const STREAM_FAILED_MESSAGE: &str =
    "The answer was interrupted by a model error. Please ask again.";
const INTERNAL_MESSAGE: &str = "The answer failed because of an internal error. Please ask again.";
const RATE_LIMITED_MESSAGE: &str =
    "The assistant is too busy to answer right now. Please try again in a few minutes.";

/// `message.completed` for the stored answer, in the one public shape of a message
/// (`store::public`): the same as the messages listing and the JSON-mode answer.
fn completed_event(m: &Message) -> ResponseEvent {
    let c = store::public::PublicMessage::from(m.clone()).completed();
    ResponseEvent::MessageCompleted {
        message: c.message,
        model: c.model,
        usage: c.usage,
    }
}

/// A response's stored tool exchange, its rounds and its proposals.
#[derive(Default)]
struct OwnExchange {
    messages: Vec<Message>,
    rounds: u32,
    proposed: Vec<store::actions::Action>,
}

impl ChatHandler {
    #[tracing::instrument(
        name = "chat",
        skip_all,
        fields(job_id = %ctx.id, response_id = %job.response_id, conversation_id = %job.conversation_id, attempt = ctx.attempt)
    )]
    pub async fn run(&self, ctx: JobContext, job: Chat) -> HandlerResult {
        let result = self.turn(&ctx, &job).await;
        if let Err(e) = &result
            && (!e.is_retryable() || ctx.attempt >= self.inner.queue.max_attempts)
        {
            // The bus dead-letters it now; the client must not wait for an answer forever.
            tracing::error!(error = %e, "the job failed for good; ending the turn with an error");
            self.give_up(&job).await;
        }
        result
    }

    /// Best effort after the last attempt: mark the response failed (unless it completed) and
    /// publish its terminal event from what is stored.
    pub(super) async fn give_up(&self, job: &Chat) {
        let attempt = async {
            let mut conn = self.inner.db.acquire().await.map_err(db_error)?;
            conv::fail(
                &mut conn,
                job.response_id,
                codes::INTERNAL_ERROR,
                INTERNAL_MESSAGE,
            )
            .await
            .map_err(db_error)?;
            drop(conn);
            self.already_finished(job).await
        };
        if let Err(e) = attempt.await {
            tracing::error!(error = %e, "cannot end the turn with an error either");
        }
    }

    async fn turn(&self, ctx: &JobContext, job: &Chat) -> HandlerResult {
        let db = &self.inner.db;
        // Two independent reads at once, each on its own pooled connection (neither holds one
        // while waiting for another): the response with everything else a run needs to know
        // first (org models, whether there is an index, a tool exchange, proposals), and the
        // recent window.
        let recent_n = i64::try_from(self.inner.chat.recent_messages).unwrap_or(i64::MAX);
        let (start, recent) = tokio::join!(
            async {
                let mut conn = db.acquire().await?;
                conv::turn_start(
                    &mut conn,
                    job.user_id,
                    job.conversation_id,
                    job.response_id,
                    job.org_id,
                    &self.inner.embedding.model,
                )
                .await
            },
            async {
                let mut conn = db.acquire().await?;
                conv::recent_messages(&mut conn, job.conversation_id, job.message_id, recent_n)
                    .await
            }
        );
        let Some(mut start) = start.map_err(db_error)? else {
            return Err(JobError::permanent(
                "the response does not exist (or is not this user's)",
            ));
        };
        let response = start.response.clone();
        if response.user_message_id != job.message_id {
            return Err(JobError::permanent(
                "the job names another message than the one its response answers",
            ));
        }
        if matches!(response.status.as_str(), "completed" | "failed") {
            tracing::info!(status = %response.status, "the response is already finished (redelivery)");
            return self.ensure_terminal_published(&response).await;
        }
        let recent = recent.map_err(db_error)?;
        if recent.last().map(|m| m.id) != Some(job.message_id) {
            return Err(JobError::permanent(
                "the user message of this turn is not in its conversation",
            ));
        }
        let org = (start.org_model.take(), start.org_fallback_model.take());
        let models = Models::choose(org, &self.inner.chat);
        // the primary — unless an earlier attempt of this turn saw it fail before its first
        // token and was re-queued by the fallback's rate limit: then straight to the fallback
        let primary_failed_before = ctx.attempt > 1
            && models.fallback.is_some()
            && self
                .inner
                .primary_failures
                .marked(response.id)
                .await
                .map_err(redis_error)?;
        // The model this attempt calls first cooling down: wait (re-queue) before the turn's
        // reads and its embedding call, which the re-queued attempt would only repeat.
        let first = match (&models.fallback, primary_failed_before) {
            (Some(fallback), true) => fallback.as_str(),
            _ => models.primary.as_str(),
        };
        if let Some(left) = self.cooling_down(first).await? {
            if primary_failed_before {
                // keep the mark for as long as this turn may still wait
                self.remember_primary_failed(&response).await?;
            }
            return self.wait_for_rate_limit(ctx, &response, first, left).await;
        }

        // Retrieval, memory and this response's own tool exchange are independent reads; the
        // question is embedded once, and only if retrieval or memory has something to rank.
        let question = super::retrieval::Question::new(
            recent
                .last()
                .map(|m| m.content.as_str())
                .unwrap_or_default(),
        );
        let (retrieved, memory, exchange) = tokio::join!(
            self.retrieve(job, &recent, &question, start.has_index),
            self.memory_context(job, &question),
            self.own_exchange(&start)
        );
        let (retrieved, memory, exchange) = (retrieved?, memory?, exchange?);
        let citations = retrieved.citations();
        let recent = with_exchange(recent, exchange.messages);
        let messages = PromptBuilder::new()
            .memories(memory.memories)
            .summary(memory.summary)
            .retrieved(&retrieved.chunks)
            .recent_messages(&recent)
            .build();
        let mut tools = ToolTurn {
            ctx: ToolCtx {
                user_id: job.user_id,
                org_id: job.org_id,
                conversation_id: job.conversation_id,
            },
            response_id: response.id,
            messages,
            rounds_done: exchange.rounds,
            proposed: (!exchange.proposed.is_empty()).then(|| proposal_answer(&exchange.proposed)),
        };
        let fresh = response.status == "queued" && response.starts == 0;
        let mut turn = Turn::new(response.id, self.inner.call_limit, fresh);

        let primary_error = if primary_failed_before {
            tracing::info!(primary = %models.primary, "the primary failed in an earlier attempt of this turn; using the fallback");
            None
        } else {
            Some(
                self.call_primary(
                    ctx,
                    job,
                    &response,
                    &models,
                    (&mut turn, &mut tools),
                    &citations,
                )
                .await?,
            )
        };
        let primary_error = match primary_error {
            Some(Ok(e)) => Some(e),
            Some(Err(done)) => return done,
            None => None,
        };

        // the fallback, once
        let Some(fallback) = models.fallback.as_deref() else {
            tracing::warn!(primary = %models.primary, kind = primary_error.as_ref().map(llm::LlmError::kind), "no fallback model; giving up");
            return self
                .fail(&response, codes::MODEL_UNAVAILABLE, UNAVAILABLE_MESSAGE)
                .await;
        };
        if let Some(left) = self.cooling_down(fallback).await? {
            self.remember_primary_failed(&response).await?;
            return self
                .wait_for_rate_limit(ctx, &response, fallback, left)
                .await;
        }
        if let Some(e) = &primary_error {
            tracing::info!(primary = %models.primary, fallback, kind = e.kind(), "falling back");
            metrics::fallback(&models.primary, fallback);
        }
        match self
            .call_with_tools(&mut turn, fallback, &mut tools)
            .await?
        {
            CallOutcome::Answered(a) => self.complete(&response, a, citations).await,
            CallOutcome::AlreadyFinished => self.already_finished(job).await,
            CallOutcome::RateLimited(after) => {
                self.remember_primary_failed(&response).await?;
                self.on_rate_limited(ctx, &response, fallback, after).await
            }
            CallOutcome::FailedAfterTokens => {
                self.fail(&response, codes::MODEL_STREAM_FAILED, STREAM_FAILED_MESSAGE)
                    .await
            }
            CallOutcome::FailedBeforeTokens(_) => {
                self.fail(&response, codes::MODEL_UNAVAILABLE, UNAVAILABLE_MESSAGE)
                    .await
            }
        }
    }

    /// What this response already stored of its tool exchange (the rounds of a restarted
    /// turn, the decided proposal of a continuation) and its proposals; no query when the turn
    /// start saw none.
    async fn own_exchange(&self, start: &conv::TurnStart) -> Result<OwnExchange, JobError> {
        let mut own = OwnExchange::default();
        if !start.has_exchange && !start.has_proposals {
            return Ok(own);
        }
        let mut conn = self.inner.db.acquire().await.map_err(db_error)?;
        if start.has_exchange {
            let (messages, rounds) =
                store::actions::response_exchange(&mut conn, start.response.id)
                    .await
                    .map_err(db_error)?;
            own.messages = messages;
            own.rounds = u32::try_from(rounds).unwrap_or(0);
        }
        if start.has_proposals {
            own.proposed = store::actions::list_for_response(&mut conn, start.response.id)
                .await
                .map_err(db_error)?;
        }
        Ok(own)
    }

    /// The primary's call: `Ok(Ok(error))` when it failed before its first token (fallback
    /// eligible), `Ok(Err(result))` when the turn ends (or waits) with `result`.
    async fn call_primary(
        &self,
        ctx: &JobContext,
        job: &Chat,
        response: &Response,
        models: &Models,
        (turn, tools): (&mut Turn, &mut ToolTurn),
        citations: &Value,
    ) -> Result<Result<llm::LlmError, HandlerResult>, JobError> {
        // (its cooldown was checked before the turn's reads)
        Ok(
            match self.call_with_tools(turn, &models.primary, tools).await? {
                CallOutcome::Answered(a) => {
                    Err(self.complete(response, a, citations.clone()).await)
                }
                CallOutcome::AlreadyFinished => Err(self.already_finished(job).await),
                CallOutcome::RateLimited(after) => Err(self
                    .on_rate_limited(ctx, response, &models.primary, after)
                    .await),
                CallOutcome::FailedAfterTokens => Err(self
                    .fail(response, codes::MODEL_STREAM_FAILED, STREAM_FAILED_MESSAGE)
                    .await),
                CallOutcome::FailedBeforeTokens(e) => Ok(e),
            },
        )
    }

    /// The fallback is rate limited after the primary failed: the re-queued job must not call
    /// the primary again (kept past the longest wait of the turn).
    async fn remember_primary_failed(&self, response: &Response) -> Result<(), JobError> {
        let ttl = Duration::from_secs(self.inner.chat.rate_limit_max_wait_secs)
            + self.inner.call_limit
            + Duration::from_secs(60);
        self.inner
            .primary_failures
            .mark(response.id, ttl)
            .await
            .map_err(redis_error)
    }

    async fn cooling_down(&self, model: &str) -> Result<Option<Duration>, JobError> {
        self.inner
            .cooldowns
            .remaining(model)
            .await
            .map_err(redis_error)
    }

    /// A 429: start the model's cooldown, then wait (re-queue) or give up.
    async fn on_rate_limited(
        &self,
        ctx: &JobContext,
        response: &Response,
        model: &str,
        retry_after: Option<Duration>,
    ) -> HandlerResult {
        let cooldown = retry_after.unwrap_or(DEFAULT_COOLDOWN);
        self.inner
            .cooldowns
            .start(model, cooldown)
            .await
            .map_err(redis_error)?;
        self.wait_for_rate_limit(ctx, response, model, cooldown)
            .await
    }

    /// Re-queue the job until `model`'s cooldown is over (plus jitter), or give up: fail the
    /// turn with `rate_limited` (the job succeeds; it must not die silently while the client
    /// waits).
    async fn wait_for_rate_limit(
        &self,
        ctx: &JobContext,
        response: &Response,
        model: &str,
        cooldown: Duration,
    ) -> HandlerResult {
        let jitter = jobs::backoff::delay(&self.inner.queue, ctx.attempt, None, &mut rand::rng());
        let decision = rate_limit_decision(
            cooldown,
            jitter,
            response.created_at,
            Utc::now(),
            Duration::from_secs(self.inner.chat.rate_limit_max_wait_secs),
            ctx.attempt,
            self.inner.queue.max_attempts,
        );
        match decision {
            RateLimitDecision::Wait(delay) => {
                metrics::rate_limit_wait(model);
                tracing::info!(
                    model,
                    delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "rate limited; re-queued"
                );
                Err(JobError::retry_after(
                    format!("model {model} is rate limited"),
                    delay,
                ))
            }
            RateLimitDecision::GiveUp => {
                tracing::warn!(model, "rate limited past the maximum wait; giving up");
                self.fail(response, codes::RATE_LIMITED, RATE_LIMITED_MESSAGE)
                    .await
            }
        }
    }

    /// Store the answer with its `citations` (once per response) and, when it was new, count
    /// its usage for the conversation's org; commit; then publish `message.completed`.
    async fn complete(&self, response: &Response, a: Answered, citations: Value) -> HandlerResult {
        let mut tx = self.inner.db.begin().await.map_err(db_error)?;
        let Some(locked) = conv::lock_response(&mut tx, response.id)
            .await
            .map_err(db_error)?
        else {
            return Err(JobError::permanent("the response disappeared"));
        };
        if locked.status == "failed" {
            // Failed meanwhile (the client was told so with an `error` event): do not turn it
            // into a success the client never sees.
            tracing::warn!("the response failed meanwhile; dropping this answer");
            return Ok(());
        }
        let to_i32 = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        let (message, stored) = conv::complete(
            &mut tx,
            &locked,
            &Answer {
                content: &a.text,
                model: &a.model,
                prompt_tokens: a.usage.map(|u| to_i32(u.prompt_tokens)),
                completion_tokens: a.usage.map(|u| to_i32(u.completion_tokens)),
                latency_ms: i32::try_from(a.latency.as_millis()).unwrap_or(i32::MAX),
                citations,
            },
        )
        .await
        .map_err(db_error)?;
        let mut follow_up = None;
        if stored {
            // The org of the conversation (not the job's payload) pays. A call whose answer was
            // not stored (a failed attempt, or a stalled run that lost the race) is not counted.
            let conversation = conv::get(&mut tx, locked.conversation_id)
                .await
                .map_err(db_error)?
                .ok_or_else(|| JobError::permanent("the conversation disappeared"))?;
            let (prompt, completion) = a.usage.map_or((0, 0), |u| {
                (i64::from(u.prompt_tokens), i64::from(u.completion_tokens))
            });
            store::usage::record(
                &mut tx,
                conversation.org_id,
                &a.model,
                prompt,
                completion,
                Utc::now(),
            )
            .await
            .map_err(db_error)?;
            follow_up = Some((conversation.id, conversation.user_id, conversation.org_id));
        } else {
            tracing::info!("the answer was already stored by another run; usage not counted again");
        }
        tx.commit().await.map_err(db_error)?;
        self.publish(response.id, &completed_event(&message))
            .await?;
        tracing::info!(model = %a.model, "answered");
        if let Some((conversation_id, user_id, org_id)) = follow_up {
            self.enqueue_follow_ups(conversation_id, user_id, org_id, message.id)
                .await;
        }
        Ok(())
    }

    /// Mark the response failed, then publish the `error` event. The job itself succeeded:
    /// the user has their answer (an error), nothing is retried.
    async fn fail(&self, response: &Response, code: &str, message: &str) -> HandlerResult {
        let mut conn = self.inner.db.acquire().await.map_err(db_error)?;
        conv::fail(&mut conn, response.id, code, message)
            .await
            .map_err(db_error)?;
        drop(conn);
        self.publish(
            response.id,
            &ResponseEvent::Error {
                code: code.to_owned(),
                message: message.to_owned(),
            },
        )
        .await?;
        tracing::warn!(code, "the turn failed");
        Ok(())
    }

    async fn already_finished(&self, job: &Chat) -> HandlerResult {
        let mut conn = self.inner.db.acquire().await.map_err(db_error)?;
        let response =
            conv::get_response_own(&mut conn, job.user_id, job.conversation_id, job.response_id)
                .await
                .map_err(db_error)?
                .ok_or_else(|| JobError::permanent("the response disappeared"))?;
        drop(conn);
        tracing::info!(status = %response.status, "another run finished the response meanwhile");
        self.ensure_terminal_published(&response).await
    }

    /// A finished response whose terminal event may be missing (a run that crashed between its
    /// commit and its publish): publish it from what is stored, unless it went out.
    async fn ensure_terminal_published(&self, response: &Response) -> HandlerResult {
        let events = self
            .inner
            .hub
            .replay(response.id, None)
            .await
            .map_err(redis_error)?;
        if events.iter().any(|e| e.event.is_terminal()) {
            return Ok(());
        }
        let event = if response.status == "completed" {
            let mut conn = self.inner.db.acquire().await.map_err(db_error)?;
            let Some(m) = conv::answer_of(&mut conn, response.id)
                .await
                .map_err(db_error)?
            else {
                return Err(JobError::permanent(
                    "a completed response without an answer",
                ));
            };
            completed_event(&m)
        } else {
            ResponseEvent::Error {
                code: response
                    .error_code
                    .clone()
                    .unwrap_or_else(|| codes::MODEL_UNAVAILABLE.to_owned()),
                message: response
                    .error_message
                    .clone()
                    .unwrap_or_else(|| UNAVAILABLE_MESSAGE.to_owned()),
            }
        };
        tracing::info!(
            event = event.name(),
            "publishing the missing terminal event"
        );
        self.publish(response.id, &event).await
    }

    async fn publish(&self, response_id: uuid::Uuid, event: &ResponseEvent) -> HandlerResult {
        self.inner
            .events
            .publish(response_id, event)
            .await
            .map(|_| ())
            .map_err(|e| JobError::retryable(format!("publishing {}: {e}", event.name())))
    }
}
