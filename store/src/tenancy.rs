//! Organizations, users, org memberships and teams.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor, PgPool};

use crate::error::OnConstraint;
use crate::types::{OrgId, TeamId, UserId};
use crate::{Role, StoreError};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Org {
    pub id: OrgId,
    pub name: String,
    pub model: Option<String>,
    pub fallback_model: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct User {
    pub id: UserId,
    pub email: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// What login needs: the hash to verify and the org the token will name.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LoginRecord {
    pub user_id: UserId,
    pub org_id: OrgId,
    pub password_hash: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Team {
    pub id: TeamId,
    pub org_id: OrgId,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

pub async fn insert_org(conn: &mut PgConnection, name: &str) -> Result<Org, StoreError> {
    let org = sqlx::query_as::<_, Org>(
        "INSERT INTO organizations (id, name) VALUES ($1, $2)
         RETURNING id, name, model, fallback_model, created_at",
    )
    .bind(OrgId::new_v7())
    .bind(name)
    .fetch_one(conn)
    .await?;
    Ok(org)
}

/// Insert a user; an email already registered (case-insensitively) is a conflict.
pub async fn insert_user(
    conn: &mut PgConnection,
    email: &str,
    name: &str,
    password_hash: &str,
) -> Result<User, StoreError> {
    sqlx::query_as::<_, User>(
        "INSERT INTO users (id, email, name, password_hash) VALUES ($1, $2, $3, $4)
         RETURNING id, email, name, created_at",
    )
    .bind(UserId::new_v7())
    .bind(email)
    .bind(name)
    .bind(password_hash)
    .fetch_one(conn)
    .await
    .on_constraint(
        "users_email_key",
        StoreError::Conflict {
            message: "email is already registered",
        },
    )
}

/// Make `user_id` a member of `org_id` with `role` (v1: a user has exactly one org).
pub async fn insert_membership(
    conn: &mut PgConnection,
    org_id: OrgId,
    user_id: UserId,
    role: Role,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO org_memberships (org_id, user_id, role) VALUES ($1, $2, $3)")
        .bind(org_id)
        .bind(user_id)
        .bind(role)
        .execute(conn)
        .await
        .on_constraint(
            "org_memberships_one_org_per_user",
            StoreError::Conflict {
                message: "the user already belongs to an organization",
            },
        )
        .on_constraint(
            "org_memberships_pkey",
            StoreError::Conflict {
                message: "the user is already a member",
            },
        )?;
    Ok(())
}

/// The login record of the user with this email (case-insensitive), if any.
pub async fn find_login(pool: &PgPool, email: &str) -> Result<Option<LoginRecord>, StoreError> {
    let row = sqlx::query_as::<_, LoginRecord>(
        "SELECT u.id AS user_id, m.org_id, u.password_hash
         FROM users u JOIN org_memberships m ON m.user_id = u.id
         WHERE lower(u.email) = lower($1)
         ORDER BY m.created_at
         LIMIT 1",
    )
    .bind(email)
    .fetch_optional(pool)
    .await?;
    Ok(row)
}

pub async fn get_user(pool: &PgPool, id: UserId) -> Result<Option<User>, StoreError> {
    let row =
        sqlx::query_as::<_, User>("SELECT id, email, name, created_at FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    Ok(row)
}

/// The user with this email (case-insensitive) and their org, if they have one.
pub async fn find_user_by_email(
    pool: &PgPool,
    email: &str,
) -> Result<Option<(User, OrgId)>, StoreError> {
    let row = sqlx::query_as::<_, (UserId, String, String, DateTime<Utc>, OrgId)>(
        "SELECT u.id, u.email, u.name, u.created_at, m.org_id
         FROM users u JOIN org_memberships m ON m.user_id = u.id
         WHERE lower(u.email) = lower($1)
         ORDER BY m.created_at LIMIT 1",
    )
    .bind(email)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(id, email, name, created_at, org)| {
        (
            User {
                id,
                email,
                name,
                created_at,
            },
            org,
        )
    }))
}

pub async fn get_org(pool: &PgPool, id: OrgId) -> Result<Option<Org>, StoreError> {
    let row = sqlx::query_as::<_, Org>(
        "SELECT id, name, model, fallback_model, created_at FROM organizations WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row)
}

/// The role of `user_id` in `org_id`, or `None` when they are not (or no longer) a member.
pub async fn member_role(
    pool: &PgPool,
    org_id: OrgId,
    user_id: UserId,
) -> Result<Option<Role>, StoreError> {
    let role = sqlx::query_scalar::<_, Role>(
        "SELECT role FROM org_memberships WHERE org_id = $1 AND user_id = $2",
    )
    .bind(org_id)
    .bind(user_id)
    .fetch_optional(pool)
    .await?;
    Ok(role)
}

/// Change a member's role; false when they are not a member.
pub async fn set_role(
    exec: impl PgExecutor<'_>,
    org_id: OrgId,
    user_id: UserId,
    role: Role,
) -> Result<bool, StoreError> {
    let done =
        sqlx::query("UPDATE org_memberships SET role = $3 WHERE org_id = $1 AND user_id = $2")
            .bind(org_id)
            .bind(user_id)
            .bind(role)
            .execute(exec)
            .await?;
    Ok(done.rows_affected() == 1)
}

/// Remove a member from the org (and, by cascade, from its teams and projects).
pub async fn remove_member(
    exec: impl PgExecutor<'_>,
    org_id: OrgId,
    user_id: UserId,
) -> Result<bool, StoreError> {
    let done = sqlx::query("DELETE FROM org_memberships WHERE org_id = $1 AND user_id = $2")
        .bind(org_id)
        .bind(user_id)
        .execute(exec)
        .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn insert_team(
    conn: &mut PgConnection,
    org_id: OrgId,
    name: &str,
) -> Result<Team, StoreError> {
    sqlx::query_as::<_, Team>(
        "INSERT INTO teams (id, org_id, name) VALUES ($1, $2, $3)
         RETURNING id, org_id, name, created_at",
    )
    .bind(TeamId::new_v7())
    .bind(org_id)
    .bind(name)
    .fetch_one(conn)
    .await
    .on_constraint(
        "teams_org_name_key",
        StoreError::Conflict {
            message: "a team with this name already exists",
        },
    )
}

/// A team of `org_id` (a team of another org is `None`, like a missing one).
pub async fn get_team(
    pool: &PgPool,
    org_id: OrgId,
    team_id: TeamId,
) -> Result<Option<Team>, StoreError> {
    let row = sqlx::query_as::<_, Team>(
        "SELECT id, org_id, name, created_at FROM teams WHERE id = $1 AND org_id = $2",
    )
    .bind(team_id)
    .bind(org_id)
    .fetch_optional(pool)
    .await?;
    Ok(row)
}

/// Add a member of the team's org to the team.
pub async fn add_team_member(
    pool: &PgPool,
    org_id: OrgId,
    team_id: TeamId,
    user_id: UserId,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO team_members (team_id, org_id, user_id) VALUES ($1, $2, $3)")
        .bind(team_id)
        .bind(org_id)
        .bind(user_id)
        .execute(pool)
        .await
        .on_constraint(
            "team_members_member_fkey",
            StoreError::InvalidReference {
                field: "user_id",
                message: "does not name a member of this organization",
            },
        )
        .on_constraint(
            "team_members_team_fkey",
            StoreError::InvalidReference {
                field: "team_id",
                message: "does not name a team of this organization",
            },
        )
        .on_constraint(
            "team_members_pkey",
            StoreError::Conflict {
                message: "the user is already a member of this team",
            },
        )?;
    Ok(())
}

/// Remove a user from a team; false when they were not in it.
pub async fn remove_team_member(
    pool: &PgPool,
    org_id: OrgId,
    team_id: TeamId,
    user_id: UserId,
) -> Result<bool, StoreError> {
    let done =
        sqlx::query("DELETE FROM team_members WHERE org_id = $1 AND team_id = $2 AND user_id = $3")
            .bind(org_id)
            .bind(team_id)
            .bind(user_id)
            .execute(pool)
            .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn is_team_member(
    pool: &PgPool,
    team_id: TeamId,
    user_id: UserId,
) -> Result<bool, StoreError> {
    let yes = sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM team_members WHERE team_id = $1 AND user_id = $2)",
    )
    .bind(team_id)
    .bind(user_id)
    .fetch_one(pool)
    .await?;
    Ok(yes)
}

/// Lock the org's owner memberships until the end of the caller's transaction and count them,
/// so that concurrent demotions or removals cannot leave an org without an owner.
pub async fn lock_owners(conn: &mut PgConnection, org_id: OrgId) -> Result<i64, StoreError> {
    let owners = sqlx::query_scalar::<_, UserId>(
        "SELECT user_id FROM org_memberships WHERE org_id = $1 AND role = 'owner' FOR UPDATE",
    )
    .bind(org_id)
    .fetch_all(conn)
    .await?;
    Ok(i64::try_from(owners.len()).unwrap_or(i64::MAX))
}

/// The role of `user_id` in `org_id`, locked until the end of the caller's transaction.
pub async fn lock_member_role(
    conn: &mut PgConnection,
    org_id: OrgId,
    user_id: UserId,
) -> Result<Option<Role>, StoreError> {
    let role = sqlx::query_scalar::<_, Role>(
        "SELECT role FROM org_memberships WHERE org_id = $1 AND user_id = $2 FOR UPDATE",
    )
    .bind(org_id)
    .bind(user_id)
    .fetch_optional(conn)
    .await?;
    Ok(role)
}

/// A member of an org, as listed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Member {
    pub id: UserId,
    pub email: String,
    pub name: String,
    pub role: Role,
    /// When they joined the org (the list's order).
    pub joined_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// The members of `org_id` in joining order, after `(joined_at, user id)`.
pub async fn list_members(
    pool: &PgPool,
    org_id: OrgId,
    after: Option<crate::projects::Cursor>,
    limit: i64,
) -> Result<Vec<Member>, StoreError> {
    let rows = sqlx::query_as::<_, Member>(
        "SELECT u.id, u.email, u.name, m.role, m.created_at AS joined_at, u.created_at
         FROM org_memberships m JOIN users u ON u.id = m.user_id
         WHERE m.org_id = $1
           AND ($2::timestamptz IS NULL OR (m.created_at, u.id) > ($2, $3))
         ORDER BY m.created_at, u.id
         LIMIT $4",
    )
    .bind(org_id)
    .bind(after.map(|c| c.0))
    .bind(after.map(|c| c.1))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// The teams of `org_id`, oldest first, after `cursor`.
pub async fn list_teams(
    pool: &PgPool,
    org_id: OrgId,
    after: Option<crate::projects::Cursor>,
    limit: i64,
) -> Result<Vec<Team>, StoreError> {
    let rows = sqlx::query_as::<_, Team>(
        "SELECT id, org_id, name, created_at FROM teams
         WHERE org_id = $1
           AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
         ORDER BY created_at, id
         LIMIT $4",
    )
    .bind(org_id)
    .bind(after.map(|c| c.0))
    .bind(after.map(|c| c.1))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}
