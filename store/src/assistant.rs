//! What the assistant's tools read: project data of one conversation, for its owner, through
//! `conversation_projects_visible(user, conversation)` — live visibility ∩ the conversation's
//! narrowing, evaluated in SQL at query time. Anything outside it answers `None` / nothing,
//! exactly like something that does not exist.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::tasks::Task;
use crate::types::{ConversationId, OrgId, ProjectId, TaskId, UserId};
use crate::{StoreError, TaskStatus, Visibility};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ProjectSummary {
    pub id: ProjectId,
    pub name: String,
    pub description: String,
    pub visibility: Visibility,
}

const TASK_COLS: &str = "t.id, t.project_id, t.title, t.description, t.status, t.assignee_id, \
     t.created_by, t.created_at, t.updated_at";

/// Statements here only splice in the constant column list above, never input.
fn sql(s: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(s)
}

/// The projects the conversation may draw on, by name (at most `limit`).
pub async fn projects(
    conn: &mut PgConnection,
    user_id: UserId,
    conversation_id: ConversationId,
    limit: i64,
) -> Result<Vec<ProjectSummary>, StoreError> {
    Ok(sqlx::query_as::<_, ProjectSummary>(
        "SELECT p.id, p.name, p.description, p.visibility
         FROM projects p
         JOIN conversation_projects_visible($1, $2) v ON v.project_id = p.id
         ORDER BY p.name, p.id LIMIT $3",
    )
    .bind(user_id)
    .bind(conversation_id)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// One project the conversation may draw on, with its org.
pub async fn project(
    conn: &mut PgConnection,
    user_id: UserId,
    conversation_id: ConversationId,
    project_id: ProjectId,
) -> Result<Option<(ProjectSummary, OrgId)>, StoreError> {
    let row = sqlx::query_as::<_, (ProjectId, String, String, Visibility, OrgId)>(
        "SELECT p.id, p.name, p.description, p.visibility, p.org_id
         FROM projects p
         JOIN conversation_projects_visible($1, $2) v ON v.project_id = p.id
         WHERE p.id = $3",
    )
    .bind(user_id)
    .bind(conversation_id)
    .bind(project_id)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(id, name, description, visibility, org)| {
        (
            ProjectSummary {
                id,
                name,
                description,
                visibility,
            },
            org,
        )
    }))
}

/// Tasks of one project the conversation may draw on (none for any other), oldest first.
pub async fn tasks(
    conn: &mut PgConnection,
    user_id: UserId,
    conversation_id: ConversationId,
    project_id: ProjectId,
    status: Option<TaskStatus>,
    limit: i64,
) -> Result<Vec<Task>, StoreError> {
    Ok(sqlx::query_as::<_, Task>(sql(format!(
        "SELECT {TASK_COLS} FROM tasks t
         JOIN conversation_projects_visible($1, $2) v ON v.project_id = t.project_id
         WHERE t.project_id = $3 AND ($4::text IS NULL OR t.status = $4)
         ORDER BY t.created_at, t.id LIMIT $5"
    )))
    .bind(user_id)
    .bind(conversation_id)
    .bind(project_id)
    .bind(status)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// One task of a project the conversation may draw on.
pub async fn task(
    conn: &mut PgConnection,
    user_id: UserId,
    conversation_id: ConversationId,
    task_id: TaskId,
) -> Result<Option<Task>, StoreError> {
    Ok(sqlx::query_as::<_, Task>(sql(format!(
        "SELECT {TASK_COLS} FROM tasks t
         JOIN conversation_projects_visible($1, $2) v ON v.project_id = t.project_id
         WHERE t.id = $3"
    )))
    .bind(user_id)
    .bind(conversation_id)
    .bind(task_id)
    .fetch_optional(conn)
    .await?)
}

/// A hit of the interim full-text search.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SearchHit {
    /// `project` or `task`.
    pub kind: String,
    pub id: Uuid,
    pub project_id: ProjectId,
    pub title: String,
    pub snippet: String,
    pub updated_at: DateTime<Utc>,
}

/// Full-text search over the projects and tasks the conversation may draw on
/// (`to_tsvector(title || ' ' || description) @@ websearch_to_tsquery(query)`, English
/// configuration), best first. The interim backend of `search_knowledge` until the retrieval
/// index serves it.
pub async fn search(
    conn: &mut PgConnection,
    user_id: UserId,
    conversation_id: ConversationId,
    query: &str,
    limit: i64,
) -> Result<Vec<SearchHit>, StoreError> {
    Ok(sqlx::query_as::<_, SearchHit>(
        "WITH visible AS (SELECT project_id FROM conversation_projects_visible($1, $2)),
              q AS (SELECT websearch_to_tsquery('english', $3) AS q),
              hits AS (
                SELECT 'project' AS kind, p.id, p.id AS project_id, p.name AS title,
                       left(p.description, 300) AS snippet, p.updated_at,
                       ts_rank(to_tsvector('english', p.name || ' ' || p.description), q.q) AS rank
                FROM projects p JOIN visible v ON v.project_id = p.id, q
                WHERE to_tsvector('english', p.name || ' ' || p.description) @@ q.q
                UNION ALL
                SELECT 'task', t.id, t.project_id, t.title, left(t.description, 300),
                       t.updated_at,
                       ts_rank(to_tsvector('english', t.title || ' ' || t.description), q.q)
                FROM tasks t JOIN visible v ON v.project_id = t.project_id, q
                WHERE to_tsvector('english', t.title || ' ' || t.description) @@ q.q
              )
         SELECT kind, id, project_id, title, snippet, updated_at FROM hits
         ORDER BY rank DESC, updated_at DESC, id LIMIT $4",
    )
    .bind(user_id)
    .bind(conversation_id)
    .bind(query)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// A user's display name, if they are a member of `org_id` who can see `project_id` (the
/// rule for assignees, as the task API applies it).
pub async fn assignable(
    conn: &mut PgConnection,
    org_id: OrgId,
    project_id: ProjectId,
    user_id: UserId,
) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT u.name FROM users u
         JOIN org_memberships m ON m.user_id = u.id AND m.org_id = $1
         WHERE u.id = $3 AND can_see_project($3, $2)",
    )
    .bind(org_id)
    .bind(project_id)
    .bind(user_id)
    .fetch_optional(conn)
    .await?)
}

/// A user's display name within an org (for summaries).
pub async fn member_name(
    conn: &mut PgConnection,
    org_id: OrgId,
    user_id: UserId,
) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT u.name FROM users u
         JOIN org_memberships m ON m.user_id = u.id AND m.org_id = $1
         WHERE u.id = $2",
    )
    .bind(org_id)
    .bind(user_id)
    .fetch_optional(conn)
    .await?)
}
