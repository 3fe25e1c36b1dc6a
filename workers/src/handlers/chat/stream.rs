//! One model call: stream it, publishing each token as it arrives, and say how it ended.

use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use jobs::JobError;
use jobs::events::{EventId, EventPublisher, EventsError, ResponseEvent};
use llm::{ChatEvent, ChatRequest, Completion, GenerationParams, LlmError, Timeouts};
use uuid::Uuid;

use super::{ChatHandler, metrics};

/// How one model call ended.
pub(super) enum CallOutcome {
    Answered(Answered),
    /// 429 before any token (with the provider's `Retry-After`, if any).
    RateLimited(Option<Duration>),
    /// Any other failure before a token reached the client: fallback-eligible.
    FailedBeforeTokens(LlmError),
    /// Failure after tokens reached the client: no fallback, no retry.
    FailedAfterTokens,
    /// Another run of this job finished the response meanwhile; this one stopped.
    AlreadyFinished,
}

pub(super) struct Answered {
    pub model: String,
    pub text: String,
    pub usage: Option<llm::Usage>,
    pub latency: Duration,
    /// Tool calls the model made (handled by `rounds`); empty for a plain answer.
    pub tool_calls: Vec<llm::ToolCall>,
}

/// The streaming state of one run of a turn, shared by the primary and fallback calls.
pub(super) struct Turn {
    pub response_id: Uuid,
    /// `mark_streaming` happened in this run (at the first token).
    marked: bool,
    /// The response had never started streaming when this run read it (`queued`, no start):
    /// the first token is then published while the start is recorded, not after.
    fresh: bool,
    /// All model calls of this run end by then (`litellm.request_timeout_secs` from the start
    /// of the first): the bus keeps no heartbeat, so a handler must finish within the chat
    /// queue's visibility timeout, which configuration checks is longer than this.
    deadline: tokio::time::Instant,
}

impl Turn {
    pub fn new(response_id: Uuid, limit: Duration, fresh: bool) -> Self {
        Self {
            response_id,
            marked: false,
            fresh,
            deadline: tokio::time::Instant::now() + limit,
        }
    }
}

fn db_error(e: impl std::fmt::Display) -> JobError {
    JobError::retryable(format!("database: {e}"))
}

fn events_error(e: impl std::fmt::Display) -> JobError {
    JobError::retryable(format!("publishing an event: {e}"))
}

impl ChatHandler {
    /// Before the first token of this run goes out: record the start; if a previous run had
    /// started streaming (a lost worker), tell the client to discard its partial text.
    /// `false`: the response is already finished (another run completed it).
    pub(super) async fn begin_streaming(&self, turn: &mut Turn) -> Result<bool, JobError> {
        if turn.marked {
            return Ok(true);
        }
        let before = self.mark_streaming(turn).await?;
        if before < 0 {
            return Ok(false);
        }
        if before > 0 {
            tracing::info!(
                starts = before,
                "restarting a response whose worker was lost"
            );
            self.publish_restarted(turn).await?;
        }
        Ok(true)
    }

    /// `mark_streaming`: how many runs had started before this one (-1: already finished).
    async fn mark_streaming(&self, turn: &mut Turn) -> Result<i32, JobError> {
        let mut conn = self.inner.db.acquire().await.map_err(db_error)?;
        let before = store::conversations::mark_streaming(&mut conn, turn.response_id)
            .await
            .map_err(db_error)?;
        turn.marked = before >= 0;
        Ok(before)
    }

    /// `response.restarted`: the client discards what it got of this response so far.
    async fn publish_restarted(&self, turn: &Turn) -> Result<(), JobError> {
        self.inner
            .events
            .publish(
                turn.response_id,
                &ResponseEvent::ResponseRestarted {
                    reason: "worker_lost".into(),
                },
            )
            .await
            .map_err(events_error)?;
        Ok(())
    }

    /// Call `model` with `messages` (offering `tools`), publishing tokens. `Err` only for our
    /// own infrastructure (database, Redis): the bus retries the job.
    pub(super) async fn call_model(
        &self,
        turn: &mut Turn,
        model: &str,
        messages: &[llm::Message],
        tools: &[serde_json::Value],
    ) -> Result<CallOutcome, JobError> {
        let req = ChatRequest {
            model: model.to_owned(),
            messages: messages.to_vec(),
            tools: tools.to_vec(),
            params: GenerationParams::from(&self.inner.chat),
        };
        let timeouts = Timeouts::from_settings(&self.inner.chat);
        let started = Instant::now();
        let deadline = turn.deadline;
        let over_limit = || {
            LlmError::Timeout(format!(
                "the turn's model calls took longer than {:?} (litellm.request_timeout_secs)",
                self.inner.call_limit
            ))
        };
        let opened = tokio::time::timeout_at(deadline, self.inner.llm.chat_stream(&req, timeouts))
            .await
            .unwrap_or_else(|_| Err(over_limit()));
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) => return Ok(failed(model, e, false)),
        };
        let mut completion = Completion::default();
        let mut published = false;
        let mut tokens = TokenPublisher::new(self.inner.events.clone(), turn.response_id);
        loop {
            let next = tokio::select! {
                // a publish finished: send what arrived meanwhile, as one event
                r = tokens.in_flight() => {
                    r.map_err(events_error)?;
                    continue;
                }
                next = tokio::time::timeout_at(deadline, stream.next()) => {
                    next.unwrap_or_else(|_| Some(Err(over_limit())))
                }
            };
            match next {
                None => break,
                Some(Err(e)) => {
                    // what the client was sent so far goes out before the turn's end event
                    tokens.flush().await.map_err(events_error)?;
                    return Ok(failed(model, e, published));
                }
                Some(Ok(event)) => {
                    if let ChatEvent::Token(text) = &event {
                        if !published {
                            metrics::first_token(model, started.elapsed());
                            published = true;
                            if turn.fresh && !turn.marked {
                                // publish and record the start at once (one round trip off
                                // the first token); should another run have started in
                                // between, the client is told to restart and this run's
                                // text so far goes out again after that
                                tokens.push(text);
                                let (sent, before) =
                                    tokio::join!(tokens.in_flight(), self.mark_streaming(turn));
                                sent.map_err(events_error)?;
                                let before = before?;
                                if before < 0 {
                                    return Ok(CallOutcome::AlreadyFinished);
                                }
                                if before > 0 {
                                    tracing::info!(
                                        starts = before,
                                        "another run started this response meanwhile; restarting it"
                                    );
                                    tokens.flush().await.map_err(events_error)?;
                                    self.publish_restarted(turn).await?;
                                    tokens.push(text);
                                }
                                completion.apply(&event);
                                continue;
                            }
                            if !self.begin_streaming(turn).await? {
                                return Ok(CallOutcome::AlreadyFinished);
                            }
                        }
                        tokens.push(text);
                    }
                    completion.apply(&event);
                }
            }
        }
        tokens.flush().await.map_err(events_error)?;
        if completion.text.is_empty() && completion.tool_calls.is_empty() {
            return Ok(failed(model, LlmError::Empty, published));
        }
        let latency = started.elapsed();
        metrics::request(model, "ok");
        metrics::finished(model, latency, completion.usage);
        Ok(CallOutcome::Answered(Answered {
            model: model.to_owned(),
            text: completion.text,
            usage: completion.usage,
            latency,
            tool_calls: completion.tool_calls,
        }))
    }
}

type PublishFuture = BoxFuture<'static, Result<EventId, EventsError>>;

/// Publishes a call's tokens without waiting on each: the first token goes out at once; the
/// tokens that arrive while a publish is in flight are joined into ONE `token` event (their
/// concatenation, one id), sent when it completes. No added latency for the first token, and
/// under load one Redis call, pub/sub message and SSE write per batch instead of per token.
struct TokenPublisher {
    events: EventPublisher,
    response_id: Uuid,
    pending: String,
    in_flight: Option<PublishFuture>,
}

impl TokenPublisher {
    fn new(events: EventPublisher, response_id: Uuid) -> Self {
        Self {
            events,
            response_id,
            pending: String::new(),
            in_flight: None,
        }
    }

    fn start(&mut self, text: String) {
        let events = self.events.clone();
        let response_id = self.response_id;
        self.in_flight = Some(Box::pin(async move {
            events
                .publish(response_id, &ResponseEvent::Token { text })
                .await
        }));
    }

    /// A token from the model: published now, or joined to the next batch.
    fn push(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if self.in_flight.is_none() {
            self.start(text.to_owned());
        } else {
            self.pending.push_str(text);
        }
    }

    /// Completes when the publish in flight does (pending forever when none is), then starts
    /// the next batch if tokens are waiting.
    async fn in_flight(&mut self) -> Result<(), EventsError> {
        let Some(publish) = self.in_flight.as_mut() else {
            return std::future::pending().await;
        };
        let r = publish.await;
        self.in_flight = None;
        r?;
        if !self.pending.is_empty() {
            let text = std::mem::take(&mut self.pending);
            self.start(text);
        }
        Ok(())
    }

    /// Wait until everything pushed so far is published.
    async fn flush(&mut self) -> Result<(), EventsError> {
        while self.in_flight.is_some() {
            self.in_flight().await?;
        }
        Ok(())
    }
}

fn failed(model: &str, e: LlmError, published: bool) -> CallOutcome {
    metrics::request(model, e.kind());
    if published {
        tracing::warn!(model, error = %e, kind = e.kind(), "the model failed after tokens were sent");
        CallOutcome::FailedAfterTokens
    } else if e.is_rate_limited() {
        tracing::info!(model, retry_after = ?e.retry_after(), "the model is rate limited");
        CallOutcome::RateLimited(e.retry_after())
    } else {
        tracing::warn!(model, error = %e, kind = e.kind(), "the model failed before the first token");
        CallOutcome::FailedBeforeTokens(e)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::Arc;

    use jobs::RedisHandle;
    use jobs::events::EventHub;

    use super::*;

    /// Tokens pushed while a publish is in flight go out as ONE event, after it; nothing is
    /// lost or reordered (against the real Redis).
    #[tokio::test]
    async fn tokens_arriving_during_a_publish_are_joined_into_one_event() {
        let redis = testkit::TestRedis::new();
        let settings = config::Settings::load_from(None, |k| match k {
            "REDIS_URL" => Some(redis.url.clone()),
            "REDIS_PREFIX" => Some(redis.prefix.clone()),
            _ => None,
        })
        .unwrap();
        let handle = Arc::new(RedisHandle::new(&settings.redis).unwrap());
        let response_id = Uuid::now_v7();
        let mut tokens = TokenPublisher::new(
            EventPublisher::new(handle.clone(), &settings.events),
            response_id,
        );
        tokens.push("Hel"); // published at once
        tokens.push("lo"); // these three wait for it, then go together
        tokens.push("");
        tokens.push(", ");
        tokens.push("world");
        tokens.flush().await.unwrap();
        tokens.push("!"); // nothing in flight: published at once
        tokens.flush().await.unwrap();

        let events = EventHub::new(handle)
            .replay(response_id, None)
            .await
            .unwrap();
        let texts: Vec<String> = events
            .into_iter()
            .map(|e| match e.event {
                ResponseEvent::Token { text } => text,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(texts, ["Hel", "lo, world", "!"]);
    }
}
