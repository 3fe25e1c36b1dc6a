//! The `embeddings` index (docs/architecture/retrieval.md): one row per chunk of a source and
//! embedding model.
//!
//! The vector column is dimensionless; each configured dimension gets its own HNSW expression
//! index (`ensure_vector_index`). Queries must use the same expression,
//! `embedding::vector(<dim>) <=> $query` with `dim = <dim>`, to use it.

use sqlx::PgPool;

use crate::StoreError;
use crate::types::{OrgId, ProjectId, TeamId, UserId};

/// The name of the HNSW index for vectors of dimension `dim`.
pub fn vector_index_name(dim: u32) -> String {
    format!("embeddings_hnsw_d{dim}")
}

/// Create the HNSW (cosine) index for dimension `dim` unless it exists. Idempotent; called by
/// `api migrate` and by the test template after the migrations. `dim` is a validated integer
/// from configuration, so splicing it into the statement is safe.
pub async fn ensure_vector_index(pool: &PgPool, dim: u32) -> Result<(), StoreError> {
    let sql = format!(
        "CREATE INDEX IF NOT EXISTS {name} ON embeddings \
         USING hnsw ((embedding::vector({dim})) vector_cosine_ops) WHERE dim = {dim}",
        name = vector_index_name(dim)
    );
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
    Ok(())
}

/// The kinds of indexed source (`embeddings.source_kind`, `index_outbox.source_kind`).
pub const SOURCE_KINDS: [&str; 4] = ["document", "project", "task", "message"];

/// One chunk to store. Project content sets `project_id` (and optionally the allowed
/// users/teams of a restricted document); conversation messages set `owner_user_id` instead.
#[derive(Debug, Clone)]
pub struct NewChunk {
    pub org_id: OrgId,
    pub source_kind: &'static str,
    pub source_id: uuid::Uuid,
    pub chunk_index: i32,
    pub project_id: Option<ProjectId>,
    pub owner_user_id: Option<UserId>,
    pub allowed_user_ids: Vec<UserId>,
    pub allowed_team_ids: Vec<TeamId>,
    pub title: String,
    pub content: String,
    pub content_hash: Vec<u8>,
    pub model: String,
    pub embedding: pgvector::Vector,
    /// What a message chunk drew on (its message's provenance; empty for project content).
    pub provenance: crate::provenance::Provenance,
}

/// Insert or replace chunks (keyed by source, model and chunk index), in the caller's
/// transaction: one statement per chunk, so chunks may share a key (the last one wins). The
/// statement is [`crate::index::write_chunks`]'s, which writes many chunks at once.
pub async fn upsert_chunks(
    conn: &mut sqlx::PgConnection,
    chunks: &[NewChunk],
) -> Result<(), StoreError> {
    for c in chunks {
        crate::index::write_chunks(&mut *conn, std::slice::from_ref(c)).await?;
    }
    Ok(())
}
