//! `search_knowledge`: what the assistant finds for a query among the data the conversation
//! may use.
//!
//! INTERIM BACKEND: until the retrieval index (`store::retrieval`, pgvector) serves it, this is
//! a PostgreSQL full-text search over the projects and tasks of
//! `conversation_projects_visible(user, conversation)` ([`store::assistant::search`]). Switching
//! to retrieval changes only the body of [`search_knowledge`]; its visibility rule stays the
//! same (filtered in SQL at query time).

use serde_json::{Value, json};
use sqlx::PgConnection;

use super::{Internal, ToolCtx};

/// Most hits returned to the model.
const HITS: i64 = 10;

pub async fn search_knowledge(
    conn: &mut PgConnection,
    ctx: &ToolCtx,
    query: &str,
) -> Result<Value, Internal> {
    let hits =
        store::assistant::search(conn, ctx.user_id, ctx.conversation_id, query, HITS).await?;
    Ok(json!({
        "results": hits.iter().map(|h| json!({
            "kind": h.kind,
            "id": h.id,
            "project_id": h.project_id,
            "title": h.title,
            "snippet": h.snippet,
        })).collect::<Vec<_>>(),
    }))
}
