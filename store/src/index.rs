//! What the `index` job reads and writes besides the outbox: the current content of each kind
//! of source, the chunk hashes already stored, stale-chunk removal and document status.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::StoreError;
use crate::outbox::SourceKind;
use crate::types::{DocumentId, OrgId, ProjectId, TeamId, UserId};

/// The current, indexable state of a source, with the visibility facts its chunks carry.
#[derive(Debug, Clone)]
pub struct SourceContent {
    pub org_id: OrgId,
    pub project_id: Option<ProjectId>,
    pub owner_user_id: Option<UserId>,
    pub allowed_user_ids: Vec<UserId>,
    pub allowed_team_ids: Vec<TeamId>,
    /// The title every chunk starts from (document title, project name, task title,
    /// conversation title).
    pub title: String,
    /// `text/markdown` is chunked by headings; everything else as plain text.
    pub markdown: bool,
    pub text: String,
    /// What a message drew on (its chunks carry it; empty for project content).
    pub provenance: crate::provenance::Provenance,
}

#[derive(sqlx::FromRow)]
struct DocumentRow {
    org_id: OrgId,
    project_id: ProjectId,
    title: String,
    content_type: String,
    content: String,
    visible_to_user_ids: Vec<UserId>,
    visible_to_team_ids: Vec<TeamId>,
    uploaded_by: Option<UserId>,
}

#[derive(sqlx::FromRow)]
struct ProjectRow {
    org_id: OrgId,
    name: String,
    description: String,
}

#[derive(sqlx::FromRow)]
struct TaskRow {
    org_id: OrgId,
    project_id: ProjectId,
    title: String,
    description: String,
    status: String,
}

#[derive(sqlx::FromRow)]
struct MessageRow {
    org_id: OrgId,
    user_id: UserId,
    title: String,
    role: String,
    content: String,
    #[sqlx(flatten)]
    provenance: crate::provenance::Provenance,
}

/// Load the current content of a source; `None` when it is gone (deleted, or a kind of row
/// that is not indexed, e.g. a tool-call message), so its chunks should go.
pub async fn load_source(
    conn: &mut PgConnection,
    kind: SourceKind,
    id: Uuid,
) -> Result<Option<SourceContent>, StoreError> {
    Ok(match kind {
        SourceKind::Document => sqlx::query_as::<_, DocumentRow>(
            "SELECT org_id, project_id, title, content_type, content, visible_to_user_ids,
                    visible_to_team_ids, uploaded_by
             FROM documents WHERE id = $1 AND deleted_at IS NULL",
        )
        .bind(id)
        .fetch_optional(conn)
        .await?
        .map(|d| {
            // A restricted document's uploader keeps access as if listed.
            let mut users = d.visible_to_user_ids;
            let restricted = !users.is_empty() || !d.visible_to_team_ids.is_empty();
            if let Some(uploader) = d.uploaded_by.filter(|u| restricted && !users.contains(u)) {
                users.push(uploader);
                users.sort();
            }
            SourceContent {
                org_id: d.org_id,
                project_id: Some(d.project_id),
                owner_user_id: None,
                allowed_user_ids: users,
                allowed_team_ids: d.visible_to_team_ids,
                title: d.title,
                markdown: d.content_type == "text/markdown",
                text: d.content,
                provenance: Default::default(),
            }
        }),
        SourceKind::Project => sqlx::query_as::<_, ProjectRow>(
            "SELECT org_id, name, description FROM projects WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(conn)
        .await?
        .map(|p| SourceContent {
            org_id: p.org_id,
            project_id: Some(id.into()),
            owner_user_id: None,
            allowed_user_ids: vec![],
            allowed_team_ids: vec![],
            text: if p.description.trim().is_empty() {
                p.name.clone()
            } else {
                format!("{}\n\n{}", p.name, p.description)
            },
            title: p.name,
            markdown: false,
            provenance: Default::default(),
        }),
        SourceKind::Task => sqlx::query_as::<_, TaskRow>(
            "SELECT org_id, project_id, title, description, status::text AS status
             FROM tasks WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(conn)
        .await?
        .map(|t| SourceContent {
            org_id: t.org_id,
            project_id: Some(t.project_id),
            owner_user_id: None,
            allowed_user_ids: vec![],
            allowed_team_ids: vec![],
            text: if t.description.trim().is_empty() {
                format!("{}\nstatus: {}", t.title, t.status)
            } else {
                format!("{}\nstatus: {}\n\n{}", t.title, t.status, t.description)
            },
            title: t.title,
            markdown: false,
            provenance: Default::default(),
        }),
        SourceKind::Message => sqlx::query_as::<_, MessageRow>(
            // (a message that drew on a deleted document is not indexed again: what was
            // derived from a deleted source goes with it)
            "SELECT c.org_id, c.user_id, c.title, m.role, m.content, m.source_project_ids,
                    m.source_document_ids, m.narrow
             FROM messages m JOIN conversations c ON c.id = m.conversation_id
             WHERE m.id = $1 AND m.role IN ('user', 'assistant') AND m.tool_calls IS NULL
               AND NOT EXISTS (SELECT 1 FROM documents d
                               WHERE d.id = ANY(m.source_document_ids)
                                 AND d.deleted_at IS NOT NULL)",
        )
        .bind(id)
        .fetch_optional(conn)
        .await?
        .map(|m| SourceContent {
            org_id: m.org_id,
            project_id: None,
            owner_user_id: Some(m.user_id),
            allowed_user_ids: vec![],
            allowed_team_ids: vec![],
            title: if m.title.is_empty() {
                format!("conversation ({})", m.role)
            } else {
                format!("{} ({})", m.title, m.role)
            },
            markdown: false,
            text: m.content,
            provenance: m.provenance,
        }),
    })
}

/// The stored `(chunk_index, content_hash)` of a source for `model`.
pub async fn chunk_hashes(
    conn: &mut PgConnection,
    kind: SourceKind,
    id: Uuid,
    model: &str,
) -> Result<Vec<(i32, Vec<u8>)>, StoreError> {
    let rows = sqlx::query_as::<_, (i32, Vec<u8>)>(
        "SELECT chunk_index, content_hash FROM embeddings
         WHERE source_kind = $1 AND source_id = $2 AND model = $3",
    )
    .bind(kind.as_str())
    .bind(id)
    .bind(model)
    .fetch_all(conn)
    .await?;
    Ok(rows)
}

/// Delete every chunk of a source (every model).
pub async fn delete_source_chunks(
    conn: &mut PgConnection,
    kind: SourceKind,
    id: Uuid,
) -> Result<u64, StoreError> {
    let done = sqlx::query("DELETE FROM embeddings WHERE source_kind = $1 AND source_id = $2")
        .bind(kind.as_str())
        .bind(id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// Delete the chunks of a source for `model` whose index is `count` or beyond (the source got
/// shorter).
pub async fn delete_stale_chunks(
    conn: &mut PgConnection,
    kind: SourceKind,
    id: Uuid,
    model: &str,
    count: i32,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "DELETE FROM embeddings
         WHERE source_kind = $1 AND source_id = $2 AND model = $3 AND chunk_index >= $4",
    )
    .bind(kind.as_str())
    .bind(id)
    .bind(model)
    .bind(count)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// A document's content is in the index.
pub async fn mark_document_indexed(
    conn: &mut PgConnection,
    id: DocumentId,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE documents SET status = 'indexed', failure_reason = NULL, indexed_at = now(),
                              updated_at = now()
         WHERE id = $1 AND deleted_at IS NULL",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// A document's content could not be indexed; `reason` is shown to whoever may see it, so it
/// must not carry provider text.
pub async fn mark_document_failed(
    conn: &mut PgConnection,
    id: DocumentId,
    reason: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE documents SET status = 'failed', failure_reason = $2, updated_at = now()
         WHERE id = $1 AND deleted_at IS NULL",
    )
    .bind(id)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// Rows per bulk statement of [`write_chunks`].
const WRITE_CHUNK_ROWS: usize = 512;

/// Insert or replace many chunks (keyed by source, model and chunk index) with few statements
/// ([`crate::embeddings::upsert_chunks`] writes one per statement through this): rows are grouped
/// by their allowed-user/team lists and their provenance (the array columns that cannot travel
/// inside an `unnest`), then written `WRITE_CHUNK_ROWS` at a time. No two chunks may share a
/// key.
pub async fn write_chunks<C: std::borrow::Borrow<crate::embeddings::NewChunk> + Sync>(
    conn: &mut PgConnection,
    chunks: &[C],
) -> Result<(), StoreError> {
    type Key<'k> = (
        &'k [UserId],
        &'k [TeamId],
        &'k [ProjectId],
        &'k [DocumentId],
        bool,
    );
    let mut groups: std::collections::BTreeMap<Key<'_>, Vec<&crate::embeddings::NewChunk>> =
        std::collections::BTreeMap::new();
    for c in chunks {
        let c = c.borrow();
        groups
            .entry((
                c.allowed_user_ids.as_slice(),
                c.allowed_team_ids.as_slice(),
                c.provenance.source_project_ids.as_slice(),
                c.provenance.source_document_ids.as_slice(),
                c.provenance.narrow,
            ))
            .or_default()
            .push(c);
    }
    for ((users, teams, source_projects, source_documents, narrow), rows) in groups {
        for part in rows.chunks(WRITE_CHUNK_ROWS) {
            let ids: Vec<Uuid> = part.iter().map(|_| Uuid::now_v7()).collect();
            let orgs: Vec<OrgId> = part.iter().map(|c| c.org_id).collect();
            let kinds: Vec<&str> = part.iter().map(|c| c.source_kind).collect();
            let sources: Vec<Uuid> = part.iter().map(|c| c.source_id).collect();
            let indexes: Vec<i32> = part.iter().map(|c| c.chunk_index).collect();
            let projects: Vec<Option<ProjectId>> = part.iter().map(|c| c.project_id).collect();
            let owners: Vec<Option<UserId>> = part.iter().map(|c| c.owner_user_id).collect();
            let titles: Vec<&str> = part.iter().map(|c| c.title.as_str()).collect();
            let contents: Vec<&str> = part.iter().map(|c| c.content.as_str()).collect();
            let hashes: Vec<&[u8]> = part.iter().map(|c| c.content_hash.as_slice()).collect();
            let models: Vec<&str> = part.iter().map(|c| c.model.as_str()).collect();
            let dims: Vec<i32> = part
                .iter()
                .map(|c| i32::try_from(c.embedding.as_slice().len()).unwrap_or(i32::MAX))
                .collect();
            let vectors: Vec<pgvector::Vector> = part.iter().map(|c| c.embedding.clone()).collect();
            sqlx::query(
                "INSERT INTO embeddings (id, org_id, source_kind, source_id, chunk_index, project_id,
                     owner_user_id, allowed_user_ids, allowed_team_ids, title, content, content_hash,
                     model, dim, embedding, source_project_ids, source_document_ids, narrow)
                 SELECT u.id, u.org_id, u.kind, u.source_id, u.chunk_index, u.project_id,
                        u.owner_user_id, $14, $15, u.title, u.content, u.hash, u.model, u.dim,
                        u.embedding, $16, $17, $18
                 FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::int4[],
                             $6::uuid[], $7::uuid[], $8::text[], $9::text[], $10::bytea[],
                             $11::text[], $12::int4[], $13::vector[])
                      AS u(id, org_id, kind, source_id, chunk_index, project_id, owner_user_id,
                           title, content, hash, model, dim, embedding)
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
            .bind(&ids)
            .bind(&orgs)
            .bind(&kinds)
            .bind(&sources)
            .bind(&indexes)
            .bind(&projects)
            .bind(&owners)
            .bind(&titles)
            .bind(&contents)
            .bind(&hashes)
            .bind(&models)
            .bind(&dims)
            .bind(&vectors)
            .bind(users)
            .bind(teams)
            .bind(source_projects)
            .bind(source_documents)
            .bind(narrow)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}
