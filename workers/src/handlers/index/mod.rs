//! `index`: drain the indexing outbox (docs/ARCHITECTURE.md, "Documents and indexing") —
//! chunk → skip unchanged → embed → upsert → remove stale — in batches, each batch one
//! transaction with the deletion of its outbox rows, so a crash never loses an outbox row nor
//! half-writes a source.
//!
//! A batch claims up to `INDEX_BATCH_SOURCES` outbox rows with `FOR UPDATE SKIP LOCKED`, the
//! orgs in turn (`store::outbox::claim`: one org's backlog never starves another's), plus the
//! other rows of the same sources (duplicates are coalesced), then takes a per-source advisory
//! lock, so two index runs never process the same rows or the same source at once. For each
//! source it loads the current content (gone or deleted → its chunks are removed), chunks it
//! ([`chunk`]: titles and chunk text bounded), compares each chunk's hash (model + title +
//! content) with the stored one at the same index, embeds only the changed chunks through
//! LiteLLM (requests of up to `INDEX_EMBED_BATCH` inputs, one org's each: their tokens count in
//! that org's usage), upserts them, deletes chunks past the new
//! count and marks documents `indexed`.
//!
//! **A source that cannot be indexed fails alone.** Its writes run in a savepoint (all
//! sources' writes together first; if the database refuses them, source by source), so a row
//! the database refuses (a value too long, a constraint) rolls back that source only. An
//! embedding request that fails with an upstream error while other requests of the batch
//! succeed is retried source by source, and only the sources still failing are charged. A
//! failed source's outbox rows count the attempt and wait (`index.source_retry_secs`,
//! doubling); after `index.source_max_attempts` — at once when retrying cannot help (the
//! database refused the content, the embedder rejected it) — they are dead-lettered
//! (`store::outbox::fail`) and a document becomes `failed` with a reason its user can act on.
//! The rest of the batch commits.
//!
//! When the embedder itself is unavailable (timeouts, connection errors, rate limits, or no
//! request of the batch succeeding), the batch rolls back and the job fails retryably — the bus
//! retries it with backoff. On the job's last attempt such a failure instead marks the
//! documents it hit `failed` (their outbox rows are consumed) and ends the pass, leaving the
//! other sources' rows for the next run.

pub mod chunk;
mod embed;
mod failure;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use jobs::kinds::Index;
use jobs::{JobContext, JobError, Registry};
use llm::{LlmClient, LlmError};
use store::StoreError;
use store::embeddings::NewChunk;
use store::outbox::SourceKind;
use uuid::Uuid;

use chunk::{Chunk, ChunkParams};
use failure::{FAILED_UNAVAILABLE, Failure, db_failure};

/// Why an index run stopped.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("database: {0}")]
    Db(#[from] StoreError),
    #[error("embedding failed: {0}")]
    Embed(#[source] LlmError),
}

impl IndexError {
    fn into_job_error(self) -> JobError {
        match self {
            IndexError::Embed(LlmError::RateLimited {
                retry_after: Some(after),
            }) => JobError::retry_after("embedding rate limited", after),
            other => JobError::retryable(format!("{other:#}")),
        }
    }
}

impl From<sqlx::Error> for IndexError {
    fn from(e: sqlx::Error) -> Self {
        IndexError::Db(e.into())
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    pub batches: u64,
    /// Distinct sources processed.
    pub sources: u64,
    /// Outbox rows consumed (duplicates included).
    pub outbox_rows: u64,
    pub chunks_embedded: u64,
    pub chunks_skipped: u64,
    /// Chunks removed (sources gone, or shorter than before).
    pub chunks_deleted: u64,
    pub documents_failed: u64,
    /// Sources that could not be indexed in this pass (their rows wait or are dead).
    pub sources_failed: u64,
    /// Of those, the sources whose outbox rows were dead-lettered.
    pub sources_dead: u64,
    /// Embedding requests made.
    pub embed_requests: u64,
    /// Milliseconds spent waiting for the embedder, and writing chunks.
    pub embed_ms: u64,
    pub write_ms: u64,
}

impl PassReport {
    fn add(&mut self, b: &PassReport) {
        self.batches += b.batches;
        self.sources += b.sources;
        self.outbox_rows += b.outbox_rows;
        self.chunks_embedded += b.chunks_embedded;
        self.chunks_skipped += b.chunks_skipped;
        self.chunks_deleted += b.chunks_deleted;
        self.documents_failed += b.documents_failed;
        self.sources_failed += b.sources_failed;
        self.sources_dead += b.sources_dead;
        self.embed_requests += b.embed_requests;
        self.embed_ms += b.embed_ms;
        self.write_ms += b.write_ms;
    }
}

/// The indexer: what the `index` handler, `worker index --now` and `bench index` run.
#[derive(Clone)]
pub struct Indexer {
    db: sqlx::PgPool,
    llm: LlmClient,
    model: String,
    params: ChunkParams,
    batch_sources: i64,
    embed_batch: usize,
    max_attempts: u32,
    source_max_attempts: u32,
    source_retry_secs: u64,
}

/// One source of a batch and what to write for it.
struct Plan {
    kind: SourceKind,
    id: Uuid,
    outbox_ids: Vec<i64>,
    content: Option<store::index::SourceContent>,
    count: i32,
    /// Failed attempts before this one (the highest among its outbox rows).
    attempts: i32,
    failure: Option<Failure>,
}

/// A chunk that needs a (new) embedding.
struct Pending {
    plan: usize,
    index: i32,
    chunk: Chunk,
    hash: Vec<u8>,
    vector: Option<Vec<f32>>,
}

impl Indexer {
    pub fn new(db: sqlx::PgPool, settings: &config::Settings) -> Result<Self, LlmError> {
        describe_metrics();
        Ok(Self {
            db,
            llm: LlmClient::new(&settings.litellm)?,
            model: settings.embedding.model.clone(),
            params: ChunkParams::from_settings(&settings.index),
            batch_sources: i64::try_from(settings.index.batch_sources).unwrap_or(i64::MAX),
            embed_batch: settings.index.embed_batch.max(1),
            max_attempts: settings.queues.index.max_attempts,
            source_max_attempts: settings.index.source_max_attempts,
            source_retry_secs: settings.index.source_retry_secs,
        })
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// Register the `index` handler.
    pub fn register(self, registry: &mut Registry) {
        registry.register::<Index, _, _>(move |ctx, job| {
            let h = self.clone();
            async move { h.handle(ctx, job).await }
        });
    }

    #[tracing::instrument(skip_all, fields(job_id = %ctx.id, attempt = ctx.attempt))]
    async fn handle(&self, ctx: JobContext, job: Index) -> Result<(), JobError> {
        let last_attempt = ctx.attempt >= self.max_attempts;
        let started = Instant::now();
        match self.run_pass(last_attempt).await {
            Ok(r) => {
                tracing::info!(
                    reason = ?job.reason,
                    batches = r.batches,
                    sources = r.sources,
                    embedded = r.chunks_embedded,
                    skipped = r.chunks_skipped,
                    deleted = r.chunks_deleted,
                    documents_failed = r.documents_failed,
                    ms = started.elapsed().as_millis() as u64,
                    "index pass done"
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, last_attempt, "index pass failed");
                Err(e.into_job_error())
            }
        }
    }

    /// Drain the outbox: batches until none is left (or, on a last attempt, until the embedder
    /// fails). `last_attempt`: an embedder failure worth retrying marks documents failed
    /// instead of failing the run.
    pub async fn run_pass(&self, last_attempt: bool) -> Result<PassReport, IndexError> {
        self.run_pass_with(last_attempt, |_| {}).await
    }

    /// [`Indexer::run_pass`], calling `on_batch` with each committed batch's figures.
    pub async fn run_pass_with(
        &self,
        last_attempt: bool,
        mut on_batch: impl FnMut(&PassReport),
    ) -> Result<PassReport, IndexError> {
        let mut total = PassReport::default();
        loop {
            let (report, stop) = match self.run_batch(last_attempt).await {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    self.record_depth().await;
                    return Err(e);
                }
            };
            total.add(&report);
            on_batch(&report);
            // no source processed (all locked by another run): stop rather than spin
            if stop || (report.outbox_rows == 0 && report.sources == 0) {
                break;
            }
        }
        self.record_depth().await;
        Ok(total)
    }

    async fn record_depth(&self) {
        if let Ok(mut conn) = self.db.acquire().await
            && let Ok(n) = store::outbox::depth(&mut conn).await
        {
            metrics::gauge!("index_outbox_depth").set(n as f64);
            if let Ok(n) = store::outbox::dead_count(&mut conn).await {
                metrics::gauge!("index_outbox_dead").set(n as f64);
            }
        }
    }

    /// One batch in one transaction. `None` when the outbox is empty; the flag asks the pass to
    /// stop (the embedder failed on a last attempt). The embedding calls' tokens count in
    /// their orgs' usage whether the batch commits or not (the upstream charged them), recorded
    /// once its transaction is over, never while it holds the outbox rows.
    async fn run_batch(
        &self,
        last_attempt: bool,
    ) -> Result<Option<(PassReport, bool)>, IndexError> {
        let mut spent = BTreeMap::new();
        let outcome = self.run_batch_in(last_attempt, &mut spent).await;
        for (org, tokens) in spent {
            crate::model::record_embedding(&self.db, org, &self.model, tokens).await;
        }
        outcome
    }

    async fn run_batch_in(
        &self,
        last_attempt: bool,
        spent: &mut BTreeMap<Uuid, u64>,
    ) -> Result<Option<(PassReport, bool)>, IndexError> {
        let started = Instant::now();
        let mut tx = self.db.begin().await?;
        let rows = store::outbox::claim(&mut tx, self.batch_sources, Uuid::new_v4().into()).await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut report = PassReport {
            batches: 1,
            ..PassReport::default()
        };
        let mut groups: BTreeMap<(SourceKind, Uuid), (Vec<i64>, i32)> = BTreeMap::new();
        let mut junk: Vec<i64> = Vec::new();
        for r in &rows {
            match SourceKind::parse(&r.source_kind) {
                Some(k) => {
                    let g = groups.entry((k, r.source_id)).or_default();
                    g.0.push(r.id);
                    g.1 = g.1.max(r.attempts);
                }
                None => junk.push(r.id),
            }
        }
        let mut plans: Vec<Plan> = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        for ((kind, id), (outbox_ids, attempts)) in groups {
            if !store::outbox::try_lock_source(&mut tx, kind, id).await? {
                // another run is on this source right now; its rows wait for the next batch
                continue;
            }
            let content = store::index::load_source(&mut tx, kind, id).await?;
            let mut count = 0;
            if let Some(src) = &content {
                let chunks = chunk::chunk_text(&src.title, &src.text, src.markdown, self.params);
                let stored: HashMap<i32, Vec<u8>> =
                    store::index::chunk_hashes(&mut tx, kind, id, &self.model)
                        .await?
                        .into_iter()
                        .collect();
                count = i32::try_from(chunks.len()).unwrap_or(i32::MAX);
                for (i, c) in chunks.into_iter().enumerate() {
                    let index = i32::try_from(i).unwrap_or(i32::MAX);
                    let hash = chunk::content_hash(&self.model, &c.title, &c.content);
                    if stored.get(&index) == Some(&hash) {
                        report.chunks_skipped += 1;
                    } else {
                        pending.push(Pending {
                            plan: plans.len(),
                            index,
                            chunk: c,
                            hash,
                            vector: None,
                        });
                    }
                }
            }
            plans.push(Plan {
                kind,
                id,
                outbox_ids,
                content,
                count,
                attempts,
                failure: None,
            });
        }

        // Embed what changed.
        let embed_started = Instant::now();
        let unavailable = self
            .embed_pending(&mut pending, &mut plans, &mut report, last_attempt, spent)
            .await?;
        let stop = !unavailable.is_empty();
        report.embed_ms = embed_started.elapsed().as_millis() as u64;
        let write_started = Instant::now();

        // Write: chunks, stale chunks, document status, outbox rows.
        let mut done_ids = junk;
        let mut chunks_by_plan: HashMap<usize, Vec<NewChunk>> = HashMap::new();
        for p in pending {
            let (Some(vector), Some(src)) = (p.vector, plans[p.plan].content.as_ref()) else {
                continue;
            };
            let plan = &plans[p.plan];
            chunks_by_plan.entry(p.plan).or_default().push(NewChunk {
                org_id: src.org_id,
                source_kind: plan.kind.as_str(),
                source_id: plan.id,
                chunk_index: p.index,
                project_id: src.project_id,
                owner_user_id: src.owner_user_id,
                allowed_user_ids: src.allowed_user_ids.clone(),
                allowed_team_ids: src.allowed_team_ids.clone(),
                title: p.chunk.title,
                content: p.chunk.content,
                content_hash: p.hash,
                model: self.model.clone(),
                embedding: pgvector::Vector::from(vector),
                provenance: src.provenance.clone(),
            });
        }
        let mut live: Vec<usize> = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            if unavailable.binary_search(&i).is_ok() {
                if plan.kind == SourceKind::Document {
                    report.sources += 1;
                    done_ids.extend(&plan.outbox_ids);
                    store::index::mark_document_failed(&mut tx, plan.id.into(), FAILED_UNAVAILABLE)
                        .await?;
                    report.documents_failed += 1;
                }
                // project data and messages wait in the outbox for the next run
                continue;
            }
            if plan.failure.is_none() {
                live.push(i);
            }
        }
        // Every source's writes in one savepoint; if the database refuses them, one savepoint
        // per source, so that only the sources it refuses fail.
        let mut sp = sqlx::Acquire::begin(&mut *tx).await?;
        match self
            .write_sources(&mut sp, &plans, &live, &chunks_by_plan)
            .await
        {
            Ok(r) => {
                sp.commit().await?;
                report.chunks_embedded += r.chunks_embedded;
                report.chunks_deleted += r.chunks_deleted;
            }
            Err(e) => {
                let Some(first) = db_failure(&e) else {
                    return Err(e.into());
                };
                sp.rollback().await?;
                tracing::warn!(error = %first.detail(), "the database refused a batch's writes; writing source by source");
                for i in std::mem::take(&mut live) {
                    let mut sp = sqlx::Acquire::begin(&mut *tx).await?;
                    match self
                        .write_sources(&mut sp, &plans, &[i], &chunks_by_plan)
                        .await
                    {
                        Ok(r) => {
                            sp.commit().await?;
                            report.chunks_embedded += r.chunks_embedded;
                            report.chunks_deleted += r.chunks_deleted;
                            live.push(i);
                        }
                        Err(e) => {
                            let Some(failure) = db_failure(&e) else {
                                return Err(e.into());
                            };
                            sp.rollback().await?;
                            plans[i].failure = Some(failure);
                        }
                    }
                }
            }
        }
        // Failed sources: their rows count the attempt, wait, or are dead-lettered.
        for plan in plans.iter().filter(|p| p.failure.is_some()) {
            let Some(failure) = &plan.failure else {
                continue;
            };
            report.sources += 1;
            report.sources_failed += 1;
            let attempts = u32::try_from(plan.attempts).unwrap_or(0) + 1;
            let wait = self
                .source_retry_secs
                .saturating_mul(1 << (attempts - 1).min(16));
            let outcome = store::outbox::fail(
                &mut tx,
                &plan.outbox_ids,
                &failure.detail(),
                wait,
                self.source_max_attempts,
                failure.permanent(),
            )
            .await?;
            tracing::warn!(
                kind = plan.kind.as_str(),
                source_id = %plan.id,
                attempts,
                dead = outcome == store::outbox::FailOutcome::Dead,
                error = %failure.detail(),
                "a source could not be indexed"
            );
            if outcome == store::outbox::FailOutcome::Dead {
                report.sources_dead += 1;
                if plan.kind == SourceKind::Document {
                    store::index::mark_document_failed(
                        &mut tx,
                        plan.id.into(),
                        &failure.reason(attempts),
                    )
                    .await?;
                    report.documents_failed += 1;
                }
            }
        }
        let mut indexed: Vec<(SourceKind, Uuid)> = Vec::with_capacity(live.len());
        for i in live {
            report.sources += 1;
            done_ids.extend(&plans[i].outbox_ids);
            indexed.push((plans[i].kind, plans[i].id));
        }
        report.outbox_rows = done_ids.len() as u64;
        store::outbox::delete(&mut tx, &done_ids, &indexed).await?;
        tx.commit().await?;
        report.write_ms = write_started.elapsed().as_millis() as u64;
        metrics::counter!("index_chunks_total", "outcome" => "embedded")
            .increment(report.chunks_embedded);
        metrics::counter!("index_chunks_total", "outcome" => "skipped")
            .increment(report.chunks_skipped);
        metrics::counter!("index_chunks_total", "outcome" => "deleted")
            .increment(report.chunks_deleted);
        metrics::counter!("index_sources_total").increment(report.sources);
        metrics::counter!("index_source_failures_total", "outcome" => "retry")
            .increment(report.sources_failed - report.sources_dead);
        metrics::counter!("index_source_failures_total", "outcome" => "dead")
            .increment(report.sources_dead);
        tracing::info!(
            sources = report.sources,
            outbox_rows = report.outbox_rows,
            embedded = report.chunks_embedded,
            skipped = report.chunks_skipped,
            deleted = report.chunks_deleted,
            failed = report.sources_failed,
            dead = report.sources_dead,
            documents_failed = report.documents_failed,
            ms = started.elapsed().as_millis() as u64,
            "index batch committed"
        );
        Ok(Some((report, stop)))
    }

    /// Write the sources `which` of `plans`: their new chunks (one bulk statement), stale
    /// chunks, document status. Returns chunks embedded and deleted.
    async fn write_sources(
        &self,
        conn: &mut sqlx::PgConnection,
        plans: &[Plan],
        which: &[usize],
        chunks_by_plan: &HashMap<usize, Vec<NewChunk>>,
    ) -> Result<PassReport, StoreError> {
        let mut r = PassReport::default();
        let mut to_write: Vec<&NewChunk> = Vec::new();
        for &i in which {
            let plan = &plans[i];
            if plan.content.is_none() {
                r.chunks_deleted +=
                    store::index::delete_source_chunks(&mut *conn, plan.kind, plan.id).await?;
                continue;
            }
            if let Some(chunks) = chunks_by_plan.get(&i) {
                r.chunks_embedded += chunks.len() as u64;
                to_write.extend(chunks);
            }
            r.chunks_deleted += store::index::delete_stale_chunks(
                &mut *conn,
                plan.kind,
                plan.id,
                &self.model,
                plan.count,
            )
            .await?;
            if plan.kind == SourceKind::Document {
                store::index::mark_document_indexed(&mut *conn, plan.id.into()).await?;
            }
        }
        store::index::write_chunks(&mut *conn, &to_write).await?;
        Ok(r)
    }
}

fn describe_metrics() {
    metrics::describe_counter!(
        "index_chunks_total",
        "Chunks handled by the index job, by outcome (embedded, skipped unchanged, deleted)"
    );
    metrics::describe_counter!("index_sources_total", "Sources re-indexed by the index job");
    metrics::describe_counter!(
        "index_source_failures_total",
        "Sources that could not be indexed, by outcome (retry later, dead-lettered)"
    );
    metrics::describe_gauge!(
        "index_outbox_dead",
        "Dead-lettered outbox rows (sources that could not be indexed)"
    );
    metrics::describe_gauge!(
        "index_outbox_depth",
        "Outbox rows waiting for the index job (after its last pass)"
    );
}

/// Run one pass inline and report it (`worker index --now`); `on_batch` sees each batch.
pub async fn run_now(
    indexer: &Indexer,
    on_batch: impl FnMut(&PassReport),
) -> Result<(PassReport, Duration), IndexError> {
    let started = Instant::now();
    let r = indexer.run_pass_with(false, on_batch).await?;
    Ok((r, started.elapsed()))
}
