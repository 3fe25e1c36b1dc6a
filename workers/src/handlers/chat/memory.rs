//! Memory in the chat turn's context (docs/ARCHITECTURE.md, "Memory"): what the prompt gets —
//! the conversation's running summary and the memory entries the user may see, most relevant
//! first within `MEMORY_TOKEN_BUDGET`. (The follow-up jobs a finished turn enqueues are
//! `crate::follow_ups`.)
//!
//! Visibility is decided in SQL at query time (`store::memory::for_prompt`): the org's
//! entries, those of the projects the conversation may draw on for the user right now, and the
//! user's own. Relevance: the user's message is embedded (`EMBEDDING_MODEL`) and entries are
//! ranked by cosine distance; when embedding fails they are ranked by recency.

use jobs::JobError;
use jobs::kinds::Chat;

use super::context::ContextLoader;
use super::retrieval::Question;
use crate::handlers::db_error;

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

/// The longest prefix of `entries` (already most relevant first) that fits `budget` tokens.
pub fn fit_budget(entries: Vec<String>, budget: usize) -> Vec<String> {
    let mut used = 0usize;
    let mut out = Vec::new();
    for e in entries {
        // (an entry costs at least one token)
        let t = llm::estimate_tokens(&e).max(1);
        if used + t > budget {
            break;
        }
        used += t;
        out.push(e);
    }
    out
}

impl ContextLoader {
    /// The summary and the memory entries for the prompt of `job`, whose user message is
    /// `question`.
    pub(super) async fn memory_context(
        &self,
        job: &Chat,
        question: &Question,
    ) -> Result<MemoryContext, JobError> {
        let mut conn = self.db.acquire().await.map_err(db_error)?;
        let start =
            store::memory::prompt_start(&mut conn, job.user_id.into(), job.conversation_id.into())
                .await
                .map_err(db_error)?;
        if start.summary_hidden {
            // It drew on a source the user can no longer see (or outside the conversation's
            // narrowing): withheld, and rebuilt without it.
            self.follow_ups
                .rebuild_summary(&mut conn, job.user_id.into(), job.conversation_id.into())
                .await;
        }
        let summary = start.summary.filter(|s| !s.trim().is_empty());
        let summary_provenance = start.provenance;
        if self.memory_budget == 0 || !start.any_entry {
            return Ok(MemoryContext {
                summary,
                summary_provenance,
                ..Default::default()
            });
        }
        drop(conn);
        let model = self.embedder.model.as_str();
        let query = self.question_embedding(question).await;
        let mut conn = self.db.acquire().await.map_err(db_error)?;
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
            self.memory_budget,
        );
        entries.truncate(memories.len());
        Ok(MemoryContext {
            summary,
            summary_provenance,
            memories,
            entries,
        })
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
