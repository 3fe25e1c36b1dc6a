//! Tasks of the projects the caller can see. Whoever sees a project may read, create and
//! update its tasks; a task of a project the caller cannot see answers 404.

use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::types::MaybeUndefined;
use poem_openapi::{ApiResponse, Object, OpenApi};
use serde::Deserialize;
use uuid::Uuid;

use super::Tag;
use crate::auth::BearerAuth;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::pagination::PageRequest;
use crate::state::AppState;
use crate::validate;
use crate::views::{StatusName, TaskView};

pub struct TasksApi {
    pub state: AppState,
}

#[derive(Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    title: String,
    #[serde(default)]
    #[oai(nullable)]
    description: Option<String>,
    /// Default `todo`.
    #[serde(default)]
    #[oai(nullable)]
    status: Option<StatusName>,
    /// A member of the org who can see the project.
    #[serde(default)]
    #[oai(nullable)]
    assignee_id: Option<Uuid>,
}

/// A partial update: absent fields stay as they are; `assignee_id: null` unassigns (the other
/// fields cannot be null).
#[derive(Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct TaskChanges {
    #[serde(default)]
    title: MaybeUndefined<String>,
    #[serde(default)]
    description: MaybeUndefined<String>,
    #[serde(default)]
    status: MaybeUndefined<StatusName>,
    /// `null` unassigns.
    #[serde(default)]
    #[oai(nullable)]
    assignee_id: MaybeUndefined<Uuid>,
}

/// The value of a field that may be absent but not null.
fn not_null<T>(field: &str, v: MaybeUndefined<T>) -> Result<Option<T>, ApiError> {
    match v {
        MaybeUndefined::Undefined => Ok(None),
        MaybeUndefined::Null => Err(ApiError::invalid(format!("{field} must not be null"))),
        MaybeUndefined::Value(v) => Ok(Some(v)),
    }
}

#[derive(Object)]
pub struct TaskPage {
    items: Vec<TaskView>,
    /// Pass as `?cursor=` for the next page; null on the last page.
    #[oai(nullable)]
    next_cursor: Option<String>,
}

#[derive(ApiResponse)]
pub enum TaskCreated {
    #[oai(status = 201)]
    Created(Json<TaskView>),
}

const TITLE_MAX: usize = 500;
const DESCRIPTION_MAX: usize = 20_000;

#[OpenApi(prefix_path = "/v1", tag = "Tag::Tasks")]
impl TasksApi {
    /// Create a task in a project the caller can see.
    #[oai(path = "/projects/:id/tasks", method = "post")]
    async fn create(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: JsonBody<NewTask>,
    ) -> Result<TaskCreated, ApiError> {
        let caller = auth.0;
        let req = body.0;
        let mut tx = self.state.db.begin().await?;
        let project = store::projects::get_visible(&mut tx, caller.user_id.into(), id.0.into())
            .await?
            .ok_or(ApiError::NotFound)?;
        let title = validate::text("title", &req.title, TITLE_MAX)?;
        let description = validate::optional_text(
            "description",
            req.description.as_deref().unwrap_or(""),
            DESCRIPTION_MAX,
        )?;
        let task = store::tasks::insert_task(
            &mut tx,
            &store::tasks::NewTask {
                org_id: project.org_id,
                project_id: project.id,
                created_by: caller.user_id.into(),
                title: &title,
                description: &description,
                status: req.status.map_or(store::TaskStatus::Todo, Into::into),
                assignee_id: req.assignee_id.map(Into::into),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(TaskCreated::Created(Json(task.into())))
    }

    /// The tasks of a project the caller can see, oldest first.
    #[oai(path = "/projects/:id/tasks", method = "get")]
    async fn list(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// Page size, 1 to 200 (default 50).
        limit: Query<Option<i64>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<Json<TaskPage>, ApiError> {
        let caller = auth.0;
        let page = PageRequest::parse(limit.0, cursor.0.as_deref())?;
        let mut conn = self.state.db.acquire().await?;
        if !store::projects::can_see(&mut conn, caller.user_id.into(), id.0.into()).await? {
            return Err(ApiError::NotFound);
        }
        let rows = store::tasks::list_visible(
            &mut conn,
            caller.user_id.into(),
            id.0.into(),
            page.after,
            page.fetch(),
        )
        .await?;
        let (rows, next_cursor) = page.finish(rows, |t| (t.created_at, t.id.into()));
        Ok(Json(TaskPage {
            items: rows.into_iter().map(Into::into).collect(),
            next_cursor,
        }))
    }

    /// A task of a project the caller can see.
    #[oai(path = "/tasks/:id", method = "get")]
    async fn get(&self, auth: BearerAuth, id: Path<Uuid>) -> Result<Json<TaskView>, ApiError> {
        let caller = auth.0;
        let mut conn = self.state.db.acquire().await?;
        let task = store::tasks::get_visible(&mut conn, caller.user_id.into(), id.0.into(), false)
            .await?
            .ok_or(ApiError::NotFound)?;
        Ok(Json(task.into()))
    }

    /// Update a task's title, description, status or assignee.
    #[oai(path = "/tasks/:id", method = "patch")]
    async fn update(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: JsonBody<TaskChanges>,
    ) -> Result<Json<TaskView>, ApiError> {
        let caller = auth.0;
        let req = body.0;
        let patch = store::tasks::TaskPatch {
            title: not_null("title", req.title)?
                .map(|t| validate::text("title", &t, TITLE_MAX))
                .transpose()?,
            description: not_null("description", req.description)?
                .map(|d| validate::optional_text("description", &d, DESCRIPTION_MAX))
                .transpose()?,
            status: not_null("status", req.status)?.map(Into::into),
            assignee_id: match req.assignee_id {
                MaybeUndefined::Undefined => None,
                MaybeUndefined::Null => Some(None),
                MaybeUndefined::Value(v) => Some(Some(v.into())),
            },
        };
        let mut tx = self.state.db.begin().await?;
        let task =
            store::tasks::update_visible(&mut tx, caller.user_id.into(), id.0.into(), &patch)
                .await?
                .ok_or(ApiError::NotFound)?;
        tx.commit().await?;
        Ok(Json(task.into()))
    }
}
