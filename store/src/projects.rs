//! Projects and project members. Every read goes through `visible_projects(user)`.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::error::OnConstraint;
use crate::outbox::SourceKind;
use crate::types::{OrgId, ProjectId, TeamId, UserId};
use crate::{StoreError, Visibility};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Project {
    pub id: ProjectId,
    pub org_id: OrgId,
    pub name: String,
    pub description: String,
    pub visibility: Visibility,
    pub team_id: Option<TeamId>,
    pub created_by: Option<UserId>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Position in a list ordered by `(created_at, id)`: the last row of the previous page.
pub type Cursor = (DateTime<Utc>, Uuid);

pub struct NewProject<'a> {
    pub org_id: OrgId,
    pub created_by: UserId,
    pub name: &'a str,
    pub description: &'a str,
    pub visibility: Visibility,
    pub team_id: Option<TeamId>,
}

/// Insert a project; the creator of a private project becomes its first member. Writes the
/// indexing outbox row in the caller's transaction.
pub async fn insert_project(
    conn: &mut PgConnection,
    new: &NewProject<'_>,
) -> Result<Project, StoreError> {
    let project = sqlx::query_as::<_, Project>(
        "INSERT INTO projects (id, org_id, name, description, visibility, team_id, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         RETURNING id, org_id, name, description, visibility, team_id, created_by,
                   created_at, updated_at",
    )
    .bind(ProjectId::new_v7())
    .bind(new.org_id)
    .bind(new.name)
    .bind(new.description)
    .bind(new.visibility)
    .bind(new.team_id)
    .bind(new.created_by)
    .fetch_one(&mut *conn)
    .await
    .on_constraint(
        "projects_team_fkey",
        StoreError::InvalidReference {
            field: "team_id",
            message: "does not name a team of this organization",
        },
    )
    .on_constraint(
        "projects_team_iff_team_visibility",
        StoreError::InvalidReference {
            field: "team_id",
            message: "is required with visibility \"team\" and not allowed otherwise",
        },
    )?;
    if new.visibility == Visibility::Private {
        add_member(&mut *conn, project.org_id, project.id, new.created_by).await?;
    }
    crate::outbox::record(
        &mut *conn,
        project.org_id,
        SourceKind::Project,
        project.id.into(),
    )
    .await?;
    Ok(project)
}

/// The projects `user_id` can see, oldest first, after `cursor`.
pub async fn list_visible(
    pool: &PgPool,
    user_id: UserId,
    after: Option<Cursor>,
    limit: i64,
) -> Result<Vec<Project>, StoreError> {
    let rows = sqlx::query_as::<_, Project>(
        "SELECT p.id, p.org_id, p.name, p.description, p.visibility, p.team_id, p.created_by,
                p.created_at, p.updated_at
         FROM projects p
         JOIN visible_projects($1) v ON v.project_id = p.id
         WHERE $2::timestamptz IS NULL OR (p.created_at, p.id) > ($2, $3)
         ORDER BY p.created_at, p.id
         LIMIT $4",
    )
    .bind(user_id)
    .bind(after.map(|c| c.0))
    .bind(after.map(|c| c.1))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// The project if `user_id` can see it; `None` for missing, other-org and hidden alike.
pub async fn get_visible(
    conn: &mut PgConnection,
    user_id: UserId,
    project_id: ProjectId,
) -> Result<Option<Project>, StoreError> {
    let row = sqlx::query_as::<_, Project>(
        "SELECT p.id, p.org_id, p.name, p.description, p.visibility, p.team_id, p.created_by,
                p.created_at, p.updated_at
         FROM projects p
         JOIN visible_projects($1) v ON v.project_id = p.id
         WHERE p.id = $2",
    )
    .bind(user_id)
    .bind(project_id)
    .fetch_optional(conn)
    .await?;
    Ok(row)
}

/// Can `user_id` see `project_id`? (The same rule, as a predicate.)
pub async fn can_see(
    conn: &mut PgConnection,
    user_id: UserId,
    project_id: ProjectId,
) -> Result<bool, StoreError> {
    let yes = sqlx::query_scalar::<_, bool>("SELECT can_see_project($1, $2)")
        .bind(user_id)
        .bind(project_id)
        .fetch_one(conn)
        .await?;
    Ok(yes)
}

/// Add a member of the project's org to the project.
pub async fn add_member(
    conn: &mut PgConnection,
    org_id: OrgId,
    project_id: ProjectId,
    user_id: UserId,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO project_members (project_id, org_id, user_id) VALUES ($1, $2, $3)")
        .bind(project_id)
        .bind(org_id)
        .bind(user_id)
        .execute(conn)
        .await
        .on_constraint(
            "project_members_member_fkey",
            StoreError::InvalidReference {
                field: "user_id",
                message: "does not name a member of this organization",
            },
        )
        .on_constraint(
            "project_members_pkey",
            StoreError::Conflict {
                message: "the user is already a member of this project",
            },
        )?;
    Ok(())
}

/// Remove a project member; false when they were not one.
pub async fn remove_member(
    conn: &mut PgConnection,
    project_id: ProjectId,
    user_id: UserId,
) -> Result<bool, StoreError> {
    let done = sqlx::query("DELETE FROM project_members WHERE project_id = $1 AND user_id = $2")
        .bind(project_id)
        .bind(user_id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}
