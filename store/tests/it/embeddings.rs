//! The `embeddings` table: upserts keyed by (source, model, chunk), and the per-dimension HNSW
//! expression index that nearest-neighbour queries use.

use store::embeddings::{self, NewChunk};
use testkit::TestDb;
use uuid::Uuid;

fn chunk(org_id: Uuid, project_id: Uuid, source_id: Uuid, i: i32, text: &str, v: f32) -> NewChunk {
    let mut e = vec![0.0f32; 384];
    e[0] = 1.0;
    e[1] = v;
    NewChunk {
        org_id: org_id.into(),
        source_kind: "task",
        source_id,
        chunk_index: i,
        project_id: Some(project_id.into()),
        owner_user_id: None,
        allowed_user_ids: vec![],
        allowed_team_ids: vec![],
        title: "t".into(),
        content: text.into(),
        content_hash: text.as_bytes().to_vec(),
        model: "m".into(),
        embedding: pgvector::Vector::from(e),
        provenance: Default::default(),
    }
}

#[tokio::test]
async fn upsert_replaces_by_key_and_the_hnsw_index_serves_ann_queries() {
    let db = TestDb::new().await;
    let mut c = db.pool.acquire().await.unwrap();
    let org = store::tenancy::insert_org(&mut c, "o").await.unwrap().id;
    let project: Uuid = sqlx::query_scalar(
        "INSERT INTO projects (id, org_id, name, visibility) VALUES ($1, $2, 'p', 'org') RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(org)
    .fetch_one(&mut *c)
    .await
    .unwrap();
    let source = Uuid::now_v7();
    embeddings::upsert_chunks(
        &mut c,
        &[
            chunk(org.into(), project, source, 0, "old", 0.0),
            chunk(org.into(), project, source, 1, "b", 0.5),
        ],
    )
    .await
    .unwrap();
    embeddings::upsert_chunks(&mut c, &[chunk(org.into(), project, source, 0, "new", 0.1)])
        .await
        .unwrap();
    let rows: Vec<(i32, String)> =
        sqlx::query_as("SELECT chunk_index, content FROM embeddings ORDER BY chunk_index")
            .fetch_all(&mut *c)
            .await
            .unwrap();
    assert_eq!(rows, [(0, "new".to_owned()), (1, "b".to_owned())]);

    // the template created the index for the default dimension; a query in its form uses it
    let name = embeddings::vector_index_name(384);
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE indexname = $1)")
            .bind(&name)
            .fetch_one(&mut *c)
            .await
            .unwrap();
    assert!(exists, "{name} exists");
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *c)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT id FROM embeddings WHERE dim = 384 \
         ORDER BY embedding::vector(384) <=> $1 LIMIT 5",
    )
    .bind(pgvector::Vector::from(vec![1.0f32; 384]))
    .fetch_all(&mut *c)
    .await
    .unwrap();
    assert!(plan.iter().any(|l| l.contains(&name)), "{plan:?}");
}
