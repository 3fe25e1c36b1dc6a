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
/// transaction.
pub async fn upsert_chunks(
    conn: &mut sqlx::PgConnection,
    chunks: &[NewChunk],
) -> Result<(), StoreError> {
    for c in chunks {
        let dim = i32::try_from(c.embedding.as_slice().len()).unwrap_or(i32::MAX);
        sqlx::query(
            "INSERT INTO embeddings (id, org_id, source_kind, source_id, chunk_index, project_id,
                 owner_user_id, allowed_user_ids, allowed_team_ids, title, content, content_hash,
                 model, dim, embedding, source_project_ids, source_document_ids, narrow)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                     $17, $18)
             ON CONFLICT (source_kind, source_id, model, chunk_index) DO UPDATE SET
                 project_id = EXCLUDED.project_id, owner_user_id = EXCLUDED.owner_user_id,
                 allowed_user_ids = EXCLUDED.allowed_user_ids,
                 allowed_team_ids = EXCLUDED.allowed_team_ids, title = EXCLUDED.title,
                 content = EXCLUDED.content, content_hash = EXCLUDED.content_hash,
                 dim = EXCLUDED.dim, embedding = EXCLUDED.embedding,
                 source_project_ids = EXCLUDED.source_project_ids,
                 source_document_ids = EXCLUDED.source_document_ids,
                 narrow = EXCLUDED.narrow, updated_at = now()",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(c.org_id)
        .bind(c.source_kind)
        .bind(c.source_id)
        .bind(c.chunk_index)
        .bind(c.project_id)
        .bind(c.owner_user_id)
        .bind(&c.allowed_user_ids)
        .bind(&c.allowed_team_ids)
        .bind(&c.title)
        .bind(&c.content)
        .bind(&c.content_hash)
        .bind(&c.model)
        .bind(dim)
        .bind(&c.embedding)
        .bind(&c.provenance.source_project_ids)
        .bind(&c.provenance.source_document_ids)
        .bind(c.provenance.narrow)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
