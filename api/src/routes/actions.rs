//! Proposed actions (supervised writes; docs/ARCHITECTURE.md, "Scope and tools"): the
//! assistant's write tools only propose; the conversation's owner confirms (→ executed exactly
//! once by a worker, then the assistant continues the conversation as a new response) or
//! rejects. Anyone else gets 404, exactly like an id that does not exist.

use chrono::{DateTime, Utc};
use jobs::events::ResponseEvent;
use poem::Request;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use serde_json::Value;
use store::actions::Decision;
use uuid::Uuid;

use super::Tag;
use crate::auth::BearerAuth;
use crate::error::ApiError;
use crate::state::AppState;

pub struct ActionsApi {
    pub state: AppState,
}

/// A proposed action.
#[derive(Object, Clone)]
pub struct ActionView {
    pub id: Uuid,
    pub conversation_id: Uuid,
    /// The response (turn) that proposed it.
    pub response_id: Uuid,
    /// `create_task` or `update_task`.
    pub tool: String,
    /// The validated arguments.
    pub arguments: Value,
    /// What it does, in words.
    pub summary: String,
    /// Updates: the changed fields before (as proposed).
    #[oai(nullable)]
    pub before: Option<Value>,
    /// The fields after.
    #[oai(nullable)]
    pub after: Option<Value>,
    /// `pending` | `confirmed` | `executed` | `rejected` | `expired` | `failed`.
    pub status: String,
    /// Executed: what was written.
    #[oai(nullable)]
    pub result: Option<Value>,
    /// Failed: why nothing was written.
    #[oai(nullable)]
    pub failure_reason: Option<String>,
    /// Confirmed: the response that continues the conversation.
    #[oai(nullable)]
    pub continuation_response_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    /// A pending proposal expires then.
    pub expires_at: DateTime<Utc>,
    #[oai(nullable)]
    pub decided_at: Option<DateTime<Utc>>,
    #[oai(nullable)]
    pub executed_at: Option<DateTime<Utc>>,
}

impl From<store::actions::Action> for ActionView {
    fn from(a: store::actions::Action) -> Self {
        Self {
            id: a.id.into(),
            conversation_id: a.conversation_id.into(),
            response_id: a.response_id.into(),
            tool: a.tool,
            arguments: a.arguments,
            summary: a.summary,
            before: a.before,
            after: a.after,
            status: a.status,
            result: a.result,
            failure_reason: a.failure_reason,
            continuation_response_id: a.continuation_response_id.map(Into::into),
            created_at: a.created_at,
            expires_at: a.expires_at,
            decided_at: a.decided_at,
            executed_at: a.executed_at,
        }
    }
}

#[derive(Object)]
pub struct ActionList {
    /// Oldest first (at most 200).
    items: Vec<ActionView>,
}

/// A confirmed action: it runs shortly; follow the assistant's continuation on
/// `GET /v1/conversations/{id}/responses/{response_id}/events`.
#[derive(Object)]
pub struct ActionConfirmed {
    action: ActionView,
    response_id: Uuid,
}

#[derive(ApiResponse)]
pub enum ConfirmResponse {
    /// Confirmed; the execution and the assistant's continuation follow.
    #[oai(status = 202)]
    Accepted(Json<ActionConfirmed>),
}

const LIST_MAX: i64 = 200;

fn not_pending(status: &str) -> ApiError {
    ApiError::Conflict(format!(
        "the proposed action is no longer pending (it is {status})"
    ))
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Actions")]
impl ActionsApi {
    /// The actions the assistant proposed in one of the caller's conversations.
    #[oai(path = "/conversations/:id/actions", method = "get")]
    async fn list(&self, auth: BearerAuth, id: Path<Uuid>) -> Result<Json<ActionList>, ApiError> {
        let caller = auth.0;
        let mut conn = self.state.db.acquire().await?;
        store::conversations::get_own(&mut conn, caller.user_id, id.0)
            .await?
            .ok_or(ApiError::NotFound)?;
        let rows =
            store::actions::list_own(&mut conn, caller.user_id.into(), id.0.into(), LIST_MAX)
                .await?;
        Ok(Json(ActionList {
            items: rows.into_iter().map(Into::into).collect(),
        }))
    }

    /// One of the caller's proposed actions.
    #[oai(path = "/actions/:id", method = "get")]
    async fn get(&self, auth: BearerAuth, id: Path<Uuid>) -> Result<Json<ActionView>, ApiError> {
        let caller = auth.0;
        let mut conn = self.state.db.acquire().await?;
        let action = store::actions::get_own(&mut conn, caller.user_id.into(), id.0.into())
            .await?
            .ok_or(ApiError::NotFound)?;
        Ok(Json(action.into()))
    }

    /// Confirm a pending proposal (only the conversation's owner): it is executed exactly once,
    /// with the permissions the caller has then, and the assistant continues the conversation
    /// (the `response_id` of the answer). 409 when it is no longer pending (already decided or
    /// expired); 429 `budget_exceeded` when the org's token budget has no room for the
    /// continuation (the proposal stays pending).
    #[oai(path = "/actions/:id/confirm", method = "post")]
    async fn confirm(
        &self,
        req: &Request,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> Result<ConfirmResponse, ApiError> {
        let caller = auth.0;
        let state = &self.state;
        let traceparent = req
            .extensions()
            .get::<crate::middleware::TraceContext>()
            .map(|t| t.traceparent.clone());
        let envelope = jobs::Envelope::new(jobs::kinds::ExecuteAction {
            action_id: id.0.into(),
        })
        .with_trace(traceparent);
        let mut tx = state.db.begin().await?;
        let (action, response) = match store::actions::confirm(
            &mut tx,
            caller.user_id.into(),
            id.0.into(),
            envelope.id.into(),
        )
        .await?
        {
            Decision::Done(done) => done,
            Decision::NotFound => return Err(ApiError::NotFound),
            Decision::NotPending(status) => return Err(not_pending(&status)),
        };
        // The continuation calls the model: it is admitted within the org's token budget like
        // a turn (over it: 429, and the proposal stays pending — the transaction rolls back).
        let policy = store::budgets::Policy::from_settings(&state.settings.budget);
        if let Some(tokens) = store::budgets::admit(&mut tx, &policy, caller.org_id.into()).await? {
            store::budgets::hold(&mut tx, response.id, tokens).await?;
        }
        tx.commit().await?;
        let created = ResponseEvent::MessageCreated {
            message_id: response.user_message_id,
            response_id: response.id,
        };
        if let Err(e) = state.publisher.publish(response.id, &created).await {
            tracing::warn!(error = %e, response_id = %response.id, "cannot publish message.created");
        }
        if let Err(e) = state.bus.enqueue_envelope(&envelope).await {
            // Confirmed is recorded with its job; the reconciler enqueues a lost one again.
            tracing::error!(error = %e, action_id = %action.id, "cannot enqueue the execution; the reconciler will");
        }
        Ok(ConfirmResponse::Accepted(Json(ActionConfirmed {
            response_id: response.id,
            action: action.into(),
        })))
    }

    /// Reject a pending proposal (only the conversation's owner): nothing is written, and the
    /// assistant is told in its next turn. 409 when it is no longer pending.
    #[oai(path = "/actions/:id/reject", method = "post")]
    async fn reject(&self, auth: BearerAuth, id: Path<Uuid>) -> Result<Json<ActionView>, ApiError> {
        let caller = auth.0;
        let mut tx = self.state.db.begin().await?;
        let action =
            match store::actions::reject(&mut tx, caller.user_id.into(), id.0.into()).await? {
                Decision::Done(a) => a,
                Decision::NotFound => return Err(ApiError::NotFound),
                Decision::NotPending(status) => return Err(not_pending(&status)),
            };
        tx.commit().await?;
        Ok(Json(action.into()))
    }
}
