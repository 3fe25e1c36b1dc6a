//! The memory queue's handlers (SPEC §3, docs/ARCHITECTURE.md "Memory"):
//!
//! - [`summarize`]: fold a conversation's messages older than the `RECENT_MESSAGES` window
//!   into its running summary (row lock on the summary; race-safe, idempotent);
//! - [`remember`]: extract durable facts from a finished exchange as strict JSON and store them
//!   as user- or project-tier entries (near-duplicates refresh, capacity retention).
//!
//! Both call the conversation org's model with the fixed generation parameters, falling back
//! once, and honour the model-wide cooldowns the chat handler keeps.

pub mod remember;
pub mod summarize;

use crate::handlers::{db_error, redis_error};
use std::sync::Arc;
use std::time::Duration;

use jobs::kinds::{Remember, Summarize};
use jobs::{JobError, RedisHandle, Registry};

use super::chat::policy::{Admission, Cooldowns, DEFAULT_COOLDOWN, Models};

pub const SUMMARIES: &str = "memory_summaries_total";
pub const FACTS: &str = "memory_facts_total";
pub const EXTRACTIONS: &str = "memory_extractions_total";
pub const EMBED_FAILURES: &str = "memory_embedding_failures_total";

fn describe() {
    metrics::describe_counter!(
        SUMMARIES,
        "Summarize runs by outcome (folded, nothing_new, busy, superseded, reset)"
    );
    metrics::describe_counter!(
        FACTS,
        "Extracted facts by outcome (stored, refreshed, not_visible, demoted)"
    );
    metrics::describe_counter!(
        EXTRACTIONS,
        "Remember runs by outcome (ok, malformed, already_done)"
    );
    metrics::describe_counter!(
        EMBED_FAILURES,
        "Memory embeddings that failed (the entry is kept, ranked by recency)"
    );
}

/// The `summarize` and `remember` handlers; cheap to clone.
#[derive(Clone)]
pub struct MemoryHandlers {
    inner: Arc<Inner>,
}

struct Inner {
    db: sqlx::PgPool,
    llm: llm::LlmClient,
    cooldowns: Cooldowns,
    chat: config::ChatSettings,
    memory: config::MemorySettings,
    embedding: config::EmbeddingSettings,
    /// To continue a summary that one run could not finish.
    bus: jobs::Bus,
    call_limit: Duration,
}

impl MemoryHandlers {
    pub fn new(
        db: sqlx::PgPool,
        redis: Arc<RedisHandle>,
        settings: &config::Settings,
    ) -> Result<Self, llm::LlmError> {
        describe();
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                llm: llm::LlmClient::new(&settings.litellm)?,
                cooldowns: Cooldowns::new(
                    redis.clone(),
                    std::time::Duration::from_secs(settings.chat.model_timeout_secs),
                ),
                bus: jobs::Bus::new(redis, &settings.queues),
                chat: settings.chat.clone(),
                memory: settings.memory.clone(),
                embedding: settings.embedding.clone(),
                call_limit: Duration::from_secs(settings.litellm.request_timeout_secs),
            }),
        })
    }

    /// Register the `summarize` and `remember` handlers.
    pub fn register(self, registry: &mut Registry) {
        let s = self.clone();
        registry.register::<Summarize, _, _>(move |ctx, job| {
            let h = s.clone();
            async move { h.summarize(ctx, job).await }
        });
        registry.register::<Remember, _, _>(move |ctx, job| {
            let h = self.clone();
            async move { h.remember(ctx, job).await }
        });
    }

    /// One non-streamed answer from the org's model (the fallback once when the primary
    /// fails); a 429 or a cooling-down model re-queues the job after the cooldown.
    async fn complete_text(
        &self,
        org_id: uuid::Uuid,
        messages: Vec<llm::Message>,
    ) -> Result<(String, String), JobError> {
        let inner = &self.inner;
        let org = store::conversations::org_models(&inner.db, org_id)
            .await
            .map_err(db_error)?;
        let models = Models::choose(org, &inner.chat);
        let mut last = String::new();
        for model in std::iter::once(models.primary).chain(models.fallback) {
            let probe = match inner.cooldowns.admit(&model).await.map_err(redis_error)? {
                Admission::Call { probe } => probe,
                // (background work: its waits count as attempts, so a model that stays rate
                // limited ends in the dead letters instead of waiting forever)
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
                params: llm::GenerationParams::from(&inner.chat),
            };
            let call = async {
                let stream = inner
                    .llm
                    .chat_stream(&req, llm::Timeouts::from_settings(&inner.chat))
                    .await?;
                llm::collect(stream).await
            };
            let outcome = match tokio::time::timeout(inner.call_limit, call).await {
                Ok(r) => r,
                Err(_) => Err(llm::LlmError::Timeout(
                    "the model call took too long".into(),
                )),
            };
            if probe
                && !matches!(&outcome, Err(e) if e.is_rate_limited())
                && let Err(e) = inner.cooldowns.recovered(&model).await
            {
                tracing::warn!(model, error = %e, "cannot end the model's probation; it expires");
            }
            match outcome {
                Ok(c) if !c.text.trim().is_empty() => return Ok((c.text, model)),
                Ok(_) => last = format!("{model}: empty answer"),
                Err(e) if e.is_rate_limited() => {
                    let wait = e.retry_after().unwrap_or(DEFAULT_COOLDOWN);
                    inner
                        .cooldowns
                        .start(&model, wait)
                        .await
                        .map_err(redis_error)?;
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

    /// Embed texts with `EMBEDDING_MODEL`; `None` (logged, counted) when that fails.
    async fn embed(&self, texts: &[String]) -> Option<Vec<Vec<f32>>> {
        let inner = &self.inner;
        let expect = llm::Expect::default();
        match inner
            .llm
            .embed_or_fail(&inner.embedding.model, texts, expect)
            .await
        {
            Ok(v) => Some(v),
            Err(failure) => {
                tracing::warn!(%failure, "embedding memory entries failed");
                metrics::counter!(EMBED_FAILURES).increment(1);
                None
            }
        }
    }
}

/// `s` cut to at most `max` characters (on a character boundary).
pub(crate) fn truncate_chars(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate_chars("héllo", 2), "hé");
        assert_eq!(truncate_chars("abc", 10), "abc");
    }
}
