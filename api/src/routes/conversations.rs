//! The caller's conversations and their messages. A conversation is its owner's alone: anyone
//! else (same org or not) gets 404, exactly like an id that does not exist.

use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use serde::Deserialize;
use uuid::Uuid;

use super::Tag;
use crate::auth::BearerAuth;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::pagination::{PageRequest, SeqPageRequest};
use crate::state::AppState;
use crate::validate;
use crate::views::{ConversationView, MessageView};

pub struct ConversationsApi {
    pub state: AppState,
}

#[derive(Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct NewConversation {
    #[serde(default)]
    #[oai(nullable)]
    title: Option<String>,
    /// Narrow the conversation to these projects (each must be visible to the caller);
    /// absent or empty (`[]`): not narrowed — every project the caller can see.
    #[serde(default)]
    #[oai(nullable)]
    project_ids: Option<Vec<Uuid>>,
}

#[derive(ApiResponse)]
pub enum ConversationCreated {
    #[oai(status = 201)]
    Created(Json<ConversationView>),
}

#[derive(Object)]
pub struct ConversationPage {
    items: Vec<ConversationView>,
    /// Pass as `?cursor=` for the next page; null on the last page.
    #[oai(nullable)]
    next_cursor: Option<String>,
}

#[derive(Object)]
pub struct MessagePage {
    items: Vec<MessageView>,
    /// Pass as `?cursor=` for the next page; null on the last page.
    #[oai(nullable)]
    next_cursor: Option<String>,
}

const TITLE_MAX: usize = 500;
const PROJECT_IDS_MAX: usize = 100;

#[OpenApi(prefix_path = "/v1", tag = "Tag::Conversations")]
impl ConversationsApi {
    /// Start a conversation, optionally narrowed to some of the projects the caller can see.
    #[oai(path = "/conversations", method = "post")]
    async fn create(
        &self,
        auth: BearerAuth,
        body: JsonBody<NewConversation>,
    ) -> Result<ConversationCreated, ApiError> {
        let caller = auth.0;
        let req = body.0;
        let title =
            validate::optional_text("title", req.title.as_deref().unwrap_or(""), TITLE_MAX)?;
        // `[]` means "not narrowed", as if omitted (not "narrowed to nothing").
        let project_ids = req.project_ids.filter(|ids| !ids.is_empty());
        if let Some(ids) = &project_ids
            && ids.len() > PROJECT_IDS_MAX
        {
            return Err(ApiError::invalid(format!(
                "project_ids must name at most {PROJECT_IDS_MAX} projects"
            )));
        }
        let mut tx = self.state.db.begin().await?;
        let conversation = store::conversations::create(
            &mut tx,
            caller.org_id,
            caller.user_id,
            &title,
            project_ids.as_deref(),
        )
        .await?;
        let scope = store::conversations::scope(&mut tx, conversation.id).await?;
        tx.commit().await?;
        Ok(ConversationCreated::Created(Json(ConversationView::new(
            conversation,
            scope,
        ))))
    }

    /// The caller's own conversations, oldest first.
    #[oai(path = "/conversations", method = "get")]
    async fn list(
        &self,
        auth: BearerAuth,
        /// Page size, 1 to 200 (default 50).
        limit: Query<Option<i64>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<Json<ConversationPage>, ApiError> {
        let caller = auth.0;
        let page = PageRequest::parse(limit.0, cursor.0.as_deref())?;
        let rows = store::conversations::list_own(
            &self.state.db,
            caller.user_id,
            page.after,
            page.fetch(),
        )
        .await?;
        let (rows, next_cursor) = page.finish(rows, |c| (c.created_at, c.id));
        let mut conn = self.state.db.acquire().await?;
        let scoped: Vec<Uuid> = rows.iter().filter(|c| c.scoped).map(|c| c.id).collect();
        let mut scopes: std::collections::HashMap<Uuid, Vec<Uuid>> = Default::default();
        if !scoped.is_empty() {
            for (c, p) in store::conversations::scopes(&mut conn, &scoped).await? {
                scopes.entry(c).or_default().push(p);
            }
        }
        let items = rows
            .into_iter()
            .map(|c| {
                let scope = scopes.remove(&c.id).unwrap_or_default();
                ConversationView::new(c, scope)
            })
            .collect();
        Ok(Json(ConversationPage { items, next_cursor }))
    }

    /// One of the caller's conversations.
    #[oai(path = "/conversations/:id", method = "get")]
    async fn get(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<Json<ConversationView>, ApiError> {
        let caller = auth.0;
        let mut conn = self.state.db.acquire().await?;
        let c = store::conversations::get_own(&mut conn, caller.user_id, id.0)
            .await?
            .ok_or(ApiError::NotFound)?;
        let scope = store::conversations::scope(&mut conn, c.id).await?;
        Ok(Json(ConversationView::new(c, scope)))
    }

    /// The messages of one of the caller's conversations, in order. Tool-call bookkeeping
    /// (assistant turns that only call tools, and tool results) is not shown.
    #[oai(path = "/conversations/:id/messages", method = "get")]
    async fn messages(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// Page size, 1 to 200 (default 50).
        limit: Query<Option<i64>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<Json<MessagePage>, ApiError> {
        let caller = auth.0;
        let page = SeqPageRequest::parse(limit.0, cursor.0.as_deref())?;
        {
            let mut conn = self.state.db.acquire().await?;
            store::conversations::get_own(&mut conn, caller.user_id, id.0)
                .await?
                .ok_or(ApiError::NotFound)?;
        }
        let rows =
            store::conversations::list_messages(&self.state.db, id.0, page.after, page.fetch())
                .await?;
        let (rows, next_cursor) = page.finish(rows, |m| m.seq);
        let items = rows
            .into_iter()
            .filter(|m| m.role != "tool" && m.tool_calls.is_none())
            .map(MessageView::from)
            .collect();
        Ok(Json(MessagePage { items, next_cursor }))
    }
}
