//! Project tasks. Every read and write goes through `visible_projects(user)`.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::outbox::SourceKind;
use crate::projects::Cursor;
use crate::types::{OrgId, ProjectId, TaskId, UserId};
use crate::{StoreError, TaskStatus};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Task {
    pub id: TaskId,
    pub project_id: ProjectId,
    pub title: String,
    pub description: String,
    pub status: TaskStatus,
    pub assignee_id: Option<UserId>,
    pub created_by: Option<UserId>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub struct NewTask<'a> {
    pub org_id: OrgId,
    pub project_id: ProjectId,
    pub created_by: UserId,
    pub title: &'a str,
    pub description: &'a str,
    pub status: TaskStatus,
    pub assignee_id: Option<UserId>,
}

/// A partial update: `None` leaves a field as it is; `assignee_id: Some(None)` unassigns.
#[derive(Debug, Default)]
pub struct TaskPatch {
    pub title: Option<String>,
    pub description: Option<String>,
    pub status: Option<TaskStatus>,
    pub assignee_id: Option<Option<UserId>>,
}

const ASSIGNEE_INVALID: StoreError = StoreError::InvalidReference {
    field: "assignee_id",
    message: "does not name a member of this organization who can see the project",
};

/// An assignee must be able to see the project (which implies being a member of its org).
async fn check_assignee(
    conn: &mut PgConnection,
    project_id: ProjectId,
    assignee: Option<UserId>,
) -> Result<(), StoreError> {
    if let Some(user) = assignee
        && !crate::projects::can_see(conn, user, project_id).await?
    {
        return Err(ASSIGNEE_INVALID);
    }
    Ok(())
}

/// Insert a task. The caller has checked that the creator sees the project; the assignee is
/// checked here. Writes the indexing outbox row in the caller's transaction.
pub async fn insert_task(conn: &mut PgConnection, new: &NewTask<'_>) -> Result<Task, StoreError> {
    check_assignee(&mut *conn, new.project_id, new.assignee_id).await?;
    let task = sqlx::query_as::<_, Task>(
        "INSERT INTO tasks (id, org_id, project_id, title, description, status, assignee_id,
                            created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         RETURNING id, project_id, title, description, status, assignee_id, created_by,
                   created_at, updated_at",
    )
    .bind(TaskId::new_v7())
    .bind(new.org_id)
    .bind(new.project_id)
    .bind(new.title)
    .bind(new.description)
    .bind(new.status)
    .bind(new.assignee_id)
    .bind(new.created_by)
    .fetch_one(&mut *conn)
    .await?;
    crate::outbox::record(conn, new.org_id, SourceKind::Task, task.id.into()).await?;
    Ok(task)
}

/// Tasks of a project `user_id` can see (empty for a project they cannot see), oldest first.
pub async fn list_visible(
    conn: &mut PgConnection,
    user_id: UserId,
    project_id: ProjectId,
    after: Option<Cursor>,
    limit: i64,
) -> Result<Vec<Task>, StoreError> {
    let rows = sqlx::query_as::<_, Task>(
        "SELECT t.id, t.project_id, t.title, t.description, t.status, t.assignee_id,
                t.created_by, t.created_at, t.updated_at
         FROM tasks t
         JOIN visible_projects($1) v ON v.project_id = t.project_id
         WHERE t.project_id = $2
           AND ($3::timestamptz IS NULL OR (t.created_at, t.id) > ($3, $4))
         ORDER BY t.created_at, t.id
         LIMIT $5",
    )
    .bind(user_id)
    .bind(project_id)
    .bind(after.map(|c| c.0))
    .bind(after.map(|c| c.1))
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(rows)
}

/// The task if `user_id` can see its project; `None` for missing, other-org and hidden alike.
/// With `lock`, the row is locked for update until the caller's transaction ends.
pub async fn get_visible(
    conn: &mut PgConnection,
    user_id: UserId,
    task_id: TaskId,
    lock: bool,
) -> Result<Option<Task>, StoreError> {
    let sql = if lock {
        "SELECT t.id, t.project_id, t.title, t.description, t.status, t.assignee_id,
                t.created_by, t.created_at, t.updated_at
         FROM tasks t
         WHERE t.id = $2 AND t.project_id IN (SELECT project_id FROM visible_projects($1))
         FOR UPDATE OF t"
    } else {
        "SELECT t.id, t.project_id, t.title, t.description, t.status, t.assignee_id,
                t.created_by, t.created_at, t.updated_at
         FROM tasks t
         WHERE t.id = $2 AND t.project_id IN (SELECT project_id FROM visible_projects($1))"
    };
    let row = sqlx::query_as::<_, Task>(sql)
        .bind(user_id)
        .bind(task_id)
        .fetch_optional(conn)
        .await?;
    Ok(row)
}

/// Apply `patch` to a task `user_id` can see. Run it in a transaction: the task row is locked
/// while the new assignee is checked, and the indexing outbox row commits with the change.
/// `None` when the task is not visible.
pub async fn update_visible(
    conn: &mut PgConnection,
    user_id: UserId,
    task_id: TaskId,
    patch: &TaskPatch,
) -> Result<Option<Task>, StoreError> {
    let Some(task) = get_visible(&mut *conn, user_id, task_id, true).await? else {
        return Ok(None);
    };
    if let Some(assignee) = patch.assignee_id {
        check_assignee(&mut *conn, task.project_id, assignee).await?;
    }
    let row = sqlx::query_as::<_, Task>(
        "UPDATE tasks SET
            title = COALESCE($2, title),
            description = COALESCE($3, description),
            status = COALESCE($4, status),
            assignee_id = CASE WHEN $5 THEN $6 ELSE assignee_id END,
            updated_at = now()
         WHERE id = $1
         RETURNING id, project_id, title, description, status, assignee_id, created_by,
                   created_at, updated_at",
    )
    .bind(task.id)
    .bind(patch.title.as_deref())
    .bind(patch.description.as_deref())
    .bind(patch.status)
    .bind(patch.assignee_id.is_some())
    .bind(patch.assignee_id.flatten())
    .fetch_one(&mut *conn)
    .await?;
    let org_id = sqlx::query_scalar::<_, Uuid>("SELECT org_id FROM tasks WHERE id = $1")
        .bind(row.id)
        .fetch_one(&mut *conn)
        .await?;
    crate::outbox::record(conn, org_id.into(), SourceKind::Task, row.id.into_uuid()).await?;
    Ok(Some(row))
}
