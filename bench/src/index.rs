//! `bench index`: indexing throughput (chunks/s) of the `index` pass — claim outbox rows, load
//! and chunk the sources, embed, upsert with the HNSW index in place, delete the outbox rows —
//! with the zero-latency fake embedder, in a scratch database.
//!
//! `N` tasks are seeded (one chunk each: title, status and a ~600-character description) with
//! their outbox rows, then one pass runs in each mode:
//! 1. `direct`: the indexer talks to the fake upstream itself (`FAKE_UPSTREAM_URL`, default
//!    `http://127.0.0.1:4010`): our own cost;
//! 2. `litellm`: through the LiteLLM proxy (`LITELLM_BASE_URL`, model `fake/<name>`): the
//!    deployed path;
//! 3. `unchanged`: the same sources again through the proxy — every chunk is skipped by its
//!    hash, no embedding call.
//!
//! The last line is `index: chunks=N chunks_per_s=X`, X being the `litellm` figure.

use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::PgPool;
use workers::handlers::index::{Indexer, PassReport};

use crate::scratch::ScratchDb;

/// One measured pass.
#[derive(Debug, Clone, Copy)]
pub struct PassFigure {
    pub report: PassReport,
    pub elapsed: Duration,
}

impl PassFigure {
    /// Chunks handled per second (embedded, or skipped when nothing was embedded).
    pub fn chunks_per_s(&self) -> f64 {
        let n = if self.report.chunks_embedded > 0 {
            self.report.chunks_embedded
        } else {
            self.report.chunks_skipped
        };
        n as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The figures of one `bench index` run.
#[derive(Debug, Clone, Copy)]
pub struct IndexFigures {
    pub chunks: usize,
    pub direct: PassFigure,
    pub litellm: PassFigure,
    pub unchanged: PassFigure,
}

/// Seed `chunks` single-chunk sources into `pool` (migrated, with the vector index), then run
/// the three passes. `settings` gives the LiteLLM proxy and the index batch sizes; the embedding
/// model is a fresh fake name. For other benches (e.g. `bench retrieval`) to reuse.
pub async fn measure_index(
    pool: &PgPool,
    settings: &config::Settings,
    fake_upstream_url: &str,
    chunks: usize,
) -> anyhow::Result<IndexFigures> {
    let name = format!("bench-embed-{:08x}", rand::random::<u32>());
    seed(pool, chunks).await?;

    // 1. direct to the fake upstream
    let mut direct_settings = settings.clone();
    direct_settings.litellm.base_url = fake_upstream_url.trim_end_matches('/').to_owned();
    direct_settings.embedding.model = name.clone();
    let direct = pass(Indexer::new(pool.clone(), &direct_settings)?).await?;

    // 2. through the proxy (a different model name: every chunk is embedded again)
    requeue(pool).await?;
    let mut proxy_settings = settings.clone();
    proxy_settings.embedding.model = format!("fake/{name}-proxy");
    let indexer = Indexer::new(pool.clone(), &proxy_settings)?;
    let litellm = pass(indexer.clone()).await?;

    // 3. unchanged content: all skipped
    requeue(pool).await?;
    let unchanged = pass(indexer).await?;
    for (mode, f) in [("direct", direct), ("litellm", litellm)] {
        anyhow::ensure!(
            f.report.chunks_embedded as usize == chunks,
            "{mode}: {} chunks embedded, {chunks} expected",
            f.report.chunks_embedded
        );
    }
    anyhow::ensure!(
        unchanged.report.chunks_embedded == 0,
        "unchanged content was embedded again"
    );
    Ok(IndexFigures {
        chunks,
        direct,
        litellm,
        unchanged,
    })
}

async fn pass(indexer: Indexer) -> anyhow::Result<PassFigure> {
    let started = Instant::now();
    let report = indexer.run_pass(false).await?;
    Ok(PassFigure {
        report,
        elapsed: started.elapsed(),
    })
}

/// One org, user and project, `n` tasks and their outbox rows.
async fn seed(pool: &PgPool, n: usize) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let org = store::tenancy::insert_org(&mut tx, "bench").await?.id;
    let project: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO projects (id, org_id, name, visibility) VALUES ($1, $2, 'bench', 'org')
         RETURNING id",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(org)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO tasks (id, org_id, project_id, title, description)
         SELECT gen_random_uuid(), $1, $2, 'Task number ' || i,
                repeat('Ship the quarterly report, check the figures twice. ', 12) || i
         FROM generate_series(1, $3) AS i",
    )
    .bind(org)
    .bind(project)
    .bind(i64::try_from(n)?)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    requeue(pool).await
}

/// An outbox row for every task (and nothing else).
async fn requeue(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM index_outbox")
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO index_outbox (org_id, source_kind, source_id)
         SELECT org_id, 'task', id FROM tasks ORDER BY id",
    )
    .execute(pool)
    .await?;
    Ok(())
}

#[allow(clippy::print_stdout)]
pub async fn bench_index(settings: config::Settings, chunks: usize) -> anyhow::Result<()> {
    let fake =
        std::env::var("FAKE_UPSTREAM_URL").unwrap_or_else(|_| "http://127.0.0.1:4010".into());
    let scratch = ScratchDb::create(&settings.database.url).await?;
    let outcome = async {
        let pool = PgPool::connect(&scratch.url)
            .await
            .context("connect to the scratch database")?;
        store::embeddings::ensure_vector_index(&pool, settings.embedding.dim).await?;
        let figures = measure_index(&pool, &settings, &fake, chunks).await;
        pool.close().await;
        figures
    }
    .await;
    scratch.drop_db().await;
    let f = outcome?;
    for (mode, p) in [
        ("direct", f.direct),
        ("litellm", f.litellm),
        ("unchanged", f.unchanged),
    ] {
        println!(
            "index: mode={mode} chunks={} embedded={} skipped={} embed_requests={} embed_ms={} write_ms={} ms={} chunks_per_s={:.0}",
            f.chunks,
            p.report.chunks_embedded,
            p.report.chunks_skipped,
            p.report.embed_requests,
            p.report.embed_ms,
            p.report.write_ms,
            p.elapsed.as_millis(),
            p.chunks_per_s()
        );
    }
    println!(
        "index: chunks={} chunks_per_s={:.0}",
        f.chunks,
        f.litellm.chunks_per_s()
    );
    Ok(())
}
