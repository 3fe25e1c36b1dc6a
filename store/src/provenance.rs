//! Provenance (docs/ARCHITECTURE.md, "Provenance"): what a derived item — an answer, a
//! message chunk, a memory fact, a summary — drew on, so that whoever reads it can filter it
//! by its sources against the live membership tables, and deleting a source can find what was
//! derived from it.
//!
//! The columns (`source_project_ids`, `source_document_ids`, `narrow`) are the same on
//! `messages`, `embeddings`, `conversation_memories` and `conversation_summaries` (migration
//! `20261204100001_provenance.sql`). `narrow` means "drew on something narrower than its
//! projects" (a restricted document, or another narrow item): such an item never becomes
//! project knowledge.
//!
//! The read rules live in SQL next to the rest of each read's visibility filter
//! ([`visible_sql`]); the tier rule of a learnt fact is [`Provenance::project_fact_allowed`].

use std::collections::BTreeSet;

use crate::types::{DocumentId, MessageId, ProjectId};
use serde_json::{Value, json};

/// What one derived item drew on.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Provenance {
    pub source_project_ids: Vec<ProjectId>,
    pub source_document_ids: Vec<DocumentId>,
    pub narrow: bool,
}

impl Provenance {
    /// Nothing but the user's own words.
    pub fn is_empty(&self) -> bool {
        self.source_project_ids.is_empty() && self.source_document_ids.is_empty() && !self.narrow
    }

    /// May a fact from an exchange with this provenance become project knowledge of
    /// `project`? Only when everything the exchange drew on (besides the user's own message)
    /// is visible to every member of that project: nothing narrow (restricted documents) and no
    /// other project.
    pub fn project_fact_allowed(&self, project: ProjectId) -> bool {
        !self.narrow && self.source_project_ids.iter().all(|p| *p == project)
    }
}

/// Collects the sources of one chat turn as the worker gives them to the model.
#[derive(Debug, Clone, Default)]
pub struct TurnSources {
    projects: BTreeSet<ProjectId>,
    documents: BTreeSet<DocumentId>,
    narrow: bool,
    /// What was given, for the record (`messages.sources`).
    given: Vec<Value>,
}

impl TurnSources {
    pub fn new() -> Self {
        Self::default()
    }

    /// Another derived item's provenance (a message chunk, a memory, the summary).
    fn inherit(&mut self, p: &Provenance) {
        self.projects.extend(p.source_project_ids.iter().copied());
        self.documents.extend(p.source_document_ids.iter().copied());
        self.narrow |= p.narrow;
    }

    /// A retrieved chunk: project content (its project; for a document, the document and
    /// whether it is restricted), or a message chunk (that message's provenance).
    pub fn chunk(&mut self, c: &crate::retrieval::Chunk) {
        if c.source_kind == "message" {
            self.inherit(&c.provenance);
        } else {
            if let Some(p) = c.project_id {
                self.projects.insert(p);
            }
            if c.source_kind == "document" {
                self.documents.insert(c.source_id.into());
            }
            self.narrow |= c.restricted;
        }
        self.given.push(json!({
            "kind": "chunk",
            "source_kind": c.source_kind,
            "source_id": c.source_id,
            "chunk": c.chunk_index,
            "project_id": c.project_id,
            "restricted": c.restricted,
        }));
    }

    /// A memory entry given to the prompt: every entry brings its own sources (a user's own
    /// entry is the user's own words unless its provenance says otherwise); a project entry is
    /// also its project's content.
    pub fn memory(&mut self, m: &crate::memory::PromptEntry) {
        self.inherit(&m.provenance);
        if m.tier == "project"
            && let Some(p) = m.project_id
        {
            self.projects.insert(p.into());
        }
        self.given
            .push(json!({"kind": "memory", "id": m.id, "tier": m.tier}));
    }

    /// The conversation's summary, given to the prompt.
    pub fn summary(&mut self, p: &Provenance) {
        self.inherit(p);
        self.given.push(json!({"kind": "summary"}));
    }

    /// The provenance collected so far (tool results and the recent window are added by
    /// `conversations::complete`, in SQL).
    pub fn provenance(&self) -> Provenance {
        Provenance {
            source_project_ids: self.projects.iter().copied().collect(),
            source_document_ids: self.documents.iter().copied().collect(),
            narrow: self.narrow,
        }
    }

    /// `messages.sources` of the answer (tool results are appended by `complete`).
    pub fn given(&self) -> Value {
        Value::Array(self.given.clone())
    }
}

/// What a stored message drew on (`None`: no such message).
pub async fn of_message(
    conn: &mut sqlx::PgConnection,
    message_id: MessageId,
) -> Result<Option<Provenance>, crate::StoreError> {
    Ok(sqlx::query_as::<_, Provenance>(
        "SELECT source_project_ids, source_document_ids, narrow FROM messages WHERE id = $1",
    )
    .bind(message_id)
    .fetch_optional(conn)
    .await?)
}

/// The SQL predicate "derived item `<alias>` may be read by user `<user>` in a conversation
/// whose visible projects are the array `<projects>`": every project it drew on is in that
/// set, and every document it drew on is visible to the user now. Alias, user and projects
/// are SQL expressions written by the caller (never input). Set-based, like the retrieval
/// filter ([`chunk_visible_sql`]): the user's teams are one uncorrelated array (evaluated once
/// per statement when `<user>` is a parameter), and each document costs one primary-key lookup
/// instead of a `can_see_document` call, which evaluated the user's whole visibility again for
/// every row.
pub fn visible_sql(alias: &str, user: &str, projects: &str) -> String {
    chunk_visible_sql(
        alias,
        user,
        projects,
        &format!("ARRAY(SELECT tm.team_id FROM team_members tm WHERE tm.user_id = {user})"),
    )
}

/// [`visible_sql`] with the user's teams given as an array expression `<teams>`: the
/// `can_see_document` rule written against the arrays a read already computed — `<projects>`
/// (the conversation's visible projects) and `<teams>` — so each document the item drew on
/// costs one primary-key lookup. A document's project must be in the visible set too (it is
/// among the item's projects anyway; the set is narrower than the user's visible projects, so
/// this errs on the narrow side). Retrieval evaluates it per candidate chunk.
pub fn chunk_visible_sql(alias: &str, user: &str, projects: &str, teams: &str) -> String {
    format!(
        "({alias}.source_project_ids <@ {projects}
          AND ({alias}.source_document_ids = '{{}}' OR NOT EXISTS (
              SELECT 1 FROM unnest({alias}.source_document_ids) AS sd(id)
              WHERE NOT EXISTS (
                  SELECT 1 FROM documents d
                  WHERE d.id = sd.id AND d.deleted_at IS NULL AND d.project_id = ANY({projects})
                    AND ((d.visible_to_user_ids = '{{}}' AND d.visible_to_team_ids = '{{}}')
                         OR {user} = ANY(d.visible_to_user_ids) OR d.uploaded_by = {user}
                         OR d.visible_to_team_ids && {teams})))))"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_project_fact_needs_an_exchange_no_narrower_than_its_project() {
        let p = ProjectId::new_v7();
        let q = ProjectId::new_v7();
        assert!(Provenance::default().project_fact_allowed(p));
        let own = Provenance {
            source_project_ids: vec![p],
            ..Default::default()
        };
        assert!(own.project_fact_allowed(p));
        assert!(!own.project_fact_allowed(q), "another project");
        let narrow = Provenance {
            narrow: true,
            ..own.clone()
        };
        assert!(!narrow.project_fact_allowed(p), "a restricted source");
    }
}
