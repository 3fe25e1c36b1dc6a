//! Conversation memory (docs/ARCHITECTURE.md, "Memory"): running summaries and the
//! hierarchical memory entries.
//!
//! Nothing here is reachable from a user-facing endpoint: the chat worker reads it into
//! prompts, the memory jobs write it, operators manage it with `worker memory`.
//!
//! - Summaries: [`claim_summary`] (a lease on the summary row, nothing locked) →
//!   [`messages_to_fold`] → the model call, holding no connection → [`save_summary`], a
//!   compare-and-set on `summarized_up_to` that also ends the lease; so two summarize runs
//!   never fold a message twice or lose one, and only one calls the model at a time.
//! - Entries: [`insert`] locks the owner (advisory transaction lock), refreshes a
//!   near-duplicate or inserts, then trims the owner's entries to the tier's capacity — in the
//!   caller's transaction, so concurrent inserts of one owner never leave more than capacity.
//! - Prompt reads: [`for_prompt`] filters by the user's visibility in SQL at query time.

mod prompt;
mod summary;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::StoreError;
use crate::error::OnConstraint;
use crate::provenance::Provenance;

pub use prompt::{PromptEntry, PromptStart, for_prompt, prompt_start, reset_hidden_summary};
pub use summary::{
    ExpiredFold, FoldMessage, Summary, SummaryClaim, claim_summary, expired_folds,
    messages_to_fold, recover_fold, release_summary, save_summary, summary,
    unsummarized_beyond_window,
};

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
