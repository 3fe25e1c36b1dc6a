//! `POST /v1/teams/{team_id}/members`, `DELETE /v1/teams/{team_id}/members/{user_id}`.
//! Owners and admins only; a team of another org answers 404.

use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use serde::Deserialize;
use uuid::Uuid;

use super::Tag;
use crate::auth::BearerAuth;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::state::AppState;
use crate::views::TeamMemberView;

pub struct TeamsApi {
    pub state: AppState,
}

#[derive(Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct AddUser {
    /// A member of the same organization.
    user_id: Uuid,
}

#[derive(ApiResponse)]
pub enum MemberAdded {
    #[oai(status = 201)]
    Created(Json<TeamMemberView>),
}

#[derive(ApiResponse)]
pub enum MemberRemoved {
    #[oai(status = 204)]
    NoContent,
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Organizations")]
impl TeamsApi {
    /// Add a member of the org to the team (owners and admins).
    #[oai(path = "/teams/:team_id/members", method = "post")]
    async fn add_member(
        &self,
        auth: BearerAuth,
        team_id: Path<Uuid>,
        body: JsonBody<AddUser>,
    ) -> Result<MemberAdded, ApiError> {
        let caller = auth.0;
        let team = store::tenancy::get_team(&self.state.db, caller.org_id.into(), team_id.0.into())
            .await?
            .ok_or(ApiError::NotFound)?;
        caller.require_admin()?;
        let user_id = body.0.user_id;
        store::tenancy::add_team_member(&self.state.db, team.org_id, team.id, user_id.into())
            .await?;
        Ok(MemberAdded::Created(Json(TeamMemberView {
            team_id: team.id.into(),
            user_id,
        })))
    }

    /// Remove a user from the team (owners and admins); their access to the team's projects
    /// ends at once.
    #[oai(path = "/teams/:team_id/members/:user_id", method = "delete")]
    async fn remove_member(
        &self,
        auth: BearerAuth,
        team_id: Path<Uuid>,
        user_id: Path<Uuid>,
    ) -> Result<MemberRemoved, ApiError> {
        let caller = auth.0;
        let team = store::tenancy::get_team(&self.state.db, caller.org_id.into(), team_id.0.into())
            .await?
            .ok_or(ApiError::NotFound)?;
        caller.require_admin()?;
        if !store::tenancy::remove_team_member(
            &self.state.db,
            team.org_id,
            team.id,
            user_id.0.into(),
        )
        .await?
        {
            return Err(ApiError::NotFound);
        }
        Ok(MemberRemoved::NoContent)
    }
}
