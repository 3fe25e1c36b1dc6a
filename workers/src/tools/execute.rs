//! `execute_action`: run a confirmed proposal exactly once, then let the assistant continue
//! (docs/ARCHITECTURE.md, "Scope and tools").
//!
//! In one transaction, on the locked proposal: re-check that its owner may still do it (sees the
//! project within the conversation's scope; the assignee rule of the task API), write the task,
//! move `confirmed → executed` with the result, write the audit record, and store the result as
//! the `tool` message answering the decided call. If the permission is gone: `failed` with a
//! reason and nothing written. The same transaction hands the continuation response to a new
//! `chat` job (`responses.job_id`), which is enqueued after the commit; should that enqueue be
//! lost, the scheduler's reconciler enqueues it again (the response names a job the bus does
//! not have). A redelivered job finds the proposal decided and does nothing.

use jobs::kinds::{Chat, ExecuteAction};
use jobs::worker::HandlerResult;
use jobs::{Bus, JobContext, JobError, Registry};
use serde_json::{Value, json};
use sqlx::PgConnection;
use store::actions::{self, Action, Audit};
use store::tasks::{NewTask, TaskPatch};
use store::{StoreError, TaskStatus};
use uuid::Uuid;

use super::{metrics, status_arg, uuid_arg};
use crate::handlers::db_error;

/// The `execute_action` handler.
#[derive(Clone)]
pub struct ActionsHandler {
    db: sqlx::PgPool,
    bus: Bus,
}

/// What an execution did.
enum Outcome {
    Executed {
        task_id: Uuid,
        before: Option<Value>,
        after: Value,
        task: Value,
    },
    /// Not allowed (any more), or not possible: nothing was written.
    Refused(String),
}

const NO_ACCESS: &str = "you can no longer see or change this project or task";

/// The task as an executed action's result shows it.
fn task_json(t: &store::tasks::Task) -> Value {
    json!({
        "id": t.id, "project_id": t.project_id, "title": t.title,
        "description": t.description, "status": t.status, "assignee_id": t.assignee_id,
    })
}

impl ActionsHandler {
    pub fn new(db: sqlx::PgPool, bus: Bus) -> Self {
        Self { db, bus }
    }

    pub fn register(self, registry: &mut Registry) {
        registry.register::<ExecuteAction, _, _>(move |ctx, job| {
            let h = self.clone();
            async move { h.run(ctx, job).await }
        });
    }

    #[tracing::instrument(name = "execute_action", skip_all, fields(job_id = %ctx.id, action_id = %job.action_id))]
    pub async fn run(&self, ctx: JobContext, job: ExecuteAction) -> HandlerResult {
        let mut tx = self.db.begin().await.map_err(db_error)?;
        let Some(action) = actions::lock(&mut tx, job.action_id)
            .await
            .map_err(db_error)?
        else {
            return Err(JobError::permanent("the proposed action does not exist"));
        };
        match action.status.as_str() {
            "confirmed" => {}
            "executed" | "failed" => {
                // A redelivery: the run that decided it handed the continuation to its job
                // (which the reconciler enqueues again should the bus have lost it).
                tracing::info!(status = %action.status, "already decided (redelivery)");
                return Ok(());
            }
            other => {
                tracing::warn!(status = other, "not confirmed; nothing to execute");
                return Ok(());
            }
        }
        let outcome = execute(&mut tx, &action).await.map_err(db_error)?;
        let result = match &outcome {
            Outcome::Executed {
                task_id,
                before,
                after,
                task,
            } => {
                if !actions::mark_executed(&mut tx, action.id, task)
                    .await
                    .map_err(db_error)?
                {
                    return Err(JobError::retryable("the action changed state meanwhile"));
                }
                actions::insert_audit(
                    &mut tx,
                    &Audit {
                        action: &action,
                        task_id: (*task_id).into(),
                        before: before.as_ref(),
                        after,
                    },
                )
                .await
                .map_err(db_error)?;
                json!({"status": "executed", "action_id": action.id, "task": task})
            }
            Outcome::Refused(reason) => {
                actions::mark_failed(&mut tx, action.id, reason)
                    .await
                    .map_err(db_error)?;
                refused_result(action.id.into(), reason)
            }
        };
        let continuation = answer_decision(&mut tx, &action, &result)
            .await
            .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        match &outcome {
            Outcome::Executed { task_id, .. } => {
                metrics::action("executed", 1);
                tracing::info!(%task_id, attempt = ctx.attempt, "action executed")
            }
            Outcome::Refused(reason) => {
                metrics::action("failed", 1);
                tracing::info!(reason, "action failed; nothing written")
            }
        }
        // The continuation goes on: its job is recorded with the decision, so a failure here
        // is only logged (the reconciler enqueues a job the bus does not have).
        if let Some(env) = continuation
            && let Err(e) = self.bus.enqueue_envelope(&env).await
        {
            tracing::error!(error = %e, job_id = %env.id, "cannot enqueue the continuation; the reconciler will");
        }
        Ok(())
    }
}

/// The result of an action that failed for `reason`: nothing was written.
pub(crate) fn refused_result(action_id: Uuid, reason: &str) -> Value {
    json!({"status": "failed", "action_id": action_id, "reason": reason,
           "message": "Nothing was changed."})
}

/// Inside the caller's transaction, once `action` is decided: store `result` as the `tool`
/// message answering the decided call, and hand the continuation response (unless it is gone
/// or already handed to a job) to a new `chat` job, returned for the caller to enqueue after
/// its commit. Used by this handler and by the reconciler's action sweep.
pub(crate) async fn answer_decision(
    conn: &mut PgConnection,
    action: &Action,
    result: &Value,
) -> Result<Option<jobs::Envelope>, StoreError> {
    actions::insert_message(
        &mut *conn,
        action.conversation_id,
        action.continuation_response_id,
        "tool",
        &result.to_string(),
        None,
        Some(&actions::decision_call_id(action.id)),
    )
    .await?;
    let Some(response_id) = action.continuation_response_id else {
        return Ok(None);
    };
    let Some(response) = store::conversations::get_response_own(
        &mut *conn,
        action.user_id.into(),
        action.conversation_id.into(),
        response_id.into(),
    )
    .await?
    else {
        return Ok(None);
    };
    if response.job_id.is_some() {
        return Ok(None);
    }
    let env = jobs::Envelope::new(Chat {
        conversation_id: action.conversation_id,
        message_id: response.user_message_id.into(),
        response_id,
        user_id: action.user_id,
        org_id: action.org_id,
    });
    store::responses::assign_job(&mut *conn, response_id, env.id.into()).await?;
    Ok(Some(env))
}

/// Re-check and write, inside the caller's transaction.
async fn execute(conn: &mut PgConnection, action: &Action) -> Result<Outcome, StoreError> {
    let (user, conv) = (action.user_id, action.conversation_id);
    let args = &action.arguments;
    match action.tool.as_str() {
        "create_task" => {
            let Some(project_id) = uuid_arg(args, "project_id") else {
                return Ok(Outcome::Refused("the proposal names no project".into()));
            };
            let Some((project, org)) =
                store::assistant::project(&mut *conn, user, conv, project_id.into()).await?
            else {
                return Ok(Outcome::Refused(NO_ACCESS.into()));
            };
            let assignee = uuid_arg(args, "assignee_id");
            if let Some(a) = assignee
                && store::assistant::assignable(&mut *conn, org, project.id, a.into())
                    .await?
                    .is_none()
            {
                return Ok(Outcome::Refused(
                    "the assignee can no longer see the project".into(),
                ));
            }
            let title = args.get("title").and_then(Value::as_str).unwrap_or("");
            let description = args
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or("");
            let task = store::tasks::insert_task(
                &mut *conn,
                &NewTask {
                    org_id: org,
                    project_id: project.id,
                    created_by: user,
                    title,
                    description,
                    status: status_arg(args).unwrap_or(TaskStatus::Todo),
                    assignee_id: assignee.map(Into::into),
                },
            )
            .await?;
            let t = task_json(&task);
            Ok(Outcome::Executed {
                task_id: task.id.into(),
                before: None,
                after: t.clone(),
                task: t,
            })
        }
        "update_task" => {
            let Some(task_id) = uuid_arg(args, "task_id") else {
                return Ok(Outcome::Refused("the proposal names no task".into()));
            };
            // lock the task first (its `before` is what this transaction overwrites), then the
            // conversation's narrowing
            let Some(current) =
                store::tasks::get_visible(&mut *conn, user, task_id.into(), true).await?
            else {
                return Ok(Outcome::Refused(NO_ACCESS.into()));
            };
            if store::assistant::task(&mut *conn, user, conv, task_id.into())
                .await?
                .is_none()
            {
                return Ok(Outcome::Refused(NO_ACCESS.into()));
            }
            let assignee = args
                .get("assignee_id")
                .map(|_| uuid_arg(args, "assignee_id"));
            if let Some(Some(a)) = assignee {
                let org = action.org_id;
                if store::assistant::assignable(&mut *conn, org, current.project_id, a.into())
                    .await?
                    .is_none()
                {
                    return Ok(Outcome::Refused(
                        "the assignee can no longer see the project".into(),
                    ));
                }
            }
            let patch = TaskPatch {
                title: args.get("title").and_then(Value::as_str).map(str::to_owned),
                description: args
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                status: status_arg(args),
                assignee_id: assignee.map(|x| x.map(Into::into)),
            };
            let before = task_json(&current);
            let Some(task) =
                store::tasks::update_visible(&mut *conn, user, task_id.into(), &patch).await?
            else {
                return Ok(Outcome::Refused(NO_ACCESS.into()));
            };
            let t = task_json(&task);
            Ok(Outcome::Executed {
                task_id: task.id.into(),
                before: Some(before),
                after: t.clone(),
                task: t,
            })
        }
        other => Ok(Outcome::Refused(format!("unknown tool {other}"))),
    }
}
