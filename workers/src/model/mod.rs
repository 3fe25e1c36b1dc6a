//! The model caller, shared by the chat turn and the memory queue's `summarize` and `remember`
//! (docs/ARCHITECTURE.md, "The chat turn (worker side)"):
//!
//! - [`policy`]: which models ([`Models`]: the org's, the fallback tried once), and when
//!   waiting on rate limits turns into an error ([`rate_limit_decision`]);
//! - [`cooldowns`]: model-wide cooldowns after a 429, admission and the probe after one;
//! - [`stream`]: one streamed call, its tokens published as they arrive, and how it ended
//!   ([`CallOutcome`]: the error classes the fallback policy reads);
//! - [`ModelCaller::complete_text`]: one non-streamed answer, with its fallback;
//! - [`embed`]: the query embedding of retrieval and of `search_knowledge`;
//! - [`metrics`]: model metrics (calls, latency, tokens, fallbacks, rate-limit waits).

pub mod cooldowns;
pub mod embed;
pub mod metrics;
pub mod policy;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use jobs::{JobError, RedisHandle};

pub use cooldowns::{Admission, Cooldowns, DEFAULT_COOLDOWN};
pub use embed::QueryEmbedder;
pub use policy::{Models, RateLimitDecision, rate_limit_decision};
pub use stream::{Answered, CallOutcome};

use crate::handlers::{db_error, redis_error};

/// Calls the chat models: the client, the cooldowns, the fixed generation parameters and
/// timeouts (`[chat]`), and the bound of one job's model calls. Cheap to clone.
#[derive(Clone)]
pub struct ModelCaller {
    llm: llm::LlmClient,
    cooldowns: Cooldowns,
    chat: config::ChatSettings,
    /// Upper bound of the model calls of one run (primary and fallback together):
    /// `litellm.request_timeout_secs`. (The bus's heartbeat keeps the job claimed meanwhile.)
    call_limit: Duration,
}

impl ModelCaller {
    pub fn new(llm: llm::LlmClient, redis: Arc<RedisHandle>, settings: &config::Settings) -> Self {
        metrics::describe();
        Self {
            llm,
            cooldowns: Cooldowns::new(redis, Duration::from_secs(settings.chat.model_timeout_secs)),
            chat: settings.chat.clone(),
            call_limit: Duration::from_secs(settings.litellm.request_timeout_secs),
        }
    }

    /// The bound of one run's model calls.
    pub fn call_limit(&self) -> Duration {
        self.call_limit
    }

    /// The models of an org (its choice, each half defaulting to the configured one).
    pub fn models(&self, org: (Option<String>, Option<String>)) -> Models {
        Models::choose(org, &self.chat)
    }

    /// Whether a job may call `model` now (its cooldown, or another job's probe after one).
    pub async fn admit(&self, model: &str) -> Result<Admission, JobError> {
        self.cooldowns.admit(model).await.map_err(redis_error)
    }

    /// A probe's call ended (`rate_limited`: with a 429, which restarts the cooldown instead):
    /// anything else lets every job call the model again. Best effort: a probe that cannot
    /// report expires by itself.
    pub async fn probe_done(&self, model: &str, probe: bool, rate_limited: bool) {
        if !probe || rate_limited {
            return;
        }
        if let Err(e) = self.cooldowns.recovered(model).await {
            tracing::warn!(model, error = %e, "cannot end the model's probation; it expires");
        }
    }

    /// A 429: start (or extend) `model`'s cooldown for `retry_after` (or the default); how long
    /// it cools down.
    pub async fn rate_limited(
        &self,
        model: &str,
        retry_after: Option<Duration>,
    ) -> Result<Duration, JobError> {
        let cooldown = retry_after.unwrap_or(DEFAULT_COOLDOWN);
        self.cooldowns
            .start(model, cooldown)
            .await
            .map_err(redis_error)?;
        Ok(cooldown)
    }

    /// One non-streamed answer from the org's model (the fallback once when the primary
    /// fails): `(text, model)`. Every call that answered counts against the org's token budget
    /// (`usage_daily`), whatever the job then does with the answer. A 429 or a cooling-down
    /// model re-queues the job after the cooldown (background work: its waits count as
    /// attempts, so a model that stays rate limited ends in the dead letters instead of waiting
    /// forever).
    pub async fn complete_text(
        &self,
        db: &sqlx::PgPool,
        org_id: uuid::Uuid,
        messages: Vec<llm::Message>,
    ) -> Result<(String, String), JobError> {
        let org = store::conversations::org_models(db, org_id)
            .await
            .map_err(db_error)?;
        let models = self.models(org);
        let mut last = String::new();
        for model in std::iter::once(models.primary).chain(models.fallback) {
            let probe = match self.admit(&model).await? {
                Admission::Call { probe } => probe,
                Admission::Wait(left) => {
                    return Err(JobError::retry_after(
                        format!("model {model} is cooling down"),
                        left,
                    ));
                }
            };
            let req = llm::ChatRequest {
                model: model.clone(),
                messages: messages.clone(),
                tools: Vec::new(),
                params: llm::GenerationParams::from(&self.chat),
            };
            let call = async {
                let stream = self
                    .llm
                    .chat_stream(&req, llm::Timeouts::from_settings(&self.chat))
                    .await?;
                llm::collect(stream).await
            };
            let outcome = match tokio::time::timeout(self.call_limit, call).await {
                Ok(r) => r,
                Err(_) => Err(llm::LlmError::Timeout(
                    "the model call took too long".into(),
                )),
            };
            let rate_limited = matches!(&outcome, Err(e) if e.is_rate_limited());
            self.probe_done(&model, probe, rate_limited).await;
            if let Ok(c) = &outcome {
                let (prompt, completion) = c.usage.map_or((0, 0), |u| {
                    (u64::from(u.prompt_tokens), u64::from(u.completion_tokens))
                });
                record_usage(db, org_id, &model, prompt, completion).await;
            }
            match outcome {
                Ok(c) if !c.text.trim().is_empty() => return Ok((c.text, model)),
                Ok(_) => last = format!("{model}: empty answer"),
                Err(e) if e.is_rate_limited() => {
                    let wait = self.rate_limited(&model, e.retry_after()).await?;
                    return Err(JobError::retry_after(
                        format!("model {model} is rate limited"),
                        wait,
                    ));
                }
                Err(e) => {
                    tracing::warn!(model, kind = e.kind(), "memory model call failed");
                    last = format!("{model}: {}", e.kind());
                }
            }
        }
        Err(JobError::retryable(format!("model call failed ({last})")))
    }
}

/// Count an embedding request of `org_id` (its prompt tokens; an embedding has no completion)
/// in the org's `usage_daily`, like [`record_usage`]: retrieval's query, `search_knowledge`,
/// memory entries, indexed chunks — every model call counts against the org's budget.
pub(crate) async fn record_embedding(
    db: &sqlx::PgPool,
    org_id: uuid::Uuid,
    model: &str,
    tokens: u64,
) {
    record_usage(db, org_id, model, tokens, 0).await;
}

/// Count a background model call (summarize, remember) in the org's `usage_daily`, on its own:
/// the tokens are spent whether or not the job's own write commits. A failure to count is
/// logged, never a reason to call the model again.
async fn record_usage(
    db: &sqlx::PgPool,
    org_id: uuid::Uuid,
    model: &str,
    prompt: u64,
    completion: u64,
) {
    let tokens = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let counted = async {
        let mut conn = db.acquire().await?;
        store::usage::record(
            &mut conn,
            org_id.into(),
            model,
            tokens(prompt),
            tokens(completion),
            chrono::Utc::now(),
        )
        .await
    };
    if let Err(e) = counted.await {
        tracing::warn!(error = %e, model, "cannot count a model call's usage");
    }
}
