//! Memory in the chat turn (docs/ARCHITECTURE.md, "Memory"): what the prompt gets — the
//! conversation's running summary and the memory entries the user may see, most relevant first
//! within `MEMORY_TOKEN_BUDGET` — and the follow-up jobs a finished turn enqueues.
//!
//! Visibility is decided in SQL at query time (`store::memory::for_prompt`): the org's
//! entries, those of the projects the conversation may draw on for the user right now, and the
//! user's own. Relevance: the user's message is embedded (`EMBEDDING_MODEL`) and entries are
//! ranked by cosine distance; when embedding fails they are ranked by recency.

use crate::handlers::db_error;
use jobs::JobError;
use jobs::kinds::{Chat, Remember, Summarize};
use uuid::Uuid;

use super::ChatHandler;

pub const FOLLOW_UP_FAILURES: &str = "chat_follow_up_enqueue_failures_total";

/// Entries read per prompt before the budget is applied.
const CANDIDATES: i64 = 200;

/// What memory adds to one prompt.
#[derive(Debug, Default)]
pub struct MemoryContext {
    pub summary: Option<String>,
    /// What the summary drew on (the answer inherits it).
    pub summary_provenance: store::provenance::Provenance,
    pub memories: Vec<String>,
    /// The entries behind `memories` (the answer inherits their provenance).
    pub entries: Vec<store::memory::PromptEntry>,
}

/// Estimated tokens of a text (characters / 4, at least 1).
pub fn estimate_tokens(s: &str) -> usize {
    s.chars().count().div_ceil(4).max(1)
}

/// The longest prefix of `entries` (already most relevant first) that fits `budget` tokens.
pub fn fit_budget(entries: Vec<String>, budget: usize) -> Vec<String> {
    let mut used = 0usize;
    let mut out = Vec::new();
    for e in entries {
        let t = estimate_tokens(&e);
        if used + t > budget {
            break;
        }
        used += t;
        out.push(e);
    }
    out
}

impl ChatHandler {
    /// The summary and the memory entries for the prompt of `job`, whose user message is
    /// `question`.
    pub(super) async fn memory_context(
        &self,
        job: &Chat,
        question: &super::retrieval::Question,
    ) -> Result<MemoryContext, JobError> {
        let inner = &self.inner;
        let mut conn = inner.db.acquire().await.map_err(db_error)?;
        let start =
            store::memory::prompt_start(&mut conn, job.user_id.into(), job.conversation_id.into())
                .await
                .map_err(db_error)?;
        if start.summary_hidden {
            // It drew on a source the user can no longer see (or outside the conversation's
            // narrowing): withheld, and rebuilt without it.
            self.rebuild_summary(&mut conn, job).await;
        }
        let summary = start.summary.filter(|s| !s.trim().is_empty());
        let summary_provenance = start.provenance;
        if inner.memory.token_budget == 0 || !start.any_entry {
            return Ok(MemoryContext {
                summary,
                summary_provenance,
                ..Default::default()
            });
        }
        drop(conn);
        let model = inner.embedding.model.as_str();
        let query = self.question_embedding(question).await;
        let mut conn = inner.db.acquire().await.map_err(db_error)?;
        let entries = store::memory::for_prompt(
            &mut conn,
            job.user_id.into(),
            job.conversation_id.into(),
            query.map(|v| (model, v.as_slice())),
            CANDIDATES,
        )
        .await
        .map_err(db_error)?;
        let mut entries = entries;
        let memories = fit_budget(
            entries.iter().map(|e| e.content.clone()).collect(),
            inner.memory.token_budget,
        );
        entries.truncate(memories.len());
        Ok(MemoryContext {
            summary,
            summary_provenance,
            memories,
            entries,
        })
    }

    /// Reset a summary that drew on a source its user can no longer see and enqueue a fold
    /// that rebuilds it without that source. Best effort (logged): until it is rebuilt the
    /// prompt simply has no summary.
    async fn rebuild_summary(&self, conn: &mut sqlx::PgConnection, job: &Chat) {
        match store::memory::reset_hidden_summary(
            conn,
            job.user_id.into(),
            job.conversation_id.into(),
        )
        .await
        {
            Ok(true) => {
                metrics::counter!(crate::handlers::memory::SUMMARIES, "outcome" => "reset")
                    .increment(1);
                let again = Summarize {
                    conversation_id: job.conversation_id,
                };
                if let Err(e) = self.inner.bus.enqueue(again).await {
                    metrics::counter!(FOLLOW_UP_FAILURES, "kind" => "summarize").increment(1);
                    tracing::warn!(error = %e, "cannot enqueue the summary's rebuild");
                } else {
                    tracing::info!("the summary drew on a source no longer visible; rebuilding it");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot reset the summary"),
        }
    }

    /// After a new answer was committed: `remember` (fact extraction) and, when enough
    /// messages fell out of the recent window unsummarized, `summarize`. Best effort: a failure
    /// is logged and counted, never fails the answered turn.
    pub(super) async fn enqueue_follow_ups(
        &self,
        conversation_id: Uuid,
        user_id: Uuid,
        org_id: Uuid,
        answer_id: Uuid,
    ) {
        let inner = &self.inner;
        if inner.memory.remember {
            let job = Remember {
                conversation_id: conversation_id.into(),
                message_id: answer_id.into(),
                user_id: user_id.into(),
                org_id: org_id.into(),
            };
            if let Err(e) = inner.bus.enqueue(job).await {
                metrics::counter!(FOLLOW_UP_FAILURES, "kind" => "remember").increment(1);
                tracing::warn!(error = %e, "cannot enqueue remember");
            }
        }
        let pending = async {
            let mut conn = inner.db.acquire().await.map_err(store::StoreError::from)?;
            store::memory::unsummarized_beyond_window(
                &mut conn,
                conversation_id,
                i64::try_from(inner.chat.recent_messages).unwrap_or(i64::MAX),
            )
            .await
        };
        match pending.await {
            Ok(n) if n >= i64::try_from(inner.memory.summarize_threshold).unwrap_or(i64::MAX) => {
                if let Err(e) = inner
                    .bus
                    .enqueue(Summarize {
                        conversation_id: conversation_id.into(),
                    })
                    .await
                {
                    metrics::counter!(FOLLOW_UP_FAILURES, "kind" => "summarize").increment(1);
                    tracing::warn!(error = %e, "cannot enqueue summarize");
                } else {
                    tracing::info!(unsummarized = n, "summarize enqueued");
                }
            }
            Ok(_) => {}
            Err(e) => {
                metrics::counter!(FOLLOW_UP_FAILURES, "kind" => "summarize").increment(1);
                tracing::warn!(error = %e, "cannot count unsummarized messages");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_keeps_the_most_relevant_prefix() {
        let e = vec!["a".repeat(40), "b".repeat(40), "c".repeat(4)];
        assert_eq!(fit_budget(e.clone(), 21).len(), 3);
        assert_eq!(fit_budget(e.clone(), 20).len(), 2);
        assert_eq!(fit_budget(e.clone(), 10), vec!["a".repeat(40)]);
        assert!(fit_budget(e, 5).is_empty());
    }
}
