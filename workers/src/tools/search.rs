//! `search_knowledge`: what the assistant finds for a query among the data the conversation
//! may use.
//!
//! Two sources, both filtered in SQL at query time by the live visibility rule:
//! 1. the retrieval index ([`store::retrieval::search`]: documents, projects, tasks and the
//!    user's own earlier messages; vector + full text fused, or full text only when the query
//!    could not be embedded), with the conversation's project narrowing;
//! 2. then, to fill up to [`HITS`], a live full-text search over the projects and tasks of
//!    `conversation_projects_visible(user, conversation)` ([`store::assistant::search`]), so
//!    that changes not yet re-indexed (the outbox runs every few minutes) are found too.

use serde_json::{Value, json};
use sqlx::PgConnection;

use super::{Internal, ToolCtx};

/// Most hits returned to the model.
const HITS: usize = 10;
/// Characters of a hit's text given to the model.
const SNIPPET: usize = 600;

/// What `search_knowledge` needs beyond the database: the retrieval settings and the query's
/// embedding (computed before the round's transaction; `None`: full text only).
#[derive(Debug, Clone, Copy)]
pub struct Knowledge<'a> {
    pub embedding: Option<&'a pgvector::Vector>,
    pub model: &'a str,
    pub dim: u32,
    pub tuning: store::retrieval::Tuning,
}

pub async fn search_knowledge(
    conn: &mut PgConnection,
    ctx: &ToolCtx,
    knowledge: &Knowledge<'_>,
    query: &str,
) -> Result<Value, Internal> {
    let chunks = store::retrieval::search(
        conn,
        &store::retrieval::Query {
            org_id: ctx.org_id.into(),
            user_id: ctx.user_id.into(),
            conversation_id: ctx.conversation_id.into(),
            embedding: knowledge.embedding,
            text: query,
            model: knowledge.model,
            dim: knowledge.dim,
            k: u32::try_from(HITS).unwrap_or(10),
            exclude_message_ids: &[],
        },
        &knowledge.tuning,
    )
    .await?;
    let mut seen = std::collections::HashSet::new();
    let mut results: Vec<Value> = Vec::with_capacity(HITS);
    for c in chunks {
        seen.insert(c.source_id);
        results.push(json!({
            "kind": c.source_kind,
            "id": c.source_id,
            "project_id": c.project_id,
            "title": c.title,
            "snippet": c.content.chars().take(SNIPPET).collect::<String>(),
        }));
    }
    if results.len() < HITS {
        let live = store::assistant::search(
            conn,
            ctx.user_id.into(),
            ctx.conversation_id.into(),
            query,
            i64::try_from(HITS).unwrap_or(10),
        )
        .await?;
        for h in live {
            if results.len() >= HITS {
                break;
            }
            if seen.insert(h.id) {
                results.push(json!({
                    "kind": h.kind,
                    "id": h.id,
                    "project_id": h.project_id,
                    "title": h.title,
                    "snippet": h.snippet,
                }));
            }
        }
    }
    Ok(json!({ "results": results }))
}
