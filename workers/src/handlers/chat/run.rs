//! One chat turn, in order: take the response (the ledger's lease and fence), admit the first
//! model, load the turn's context, call the primary (with its tool rounds), fall back once,
//! wait on rate limits — and end through the outcome (complete or fail).

use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use jobs::events::ResponseEvent;
use jobs::kinds::Chat;
use jobs::worker::HandlerResult;
use jobs::{JobContext, JobError};
use store::ErrorCode;
use store::conversations::{Message, Response};
use store::responses::{Take, TurnStart};

use super::ChatHandler;
use super::outcome::{RATE_LIMITED_MESSAGE, STREAM_FAILED_MESSAGE, UNAVAILABLE_MESSAGE};
use crate::handlers::db_error;
use crate::ledger::{Fence, Run};
use crate::model::{Admission, CallOutcome, RateLimitDecision, metrics, rate_limit_decision};
use crate::tools::ToolCtx;
use crate::tools::rounds::ToolTurn;

impl ChatHandler {
    #[tracing::instrument(
        name = "chat",
        skip_all,
        fields(job_id = %ctx.id, response_id = %job.response_id, conversation_id = %job.conversation_id, attempt = ctx.attempt, run)
    )]
    pub async fn run(&self, ctx: JobContext, job: Chat) -> HandlerResult {
        let result = self.turn(&ctx, &job).await;
        if let Err(e) = &result
            && !e.is_wait()
            && (!e.is_retryable() || ctx.attempt >= self.parts.queue.max_attempts)
        {
            // The bus dead-letters it now; the client must not wait for an answer forever.
            tracing::error!(error = %e, "the job failed for good; ending the turn with an error");
            self.parts.outcome.give_up(ctx.id, &job).await;
        }
        result
    }

    async fn turn(&self, ctx: &JobContext, job: &Chat) -> HandlerResult {
        let ledger = &self.parts.ledger;
        let (start, recent) = self.parts.context.start(ctx, job, ledger.lease()).await;
        let Some(start) = start.map_err(db_error)? else {
            return Err(JobError::permanent(
                "the response does not exist (or is not this user's)",
            ));
        };
        if start.response.user_message_id != job.message_id.into_uuid() {
            return Err(JobError::permanent(
                "the job names another message than the one its response answers",
            ));
        }
        let run = match start.take(ctx.id.into()) {
            Take::Taken { run } => run,
            Take::Finished => {
                tracing::info!(status = %start.response.status, "the response is already finished (redelivery)");
                return self.parts.outcome.publish_terminal(&start.response).await;
            }
            Take::Stale => {
                tracing::info!("the response was handed to another job; this one is stale");
                return Ok(());
            }
            Take::Held { for_ } => {
                // A duplicate of this job runs it still (e.g. an entry reclaimed from a worker
                // that stalled); come back when its lease ends, should it have died.
                return Err(JobError::wait(
                    "another run of this job holds the response",
                    for_ + Duration::from_millis(200),
                ));
            }
        };
        tracing::Span::current().record("run", run);
        let fence = Fence::new(job.response_id.into(), run);
        // From here on only this run may publish this response's events.
        let result = match ledger.fence(job.response_id.into(), run).await {
            Ok(r) if r > run => {
                tracing::info!(newer = r, "a later run holds the fence; this one stops");
                return Ok(());
            }
            Ok(_) => {
                tokio::select! {
                    r = self.run_taken(ctx, job, start, recent, &fence) => r,
                    () = ledger.keep_lease(&fence) => Ok(()),
                }
            }
            Err(e) => Err(e),
        };
        if fence.lost.is_cancelled() {
            tracing::info!("another run took the response over; this run stopped without effect");
            return Ok(());
        }
        if result.is_err() && !fence.released.load(Ordering::Acquire) {
            // Give the response back so the job's retry (or wait) can take it at once (best
            // effort: a lease that cannot be released here simply expires).
            ledger.release(&fence, false).await;
        }
        result
    }

    /// The turn, once this run holds the response.
    async fn run_taken(
        &self,
        ctx: &JobContext,
        job: &Chat,
        start: TurnStart,
        recent: Result<Vec<Message>, store::StoreError>,
        fence: &Fence,
    ) -> HandlerResult {
        let parts = &self.parts;
        let response = start.response.clone();
        let recent = recent.map_err(db_error)?;
        if recent.last().map(|m| m.id) != Some(job.message_id.into()) {
            return Err(JobError::permanent(
                "the user message of this turn is not in its conversation",
            ));
        }
        let models = parts
            .model
            .models((start.org_model.clone(), start.org_fallback_model.clone()));
        // the primary — unless an earlier run of this turn saw it fail before its first token
        // and waited on the fallback's rate limit: then straight to the fallback
        let fallback_only = response.fallback_only && models.fallback.is_some();
        // The model this run calls first cooling down: wait (re-queue) before the turn's reads
        // and its embedding call, which the re-queued run would only repeat.
        let first = match (&models.fallback, fallback_only) {
            (Some(fallback), true) => fallback.as_str(),
            _ => models.primary.as_str(),
        };
        let first_probe = match parts.model.admit(first).await? {
            Admission::Call { probe } => probe,
            Admission::Wait(left) => {
                return self
                    .wait_for_rate_limit(ctx, &response, fence, first, left, fallback_only)
                    .await;
            }
        };

        let context = parts.context.load(job, &start, recent).await?;
        let mut tools = ToolTurn {
            ctx: ToolCtx {
                user_id: job.user_id.into(),
                org_id: job.org_id.into(),
                conversation_id: job.conversation_id.into(),
            },
            response_id: response.id,
            messages: context.messages,
            rounds_done: context.rounds_done,
            proposed: context.proposed,
        };
        let record = context.record;
        let run = Run {
            ledger: parts.ledger.clone(),
            fence: fence.clone(),
            deadline: tokio::time::Instant::now() + parts.model.call_limit(),
        };

        let primary_error = if fallback_only {
            tracing::info!(primary = %models.primary, "the primary failed in an earlier run of this turn; using the fallback");
            None
        } else {
            let outcome = self.call(&run, &models.primary, &mut tools).await?;
            parts
                .model
                .probe_done(&models.primary, first_probe, is_rate_limited(&outcome))
                .await;
            match outcome {
                CallOutcome::Answered(a) => {
                    return parts.outcome.complete(fence, a, &record).await;
                }
                CallOutcome::RateLimited(after) => {
                    return self
                        .on_rate_limited(ctx, &response, fence, &models.primary, after, false)
                        .await;
                }
                CallOutcome::FailedAfterTokens => {
                    return parts
                        .outcome
                        .fail(fence, ErrorCode::ModelStreamFailed, STREAM_FAILED_MESSAGE)
                        .await;
                }
                CallOutcome::FailedBeforeTokens(e) => Some(e),
            }
        };

        // the fallback, once
        let Some(fallback) = models.fallback.as_deref() else {
            tracing::warn!(primary = %models.primary, kind = primary_error.as_ref().map(llm::LlmError::kind), "no fallback model; giving up");
            return parts
                .outcome
                .fail(fence, ErrorCode::ModelUnavailable, UNAVAILABLE_MESSAGE)
                .await;
        };
        // (admitted already when it is the model this run called first)
        let probe = if fallback_only {
            first_probe
        } else {
            match parts.model.admit(fallback).await? {
                Admission::Call { probe } => probe,
                Admission::Wait(left) => {
                    return self
                        .wait_for_rate_limit(ctx, &response, fence, fallback, left, true)
                        .await;
                }
            }
        };
        if let Some(e) = &primary_error {
            tracing::info!(primary = %models.primary, fallback, kind = e.kind(), "falling back");
            metrics::fallback(&models.primary, fallback);
        }
        let outcome = self.call(&run, fallback, &mut tools).await?;
        parts
            .model
            .probe_done(fallback, probe, is_rate_limited(&outcome))
            .await;
        match outcome {
            CallOutcome::Answered(a) => parts.outcome.complete(fence, a, &record).await,
            CallOutcome::RateLimited(after) => {
                self.on_rate_limited(ctx, &response, fence, fallback, after, true)
                    .await
            }
            CallOutcome::FailedAfterTokens => {
                parts
                    .outcome
                    .fail(fence, ErrorCode::ModelStreamFailed, STREAM_FAILED_MESSAGE)
                    .await
            }
            CallOutcome::FailedBeforeTokens(_) => {
                parts
                    .outcome
                    .fail(fence, ErrorCode::ModelUnavailable, UNAVAILABLE_MESSAGE)
                    .await
            }
        }
    }

    /// One model's answer to the turn: the model caller's streamed calls, with the tool rounds.
    async fn call(
        &self,
        run: &Run,
        model: &str,
        tools: &mut ToolTurn,
    ) -> Result<CallOutcome, JobError> {
        self.parts
            .tools
            .call_with_tools(run, &self.parts.model, model, tools)
            .await
    }

    /// A 429: start the model's cooldown, then wait (re-queue) or give up.
    async fn on_rate_limited(
        &self,
        ctx: &JobContext,
        response: &Response,
        fence: &Fence,
        model: &str,
        retry_after: Option<Duration>,
        fallback_only: bool,
    ) -> HandlerResult {
        let cooldown = self.parts.model.rate_limited(model, retry_after).await?;
        self.wait_for_rate_limit(ctx, response, fence, model, cooldown, fallback_only)
            .await
    }

    /// Wait until `model`'s cooldown is over (plus jitter) — the response goes back to `queued`
    /// and the job comes back later without using up an attempt — or give up: fail the turn
    /// with `rate_limited` once the wait would end past `RATE_LIMIT_MAX_WAIT_SECS` from the
    /// turn's start (the job succeeds; it must not die silently while the client waits).
    async fn wait_for_rate_limit(
        &self,
        ctx: &JobContext,
        response: &Response,
        fence: &Fence,
        model: &str,
        cooldown: Duration,
        fallback_only: bool,
    ) -> HandlerResult {
        let parts = &self.parts;
        let jitter = jobs::backoff::delay(&parts.queue, ctx.attempt, None, &mut rand::rng());
        let decision = rate_limit_decision(
            cooldown,
            jitter,
            response.created_at,
            Utc::now(),
            parts.rate_limit_max_wait,
        );
        match decision {
            RateLimitDecision::Wait(delay) => {
                metrics::rate_limit_wait(model);
                if !parts.ledger.release(fence, fallback_only).await && fence.lost.is_cancelled() {
                    return Ok(());
                }
                tracing::info!(
                    model,
                    delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "rate limited; waiting"
                );
                // the client is told why it waits, and until when
                let retry_at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                let queued = ResponseEvent::Queued {
                    position: 1,
                    reason: jobs::events::QUEUED_RATE_LIMITED.to_owned(),
                    retry_at: Some(retry_at),
                };
                parts.ledger.tell(fence.response_id, &queued).await;
                Err(JobError::wait(
                    format!("model {model} is rate limited"),
                    delay,
                ))
            }
            RateLimitDecision::GiveUp => {
                tracing::warn!(model, "rate limited past the maximum wait; giving up");
                parts
                    .outcome
                    .fail(fence, ErrorCode::RateLimited, RATE_LIMITED_MESSAGE)
                    .await
            }
        }
    }
}

fn is_rate_limited(outcome: &CallOutcome) -> bool {
    matches!(outcome, CallOutcome::RateLimited(_))
}
