//! Fixtures for retrieval tests (and the retrieval bench): orgs, users, projects and chunks in
//! the `embeddings` index, embedded with [`fake_embedding`] — the vector the fake upstream
//! returns for `/v1/embeddings` of the same text, so a query for a chunk's text finds it.

use sqlx::PgConnection;
use store::Role;
use store::Visibility;
use store::embeddings::NewChunk;
use uuid::Uuid;

use crate::fake_upstream::fake_embedding;

/// A new org.
pub async fn org(conn: &mut PgConnection) -> Uuid {
    store::tenancy::insert_org(conn, "org")
        .await
        .unwrap()
        .id
        .into()
}

/// A new user, member of `org` with `role`.
pub async fn user(conn: &mut PgConnection, org: Uuid, role: Role) -> Uuid {
    let id = store::tenancy::insert_user(
        conn,
        &format!("u-{}@example.test", Uuid::new_v4().simple()),
        "U",
        "x",
    )
    .await
    .unwrap()
    .id;
    store::tenancy::insert_membership(conn, org.into(), id, role)
        .await
        .unwrap();
    id.into()
}

/// A project of `org` created by `creator` (who becomes a member of a private one).
pub async fn project(
    conn: &mut PgConnection,
    org: Uuid,
    creator: Uuid,
    visibility: Visibility,
    team: Option<Uuid>,
) -> Uuid {
    store::projects::insert_project(
        conn,
        &store::projects::NewProject {
            org_id: org.into(),
            created_by: creator.into(),
            name: "p",
            description: "",
            visibility,
            team_id: team.map(Into::into),
        },
    )
    .await
    .unwrap()
    .id
    .into()
}

/// A document row (the tombstone that `deleted_at` marks), so chunks can name it.
pub async fn document(conn: &mut PgConnection, org: Uuid, project: Uuid, title: &str) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO documents (id, org_id, project_id, title, content_type, byte_size, content)
         VALUES ($1, $2, $3, $4, 'text/plain', 0, '') RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(org)
    .bind(project)
    .bind(title)
    .fetch_one(conn)
    .await
    .unwrap()
}

#[allow(clippy::too_many_arguments)]
/// A project-content chunk whose embedding is `fake_embedding(embed_text, dim)`.
pub fn project_chunk(
    org: Uuid,
    project: Uuid,
    kind: &'static str,
    source_id: Uuid,
    title: &str,
    content: &str,
    embed_text: &str,
    model: &str,
    dim: usize,
) -> NewChunk {
    NewChunk {
        org_id: org.into(),
        source_kind: kind,
        source_id,
        chunk_index: 0,
        project_id: Some(project.into()),
        owner_user_id: None,
        allowed_user_ids: vec![],
        allowed_team_ids: vec![],
        title: title.into(),
        content: content.into(),
        content_hash: content.as_bytes().to_vec(),
        model: model.into(),
        embedding: pgvector::Vector::from(fake_embedding(embed_text, dim)),
        provenance: Default::default(),
    }
}

/// A conversation-message chunk owned by `owner`, embedded as its own content.
pub fn message_chunk(
    org: Uuid,
    owner: Uuid,
    message_id: Uuid,
    content: &str,
    model: &str,
    dim: usize,
) -> NewChunk {
    NewChunk {
        org_id: org.into(),
        source_kind: "message",
        source_id: message_id,
        chunk_index: 0,
        project_id: None,
        owner_user_id: Some(owner.into()),
        allowed_user_ids: vec![],
        allowed_team_ids: vec![],
        title: String::new(),
        content: content.into(),
        content_hash: content.as_bytes().to_vec(),
        model: model.into(),
        embedding: pgvector::Vector::from(fake_embedding(content, dim)),
        provenance: Default::default(),
    }
}

/// Store chunks (`upsert_chunks`: the indexer's statement, one chunk at a time).
pub async fn insert(conn: &mut PgConnection, chunks: &[NewChunk]) {
    store::embeddings::upsert_chunks(conn, chunks)
        .await
        .unwrap();
}

/// A memory entry of `owner` without an embedding (tier capacity 50), committed.
pub async fn memory(pool: &sqlx::PgPool, owner: store::memory::Owner, content: &str) {
    let mut tx = pool.begin().await.unwrap();
    store::memory::insert(
        &mut tx,
        &store::memory::NewEntry {
            owner,
            content: content.into(),
            source_conversation_id: None,
            source_message_ids: vec![],
            author_user_id: None,
            provenance: Default::default(),
            embedding: None,
        },
        50,
        0.1,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}
