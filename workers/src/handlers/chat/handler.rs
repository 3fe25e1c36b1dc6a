//! One chat turn: taking the response (the ledger's lease), the primary → fallback policy, rate
//! limits, completion (commit, then publish) and failures (mark failed, then publish).

use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use jobs::events::ResponseEvent;
use jobs::kinds::Chat;
use jobs::worker::HandlerResult;
use jobs::{JobContext, JobError};
use serde_json::Value;
use store::ResponseStatus;
use store::conversations::{self as conv, Answer, Completion, Message, Response};
use store::responses::{self, Take};
use uuid::Uuid;

use super::policy::{Admission, DEFAULT_COOLDOWN, Models, RateLimitDecision, rate_limit_decision};
use super::prompt::PromptBuilder;
use super::rounds::{ToolTurn, proposal_answer, with_exchange};
use super::stream::{Answered, CallOutcome, Fence, Turn};
use super::tools::ToolCtx;
use super::{ChatHandler, codes, metrics};
use crate::handlers::{db_error, redis_error};

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

/// What an answer records besides its text: the citations of the chunks it was given and its
/// provenance (docs/ARCHITECTURE.md, "Provenance").
struct TurnRecord {
    citations: Value,
    provenance: store::provenance::Provenance,
    given: Value,
    /// The recent window (the answer inherits its messages' provenance).
    context: Vec<Uuid>,
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
        fields(job_id = %ctx.id, response_id = %job.response_id, conversation_id = %job.conversation_id, attempt = ctx.attempt, run)
    )]
    pub async fn run(&self, ctx: JobContext, job: Chat) -> HandlerResult {
        let result = self.turn(&ctx, &job).await;
        if let Err(e) = &result
            && !e.is_wait()
            && (!e.is_retryable() || ctx.attempt >= self.inner.queue.max_attempts)
        {
            // The bus dead-letters it now; the client must not wait for an answer forever.
            tracing::error!(error = %e, "the job failed for good; ending the turn with an error");
            self.give_up(ctx.id, &job).await;
        }
        result
    }

    /// Best effort after the last attempt (or from the dead-letter hook): fail the response if
    /// it is unfinished and still this job's, and publish its terminal event from what is
    /// stored.
    pub(super) async fn give_up(&self, job_id: Uuid, job: &Chat) {
        let attempt = async {
            let mut conn = self.inner.db.acquire().await.map_err(db_error)?;
            responses::fail_unfinished(
                &mut conn,
                job.response_id,
                Some(job_id.into()),
                codes::INTERNAL_ERROR,
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

    async fn turn(&self, ctx: &JobContext, job: &Chat) -> HandlerResult {
        let db = &self.inner.db;
        // Two independent reads at once, each on its own pooled connection: the take of the
        // response (the ledger's compare-and-set) with everything else a run needs to know first
        // (org models, whether there is an index, a tool exchange, proposals), and the recent
        // window.
        let recent_n = i64::try_from(self.inner.chat.recent_messages).unwrap_or(i64::MAX);
        let lease = self.inner.lease;
        let (start, recent) = tokio::join!(
            async {
                let mut conn = db.acquire().await?;
                responses::take(
                    &mut conn,
                    &responses::JobTurn {
                        job_id: ctx.id.into(),
                        user_id: job.user_id,
                        org_id: job.org_id,
                        conversation_id: job.conversation_id,
                        response_id: job.response_id,
                    },
                    &self.inner.embedding.model,
                    lease,
                )
                .await
            },
            async {
                let mut conn = db.acquire().await?;
                conv::recent_messages(
                    &mut conn,
                    job.conversation_id.into(),
                    job.message_id.into(),
                    recent_n,
                )
                .await
            }
        );
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
                return self.publish_terminal(&start.response).await;
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
        let fenced = self
            .inner
            .events
            .fence(job.response_id.into(), run)
            .await
            .map_err(redis_error);
        let result = match fenced {
            Ok(r) if r > run => {
                tracing::info!(newer = r, "a later run holds the fence; this one stops");
                return Ok(());
            }
            Ok(_) => {
                tokio::select! {
                    r = self.run_taken(ctx, job, start, recent, &fence) => r,
                    () = self.keep_lease(&fence) => Ok(()),
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
            self.release(&fence, false).await;
        }
        result
    }

    /// Renew this run's lease every quarter of its length (each try bounded by that, so a
    /// slow pool never costs more than one) until another run takes the response over: then
    /// `fence.lost` is cancelled and this resolves, ending the run. A response this very run
    /// finished or gave back just stops being renewed (this never resolves then: the run ends
    /// by itself). A failed renewal is tried again; the run goes on, its writes being fenced.
    async fn keep_lease(&self, fence: &Fence) {
        let every = (self.inner.lease / 4).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                () = fence.lost.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let renewed = tokio::time::timeout(
                every,
                responses::renew(
                    &self.inner.db,
                    &[(fence.response_id.into(), fence.run)],
                    self.inner.lease,
                ),
            )
            .await;
            match renewed {
                Ok(Ok(held)) if held.is_empty() => {
                    match responses::current_run(&self.inner.db, fence.response_id.into()).await {
                        Ok(Some(r)) if r > fence.run => {
                            tracing::warn!(newer = r, "the run's lease was lost");
                            fence.lost.cancel();
                            return;
                        }
                        // finished or given back by this run: nothing left to renew
                        Ok(_) => return std::future::pending().await,
                        Err(e) => tracing::warn!(error = %e, "cannot read the response's run"),
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot renew the run's lease; trying again")
                }
                Err(_) => tracing::warn!("renewing the run's lease timed out; trying again"),
            }
        }
    }

    /// Give the response back (`running → queued`): the run waits (rate limit) or failed in a
    /// way its job retries. `fallback_only`: only the fallback is left for later runs.
    pub(super) async fn release(&self, fence: &Fence, fallback_only: bool) -> bool {
        let released = async {
            let mut conn = self.inner.db.acquire().await?;
            responses::release(
                &mut conn,
                fence.response_id.into(),
                fence.run,
                fallback_only,
            )
            .await
        };
        match released.await {
            Ok(true) => {
                fence.released.store(true, Ordering::Release);
                true
            }
            Ok(false) => {
                fence.lost.cancel();
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot release the response; its lease will expire");
                false
            }
        }
    }

    /// The turn, once this run holds the response.
    async fn run_taken(
        &self,
        ctx: &JobContext,
        job: &Chat,
        start: responses::TurnStart,
        recent: Result<Vec<Message>, store::StoreError>,
        fence: &Fence,
    ) -> HandlerResult {
        let response = start.response.clone();
        let recent = recent.map_err(db_error)?;
        if recent.last().map(|m| m.id) != Some(job.message_id.into()) {
            return Err(JobError::permanent(
                "the user message of this turn is not in its conversation",
            ));
        }
        let models = Models::choose(
            (start.org_model.clone(), start.org_fallback_model.clone()),
            &self.inner.chat,
        );
        // the primary — unless an earlier run of this turn saw it fail before its first token
        // and waited on the fallback's rate limit: then straight to the fallback
        let fallback_only = response.fallback_only && models.fallback.is_some();
        // The model this run calls first cooling down: wait (re-queue) before the turn's reads
        // and its embedding call, which the re-queued run would only repeat.
        let first = match (&models.fallback, fallback_only) {
            (Some(fallback), true) => fallback.as_str(),
            _ => models.primary.as_str(),
        };
        let first_probe = match self.admit(first).await? {
            Admission::Call { probe } => probe,
            Admission::Wait(left) => {
                return self
                    .wait_for_rate_limit(ctx, &response, fence, first, left, fallback_only)
                    .await;
            }
        };

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
        // Provenance: what this turn gives the model besides its recent window (whose own
        // provenance, and that of the tool results, `conv::complete` adds).
        let mut sources = store::provenance::TurnSources::new();
        for c in &retrieved.chunks {
            sources.chunk(c);
        }
        for m in &memory.entries {
            sources.memory(m);
        }
        if memory.summary.is_some() {
            sources.summary(&memory.summary_provenance);
        }
        let record = TurnRecord {
            citations: retrieved.citations(),
            provenance: sources.provenance(),
            given: sources.given(),
            context: recent.iter().map(|m| m.id).collect(),
        };
        let recent = with_exchange(recent, exchange.messages);
        let messages = PromptBuilder::new()
            .memories(memory.memories)
            .summary(memory.summary)
            .retrieved(&retrieved.chunks)
            .recent_messages(&recent)
            .build();
        let mut tools = ToolTurn {
            ctx: ToolCtx {
                user_id: job.user_id.into(),
                org_id: job.org_id.into(),
                conversation_id: job.conversation_id.into(),
            },
            response_id: response.id,
            messages,
            rounds_done: exchange.rounds,
            proposed: (!exchange.proposed.is_empty()).then(|| proposal_answer(&exchange.proposed)),
        };
        let mut turn = Turn::new(fence.clone(), self.inner.call_limit);

        let primary_error = if fallback_only {
            tracing::info!(primary = %models.primary, "the primary failed in an earlier run of this turn; using the fallback");
            None
        } else {
            let outcome = self
                .call_with_tools(&mut turn, &models.primary, &mut tools)
                .await?;
            self.probe_done(&models.primary, first_probe, &outcome)
                .await;
            match outcome {
                CallOutcome::Answered(a) => return self.complete(&turn, a, &record).await,
                CallOutcome::RateLimited(after) => {
                    return self
                        .on_rate_limited(ctx, &response, fence, &models.primary, after, false)
                        .await;
                }
                CallOutcome::FailedAfterTokens => {
                    return self
                        .fail(fence, codes::MODEL_STREAM_FAILED, STREAM_FAILED_MESSAGE)
                        .await;
                }
                CallOutcome::FailedBeforeTokens(e) => Some(e),
            }
        };

        // the fallback, once
        let Some(fallback) = models.fallback.as_deref() else {
            tracing::warn!(primary = %models.primary, kind = primary_error.as_ref().map(llm::LlmError::kind), "no fallback model; giving up");
            return self
                .fail(fence, codes::MODEL_UNAVAILABLE, UNAVAILABLE_MESSAGE)
                .await;
        };
        // (admitted already when it is the model this run called first)
        let probe = if fallback_only {
            first_probe
        } else {
            match self.admit(fallback).await? {
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
        let outcome = self
            .call_with_tools(&mut turn, fallback, &mut tools)
            .await?;
        self.probe_done(fallback, probe, &outcome).await;
        match outcome {
            CallOutcome::Answered(a) => self.complete(&turn, a, &record).await,
            CallOutcome::RateLimited(after) => {
                self.on_rate_limited(ctx, &response, fence, fallback, after, true)
                    .await
            }
            CallOutcome::FailedAfterTokens => {
                self.fail(fence, codes::MODEL_STREAM_FAILED, STREAM_FAILED_MESSAGE)
                    .await
            }
            CallOutcome::FailedBeforeTokens(_) => {
                self.fail(fence, codes::MODEL_UNAVAILABLE, UNAVAILABLE_MESSAGE)
                    .await
            }
        }
    }

    /// What this response already stored of its tool exchange (the rounds of a restarted
    /// turn, the decided proposal of a continuation) and its proposals; no query when the turn
    /// start saw none.
    async fn own_exchange(&self, start: &responses::TurnStart) -> Result<OwnExchange, JobError> {
        let mut own = OwnExchange::default();
        if !start.has_exchange && !start.has_proposals {
            return Ok(own);
        }
        let mut conn = self.inner.db.acquire().await.map_err(db_error)?;
        if start.has_exchange {
            let (messages, rounds) =
                store::actions::response_exchange(&mut conn, start.response.id.into())
                    .await
                    .map_err(db_error)?;
            own.messages = messages;
            own.rounds = u32::try_from(rounds).unwrap_or(0);
        }
        if start.has_proposals {
            own.proposed = store::actions::list_for_response(&mut conn, start.response.id.into())
                .await
                .map_err(db_error)?;
        }
        Ok(own)
    }

    /// Whether this run may call `model` now (its cooldown, or another job's probe after one).
    async fn admit(&self, model: &str) -> Result<Admission, JobError> {
        self.inner.cooldowns.admit(model).await.map_err(redis_error)
    }

    /// A probe's call ended: anything but a 429 (which restarts the cooldown) lets every job
    /// call the model again. Best effort: a probe that cannot report expires by itself.
    async fn probe_done(&self, model: &str, probe: bool, outcome: &CallOutcome) {
        if !probe || matches!(outcome, CallOutcome::RateLimited(_)) {
            return;
        }
        if let Err(e) = self.inner.cooldowns.recovered(model).await {
            tracing::warn!(model, error = %e, "cannot end the model's probation; it expires");
        }
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
        let cooldown = retry_after.unwrap_or(DEFAULT_COOLDOWN);
        self.inner
            .cooldowns
            .start(model, cooldown)
            .await
            .map_err(redis_error)?;
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
        let jitter = jobs::backoff::delay(&self.inner.queue, ctx.attempt, None, &mut rand::rng());
        let decision = rate_limit_decision(
            cooldown,
            jitter,
            response.created_at,
            Utc::now(),
            Duration::from_secs(self.inner.chat.rate_limit_max_wait_secs),
        );
        match decision {
            RateLimitDecision::Wait(delay) => {
                metrics::rate_limit_wait(model);
                if !self.release(fence, fallback_only).await && fence.lost.is_cancelled() {
                    return Ok(());
                }
                tracing::info!(
                    model,
                    delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "rate limited; waiting"
                );
                Err(JobError::wait(
                    format!("model {model} is rate limited"),
                    delay,
                ))
            }
            RateLimitDecision::GiveUp => {
                tracing::warn!(model, "rate limited past the maximum wait; giving up");
                self.fail(fence, codes::RATE_LIMITED, RATE_LIMITED_MESSAGE)
                    .await
            }
        }
    }

    /// Store the answer with its `citations` and provenance (once per response, only while this
    /// run holds it) and, when it was new, count its usage for the conversation's org; commit;
    /// then publish `message.completed`.
    async fn complete(&self, turn: &Turn, a: Answered, record: &TurnRecord) -> HandlerResult {
        let fence = &turn.fence;
        let mut tx = self.inner.db.begin().await.map_err(db_error)?;
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
        self.publish_once(fence.response_id, &completed_event(&message))
            .await?;
        tracing::info!(model = %a.model, "answered");
        if let Some((conversation_id, user_id, org_id)) = follow_up {
            self.enqueue_follow_ups(conversation_id, user_id, org_id, message.id)
                .await;
        }
        Ok(())
    }

    /// Mark the response failed (only while this run holds it), then publish the `error`
    /// event. The job itself succeeded: the user has their answer (an error), nothing is
    /// retried.
    async fn fail(&self, fence: &Fence, code: &str, message: &str) -> HandlerResult {
        let mut conn = self.inner.db.acquire().await.map_err(db_error)?;
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
        self.publish_once(
            fence.response_id,
            &ResponseEvent::Error {
                code: code.to_owned(),
                message: message.to_owned(),
            },
        )
        .await?;
        tracing::warn!(code, "the turn failed");
        Ok(())
    }

    /// The response of `job` as stored now, with its terminal event published if it finished.
    async fn finished(&self, job: &Chat) -> HandlerResult {
        let mut conn = self.inner.db.acquire().await.map_err(db_error)?;
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
    async fn publish_terminal(&self, response: &Response) -> HandlerResult {
        let event = match response.status {
            ResponseStatus::Completed => {
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
            }
            ResponseStatus::Failed => ResponseEvent::Error {
                code: response
                    .error_code
                    .clone()
                    .unwrap_or_else(|| codes::MODEL_UNAVAILABLE.to_owned()),
                message: response
                    .error_message
                    .clone()
                    .unwrap_or_else(|| UNAVAILABLE_MESSAGE.to_owned()),
            },
            ResponseStatus::Queued | ResponseStatus::Running => return Ok(()),
        };
        self.publish_once(response.id, &event).await
    }

    /// Publish a terminal event outside the run's fence (the stored outcome speaks, whichever
    /// run stored it); the events publisher sends one terminal event per response.
    async fn publish_once(&self, response_id: Uuid, event: &ResponseEvent) -> HandlerResult {
        match self.inner.events.publish(response_id, event).await {
            Ok(jobs::events::Published::AlreadyFinished(_)) => {
                tracing::debug!("the terminal event went out before");
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(redis_error(e)),
        }
    }
}
