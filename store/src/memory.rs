//! Conversation memory (SPEC §3): running summaries and the hierarchical memory entries.
//!
//! Nothing here is reachable from a user-facing endpoint: the chat worker reads it into
//! prompts, the memory jobs write it, operators manage it with `api memory`.
//!
//! - Summaries: [`claim_summary`] (a lease on the summary row, nothing locked) →
//!   [`messages_to_fold`] → the model call, holding no connection → [`save_summary`], a
//!   compare-and-set on `summarized_up_to` that also ends the lease; so two summarize runs
//!   never fold a message twice or lose one, and only one calls the model at a time.
//! - Entries: [`insert`] locks the owner (advisory transaction lock), refreshes a
//!   near-duplicate or inserts, then trims the owner's entries to the tier's capacity — in the
//!   caller's transaction, so concurrent inserts of one owner never leave more than capacity.
//! - Prompt reads: [`for_prompt`] filters by the user's visibility in SQL at query time.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::StoreError;
use crate::conversations::Message;
use crate::error::OnConstraint;
use crate::provenance::{Provenance, visible_sql};

/// The tier of a memory entry: whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Org,
    Project,
    User,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Org, Tier::Project, Tier::User];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Org => "org",
            Tier::Project => "project",
            Tier::User => "user",
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Tier {
    type Err = crate::UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "org" => Ok(Tier::Org),
            "project" => Ok(Tier::Project),
            "user" => Ok(Tier::User),
            _ => Err(crate::UnknownValue),
        }
    }
}

/// Who an entry belongs to. User entries belong to a user within one org.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub org_id: Uuid,
    pub tier: Tier,
    pub project_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
}

impl Owner {
    pub fn org(org_id: Uuid) -> Self {
        Self {
            org_id,
            tier: Tier::Org,
            project_id: None,
            user_id: None,
        }
    }
    pub fn project(org_id: Uuid, project_id: Uuid) -> Self {
        Self {
            org_id,
            tier: Tier::Project,
            project_id: Some(project_id),
            user_id: None,
        }
    }
    pub fn user(org_id: Uuid, user_id: Uuid) -> Self {
        Self {
            org_id,
            tier: Tier::User,
            project_id: None,
            user_id: Some(user_id),
        }
    }

    /// The key of the owner's advisory lock.
    fn lock_key(&self) -> String {
        format!(
            "memory:{}:{}:{}:{}",
            self.org_id,
            self.tier,
            self.project_id.unwrap_or_default(),
            self.user_id.unwrap_or_default()
        )
    }
}

/// A stored entry (operators' view; prompts use [`PromptEntry`]).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Entry {
    pub id: Uuid,
    pub org_id: Uuid,
    pub tier: String,
    pub project_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub content: String,
    pub source_conversation_id: Option<Uuid>,
    pub source_message_ids: Vec<Uuid>,
    /// Whose exchange it was learnt from (`None`: an operator's entry).
    pub author_user_id: Option<Uuid>,
    #[sqlx(flatten)]
    pub provenance: Provenance,
    pub model: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const ENTRY_COLS: &str = "id, org_id, tier, project_id, user_id, content, source_conversation_id, \
     source_message_ids, author_user_id, source_project_ids, source_document_ids, narrow, model, \
     created_at, updated_at";

/// The longest entry content (the table's check).
pub const MAX_CONTENT_CHARS: usize = 2000;

/// An entry to store.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub owner: Owner,
    pub content: String,
    pub source_conversation_id: Option<Uuid>,
    pub source_message_ids: Vec<Uuid>,
    /// Whose words or exchange it came from (`None`: an operator's entry). A project entry
    /// refreshes only entries of the same author, and each author's share of a project is
    /// capped ([`insert_with`]).
    pub author_user_id: Option<Uuid>,
    /// What it was derived from (read filters and source deletions use it).
    pub provenance: Provenance,
    /// The embedding of `content` and the model that made it (`None` when embedding failed:
    /// the entry is kept, ranked by recency, and not de-duplicated).
    pub embedding: Option<(String, Vec<f32>)>,
}

/// What [`insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// A new entry; `removed` older entries of the owner went to keep the capacity.
    New { id: Uuid, removed: u64 },
    /// A near-duplicate existed: its content and `updated_at` were refreshed.
    Refreshed { id: Uuid },
}

/// Store an entry with de-duplication and capacity retention, in the caller's transaction.
///
/// Locks the owner first (`pg_advisory_xact_lock`), so concurrent inserts for one owner run
/// one after the other: each sees the others' committed rows, and the trim after the insert
/// leaves at most `capacity` entries (the most recently updated). Timestamps come from
/// `clock_timestamp()`, so the order is the order of the inserts, not of the transactions'
/// starts.
pub async fn insert(
    conn: &mut PgConnection,
    entry: &NewEntry,
    capacity: u32,
    dedup_distance: f64,
) -> Result<Inserted, StoreError> {
    insert_with(conn, entry, capacity, None, dedup_distance).await
}

/// [`insert`], with a per-author share of a project's capacity: a project entry with an
/// author first trims that author's entries of the project to `per_author` (the oldest go);
/// then, when the project holds more than `capacity`, the author's own oldest entries go
/// first, and only an author holding nothing else displaces one entry — the oldest of whoever
/// holds the most — so one member cannot fill the tier and evict the others'. A near-duplicate refreshes only an entry of the same author (project tier), and
/// the refreshed entry keeps the union of both entries' sources.
pub async fn insert_with(
    conn: &mut PgConnection,
    entry: &NewEntry,
    capacity: u32,
    per_author: Option<u32>,
    dedup_distance: f64,
) -> Result<Inserted, StoreError> {
    let o = &entry.owner;
    let p = &entry.provenance;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(o.lock_key())
        .execute(&mut *conn)
        .await?;
    let (model, dim, vector) = match &entry.embedding {
        Some((model, v)) => (
            Some(model.as_str()),
            Some(i32::try_from(v.len()).unwrap_or(i32::MAX)),
            Some(pgvector::Vector::from(v.clone())),
        ),
        None => (None, None, None),
    };
    if let (Some(model), Some(dim), Some(vector)) = (model, dim, &vector) {
        let near: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM (
                 SELECT id, CASE WHEN dim = $5 AND model = $6 THEN embedding <=> $7 END AS d
                 FROM conversation_memories
                 WHERE org_id = $1 AND tier = $2
                   AND project_id IS NOT DISTINCT FROM $3 AND user_id IS NOT DISTINCT FROM $4
                   AND (tier <> 'project' OR author_user_id IS NOT DISTINCT FROM $9)
                   AND embedding IS NOT NULL) c
             WHERE d < $8 ORDER BY d LIMIT 1",
        )
        .bind(o.org_id)
        .bind(o.tier.as_str())
        .bind(o.project_id)
        .bind(o.user_id)
        .bind(dim)
        .bind(model)
        .bind(vector)
        .bind(dedup_distance)
        .bind(entry.author_user_id)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(id) = near {
            sqlx::query(
                "UPDATE conversation_memories SET content = $2, embedding = $3, dim = $4,
                     model = $5, updated_at = clock_timestamp(),
                     source_conversation_id = coalesce($6, source_conversation_id),
                     source_message_ids = CASE WHEN cardinality($7::uuid[]) > 0 THEN $7
                                               ELSE source_message_ids END,
                     source_project_ids = uuid_union(source_project_ids, $8),
                     source_document_ids = uuid_union(source_document_ids, $9),
                     narrow = narrow OR $10
                 WHERE id = $1",
            )
            .bind(id)
            .bind(&entry.content)
            .bind(vector)
            .bind(dim)
            .bind(model)
            .bind(entry.source_conversation_id)
            .bind(&entry.source_message_ids)
            .bind(&p.source_project_ids)
            .bind(&p.source_document_ids)
            .bind(p.narrow)
            .execute(&mut *conn)
            .await?;
            return Ok(Inserted::Refreshed { id });
        }
    }
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO conversation_memories (id, org_id, tier, project_id, user_id, content,
             source_conversation_id, source_message_ids, model, dim, embedding,
             author_user_id, source_project_ids, source_document_ids, narrow)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(id)
    .bind(o.org_id)
    .bind(o.tier.as_str())
    .bind(o.project_id)
    .bind(o.user_id)
    .bind(&entry.content)
    .bind(entry.source_conversation_id)
    .bind(&entry.source_message_ids)
    .bind(model)
    .bind(dim)
    .bind(vector)
    .bind(entry.author_user_id)
    .bind(&p.source_project_ids)
    .bind(&p.source_document_ids)
    .bind(p.narrow)
    .execute(&mut *conn)
    .await
    .on_constraint(
        "conversation_memories_project_fkey",
        StoreError::InvalidReference {
            field: "project",
            message: "does not name a project of this organization",
        },
    )
    .on_constraint(
        "conversation_memories_user_id_fkey",
        StoreError::InvalidReference {
            field: "user",
            message: "does not name a user",
        },
    )
    .on_constraint(
        "conversation_memories_content_check",
        StoreError::InvalidReference {
            field: "content",
            message: "must be 1 to 2000 characters",
        },
    )?;
    let mut removed = 0;
    if let (Tier::Project, Some(author), Some(share)) = (o.tier, entry.author_user_id, per_author) {
        removed += sqlx::query(
            "DELETE FROM conversation_memories WHERE id IN (
                 SELECT id FROM conversation_memories
                 WHERE tier = 'project' AND project_id = $1 AND author_user_id = $2
                 ORDER BY updated_at DESC, id DESC
                 OFFSET $3)",
        )
        .bind(o.project_id)
        .bind(author)
        .bind(i64::from(share))
        .execute(&mut *conn)
        .await?
        .rows_affected();
    }
    if let (Tier::Project, Some(author)) = (o.tier, entry.author_user_id) {
        // Over the project's capacity: the inserting author's own oldest entries go first; if
        // the author holds nothing else, the oldest entry of whoever holds the most (deepest in
        // their own list) goes. So an author can displace at most one entry of the others.
        removed += sqlx::query(
            "DELETE FROM conversation_memories WHERE id IN (
                 SELECT id FROM conversation_memories
                 WHERE tier = 'project' AND project_id = $1 AND author_user_id = $2 AND id <> $3
                 ORDER BY updated_at ASC, id ASC
                 LIMIT greatest((SELECT count(*) FROM conversation_memories
                                 WHERE tier = 'project' AND project_id = $1) - $4, 0))",
        )
        .bind(o.project_id)
        .bind(author)
        .bind(id)
        .bind(i64::from(capacity))
        .execute(&mut *conn)
        .await?
        .rows_affected();
        removed += sqlx::query(
            "DELETE FROM conversation_memories WHERE id IN (
                 SELECT id FROM (
                     SELECT id, updated_at, row_number() OVER (
                                PARTITION BY author_user_id ORDER BY updated_at DESC, id DESC) AS r
                     FROM conversation_memories
                     WHERE tier = 'project' AND project_id = $1) ranked
                 ORDER BY (id = $2) DESC, r ASC, updated_at DESC, id DESC
                 OFFSET $3)",
        )
        .bind(o.project_id)
        .bind(id)
        .bind(i64::from(capacity))
        .execute(&mut *conn)
        .await?
        .rows_affected();
        return Ok(Inserted::New { id, removed });
    }
    removed += sqlx::query(
        "DELETE FROM conversation_memories WHERE id IN (
             SELECT id FROM conversation_memories
             WHERE org_id = $1 AND tier = $2
               AND project_id IS NOT DISTINCT FROM $3 AND user_id IS NOT DISTINCT FROM $4
             ORDER BY updated_at DESC, id DESC
             OFFSET $5)",
    )
    .bind(o.org_id)
    .bind(o.tier.as_str())
    .bind(o.project_id)
    .bind(o.user_id)
    .bind(i64::from(capacity))
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(Inserted::New { id, removed })
}

/// Entries of an org for operators, newest first, optionally narrowed.
pub async fn list(
    conn: &mut PgConnection,
    org_id: Uuid,
    tier: Option<Tier>,
    project_id: Option<Uuid>,
    user_id: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Entry>, StoreError> {
    Ok(sqlx::query_as::<_, Entry>(sqlx::AssertSqlSafe(format!(
        "SELECT {ENTRY_COLS} FROM conversation_memories
         WHERE org_id = $1 AND ($2::text IS NULL OR tier = $2)
           AND ($3::uuid IS NULL OR project_id = $3) AND ($4::uuid IS NULL OR user_id = $4)
         ORDER BY updated_at DESC, id DESC LIMIT $5"
    )))
    .bind(org_id)
    .bind(tier.map(Tier::as_str))
    .bind(project_id)
    .bind(user_id)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Delete an entry of `org_id` (operators); false when there is none.
pub async fn delete(conn: &mut PgConnection, org_id: Uuid, id: Uuid) -> Result<bool, StoreError> {
    let done = sqlx::query("DELETE FROM conversation_memories WHERE id = $1 AND org_id = $2")
        .bind(id)
        .bind(org_id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Whether `user_id` is a member of `org_id` (user-tier entries need one).
pub async fn is_org_member(
    conn: &mut PgConnection,
    org_id: Uuid,
    user_id: Uuid,
) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM org_memberships WHERE org_id = $1 AND user_id = $2)",
    )
    .bind(org_id)
    .bind(user_id)
    .fetch_one(conn)
    .await?)
}

/// Whether `project_id` is one the conversation may draw on for `user_id` right now
/// (`conversation_projects_visible`): the check before a project-tier fact is stored.
pub async fn project_usable(
    conn: &mut PgConnection,
    user_id: Uuid,
    conversation_id: Uuid,
    project_id: Uuid,
) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM conversation_projects_visible($1, $2) WHERE project_id = $3)",
    )
    .bind(user_id)
    .bind(conversation_id)
    .bind(project_id)
    .fetch_one(conn)
    .await?)
}

/// An entry as a prompt gets it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PromptEntry {
    pub id: Uuid,
    pub tier: String,
    pub project_id: Option<Uuid>,
    pub content: String,
    #[sqlx(flatten)]
    pub provenance: Provenance,
    /// Cosine distance to the query (`None` without a query vector or a comparable embedding).
    pub distance: Option<f64>,
}

/// The visibility rule of prompt reads, for user `$1` in conversation `$2`: the entries of the
/// conversation's org (the conversation must be the user's), of the projects the conversation
/// may draw on for the user right now, and the user's own. Nothing of another user, nor of a
/// project the user cannot see (live memberships). And, for every entry, its provenance: every
/// project it drew on is in the conversation's visible set and every document it drew on is
/// visible to the user now; a project entry whose document was restricted since is its
/// author's alone.
fn visible_to() -> String {
    let provenance = visible_sql(
        "m",
        "$1",
        "ARRAY(SELECT project_id FROM conversation_projects_visible($1, $2))",
    );
    format!(
        "m.org_id = (SELECT c.org_id FROM conversations c WHERE c.id = $2 AND c.user_id = $1)
       AND (m.tier = 'org'
            OR (m.tier = 'project'
                AND m.project_id IN (SELECT project_id FROM conversation_projects_visible($1, $2))
                AND (m.author_user_id = $1 OR NOT any_document_narrowed(m.source_document_ids)))
            OR (m.tier = 'user' AND m.user_id = $1))
       AND {provenance}"
    )
}

/// What a prompt starts from ([`prompt_start`]).
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct PromptStart {
    /// The conversation's summary, when there is one the user may still be given.
    pub summary: Option<String>,
    /// What the summary drew on.
    #[sqlx(flatten)]
    pub provenance: Provenance,
    /// A summary exists but drew on a source the user can no longer see (or outside the
    /// conversation's narrowing): it is withheld, and should be rebuilt without it.
    pub summary_hidden: bool,
    /// Whether the user has any memory entry a prompt of this conversation could carry (a
    /// cheap check that spares the embedding call when there is none).
    pub any_entry: bool,
}

/// What a prompt starts from, in one round trip: the conversation's summary (only while
/// everything it drew on is visible, see [`PromptStart`]) and whether any entry is visible.
pub async fn prompt_start(
    conn: &mut PgConnection,
    user_id: Uuid,
    conversation_id: Uuid,
) -> Result<PromptStart, StoreError> {
    let visible = visible_sql(
        "s",
        "$1",
        "ARRAY(SELECT project_id FROM conversation_projects_visible($1, $2))",
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT CASE WHEN v.visible THEN v.summary END AS summary,
                coalesce(v.source_project_ids, '{{}}') AS source_project_ids,
                coalesce(v.source_document_ids, '{{}}') AS source_document_ids,
                coalesce(v.narrow, false) AS narrow,
                coalesce(NOT v.visible, false) AS summary_hidden,
                EXISTS (SELECT 1 FROM conversation_memories m WHERE {}) AS any_entry
         FROM (SELECT 1) one
         LEFT JOIN (SELECT s.summary, s.source_project_ids, s.source_document_ids, s.narrow,
                           {visible} AS visible
                    FROM conversation_summaries s WHERE s.conversation_id = $2) v ON true",
        visible_to()
    )))
    .bind(user_id)
    .bind(conversation_id)
    .fetch_one(conn)
    .await?)
}

/// Forget a summary that drew on a source its user can no longer see (still true now): it
/// starts over from the first message, and the next fold rebuilds it without what the user may
/// no longer be given ([`messages_to_fold`]). A fold in flight finds its compare-and-set
/// refused. True when it was reset.
pub async fn reset_hidden_summary(
    conn: &mut PgConnection,
    user_id: Uuid,
    conversation_id: Uuid,
) -> Result<bool, StoreError> {
    let visible = visible_sql(
        "s",
        "$1",
        "ARRAY(SELECT project_id FROM conversation_projects_visible($1, $2))",
    );
    let done = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE conversation_summaries s
            SET summary = '', summarized_up_to = 0, source_project_ids = '{{}}',
                source_document_ids = '{{}}', narrow = false, updated_at = now()
          WHERE s.conversation_id = $2 AND NOT {visible}"
    )))
    .bind(user_id)
    .bind(conversation_id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The entries a prompt for `user_id` in `conversation_id` may carry, most relevant first:
/// by cosine distance to `query` (an embedding by `model`) when given, then most recently
/// updated. At most `limit` (the caller then fits them into its token budget).
pub async fn for_prompt(
    conn: &mut PgConnection,
    user_id: Uuid,
    conversation_id: Uuid,
    query: Option<(&str, &[f32])>,
    limit: i64,
) -> Result<Vec<PromptEntry>, StoreError> {
    let (model, dim, vector) = match query {
        Some((model, v)) => (
            Some(model),
            Some(i32::try_from(v.len()).unwrap_or(i32::MAX)),
            Some(pgvector::Vector::from(v.to_vec())),
        ),
        None => (None, None, None),
    };
    Ok(
        sqlx::query_as::<_, PromptEntry>(sqlx::AssertSqlSafe(format!(
            "SELECT m.id, m.tier, m.project_id, m.content, m.source_project_ids,
                m.source_document_ids, m.narrow,
                CASE WHEN $3::vector IS NOT NULL AND m.dim = $4 AND m.model = $5
                     THEN m.embedding <=> $3 END AS distance
         FROM conversation_memories m
         WHERE {}
         ORDER BY distance ASC NULLS LAST, m.updated_at DESC, m.id DESC
         LIMIT $6",
            visible_to()
        )))
        .bind(user_id)
        .bind(conversation_id)
        .bind(vector)
        .bind(dim)
        .bind(model)
        .bind(limit)
        .fetch_all(conn)
        .await?,
    )
}

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

/// Record that the `remember` run for assistant message `message_id` stored `facts` facts;
/// false when a run had already recorded it (the caller then rolls back).
pub async fn record_extraction(
    conn: &mut PgConnection,
    message_id: Uuid,
    facts: i32,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "INSERT INTO memory_extractions (message_id, facts) VALUES ($1, $2)
         ON CONFLICT (message_id) DO NOTHING",
    )
    .bind(message_id)
    .bind(facts)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Whether the exchange closed by `message_id` was already learnt from.
pub async fn extracted(conn: &mut PgConnection, message_id: Uuid) -> Result<bool, StoreError> {
    Ok(
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM memory_extractions WHERE message_id = $1)",
        )
        .bind(message_id)
        .fetch_one(conn)
        .await?,
    )
}

/// Names of the projects the conversation may draw on for its user right now (the remember
/// prompt offers them as project-tier targets).
pub async fn usable_project_names(
    conn: &mut PgConnection,
    user_id: Uuid,
    conversation_id: Uuid,
) -> Result<Vec<(Uuid, String)>, StoreError> {
    Ok(sqlx::query_as::<_, (Uuid, String)>(
        "SELECT p.id, p.name FROM projects p
         WHERE p.id IN (SELECT project_id FROM conversation_projects_visible($1, $2))
         ORDER BY p.name, p.id LIMIT 50",
    )
    .bind(user_id)
    .bind(conversation_id)
    .fetch_all(conn)
    .await?)
}
