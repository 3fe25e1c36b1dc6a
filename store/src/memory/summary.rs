//! Running summaries: claim → messages to fold → the model call (no connection held) → save,
//! a compare-and-set that ends the claim; and the recovery of claims whose run died.

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::StoreError;
use crate::conversations::Message;
use crate::provenance::visible_sql;

/// A conversation's running summary.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct Summary {
    pub summary: String,
    /// The seq of the last message folded into it (0: none).
    pub summarized_up_to: i64,
}

/// The summary of a conversation, if any was written.
pub async fn summary(
    conn: &mut PgConnection,
    conversation_id: Uuid,
) -> Result<Option<Summary>, StoreError> {
    Ok(sqlx::query_as::<_, Summary>(
        "SELECT summary, summarized_up_to FROM conversation_summaries WHERE conversation_id = $1",
    )
    .bind(conversation_id)
    .fetch_optional(conn)
    .await?)
}

/// What [`claim_summary`] found.
#[derive(Debug)]
pub enum SummaryClaim {
    /// The summary, now leased to the caller.
    Claimed(Summary),
    /// Another job's run holds the lease.
    Busy,
    /// The conversation is gone.
    Gone,
}

/// Claim the summary of a conversation for the summarize run of job `job_id`, for `lease`
/// (the row is created empty if missing). Free when no lease is set, when it expired, or when
/// it is this job's own (a redelivery after a crash). Two autocommitted statements; nothing
/// stays locked.
pub async fn claim_summary(
    conn: &mut PgConnection,
    conversation_id: Uuid,
    job_id: Uuid,
    lease: std::time::Duration,
) -> Result<SummaryClaim, StoreError> {
    // (a conversation that is gone gets no row: Gone below)
    sqlx::query(
        "INSERT INTO conversation_summaries (conversation_id)
         SELECT id FROM conversations WHERE id = $1
         ON CONFLICT (conversation_id) DO NOTHING",
    )
    .bind(conversation_id)
    .execute(&mut *conn)
    .await?;
    let claimed: Option<(String, i64, bool)> = sqlx::query_as(
        "WITH claimed AS (
             UPDATE conversation_summaries
                SET folding_until = clock_timestamp() + make_interval(secs => $3),
                    folding_job = $2
              WHERE conversation_id = $1
                AND (folding_until IS NULL OR folding_until <= clock_timestamp()
                     OR folding_job = $2)
             RETURNING summary, summarized_up_to)
         SELECT summary, summarized_up_to, true FROM claimed
         UNION ALL
         SELECT '', 0, false FROM conversation_summaries
          WHERE conversation_id = $1 AND NOT EXISTS (SELECT 1 FROM claimed)",
    )
    .bind(conversation_id)
    .bind(job_id)
    .bind(lease.as_secs_f64())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match claimed {
        Some((summary, summarized_up_to, true)) => SummaryClaim::Claimed(Summary {
            summary,
            summarized_up_to,
        }),
        Some((_, _, false)) => SummaryClaim::Busy,
        None => SummaryClaim::Gone,
    })
}

/// End job `job_id`'s claim without writing (its model call failed): the next run may start at
/// once. A lease that already passed to another job is left alone.
pub async fn release_summary(
    conn: &mut PgConnection,
    conversation_id: Uuid,
    job_id: Uuid,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE conversation_summaries SET folding_until = NULL, folding_job = NULL
         WHERE conversation_id = $1 AND folding_job = $2",
    )
    .bind(conversation_id)
    .bind(job_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The conversation `$1`'s owner and the projects it may draw on for them now, as `cv`.
const CONVERSATION_VIEW: &str = "cv AS (
    SELECT c.user_id,
           ARRAY(SELECT project_id FROM conversation_projects_visible(c.user_id, c.id)) AS projects
    FROM conversations c WHERE c.id = $1)";

/// A message a summarize run folds, and whether its text is given to the model.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FoldMessage {
    #[sqlx(flatten)]
    pub message: Message,
    /// False when the message drew on a source its user can no longer see (or outside the
    /// conversation's narrowing): its `content` is then empty, the fold goes past it without
    /// its text.
    pub given: bool,
}

/// Messages after `after_seq` that are older than the conversation's last `keep_recent`
/// (the prompt's window), oldest first, at most `limit`: what a summarize run folds. A message
/// that drew on a source its user can no longer see (or outside the conversation's narrowing)
/// comes with empty content and `given = false`. The ids of the messages given go to
/// [`save_summary`], which records their sources whatever happened meanwhile.
pub async fn messages_to_fold(
    conn: &mut PgConnection,
    conversation_id: Uuid,
    after_seq: i64,
    keep_recent: i64,
    limit: i64,
) -> Result<Vec<FoldMessage>, StoreError> {
    let visible = visible_sql("m", "cv.user_id", "cv.projects");
    Ok(
        sqlx::query_as::<_, FoldMessage>(sqlx::AssertSqlSafe(format!(
            "WITH {CONVERSATION_VIEW}
         SELECT m.id, m.conversation_id, m.seq, m.role,
                CASE WHEN v.given THEN m.content ELSE '' END AS content, m.response_id,
                m.model, m.prompt_tokens, m.completion_tokens, m.latency_ms, m.tool_calls,
                m.tool_call_id, m.citations, m.created_at, v.given
         FROM messages m, cv, LATERAL (SELECT {visible} AS given) v
         WHERE m.conversation_id = $1 AND m.seq > $2
           AND m.seq < coalesce((SELECT min(seq) FROM (
                   SELECT seq FROM messages WHERE conversation_id = $1
                   ORDER BY seq DESC LIMIT $3) w), 0)
         ORDER BY m.seq LIMIT $4"
        )))
        .bind(conversation_id)
        .bind(after_seq)
        .bind(keep_recent)
        .bind(limit)
        .fetch_all(conn)
        .await?,
    )
}

/// How many messages are older than the last `keep_recent` and not summarized yet.
pub async fn unsummarized_beyond_window(
    conn: &mut PgConnection,
    conversation_id: Uuid,
    keep_recent: i64,
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM messages m
         WHERE m.conversation_id = $1
           AND m.seq > coalesce((SELECT summarized_up_to FROM conversation_summaries
                                 WHERE conversation_id = $1), 0)
           AND m.seq < coalesce((SELECT min(seq) FROM (
                   SELECT seq FROM messages WHERE conversation_id = $1
                   ORDER BY seq DESC LIMIT $2) w), 0)",
    )
    .bind(conversation_id)
    .bind(keep_recent)
    .fetch_one(conn)
    .await?)
}

/// A summary fold whose run died with the claim (its lease expired, not released).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExpiredFold {
    pub conversation_id: Uuid,
    pub folding_job: Uuid,
    pub fold_recoveries: i32,
}

/// Summary claims whose lease expired without being released (their run died), oldest first.
pub async fn expired_folds(pool: &PgPool, limit: i64) -> Result<Vec<ExpiredFold>, StoreError> {
    Ok(sqlx::query_as::<_, ExpiredFold>(
        "SELECT conversation_id, folding_job, fold_recoveries FROM conversation_summaries
         WHERE folding_until < clock_timestamp() AND folding_job IS NOT NULL
         ORDER BY folding_until LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Hand an expired claim to a new job (`old_job` → `new_job`: it takes the claim over when it
/// runs), counting one recovery; or, with `new_job` = `None`, drop the claim (the next turn's
/// backlog count enqueues a fold again). `false` when the claim changed meanwhile.
pub async fn recover_fold(
    pool: &PgPool,
    conversation_id: Uuid,
    old_job: Uuid,
    new_job: Option<Uuid>,
) -> Result<bool, StoreError> {
    let n = sqlx::query(
        "UPDATE conversation_summaries
            SET folding_job = $3,
                folding_until = CASE WHEN $3::uuid IS NULL THEN NULL ELSE folding_until END,
                fold_recoveries = CASE WHEN $3::uuid IS NULL THEN 0 ELSE fold_recoveries + 1 END
          WHERE conversation_id = $1 AND folding_job = $2 AND folding_until < clock_timestamp()",
    )
    .bind(conversation_id)
    .bind(old_job)
    .bind(new_job)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Store the new summary of job `job_id`'s run, folded from message seq `from` (the claimed
/// `summarized_up_to`) up to `up_to`, and end its claim. The summary's provenance grows by
/// that of `given`, the folded messages whose text the model was given
/// ([`FoldMessage::given`]) — unconditionally: their text is in the summary now, so a source
/// that turned invisible during the model call (a document deleted, a membership revoked)
/// must be recorded, and the read filter then withholds and resets the summary. Written only
/// while the claim is still this job's (its lease may have expired, as long as no other job
/// took it) and the summary still starts at `from`; false (nothing written) otherwise:
/// another run took over.
#[allow(clippy::too_many_arguments)]
pub async fn save_summary(
    conn: &mut PgConnection,
    conversation_id: Uuid,
    job_id: Uuid,
    from: i64,
    summary: &str,
    up_to: i64,
    model: &str,
    given: &[Uuid],
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "WITH folded AS (
             SELECT m.source_project_ids, m.source_document_ids, m.narrow FROM messages m
             WHERE m.conversation_id = $1 AND m.id = ANY($7)),
         p AS (
             SELECT coalesce((SELECT array_agg(DISTINCT x) FROM folded,
                                     unnest(folded.source_project_ids) x), '{}') AS projects,
                    coalesce((SELECT array_agg(DISTINCT x) FROM folded,
                                     unnest(folded.source_document_ids) x), '{}') AS documents,
                    coalesce((SELECT bool_or(narrow) FROM folded), false) AS narrow)
         UPDATE conversation_summaries s SET summary = $4, summarized_up_to = $5, model = $6,
             folding_until = NULL, folding_job = NULL, fold_recoveries = 0, updated_at = now(),
             source_project_ids = uuid_union(s.source_project_ids, p.projects),
             source_document_ids = uuid_union(s.source_document_ids, p.documents),
             narrow = s.narrow OR p.narrow
         FROM p
         WHERE s.conversation_id = $1 AND s.folding_job = $2 AND s.summarized_up_to = $3
           AND $5 > $3",
    )
    .bind(conversation_id)
    .bind(job_id)
    .bind(from)
    .bind(summary)
    .bind(up_to)
    .bind(model)
    .bind(given)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
