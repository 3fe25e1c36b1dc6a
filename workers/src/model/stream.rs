//! One model call: stream it, publishing each token as it arrives (fenced: only the run that
//! holds the response publishes), and say how it ended.

use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use jobs::JobError;
use jobs::events::ResponseEvent;
use llm::{ChatEvent, ChatRequest, Completion, GenerationParams, LlmError, Timeouts};

use super::{ModelCaller, metrics};
use crate::ledger::Run;

/// How one model call ended.
pub enum CallOutcome {
    Answered(Answered),
    /// 429 before any token (with the provider's `Retry-After`, if any).
    RateLimited(Option<Duration>),
    /// Any other failure before a token reached the client: fallback-eligible.
    FailedBeforeTokens(LlmError),
    /// Failure after tokens reached the client: no fallback, no retry.
    FailedAfterTokens,
}

pub struct Answered {
    pub model: String,
    pub text: String,
    pub usage: Option<llm::Usage>,
    pub latency: Duration,
    /// Tool calls the model made (handled by `tools::rounds`); empty for a plain answer.
    pub tool_calls: Vec<llm::ToolCall>,
}

impl ModelCaller {
    /// Call `model` with `messages` (offering `tools`), publishing tokens. `Err` only for our
    /// own infrastructure (database, Redis), or when the run lost the response.
    pub async fn stream(
        &self,
        run: &Run,
        model: &str,
        messages: &[llm::Message],
        tools: &[serde_json::Value],
    ) -> Result<CallOutcome, JobError> {
        let req = ChatRequest {
            model: model.to_owned(),
            messages: messages.to_vec(),
            tools: tools.to_vec(),
            params: GenerationParams::from(&self.chat),
        };
        let timeouts = Timeouts::from_settings(&self.chat);
        let started = Instant::now();
        let deadline = run.deadline;
        let over_limit = || {
            LlmError::Timeout(format!(
                "the turn's model calls took longer than {:?} (litellm.request_timeout_secs)",
                self.call_limit
            ))
        };
        let opened = tokio::time::timeout_at(deadline, self.llm.chat_stream(&req, timeouts))
            .await
            .unwrap_or_else(|_| Err(over_limit()));
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) => return Ok(failed(model, e, false)),
        };
        let mut completion = Completion::default();
        let mut published = false;
        let mut tokens = TokenPublisher::new(run.clone());
        loop {
            let next = tokio::select! {
                // a publish finished: send what arrived meanwhile, as one event
                r = tokens.in_flight() => {
                    r?;
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
                    tokens.flush().await?;
                    return Ok(failed(model, e, published));
                }
                Some(Ok(event)) => {
                    if let ChatEvent::Token(text) = &event {
                        if !published {
                            metrics::first_token(model, started.elapsed());
                            published = true;
                            // the start is committed before the first token goes out
                            run.begin_streaming().await?;
                        }
                        tokens.push(text);
                    }
                    completion.apply(&event);
                }
            }
        }
        tokens.flush().await?;
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

type PublishFuture = BoxFuture<'static, Result<(), JobError>>;

/// Publishes a call's tokens without waiting on each: the first token goes out at once; the
/// tokens that arrive while a publish is in flight are joined into ONE `token` event (their
/// concatenation, one id), sent when it completes. No added latency for the first token, and
/// under load one Redis call, pub/sub message and SSE write per batch instead of per token.
/// Every publish is the run's ([`Run::emit`]): fenced.
struct TokenPublisher {
    run: Run,
    pending: String,
    in_flight: Option<PublishFuture>,
}

impl TokenPublisher {
    fn new(run: Run) -> Self {
        Self {
            run,
            pending: String::new(),
            in_flight: None,
        }
    }

    fn start(&mut self, text: String) {
        let run = self.run.clone();
        self.in_flight = Some(Box::pin(async move {
            run.emit(&ResponseEvent::Token { text }).await
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
    async fn in_flight(&mut self) -> Result<(), JobError> {
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
    async fn flush(&mut self) -> Result<(), JobError> {
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
    use jobs::events::{EventHub, EventPublisher};

    use super::*;
    use crate::ledger::{Fence, Ledger};
    use uuid::Uuid;

    fn ledger(redis: &testkit::TestRedis) -> (Ledger, Arc<RedisHandle>, config::Settings) {
        let settings = config::Settings::load_from(None, |k| match k {
            "REDIS_URL" => Some(redis.url.clone()),
            "REDIS_CLUSTER" => Some(redis.cluster_env().into()),
            "REDIS_PREFIX" => Some(redis.prefix.clone()),
            _ => None,
        })
        .unwrap();
        let handle = Arc::new(RedisHandle::new(&settings.redis).unwrap());
        // (the pool connects lazily: these tests never reach PostgreSQL)
        let db = store::pool(&settings.database).unwrap();
        let ledger = Ledger::new(db, handle.clone(), &settings);
        (ledger, handle, settings)
    }

    fn run(ledger: Ledger, fence: Fence) -> Run {
        Run {
            ledger,
            fence,
            deadline: tokio::time::Instant::now() + Duration::from_secs(60),
        }
    }

    async fn texts(handle: Arc<RedisHandle>, response_id: Uuid) -> Vec<String> {
        EventHub::new(handle)
            .replay(response_id, None)
            .await
            .unwrap()
            .into_iter()
            .map(|e| match e.event {
                ResponseEvent::Token { text } => text,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    /// Tokens pushed while a publish is in flight go out as ONE event, after it; nothing is
    /// lost or reordered (against the real Redis).
    #[tokio::test]
    async fn tokens_arriving_during_a_publish_are_joined_into_one_event() {
        let redis = testkit::TestRedis::new();
        let (ledger, handle, settings) = ledger(&redis);
        let response_id = Uuid::now_v7();
        EventPublisher::new(handle.clone(), &settings.events)
            .fence(response_id, 1)
            .await
            .unwrap();
        let mut tokens = TokenPublisher::new(run(ledger, Fence::new(response_id, 1)));
        tokens.push("Hel"); // published at once
        tokens.push("lo"); // these three wait for it, then go together
        tokens.push("");
        tokens.push(", ");
        tokens.push("world");
        tokens.flush().await.unwrap();
        tokens.push("!"); // nothing in flight: published at once
        tokens.flush().await.unwrap();
        assert_eq!(texts(handle, response_id).await, ["Hel", "lo, world", "!"]);
    }

    /// A run whose response was taken over (the fence names a later run) publishes nothing
    /// more and learns that it lost the response.
    #[tokio::test]
    async fn a_superseded_run_publishes_nothing() {
        let redis = testkit::TestRedis::new();
        let (ledger, handle, settings) = ledger(&redis);
        let publisher = EventPublisher::new(handle.clone(), &settings.events);
        let response_id = Uuid::now_v7();
        publisher.fence(response_id, 1).await.unwrap();
        let old = Fence::new(response_id, 1);
        let mut tokens = TokenPublisher::new(run(ledger, old.clone()));
        tokens.push("mine");
        tokens.flush().await.unwrap();
        // run 2 takes over; run 1 can no longer publish, and a stale fence never comes back
        assert_eq!(publisher.fence(response_id, 2).await.unwrap(), 2);
        assert_eq!(publisher.fence(response_id, 1).await.unwrap(), 2);
        tokens.push("stale");
        assert!(tokens.flush().await.is_err());
        assert!(old.lost.is_cancelled());
        assert_eq!(texts(handle, response_id).await, ["mine"]);
    }
}
