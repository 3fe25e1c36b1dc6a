//! The bus's diagnostic `probe` job: its run log and its idempotent effect.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::StoreError;
use crate::types::JobId;

/// One run of the probe handler.
#[derive(Debug, Clone)]
pub struct ProbeRun<'a> {
    pub job_id: JobId,
    pub key: &'a str,
    pub attempt: u32,
    pub consumer: &'a str,
    pub due_at: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    pub failed: bool,
}

/// Append a run to the log (every run, successful or not).
pub async fn record_run(conn: &mut PgConnection, run: &ProbeRun<'_>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO bus_probe_runs (job_id, key, attempt, consumer, due_at, started_at, failed)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(run.job_id)
    .bind(run.key)
    .bind(i32::try_from(run.attempt).unwrap_or(i32::MAX))
    .bind(run.consumer)
    .bind(run.due_at)
    .bind(run.started_at)
    .bind(run.failed)
    .execute(conn)
    .await?;
    Ok(())
}

/// How many runs of `job_id` the log holds.
pub async fn runs_of(conn: &mut PgConnection, job_id: JobId) -> Result<u32, StoreError> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM bus_probe_runs WHERE job_id = $1")
        .bind(job_id)
        .fetch_one(conn)
        .await?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

/// The probe's effect, once per job id: the marker row, and the per-key counter bumped only
/// when the marker was new. Call it inside the caller's transaction. Returns whether this call
/// took effect (false: the job had already taken effect — a redelivery).
pub async fn record_effect(
    conn: &mut PgConnection,
    job_id: JobId,
    key: &str,
    consumer: &str,
    attempt: u32,
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO bus_probe_effects (job_id, key, consumer, attempt)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (job_id) DO NOTHING",
    )
    .bind(job_id)
    .bind(key)
    .bind(consumer)
    .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if inserted {
        sqlx::query(
            "INSERT INTO bus_probe_totals (key, handled) VALUES ($1, 1)
             ON CONFLICT (key) DO UPDATE SET handled = bus_probe_totals.handled + 1",
        )
        .bind(key)
        .execute(&mut *conn)
        .await?;
    }
    Ok(inserted)
}
