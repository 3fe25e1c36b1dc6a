//! The lifecycle of a response, PostgreSQL being the ledger of the work in flight
//! (docs/ARCHITECTURE.md, "The ledger").
//!
//! `Queued → Running(run) → Completed | Failed` ([`ResponseStatus`]). A worker *takes* a
//! response with a compare-and-set that adds one to `run` and sets a lease (`leased_until`),
//! renewed while the run lives ([`renew`]). Every write of a run names its number: a run whose
//! response was taken over by another (its lease expired) changes nothing ([`mark_streaming`],
//! [`release`], [`fail_run`], [`hold`], `conversations::complete`). Only the job named in
//! `job_id` may take a response: the job of a response that the reconciler re-enqueued under a
//! new id is stale and does nothing.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};

use crate::StoreError;
use crate::conversations::{RESPONSE_COLS, Response, response_cols_of};
use crate::types::ResponseStatus;
use crate::types::{ConversationId, ErrorCode, JobId, MessageId, OrgId, ResponseId, UserId};

fn sql(s: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(s)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// What a job found when it tried to take its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// This job's run `run` holds the response now.
    Taken { run: i32 },
    /// Completed or failed already.
    Finished,
    /// A live run (of this same job: a duplicate delivery) holds it for this long still.
    Held { for_: Duration },
    /// Another job is the response's job now (the reconciler re-enqueued it): this one is
    /// stale.
    Stale,
}

/// What a chat run reads first, in the one statement that also takes the response.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TurnStart {
    /// The response as it was before the take (status, starts, fallback_only, ...).
    #[sqlx(flatten)]
    pub response: Response,
    /// The org's chat models (`None`: the system default).
    pub org_model: Option<String>,
    pub org_fallback_model: Option<String>,
    /// The org has chunks embedded with the given model (else retrieval is skipped).
    pub has_index: bool,
    /// The response has a stored tool exchange (assistant tool calls, tool results).
    pub has_exchange: bool,
    /// The response has proposed actions.
    pub has_proposals: bool,
    /// The run number this statement took, if it took the response.
    taken_run: Option<i32>,
    /// The holder's lease left, in milliseconds (when held by a live run).
    held_ms: Option<f64>,
}

impl TurnStart {
    /// What the take found.
    pub fn take(&self, job_id: JobId) -> Take {
        if let Some(run) = self.taken_run {
            return Take::Taken { run };
        }
        if self.response.status.is_finished() {
            return Take::Finished;
        }
        if self
            .response
            .job_id
            .is_some_and(|j| j != job_id.into_uuid())
        {
            return Take::Stale;
        }
        let ms = self.held_ms.unwrap_or(0.0).max(0.0);
        Take::Held {
            for_: Duration::from_millis(ms as u64),
        }
    }
}

/// The response a chat job runs, as its payload names it.
#[derive(Debug, Clone, Copy)]
pub struct JobTurn {
    pub job_id: JobId,
    pub user_id: UserId,
    pub org_id: OrgId,
    pub conversation_id: ConversationId,
    pub response_id: ResponseId,
}

/// Take the response of `job` (of the user's own conversation) under a lease of `lease`, and
/// read what the run needs first — in ONE statement. The take succeeds when the response is
/// `queued`, or `running` under an expired lease (its run died), and its job is `job.job_id`
/// (or it names none: a row from before the ledger). `None`: no such response of that user's.
pub async fn take(
    conn: &mut PgConnection,
    job: &JobTurn,
    embedding_model: &str,
    lease: Duration,
) -> Result<Option<TurnStart>, StoreError> {
    Ok(sqlx::query_as::<_, TurnStart>(sql(format!(
        "WITH cur AS (
             SELECT r.* FROM responses r
             JOIN conversations c ON c.id = r.conversation_id
             WHERE r.id = $1 AND r.conversation_id = $2 AND c.user_id = $3
         ), taken AS (
             UPDATE responses r
                SET status = 'running', run = r.run + 1, job_id = coalesce(r.job_id, $6),
                    leased_until = clock_timestamp() + make_interval(secs => $7)
               FROM cur
              WHERE r.id = cur.id
                AND (r.job_id IS NULL OR r.job_id = $6)
                AND (r.status = 'queued'
                     OR (r.status = 'running'
                         AND (r.leased_until IS NULL OR r.leased_until < clock_timestamp())))
             RETURNING r.run
         )
         SELECT {},
                (SELECT run FROM taken) AS taken_run,
                (extract(epoch FROM (r.leased_until - clock_timestamp())) * 1000)::float8
                    AS held_ms,
                o.model AS org_model, o.fallback_model AS org_fallback_model,
                EXISTS (SELECT 1 FROM embeddings e
                        WHERE e.org_id = $4 AND e.model = $5) AS has_index,
                EXISTS (SELECT 1 FROM messages m
                        WHERE m.response_id = r.id
                          AND (m.tool_calls IS NOT NULL OR m.role = 'tool')) AS has_exchange,
                EXISTS (SELECT 1 FROM proposed_actions a
                        WHERE a.response_id = r.id) AS has_proposals
         FROM cur r
         LEFT JOIN organizations o ON o.id = $4",
        response_cols_of("r")
    )))
    .bind(job.response_id)
    .bind(job.conversation_id)
    .bind(job.user_id)
    .bind(job.org_id)
    .bind(embedding_model)
    .bind(job.job_id)
    .bind(secs(lease))
    .fetch_optional(conn)
    .await?)
}

/// Renew the leases of the runs a worker holds, `(response_id, run)` pairs, in one statement.
/// Returns the responses whose lease was renewed; a run missing from the answer lost its
/// response (taken over after its lease expired, or finished by someone else) and must stop.
pub async fn renew(
    pool: &PgPool,
    held: &[(ResponseId, i32)],
    lease: Duration,
) -> Result<Vec<ResponseId>, StoreError> {
    if held.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, runs): (Vec<ResponseId>, Vec<i32>) = held.iter().copied().unzip();
    Ok(sqlx::query_scalar(
        "UPDATE responses r
            SET leased_until = clock_timestamp() + make_interval(secs => $3)
           FROM unnest($1::uuid[], $2::int[]) AS h(id, run)
          WHERE r.id = h.id AND r.run = h.run AND r.status = 'running'
         RETURNING r.id",
    )
    .bind(&ids)
    .bind(&runs)
    .bind(secs(lease))
    .fetch_all(pool)
    .await?)
}

/// The run that holds (or last held) the response.
pub async fn current_run(
    pool: &PgPool,
    response_id: ResponseId,
) -> Result<Option<i32>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT run FROM responses WHERE id = $1")
            .bind(response_id)
            .fetch_optional(pool)
            .await?,
    )
}

/// Run `run` gives the response back without finishing it (it waits out a rate limit; its job
/// comes back later): `running → queued`. `fallback_only`: the primary failed in this run, so
/// later runs call only the fallback. `false`: the run no longer held it.
pub async fn release(
    conn: &mut PgConnection,
    response_id: ResponseId,
    run: i32,
    fallback_only: bool,
) -> Result<bool, StoreError> {
    let n = sqlx::query(
        "UPDATE responses SET status = 'queued', leased_until = NULL,
                              fallback_only = fallback_only OR $3
         WHERE id = $1 AND run = $2 AND status = 'running'",
    )
    .bind(response_id)
    .bind(run)
    .bind(fallback_only)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Record, before run `run` publishes its first token, that it starts streaming. Returns how
/// many runs had started before it (> 0: a restart the client must be told about), or `None`
/// when the run no longer holds the response (it must publish nothing).
pub async fn mark_streaming(
    conn: &mut PgConnection,
    response_id: ResponseId,
    run: i32,
) -> Result<Option<i32>, StoreError> {
    Ok(sqlx::query_scalar(
        "UPDATE responses SET starts = starts + 1
         WHERE id = $1 AND run = $2 AND status = 'running'
         RETURNING starts - 1",
    )
    .bind(response_id)
    .bind(run)
    .fetch_optional(conn)
    .await?)
}

/// Inside the caller's transaction: whether run `run` still holds the response, keeping it so
/// until the transaction ends (a takeover waits for the commit). The writes of a run that are
/// not its answer (a tool round, proposals) check this first.
pub async fn hold(
    conn: &mut PgConnection,
    response_id: ResponseId,
    run: i32,
) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar::<_, i32>(
        "SELECT 1 FROM responses WHERE id = $1 AND run = $2 AND status = 'running' FOR SHARE",
    )
    .bind(response_id)
    .bind(run)
    .fetch_optional(conn)
    .await?
    .is_some())
}

/// Run `run` ends the response with an error. `false`: the run no longer held it (nothing
/// written; the client must not be told).
pub async fn fail_run(
    conn: &mut PgConnection,
    response_id: ResponseId,
    run: i32,
    code: ErrorCode,
    message: &str,
) -> Result<bool, StoreError> {
    let n = sqlx::query(
        "UPDATE responses SET status = 'failed', error_code = $3, error_message = $4,
                              completed_at = now(), leased_until = NULL
         WHERE id = $1 AND run = $2 AND status = 'running'",
    )
    .bind(response_id)
    .bind(run)
    .bind(code)
    .bind(message)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// End an unfinished response with an error whoever holds it (its job died for good, or the
/// reconciler gave up on it); a run still going finds it failed at its next write. With
/// `job_id`, only while the response is that job's (a stale job must not fail a response
/// that another job now runs). `false`: nothing changed.
pub async fn fail_unfinished(
    conn: &mut PgConnection,
    response_id: ResponseId,
    job_id: Option<JobId>,
    code: ErrorCode,
    message: &str,
) -> Result<bool, StoreError> {
    let n = sqlx::query(
        "UPDATE responses SET status = 'failed', error_code = $2, error_message = $3,
                              completed_at = now(), leased_until = NULL
         WHERE id = $1 AND status IN ('queued', 'running')
           AND ($4::uuid IS NULL OR job_id IS NULL OR job_id = $4)",
    )
    .bind(response_id)
    .bind(code)
    .bind(message)
    .bind(job_id)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Hand a response to job `job_id` (a continuation whose action ran): from now on the
/// reconciler watches that job. In the caller's transaction, before the enqueue.
pub async fn assign_job(
    conn: &mut PgConnection,
    response_id: ResponseId,
    job_id: JobId,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE responses SET job_id = $2, enqueued_at = now()
         WHERE id = $1 AND status = 'queued' AND job_id IS NULL",
    )
    .bind(response_id)
    .bind(job_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// An unfinished response as the reconciler sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Unfinished {
    pub id: ResponseId,
    pub conversation_id: ConversationId,
    pub user_message_id: MessageId,
    pub user_id: UserId,
    pub org_id: OrgId,
    pub status: ResponseStatus,
    pub job_id: Option<JobId>,
    pub recoveries: i32,
    /// `running` with its lease expired: its run died.
    pub expired: bool,
    pub enqueued_at: Option<chrono::DateTime<chrono::Utc>>,
}

const UNFINISHED_COLS: &str = "r.id, r.conversation_id, r.user_message_id, c.user_id, c.org_id, \
     r.status, r.job_id, r.recoveries, \
     (r.status = 'running' AND r.leased_until < clock_timestamp()) AS expired, r.enqueued_at";

/// Responses `running` under an expired lease (their run died), oldest first.
pub async fn expired(pool: &PgPool, limit: i64) -> Result<Vec<Unfinished>, StoreError> {
    Ok(sqlx::query_as::<_, Unfinished>(sql(format!(
        "SELECT {UNFINISHED_COLS}
         FROM responses r JOIN conversations c ON c.id = r.conversation_id
         WHERE r.status = 'running' AND r.job_id IS NOT NULL
           AND r.leased_until < clock_timestamp()
         ORDER BY r.leased_until LIMIT $1"
    )))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Responses `queued` that were handed to a job more than `grace` ago (whether their job still
/// exists is Redis's to say), in `(enqueued_at, id)` order after `after`: the reconciler pages
/// through them across passes, so a long backlog of healthy ones never hides a lost one.
pub async fn queued(
    pool: &PgPool,
    grace: Duration,
    after: Option<(chrono::DateTime<chrono::Utc>, ResponseId)>,
    limit: i64,
) -> Result<Vec<Unfinished>, StoreError> {
    Ok(sqlx::query_as::<_, Unfinished>(sql(format!(
        "SELECT {UNFINISHED_COLS}
         FROM responses r JOIN conversations c ON c.id = r.conversation_id
         WHERE r.status = 'queued' AND r.job_id IS NOT NULL
           AND r.enqueued_at < clock_timestamp() - make_interval(secs => $1)
           AND ($2::timestamptz IS NULL OR (r.enqueued_at, r.id) > ($2, $3))
         ORDER BY r.enqueued_at, r.id LIMIT $4"
    )))
    .bind(secs(grace))
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Give up on a response that lost its job `job` too often: fail it — only while it is still
/// that job's and no live run holds it. `false`: nothing changed.
pub async fn give_up(
    pool: &PgPool,
    response_id: ResponseId,
    job: JobId,
    code: ErrorCode,
    message: &str,
) -> Result<bool, StoreError> {
    let n = sqlx::query(
        "UPDATE responses SET status = 'failed', error_code = $3, error_message = $4,
                              completed_at = now(), leased_until = NULL
         WHERE id = $1 AND job_id = $2
           AND (status = 'queued' OR (status = 'running' AND leased_until < clock_timestamp()))",
    )
    .bind(response_id)
    .bind(job)
    .bind(code)
    .bind(message)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Give a lost response a new job (`old_job` → `new_job`), counting one recovery: only while
/// it is still unfinished, still names `old_job`, and is `queued` or `running` under an expired
/// lease. `false`: something else happened meanwhile (nothing to do).
pub async fn recover(
    pool: &PgPool,
    response_id: ResponseId,
    old_job: JobId,
    new_job: JobId,
) -> Result<bool, StoreError> {
    let n = sqlx::query(
        "UPDATE responses SET status = 'queued', leased_until = NULL, job_id = $3,
                              enqueued_at = now(), recoveries = recoveries + 1
         WHERE id = $1 AND job_id = $2
           AND (status = 'queued'
                OR (status = 'running' AND leased_until < clock_timestamp()))",
    )
    .bind(response_id)
    .bind(old_job)
    .bind(new_job)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// A response by id, whatever its conversation (the reconciler, tests).
pub async fn get(pool: &PgPool, response_id: ResponseId) -> Result<Option<Response>, StoreError> {
    Ok(sqlx::query_as::<_, Response>(sql(format!(
        "SELECT {RESPONSE_COLS} FROM responses WHERE id = $1"
    )))
    .bind(response_id)
    .fetch_optional(pool)
    .await?)
}
