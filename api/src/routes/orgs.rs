//! `POST`/`GET /v1/orgs/{org_id}/members`, `PATCH`/`DELETE /v1/orgs/{org_id}/members/{user_id}`,
//! `POST`/`GET /v1/orgs/{org_id}/teams`. Changes: owners and admins only; lists: any member.
//! Another org's id answers 404.

use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use serde::Deserialize;
use store::Role;
use uuid::Uuid;

use super::Tag;
use crate::auth::{BearerAuth, Caller};
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::pagination::PageRequest;
use crate::state::AppState;
use crate::validate;
use crate::views::{MemberView, RoleName, TeamView};

pub struct OrgsApi {
    pub state: AppState,
}

#[derive(Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct NewMember {
    email: String,
    /// 8 to 256 characters.
    password: String,
    name: String,
    /// `owner` can only be granted by an owner.
    role: RoleName,
}

#[derive(Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct RoleChange {
    role: RoleName,
}

#[derive(Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct NewTeam {
    name: String,
}

#[derive(Object)]
pub struct MemberPage {
    items: Vec<MemberView>,
    /// Pass as `?cursor=` for the next page; null on the last page.
    #[oai(nullable)]
    next_cursor: Option<String>,
}

#[derive(Object)]
pub struct TeamPage {
    items: Vec<TeamView>,
    /// Pass as `?cursor=` for the next page; null on the last page.
    #[oai(nullable)]
    next_cursor: Option<String>,
}

#[derive(ApiResponse)]
pub enum MemberCreated {
    /// The new user, a member of the org.
    #[oai(status = 201)]
    Created(Json<MemberView>),
}

#[derive(ApiResponse)]
pub enum TeamCreated {
    #[oai(status = 201)]
    Created(Json<TeamView>),
}

#[derive(ApiResponse)]
pub enum Removed {
    #[oai(status = 204)]
    NoContent,
}

/// Only owners may grant, change or remove the owner role.
fn check_role_power(caller: &Caller, role: Role) -> Result<(), ApiError> {
    if role == Role::Owner && caller.role != Role::Owner {
        return Err(ApiError::Forbidden(
            "only owners may grant or change the owner role".into(),
        ));
    }
    Ok(())
}

/// The caller with their role as of now (inside the transaction); 403 if no longer an admin.
async fn fresh_role(tx: &mut sqlx::PgConnection, caller: Caller) -> Result<Caller, ApiError> {
    let role = store::tenancy::lock_member_role(tx, caller.org_id.into(), caller.user_id.into())
        .await?
        .ok_or(ApiError::Unauthorized)?;
    let caller = Caller { role, ..caller };
    caller.require_admin()?;
    Ok(caller)
}

/// Lock what a change to member `user_id` depends on, in the one lock order: the org's owners,
/// then the caller's own role (role changes of an org serialise on its owner rows; 403 if no
/// longer an admin), then the member's (404 if not a member; 403 if only an owner may touch
/// them). Returns the caller as of now, the member's current role and the number of owners.
async fn lock_member(
    tx: &mut sqlx::PgConnection,
    caller: Caller,
    user_id: Uuid,
) -> Result<(Caller, Role, i64), ApiError> {
    let owners = store::tenancy::lock_owners(tx, caller.org_id.into()).await?;
    let caller = fresh_role(tx, caller).await?;
    let current = store::tenancy::lock_member_role(tx, caller.org_id.into(), user_id.into())
        .await?
        .ok_or(ApiError::NotFound)?;
    check_role_power(&caller, current)?;
    Ok((caller, current, owners))
}

/// The answer to a change that would leave the org without an owner.
fn last_owner() -> ApiError {
    ApiError::Conflict("the organization must keep at least one owner".into())
}

/// A member of the org, as answered.
fn member_view(user: store::tenancy::User, role: Role, org_id: Uuid) -> MemberView {
    MemberView {
        id: user.id.into(),
        email: user.email,
        name: user.name,
        role: role.into(),
        org_id,
        created_at: user.created_at,
    }
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Organizations")]
impl OrgsApi {
    /// Create a user as a member of this org (owners and admins).
    #[oai(path = "/orgs/:org_id/members", method = "post")]
    async fn add_member(
        &self,
        auth: BearerAuth,
        org_id: Path<Uuid>,
        body: JsonBody<NewMember>,
    ) -> Result<MemberCreated, ApiError> {
        let caller = auth.0;
        caller.require_org(org_id.0)?;
        caller.require_admin()?;
        let req = body.0;
        let email = validate::email("email", &req.email)?;
        validate::password("password", &req.password)?;
        let name = validate::text("name", &req.name, 200)?;
        let role: Role = req.role.into();
        check_role_power(&caller, role)?;
        let hash = self.state.hasher.hash(req.password).await?;
        let mut tx = self.state.db.begin().await?;
        let user = store::tenancy::insert_user(&mut tx, &email, &name, &hash).await?;
        store::tenancy::insert_membership(&mut tx, caller.org_id.into(), user.id, role).await?;
        tx.commit().await?;
        Ok(MemberCreated::Created(Json(member_view(
            user,
            role,
            caller.org_id,
        ))))
    }

    /// Change a member's role (owners and admins; owner role: owners only; the last owner
    /// stays).
    #[oai(path = "/orgs/:org_id/members/:user_id", method = "patch")]
    async fn change_role(
        &self,
        auth: BearerAuth,
        org_id: Path<Uuid>,
        user_id: Path<Uuid>,
        body: JsonBody<RoleChange>,
    ) -> Result<Json<MemberView>, ApiError> {
        let caller = auth.0;
        caller.require_org(org_id.0)?;
        caller.require_admin()?;
        let role: Role = body.0.role.into();
        let mut tx = self.state.db.begin().await?;
        let (caller, current, owners) = lock_member(&mut tx, caller, user_id.0).await?;
        check_role_power(&caller, role)?;
        if current == Role::Owner && role != Role::Owner && owners <= 1 {
            return Err(last_owner());
        }
        store::tenancy::set_role(&mut *tx, caller.org_id.into(), user_id.0.into(), role).await?;
        tx.commit().await?;
        let user = store::tenancy::get_user(&self.state.db, user_id.0.into())
            .await?
            .ok_or(ApiError::NotFound)?;
        Ok(Json(member_view(user, role, caller.org_id)))
    }

    /// Remove a member from the org (and so from its teams and projects); their tokens stop
    /// working at once.
    #[oai(path = "/orgs/:org_id/members/:user_id", method = "delete")]
    async fn remove_member(
        &self,
        auth: BearerAuth,
        org_id: Path<Uuid>,
        user_id: Path<Uuid>,
    ) -> Result<Removed, ApiError> {
        let caller = auth.0;
        caller.require_org(org_id.0)?;
        caller.require_admin()?;
        let mut tx = self.state.db.begin().await?;
        let (caller, current, owners) = lock_member(&mut tx, caller, user_id.0).await?;
        if current == Role::Owner && owners <= 1 {
            return Err(last_owner());
        }
        if !store::tenancy::remove_member(&mut *tx, caller.org_id.into(), user_id.0.into()).await? {
            return Err(ApiError::NotFound);
        }
        tx.commit().await?;
        Ok(Removed::NoContent)
    }

    /// Create a team in this org (owners and admins).
    #[oai(path = "/orgs/:org_id/teams", method = "post")]
    async fn create_team(
        &self,
        auth: BearerAuth,
        org_id: Path<Uuid>,
        body: JsonBody<NewTeam>,
    ) -> Result<TeamCreated, ApiError> {
        let caller = auth.0;
        caller.require_org(org_id.0)?;
        caller.require_admin()?;
        let name = validate::text("name", &body.0.name, 200)?;
        let mut conn = self.state.db.acquire().await?;
        let team = store::tenancy::insert_team(&mut conn, caller.org_id.into(), &name).await?;
        Ok(TeamCreated::Created(Json(team.into())))
    }

    /// The members of the org (any member may list them), in joining order.
    #[oai(path = "/orgs/:org_id/members", method = "get")]
    async fn list_members(
        &self,
        auth: BearerAuth,
        org_id: Path<Uuid>,
        /// Page size, 1 to 200 (default 50).
        limit: Query<Option<i64>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<Json<MemberPage>, ApiError> {
        let caller = auth.0;
        caller.require_org(org_id.0)?;
        let page = PageRequest::parse(limit.0, cursor.0.as_deref())?;
        let rows = store::tenancy::list_members(
            &self.state.db,
            caller.org_id.into(),
            page.after,
            page.fetch(),
        )
        .await?;
        let (rows, next_cursor) = page.finish(rows, |m| (m.joined_at, m.id.into()));
        Ok(Json(MemberPage {
            items: rows
                .into_iter()
                .map(|m| MemberView {
                    id: m.id.into(),
                    email: m.email,
                    name: m.name,
                    role: m.role.into(),
                    org_id: caller.org_id,
                    created_at: m.created_at,
                })
                .collect(),
            next_cursor,
        }))
    }

    /// The teams of the org (any member may list them), oldest first.
    #[oai(path = "/orgs/:org_id/teams", method = "get")]
    async fn list_teams(
        &self,
        auth: BearerAuth,
        org_id: Path<Uuid>,
        /// Page size, 1 to 200 (default 50).
        limit: Query<Option<i64>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<Json<TeamPage>, ApiError> {
        let caller = auth.0;
        caller.require_org(org_id.0)?;
        let page = PageRequest::parse(limit.0, cursor.0.as_deref())?;
        let rows = store::tenancy::list_teams(
            &self.state.db,
            caller.org_id.into(),
            page.after,
            page.fetch(),
        )
        .await?;
        let (rows, next_cursor) = page.finish(rows, |t| (t.created_at, t.id.into()));
        Ok(Json(TeamPage {
            items: rows.into_iter().map(Into::into).collect(),
            next_cursor,
        }))
    }
}
