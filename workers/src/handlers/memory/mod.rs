//! The memory queue's handlers (docs/ARCHITECTURE.md, "Memory"):
//!
//! - [`summarize`]: fold a conversation's messages older than the `RECENT_MESSAGES` window
//!   into its running summary (row lock on the summary; race-safe, idempotent);
//! - [`remember`]: extract durable facts from a finished exchange as strict JSON and store them
//!   as user- or project-tier entries (near-duplicates refresh, capacity retention).
//!
//! Both call the conversation org's model through the model caller (`crate::model`): the fixed
//! generation parameters, the fallback once, the model-wide cooldowns chat turns keep too.

pub mod remember;
pub mod summarize;

use std::sync::Arc;

use jobs::kinds::{Remember, Summarize};
use jobs::{JobError, RedisHandle, Registry};

pub use crate::follow_ups::SUMMARIES;
use crate::handlers::db_error;
use crate::model::ModelCaller;
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
    /// Embeddings of the extracted facts.
    llm: llm::LlmClient,
    model: ModelCaller,
    /// `RECENT_MESSAGES`: the window summaries stop at.
    recent_messages: usize,
    memory: config::MemorySettings,
    embedding: config::EmbeddingSettings,
    /// To continue a summary that one run could not finish.
    bus: jobs::Bus,
}

impl MemoryHandlers {
    pub fn new(
        db: sqlx::PgPool,
        redis: Arc<RedisHandle>,
        settings: &config::Settings,
    ) -> Result<Self, llm::LlmError> {
        describe();
        let llm = llm::LlmClient::new(&settings.litellm)?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                model: ModelCaller::new(llm.clone(), redis.clone(), settings),
                llm,
                bus: jobs::Bus::new(redis, &settings.queues),
                recent_messages: settings.chat.recent_messages,
                memory: settings.memory.clone(),
                embedding: settings.embedding.clone(),
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

    /// One non-streamed answer from the org's model (`ModelCaller::complete_text`).
    async fn complete_text(
        &self,
        org_id: uuid::Uuid,
        messages: Vec<llm::Message>,
    ) -> Result<(String, String), JobError> {
        let inner = &self.inner;
        inner.model.complete_text(&inner.db, org_id, messages).await
    }

    /// Embed texts of `org_id` with `EMBEDDING_MODEL` (the tokens counted in the org's usage);
    /// `None` (logged, counted) when that fails.
    async fn embed(&self, org_id: uuid::Uuid, texts: &[String]) -> Option<Vec<Vec<f32>>> {
        let inner = &self.inner;
        let expect = llm::Expect::default();
        let model = inner.embedding.model.as_str();
        match inner.llm.embed_or_fail(model, texts, expect).await {
            Ok(embedded) => {
                crate::model::record_embedding(&inner.db, org_id, model, embedded.tokens).await;
                Some(embedded.vectors)
            }
            Err(failure) => {
                tracing::warn!(%failure, "embedding memory entries failed");
                metrics::counter!(EMBED_FAILURES).increment(1);
                None
            }
        }
    }
}

/// The job's conversation; `None` (logged) when it is gone, so there is nothing left to
/// `what`.
async fn find_conversation(
    conn: &mut sqlx::PgConnection,
    id: uuid::Uuid,
    what: &str,
) -> Result<Option<store::conversations::Conversation>, JobError> {
    let conversation = store::conversations::get(conn, id)
        .await
        .map_err(db_error)?;
    if conversation.is_none() {
        tracing::info!("the conversation is gone; nothing to {what}");
    }
    Ok(conversation)
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
