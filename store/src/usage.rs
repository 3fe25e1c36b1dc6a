//! Token usage per organization, day (UTC) and model: `usage_daily`.
//!
//! `record` adds one answered request to its day's row; the chat worker calls it in the
//! transaction that stores the answer, and only when the answer was new (so a redelivered job
//! is not counted twice). `report` is what `api usage` prints.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgConnection, PgPool};

use crate::StoreError;
use crate::types::OrgId;

/// One `usage_daily` row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Row {
    pub day: NaiveDate,
    pub org_id: OrgId,
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// Count one request of `org_id` to `model` with its tokens on the UTC day of `at`: an upsert
/// adding to that day's row. Call it inside the caller's transaction.
pub async fn record(
    conn: &mut PgConnection,
    org_id: OrgId,
    model: &str,
    prompt_tokens: i64,
    completion_tokens: i64,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO usage_daily AS u (org_id, day, model, requests, prompt_tokens, completion_tokens)
         VALUES ($1, $2, $3, 1, $4, $5)
         ON CONFLICT (org_id, day, model) DO UPDATE
         SET requests = u.requests + 1,
             prompt_tokens = u.prompt_tokens + EXCLUDED.prompt_tokens,
             completion_tokens = u.completion_tokens + EXCLUDED.completion_tokens",
    )
    .bind(org_id)
    .bind(at.date_naive())
    .bind(model)
    .bind(prompt_tokens.max(0))
    .bind(completion_tokens.max(0))
    .execute(conn)
    .await?;
    Ok(())
}

/// The rows from `since` (inclusive) on, of one org or of all, ordered by day, model (then org).
pub async fn report(
    pool: &PgPool,
    org_id: Option<OrgId>,
    since: NaiveDate,
) -> Result<Vec<Row>, StoreError> {
    Ok(sqlx::query_as::<_, Row>(
        "SELECT day, org_id, model, requests, prompt_tokens, completion_tokens
         FROM usage_daily
         WHERE day >= $1 AND ($2::uuid IS NULL OR org_id = $2)
         ORDER BY day, model, org_id",
    )
    .bind(since)
    .bind(org_id)
    .fetch_all(pool)
    .await?)
}
