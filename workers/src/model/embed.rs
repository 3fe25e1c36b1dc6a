//! The query embedding of retrieval (the chat turn's question) and of the `search_knowledge`
//! tool: `EMBEDDING_MODEL` through LiteLLM, bounded by `RETRIEVAL_EMBED_TIMEOUT_MS`. A failure
//! never fails the turn: it goes on with full-text retrieval and memories by recency (a warning
//! and `retrieval_embed_failures_total`).

use std::time::Duration;

pub const EMBED_FAILURES: &str = "retrieval_embed_failures_total";

/// The longest query text embedded / searched (a user message is size-limited anyway).
pub const MAX_QUERY_CHARS: usize = 4000;

/// Embeds one query text with the index's model, checked against its dimension; carries the
/// search settings that go with it.
#[derive(Clone)]
pub struct QueryEmbedder {
    llm: llm::LlmClient,
    /// Where each embedding's tokens are counted (`usage_daily`, the org's budget).
    db: sqlx::PgPool,
    pub model: String,
    pub dim: u32,
    timeout: Duration,
    /// The search knobs of `[retrieval]`, for the searches the embedding goes with.
    pub tuning: store::retrieval::Tuning,
}

impl QueryEmbedder {
    pub fn new(llm: llm::LlmClient, db: sqlx::PgPool, settings: &config::Settings) -> Self {
        metrics::describe_counter!(
            EMBED_FAILURES,
            "Chat turns whose query embedding failed (retrieval fell back to full text only)"
        );
        Self {
            llm,
            db,
            model: settings.embedding.model.clone(),
            dim: settings.embedding.dim,
            timeout: Duration::from_millis(settings.retrieval.embed_timeout_ms),
            tuning: tuning(&settings.retrieval),
        }
    }

    /// The embedding of `text` for a turn of `org_id` (its tokens counted in the org's usage),
    /// or `None` (logged, counted) when the embedder fails, times out or answers with the
    /// wrong dimension.
    pub async fn embed(&self, org_id: uuid::Uuid, text: &str) -> Option<pgvector::Vector> {
        let expect = llm::Expect {
            dim: Some(self.dim),
            within: Some(self.timeout),
        };
        let model = self.model.as_str();
        match self
            .llm
            .embed_or_fail(model, &[text.to_owned()], expect)
            .await
        {
            Ok(mut embedded) => {
                super::record_embedding(&self.db, org_id, model, embedded.tokens).await;
                embedded.vectors.pop().map(pgvector::Vector::from)
            }
            Err(failure) => {
                tracing::warn!(
                    model,
                    %failure,
                    "the query embedding failed; retrieval by full text only, memories by recency"
                );
                metrics::counter!(EMBED_FAILURES).increment(1);
                None
            }
        }
    }
}

/// The search knobs of `[retrieval]`.
fn tuning(settings: &config::RetrievalSettings) -> store::retrieval::Tuning {
    store::retrieval::Tuning {
        candidates: settings.candidates,
        ef_search: settings.ef_search,
        max_scan_tuples: settings.max_scan_tuples,
        exact_max_rows: settings.exact_max_rows,
        stopword_min_rows: settings.stopword_min_rows,
    }
}
