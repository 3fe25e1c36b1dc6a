//! `index`: drain the indexing outbox (SPEC §4) — chunk → skip unchanged → embed → upsert →
//! remove stale — in batches, each batch one transaction with the deletion of its outbox rows,
//! so a crash never loses an outbox row nor half-writes a source.
//!
//! A batch claims up to `INDEX_BATCH_SOURCES` of the oldest outbox rows with `FOR UPDATE SKIP
//! LOCKED` (plus the other rows of the same sources: duplicates are coalesced), then takes a
//! per-source advisory lock, so two index runs never process the same rows or the same source
//! at once. For each source it loads the current content (gone or deleted → its chunks are
//! removed), chunks it ([`chunk`]), compares each chunk's hash (model + title + content) with
//! the stored one at the same index, embeds only the changed chunks through LiteLLM (requests
//! of `INDEX_EMBED_BATCH` inputs), upserts them, deletes chunks past the new count and marks
//! documents `indexed`.
//!
//! Failures: a database error, or an embedder failure worth retrying (429, 5xx, timeout,
//! connection), rolls the batch back and fails the job with a retryable error — the bus
//! retries it with backoff. On the job's last attempt such a failure instead marks the
//! documents it hit `failed` (their outbox rows are consumed) and ends the pass, leaving the
//! other sources' rows for the next run. An embedder that rejects an input for good (a 4xx
//! other than 429) is asked again source by source; a source it still rejects is `failed`
//! (documents) or skipped with a warning (project data, messages).

pub mod chunk;

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
}

/// One source of a batch and what to write for it.
struct Plan {
    kind: SourceKind,
    id: Uuid,
    outbox_ids: Vec<i64>,
    content: Option<store::index::SourceContent>,
    count: i32,
    failed: bool,
}

/// A chunk that needs a (new) embedding.
struct Pending {
    plan: usize,
    index: i32,
    chunk: Chunk,
    hash: Vec<u8>,
    vector: Option<Vec<f32>>,
}

const FAILED_REJECTED: &str = "the embedding model rejected this document's content";
const FAILED_UNAVAILABLE: &str =
    "the embedding model was unavailable on every attempt; upload the document again later";

/// A failure the embedder will repeat for the same input (not a rate limit, a timeout or a
/// server error).
fn is_permanent(e: &LlmError) -> bool {
    matches!(e, LlmError::Upstream { status, .. }
        if (400..500).contains(status) && *status != 408 && *status != 429)
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
        })
    }

    /// The same indexer with another LiteLLM base URL (the benchmark talks to the fake
    /// upstream directly as well as through the proxy).
    pub fn with_llm(mut self, llm: LlmClient) -> Self {
        self.llm = llm;
        self
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
            if stop || report.outbox_rows == 0 {
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
        }
    }

    /// One batch in one transaction. `None` when the outbox is empty; the flag asks the pass to
    /// stop (the embedder failed on a last attempt).
    async fn run_batch(
        &self,
        last_attempt: bool,
    ) -> Result<Option<(PassReport, bool)>, IndexError> {
        let started = Instant::now();
        let mut tx = self.db.begin().await?;
        let rows = store::outbox::claim(&mut tx, self.batch_sources).await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut report = PassReport {
            batches: 1,
            ..PassReport::default()
        };
        let mut groups: BTreeMap<(SourceKind, Uuid), Vec<i64>> = BTreeMap::new();
        let mut junk: Vec<i64> = Vec::new();
        for r in &rows {
            match SourceKind::parse(&r.source_kind) {
                Some(k) => groups.entry((k, r.source_id)).or_default().push(r.id),
                None => junk.push(r.id),
            }
        }
        let mut plans: Vec<Plan> = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        for ((kind, id), outbox_ids) in groups {
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
                failed: false,
            });
        }

        // Embed what changed, `embed_batch` inputs per request.
        let embed_started = Instant::now();
        let mut stop = false;
        let mut unavailable: Vec<usize> = Vec::new();
        let mut start = 0;
        while start < pending.len() {
            let end = (start + self.embed_batch).min(pending.len());
            let inputs: Vec<String> = pending[start..end]
                .iter()
                .map(|p| chunk::embedding_input(&p.chunk))
                .collect();
            report.embed_requests += 1;
            match self.llm.embed(&self.model, &inputs).await {
                Ok(vectors) => {
                    for (p, v) in pending[start..end].iter_mut().zip(vectors) {
                        p.vector = Some(v);
                    }
                }
                Err(e) if is_permanent(&e) => {
                    tracing::warn!(error = %e, "the embedder rejected a request; retrying source by source");
                    self.embed_one_by_one(&mut pending[start..end], &mut plans, &mut report)
                        .await?;
                }
                Err(e) if last_attempt => {
                    tracing::warn!(error = %e, "the embedder failed on the last attempt");
                    unavailable.extend(pending[start..end].iter().map(|p| p.plan));
                    unavailable.extend(pending[end..].iter().map(|p| p.plan));
                    stop = true;
                    break;
                }
                Err(e) => return Err(IndexError::Embed(e)),
            }
            start = end;
        }
        unavailable.sort_unstable();
        unavailable.dedup();
        report.embed_ms = embed_started.elapsed().as_millis() as u64;
        let write_started = Instant::now();

        // Write: chunks, stale chunks, document status, outbox rows.
        let mut done_ids = junk;
        let mut chunks_by_plan: HashMap<usize, Vec<NewChunk>> = HashMap::new();
        let mut to_write: Vec<NewChunk> = Vec::new();
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
            });
        }
        for (i, plan) in plans.iter().enumerate() {
            let gave_up = unavailable.binary_search(&i).is_ok();
            if gave_up && plan.kind != SourceKind::Document {
                // project data and messages wait in the outbox for the next run
                continue;
            }
            report.sources += 1;
            done_ids.extend(&plan.outbox_ids);
            if gave_up || plan.failed {
                if plan.kind == SourceKind::Document {
                    let reason = if gave_up {
                        FAILED_UNAVAILABLE
                    } else {
                        FAILED_REJECTED
                    };
                    store::index::mark_document_failed(&mut tx, plan.id, reason).await?;
                    report.documents_failed += 1;
                } else {
                    tracing::warn!(kind = plan.kind.as_str(), source_id = %plan.id,
                        "the embedder rejected this source; it stays out of the index until it changes");
                }
                continue;
            }
            if plan.content.is_none() {
                report.chunks_deleted +=
                    store::index::delete_source_chunks(&mut tx, plan.kind, plan.id).await?;
                continue;
            }
            if let Some(chunks) = chunks_by_plan.remove(&i) {
                report.chunks_embedded += chunks.len() as u64;
                to_write.extend(chunks);
            }
            report.chunks_deleted += store::index::delete_stale_chunks(
                &mut tx,
                plan.kind,
                plan.id,
                &self.model,
                plan.count,
            )
            .await?;
            if plan.kind == SourceKind::Document {
                store::index::mark_document_indexed(&mut tx, plan.id).await?;
            }
        }
        store::index::write_chunks(&mut tx, &to_write).await?;
        report.outbox_rows = done_ids.len() as u64;
        store::outbox::delete(&mut tx, &done_ids).await?;
        tx.commit().await?;
        report.write_ms = write_started.elapsed().as_millis() as u64;
        metrics::counter!("index_chunks_total", "outcome" => "embedded")
            .increment(report.chunks_embedded);
        metrics::counter!("index_chunks_total", "outcome" => "skipped")
            .increment(report.chunks_skipped);
        metrics::counter!("index_chunks_total", "outcome" => "deleted")
            .increment(report.chunks_deleted);
        metrics::counter!("index_sources_total").increment(report.sources);
        tracing::info!(
            sources = report.sources,
            outbox_rows = report.outbox_rows,
            embedded = report.chunks_embedded,
            skipped = report.chunks_skipped,
            deleted = report.chunks_deleted,
            documents_failed = report.documents_failed,
            ms = started.elapsed().as_millis() as u64,
            "index batch committed"
        );
        Ok(Some((report, stop)))
    }

    /// After a permanent rejection of a request: embed its inputs source by source, marking
    /// the sources the embedder still rejects as failed.
    async fn embed_one_by_one(
        &self,
        pending: &mut [Pending],
        plans: &mut [Plan],
        report: &mut PassReport,
    ) -> Result<(), IndexError> {
        let mut by_plan: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, p) in pending.iter().enumerate() {
            by_plan.entry(p.plan).or_default().push(i);
        }
        for (plan, idx) in by_plan {
            let inputs: Vec<String> = idx
                .iter()
                .map(|i| chunk::embedding_input(&pending[*i].chunk))
                .collect();
            report.embed_requests += 1;
            match self.llm.embed(&self.model, &inputs).await {
                Ok(vectors) => {
                    for (i, v) in idx.iter().zip(vectors) {
                        pending[*i].vector = Some(v);
                    }
                }
                Err(e) if is_permanent(&e) => plans[plan].failed = true,
                Err(e) => return Err(IndexError::Embed(e)),
            }
        }
        Ok(())
    }
}

fn describe_metrics() {
    metrics::describe_counter!(
        "index_chunks_total",
        "Chunks handled by the index job, by outcome (embedded, skipped unchanged, deleted)"
    );
    metrics::describe_counter!("index_sources_total", "Sources re-indexed by the index job");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedder_failures_are_classified() {
        let upstream = |status| LlmError::Upstream {
            status,
            message: String::new(),
        };
        assert!(is_permanent(&upstream(400)));
        assert!(is_permanent(&upstream(422)));
        assert!(!is_permanent(&upstream(429)));
        assert!(!is_permanent(&upstream(408)));
        assert!(!is_permanent(&upstream(500)));
        assert!(!is_permanent(&LlmError::Timeout("t".into())));
        // a rate limit's Retry-After replaces the queue's backoff
        let e = IndexError::Embed(LlmError::RateLimited {
            retry_after: Some(Duration::from_secs(7)),
        })
        .into_job_error();
        assert!(matches!(
            e,
            JobError::Retryable { retry_after: Some(d), .. } if d == Duration::from_secs(7)
        ));
        assert!(
            IndexError::Embed(upstream(503))
                .into_job_error()
                .is_retryable()
        );
    }
}
