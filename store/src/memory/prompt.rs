//! Prompt reads: what a chat turn's prompt may carry of memory, filtered by the user's
//! visibility and each item's provenance in SQL at query time.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::StoreError;
use crate::provenance::{Provenance, visible_sql};

/// An entry as a prompt gets it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PromptEntry {
    pub id: Uuid,
    pub tier: String,
    pub project_id: Option<Uuid>,
    pub content: String,
    #[sqlx(flatten)]
    pub provenance: Provenance,
    /// Cosine distance to the query (`None` without a query vector or a comparable embedding).
    pub distance: Option<f64>,
}

/// [`visible_sql`] for row `alias` of a prompt read, for user `$1` in conversation `$2`: the
/// visible projects are those the conversation may draw on for the user now.
fn visible_in_conversation(alias: &str) -> String {
    visible_sql(
        alias,
        "$1",
        "ARRAY(SELECT project_id FROM conversation_projects_visible($1, $2))",
    )
}

/// The visibility rule of prompt reads, for user `$1` in conversation `$2`: the entries of the
/// conversation's org (the conversation must be the user's), of the projects the conversation
/// may draw on for the user right now, and the user's own. Nothing of another user, nor of a
/// project the user cannot see (live memberships). And, for every entry, its provenance: every
/// project it drew on is in the conversation's visible set and every document it drew on is
/// visible to the user now; a project entry whose document was restricted since is its
/// author's alone.
fn visible_to() -> String {
    let provenance = visible_in_conversation("m");
    format!(
        "m.org_id = (SELECT c.org_id FROM conversations c WHERE c.id = $2 AND c.user_id = $1)
       AND (m.tier = 'org'
            OR (m.tier = 'project'
                AND m.project_id IN (SELECT project_id FROM conversation_projects_visible($1, $2))
                AND (m.author_user_id = $1 OR NOT any_document_narrowed(m.source_document_ids)))
            OR (m.tier = 'user' AND m.user_id = $1))
       AND {provenance}"
    )
}

/// What a prompt starts from ([`prompt_start`]).
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct PromptStart {
    /// The conversation's summary, when there is one the user may still be given.
    pub summary: Option<String>,
    /// What the summary drew on.
    #[sqlx(flatten)]
    pub provenance: Provenance,
    /// A summary exists but drew on a source the user can no longer see (or outside the
    /// conversation's narrowing): it is withheld, and should be rebuilt without it.
    pub summary_hidden: bool,
    /// Whether the user has any memory entry a prompt of this conversation could carry (a
    /// cheap check that spares the embedding call when there is none).
    pub any_entry: bool,
}

/// What a prompt starts from, in one round trip: the conversation's summary (only while
/// everything it drew on is visible, see [`PromptStart`]) and whether any entry is visible.
pub async fn prompt_start(
    conn: &mut PgConnection,
    user_id: Uuid,
    conversation_id: Uuid,
) -> Result<PromptStart, StoreError> {
    let visible = visible_in_conversation("s");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT CASE WHEN v.visible THEN v.summary END AS summary,
                coalesce(v.source_project_ids, '{{}}') AS source_project_ids,
                coalesce(v.source_document_ids, '{{}}') AS source_document_ids,
                coalesce(v.narrow, false) AS narrow,
                coalesce(NOT v.visible, false) AS summary_hidden,
                EXISTS (SELECT 1 FROM conversation_memories m WHERE {}) AS any_entry
         FROM (SELECT 1) one
         LEFT JOIN (SELECT s.summary, s.source_project_ids, s.source_document_ids, s.narrow,
                           {visible} AS visible
                    FROM conversation_summaries s WHERE s.conversation_id = $2) v ON true",
        visible_to()
    )))
    .bind(user_id)
    .bind(conversation_id)
    .fetch_one(conn)
    .await?)
}

/// Forget a summary that drew on a source its user can no longer see (still true now): it
/// starts over from the first message, and the next fold rebuilds it without what the user may
/// no longer be given ([`messages_to_fold`]). A fold in flight finds its compare-and-set
/// refused. True when it was reset.
pub async fn reset_hidden_summary(
    conn: &mut PgConnection,
    user_id: Uuid,
    conversation_id: Uuid,
) -> Result<bool, StoreError> {
    let visible = visible_in_conversation("s");
    let done = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE conversation_summaries s
            SET summary = '', summarized_up_to = 0, source_project_ids = '{{}}',
                source_document_ids = '{{}}', narrow = false, updated_at = now()
          WHERE s.conversation_id = $2 AND NOT {visible}"
    )))
    .bind(user_id)
    .bind(conversation_id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The entries a prompt for `user_id` in `conversation_id` may carry, most relevant first:
/// by cosine distance to `query` (an embedding by `model`) when given, then most recently
/// updated. At most `limit` (the caller then fits them into its token budget).
pub async fn for_prompt(
    conn: &mut PgConnection,
    user_id: Uuid,
    conversation_id: Uuid,
    query: Option<(&str, &[f32])>,
    limit: i64,
) -> Result<Vec<PromptEntry>, StoreError> {
    let (model, dim, vector) = match query {
        Some((model, v)) => (
            Some(model),
            Some(i32::try_from(v.len()).unwrap_or(i32::MAX)),
            Some(pgvector::Vector::from(v.to_vec())),
        ),
        None => (None, None, None),
    };
    Ok(
        sqlx::query_as::<_, PromptEntry>(sqlx::AssertSqlSafe(format!(
            "SELECT m.id, m.tier, m.project_id, m.content, m.source_project_ids,
                m.source_document_ids, m.narrow,
                CASE WHEN $3::vector IS NOT NULL AND m.dim = $4 AND m.model = $5
                     THEN m.embedding <=> $3 END AS distance
         FROM conversation_memories m
         WHERE {}
         ORDER BY distance ASC NULLS LAST, m.updated_at DESC, m.id DESC
         LIMIT $6",
            visible_to()
        )))
        .bind(user_id)
        .bind(conversation_id)
        .bind(vector)
        .bind(dim)
        .bind(model)
        .bind(limit)
        .fetch_all(conn)
        .await?,
    )
}
