//! Projects: create, list and read (only visible ones), and the members of private projects.
//! A project the caller cannot see answers 404, exactly like a missing one.

use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use serde::Deserialize;
use store::Visibility;
use uuid::Uuid;

use super::Tag;
use crate::auth::BearerAuth;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::pagination::PageRequest;
use crate::state::AppState;
use crate::validate;
use crate::views::{ProjectMemberView, ProjectView, VisibilityName};

pub struct ProjectsApi {
    pub state: AppState,
}

#[derive(Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct NewProject {
    name: String,
    #[serde(default)]
    #[oai(nullable)]
    description: Option<String>,
    visibility: VisibilityName,
    /// Required with visibility `team` (a team of the caller's org), not allowed otherwise.
    #[serde(default)]
    #[oai(nullable)]
    team_id: Option<Uuid>,
}

#[derive(Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct AddProjectMember {
    /// A member of the same organization.
    user_id: Uuid,
}

#[derive(Object)]
pub struct ProjectPage {
    items: Vec<ProjectView>,
    /// Pass as `?cursor=` for the next page; null on the last page.
    #[oai(nullable)]
    next_cursor: Option<String>,
}

#[derive(ApiResponse)]
pub enum ProjectCreated {
    #[oai(status = 201)]
    Created(Json<ProjectView>),
}

#[derive(ApiResponse)]
pub enum MemberAdded {
    #[oai(status = 201)]
    Created(Json<ProjectMemberView>),
}

#[derive(ApiResponse)]
pub enum MemberRemoved {
    #[oai(status = 204)]
    NoContent,
}

const NOT_PRIVATE: &str = "only private projects have explicit members";

/// The project whose members are changed: 404 unless the user can see it, 422 `not_private`
/// unless it is private.
async fn private_project(
    conn: &mut sqlx::PgConnection,
    user_id: Uuid,
    id: Uuid,
) -> Result<store::projects::Project, ApiError> {
    let project = store::projects::get_visible(conn, user_id.into(), id.into())
        .await?
        .ok_or(ApiError::NotFound)?;
    if project.visibility != Visibility::Private {
        return Err(ApiError::Unprocessable {
            code: "not_private",
            message: NOT_PRIVATE.into(),
        });
    }
    Ok(project)
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Projects")]
impl ProjectsApi {
    /// Create a project in the caller's org. Any member may; with visibility `team` the caller
    /// must be an owner/admin or a member of that team. The creator of a private project is its
    /// first member.
    #[oai(path = "/projects", method = "post")]
    async fn create(
        &self,
        auth: BearerAuth,
        body: JsonBody<NewProject>,
    ) -> Result<ProjectCreated, ApiError> {
        let caller = auth.0;
        let req = body.0;
        let name = validate::text("name", &req.name, 200)?;
        let description = validate::optional_text(
            "description",
            req.description.as_deref().unwrap_or(""),
            10_000,
        )?;
        let visibility: Visibility = req.visibility.into();
        match (visibility, req.team_id) {
            (Visibility::Team, None) => {
                return Err(ApiError::invalid(
                    "team_id is required when visibility is \"team\"",
                ));
            }
            (Visibility::Org | Visibility::Private, Some(_)) => {
                return Err(ApiError::invalid(
                    "team_id is only allowed when visibility is \"team\"",
                ));
            }
            _ => {}
        }
        if let Some(team_id) = req.team_id {
            let team =
                store::tenancy::get_team(&self.state.db, caller.org_id.into(), team_id.into())
                    .await?
                    .ok_or(ApiError::Unprocessable {
                        code: "invalid_reference",
                        message: "team_id does not name a team of this organization".into(),
                    })?;
            if !caller.is_admin()
                && !store::tenancy::is_team_member(&self.state.db, team.id, caller.user_id.into())
                    .await?
            {
                return Err(ApiError::Forbidden(
                    "only owners, admins and members of the team may create its projects".into(),
                ));
            }
        }
        let mut tx = self.state.db.begin().await?;
        let project = store::projects::insert_project(
            &mut tx,
            &store::projects::NewProject {
                org_id: caller.org_id.into(),
                created_by: caller.user_id.into(),
                name: &name,
                description: &description,
                visibility,
                team_id: req.team_id.map(Into::into),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(ProjectCreated::Created(Json(project.into())))
    }

    /// The projects the caller can see, oldest first.
    #[oai(path = "/projects", method = "get")]
    async fn list(
        &self,
        auth: BearerAuth,
        /// Page size, 1 to 200 (default 50).
        limit: Query<Option<i64>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<Json<ProjectPage>, ApiError> {
        let caller = auth.0;
        let page = PageRequest::parse(limit.0, cursor.0.as_deref())?;
        let rows = store::projects::list_visible(
            &self.state.db,
            caller.user_id.into(),
            page.after,
            page.fetch(),
        )
        .await?;
        let (rows, next_cursor) = page.finish(rows, |p| (p.created_at, p.id.into()));
        Ok(Json(ProjectPage {
            items: rows.into_iter().map(Into::into).collect(),
            next_cursor,
        }))
    }

    /// A project the caller can see.
    #[oai(path = "/projects/:id", method = "get")]
    async fn get(&self, auth: BearerAuth, id: Path<Uuid>) -> Result<Json<ProjectView>, ApiError> {
        let caller = auth.0;
        let mut conn = self.state.db.acquire().await?;
        let project = store::projects::get_visible(&mut conn, caller.user_id.into(), id.0.into())
            .await?
            .ok_or(ApiError::NotFound)?;
        Ok(Json(project.into()))
    }

    /// Add a member to a private project. Whoever can see the project may (its members and the
    /// org's owners/admins); other visibilities answer 422.
    #[oai(path = "/projects/:id/members", method = "post")]
    async fn add_member(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: JsonBody<AddProjectMember>,
    ) -> Result<MemberAdded, ApiError> {
        let caller = auth.0;
        let mut tx = self.state.db.begin().await?;
        let project = private_project(&mut tx, caller.user_id, id.0).await?;
        let user_id = body.0.user_id;
        store::projects::add_member(&mut tx, project.org_id, project.id, user_id.into()).await?;
        tx.commit().await?;
        Ok(MemberAdded::Created(Json(ProjectMemberView {
            project_id: project.id.into(),
            user_id,
        })))
    }

    /// Remove a member from a private project (same rule as adding); 404 when they are not one.
    #[oai(path = "/projects/:id/members/:user_id", method = "delete")]
    async fn remove_member(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        user_id: Path<Uuid>,
    ) -> Result<MemberRemoved, ApiError> {
        let caller = auth.0;
        let mut tx = self.state.db.begin().await?;
        let project = private_project(&mut tx, caller.user_id, id.0).await?;
        if !store::projects::remove_member(&mut tx, project.id, user_id.0.into()).await? {
            return Err(ApiError::NotFound);
        }
        tx.commit().await?;
        Ok(MemberRemoved::NoContent)
    }
}
