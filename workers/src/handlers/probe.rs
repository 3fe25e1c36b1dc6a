//! `probe`: fail the first `fail_times` runs of the job (retryable; runs are counted in
//! `bus_probe_runs`, so a replayed dead letter goes on counting and eventually succeeds), sleep
//! `sleep_ms`, then take effect once.
//!
//! The pattern every handler follows: the effect and its idempotency marker (a unique key on the
//! job id, `ON CONFLICT DO NOTHING`) commit in one transaction, so a redelivered job — after a
//! crash, a lost ack or a reclaim — never takes effect twice.

use crate::handlers::db_error;
use std::time::Duration;

use chrono::Utc;
use jobs::kinds::Probe;
use jobs::worker::HandlerResult;
use jobs::{JobContext, JobError};
use store::probe::{ProbeRun, record_effect, record_run, runs_of};

#[tracing::instrument(skip_all, fields(job_id = %ctx.id, key = %job.key))]
pub async fn run(db: sqlx::PgPool, ctx: JobContext, job: Probe) -> HandlerResult {
    let started_at = Utc::now();
    let mut run = ProbeRun {
        job_id: ctx.id.into(),
        key: &job.key,
        attempt: ctx.attempt,
        consumer: &ctx.consumer,
        due_at: ctx.due_at,
        started_at,
        failed: true,
    };
    if job.fail_times > 0 {
        let mut conn = db.acquire().await.map_err(db_error)?;
        let previous = runs_of(&mut conn, ctx.id.into()).await.map_err(db_error)?;
        if previous < job.fail_times {
            record_run(&mut conn, &run).await.map_err(db_error)?;
            return Err(JobError::retryable(format!(
                "probe failure {} of {}",
                previous + 1,
                job.fail_times
            )));
        }
    }
    if job.sleep_ms > 0 {
        tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
    }
    run.failed = false;
    let mut tx = db.begin().await.map_err(db_error)?;
    record_run(&mut tx, &run).await.map_err(db_error)?;
    let fresh = record_effect(&mut tx, ctx.id.into(), &job.key, &ctx.consumer, ctx.attempt)
        .await
        .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    if !fresh {
        tracing::info!("probe already took effect (redelivery); nothing done twice");
    }
    Ok(())
}
