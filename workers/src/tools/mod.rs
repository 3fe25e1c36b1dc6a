//! The assistant's tools (docs/ARCHITECTURE.md, "Scope and tools"): the registry (this file,
//! in OpenAI `tools` format), the tool rounds of a chat turn ([`rounds`]), and the execution of
//! a confirmed proposal ([`execute`], the `execute_action` job), with their metrics.
//!
//! - Read tools run at once, for the conversation's owner, through
//!   `conversation_projects_visible(user, conversation)`: `search_knowledge`, `list_projects`,
//!   `list_tasks`, `get_task`. Anything outside it is "not found", word for word like an id
//!   that does not exist.
//! - Write tools only propose: `create_task`, `update_task` are validated and checked against
//!   the same visibility, then become a proposal (summary, before/after) the user confirms;
//!   [`execute`] executes a confirmed one.
//!
//! Arguments are checked against the very schema the model is shown ([`schema::validate`]);
//! invalid ones go back to the model as a tool error and nothing runs.

pub mod execute;
pub mod metrics;
pub mod rounds;
pub mod schema;
pub mod search;

pub use execute::ActionsHandler;

use serde_json::{Value, json};
use sqlx::PgConnection;
use store::TaskStatus;
use store::assistant as data;
use uuid::Uuid;

/// Most rows a read tool returns.
const LIST_LIMIT: i64 = 50;
const TITLE_MAX: u64 = 500;
const DESCRIPTION_MAX: u64 = 20_000;
/// The one "not found" text, for missing and invisible alike.
pub const NOT_FOUND: &str = "not found";

/// Whom a tool acts for.
#[derive(Debug, Clone, Copy)]
pub struct ToolCtx {
    pub user_id: Uuid,
    pub org_id: Uuid,
    pub conversation_id: Uuid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolKind {
    Read,
    Write,
}

/// One tool: its name, kind, description and argument schema.
#[derive(Debug)]
pub struct ToolDef {
    pub name: &'static str,
    pub kind: ToolKind,
    pub description: &'static str,
    pub parameters: fn() -> Value,
}

fn status_enum() -> Value {
    json!(["todo", "in_progress", "done"])
}

fn no_parameters() -> Value {
    json!({"type": "object", "properties": {}, "additionalProperties": false})
}

fn search_parameters() -> Value {
    json!({
        "type": "object",
        "properties": {
            "query": {"type": "string", "minLength": 1, "maxLength": 500,
                      "description": "What to look for, in plain words."},
        },
        "required": ["query"],
        "additionalProperties": false,
    })
}

fn list_tasks_parameters() -> Value {
    json!({
        "type": "object",
        "properties": {
            "project_id": {"type": "string", "format": "uuid"},
            "status": {"type": "string", "enum": status_enum()},
        },
        "required": ["project_id"],
        "additionalProperties": false,
    })
}

fn get_task_parameters() -> Value {
    json!({
        "type": "object",
        "properties": {"task_id": {"type": "string", "format": "uuid"}},
        "required": ["task_id"],
        "additionalProperties": false,
    })
}

fn create_task_parameters() -> Value {
    json!({
        "type": "object",
        "properties": {
            "project_id": {"type": "string", "format": "uuid"},
            "title": {"type": "string", "minLength": 1, "maxLength": TITLE_MAX},
            "description": {"type": "string", "maxLength": DESCRIPTION_MAX},
            "status": {"type": "string", "enum": status_enum()},
            "assignee_id": {"type": "string", "format": "uuid",
                            "description": "A member of the organization who can see the project."},
        },
        "required": ["project_id", "title"],
        "additionalProperties": false,
    })
}

fn update_task_parameters() -> Value {
    json!({
        "type": "object",
        "properties": {
            "task_id": {"type": "string", "format": "uuid"},
            "title": {"type": "string", "minLength": 1, "maxLength": TITLE_MAX},
            "description": {"type": "string", "maxLength": DESCRIPTION_MAX},
            "status": {"type": "string", "enum": status_enum()},
            "assignee_id": {"type": ["string", "null"], "format": "uuid",
                            "description": "null to unassign."},
        },
        "required": ["task_id"],
        "additionalProperties": false,
    })
}

/// The registry.
pub const TOOLS: &[ToolDef] = &[
    ToolDef {
        name: "search_knowledge",
        kind: ToolKind::Read,
        description: "Search the user's projects and tasks (that this conversation may use) for a query.",
        parameters: search_parameters,
    },
    ToolDef {
        name: "list_projects",
        kind: ToolKind::Read,
        description: "List the projects this conversation may use.",
        parameters: no_parameters,
    },
    ToolDef {
        name: "list_tasks",
        kind: ToolKind::Read,
        description: "List the tasks of a project, optionally only those with a status.",
        parameters: list_tasks_parameters,
    },
    ToolDef {
        name: "get_task",
        kind: ToolKind::Read,
        description: "Get one task by id.",
        parameters: get_task_parameters,
    },
    ToolDef {
        name: "create_task",
        kind: ToolKind::Write,
        description: "Propose creating a task in a project. Nothing is created until the user confirms.",
        parameters: create_task_parameters,
    },
    ToolDef {
        name: "update_task",
        kind: ToolKind::Write,
        description: "Propose changing a task's status, assignee, title or description. Nothing changes until the user confirms.",
        parameters: update_task_parameters,
    },
];

pub fn find(name: &str) -> Option<&'static ToolDef> {
    TOOLS.iter().find(|t| t.name == name)
}

/// The `tools` of a chat request.
pub fn definitions() -> Vec<Value> {
    TOOLS
        .iter()
        .map(|t| {
            json!({
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": (t.parameters)(),
                },
            })
        })
        .collect()
}

/// A call that cannot run: goes back to the model as `{"error": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolError(pub String);

impl ToolError {
    pub fn not_found() -> Self {
        Self(NOT_FOUND.into())
    }
    pub fn to_result(&self) -> String {
        json!({"error": self.0}).to_string()
    }
}

/// A failure of our own (database): the turn is retried.
#[derive(Debug, thiserror::Error)]
#[error("database: {0}")]
pub struct Internal(#[from] pub store::StoreError);

impl From<Internal> for store::StoreError {
    fn from(e: Internal) -> Self {
        e.0
    }
}

/// Parse and validate a call's arguments against its tool's schema.
pub fn parse_call(name: &str, arguments: &str) -> Result<(&'static ToolDef, Value), ToolError> {
    let Some(def) = find(name) else {
        return Err(ToolError(format!("unknown tool {name:?}")));
    };
    let raw = if arguments.trim().is_empty() {
        "{}"
    } else {
        arguments
    };
    let args: Value = serde_json::from_str(raw)
        .map_err(|e| ToolError(format!("the arguments are not valid JSON ({e})")))?;
    schema::validate(&(def.parameters)(), &args).map_err(ToolError)?;
    Ok((def, args))
}

pub(crate) fn uuid_arg(args: &Value, name: &str) -> Option<Uuid> {
    args.get(name)
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok())
}

pub(crate) fn status_arg(args: &Value) -> Option<TaskStatus> {
    args.get("status")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
}

/// Longest description in a list of tasks (`get_task` gives the whole one).
const BRIEF_DESCRIPTION: usize = 300;

fn task_brief(t: &store::tasks::Task) -> Value {
    let mut v = task_json(t);
    if t.description.chars().count() > BRIEF_DESCRIPTION {
        let cut: String = t.description.chars().take(BRIEF_DESCRIPTION).collect();
        v["description"] = json!(format!("{cut}…"));
    }
    v
}

fn task_json(t: &store::tasks::Task) -> Value {
    json!({
        "id": t.id,
        "project_id": t.project_id,
        "title": t.title,
        "description": t.description,
        "status": t.status,
        "assignee_id": t.assignee_id,
        "updated_at": t.updated_at,
    })
}

/// Run a read tool (already validated). `Ok(Err(_))`: a tool error for the model.
pub async fn run_read(
    conn: &mut PgConnection,
    ctx: &ToolCtx,
    knowledge: &search::Knowledge<'_>,
    name: &str,
    args: &Value,
) -> Result<Result<Value, ToolError>, Internal> {
    let (user, conv) = (ctx.user_id, ctx.conversation_id);
    Ok(match name {
        "list_projects" => {
            let rows = data::projects(conn, user.into(), conv.into(), LIST_LIMIT).await?;
            Ok(json!({"projects": rows.iter().map(|p| json!({
                "id": p.id, "name": p.name,
                "description": p.description.chars().take(BRIEF_DESCRIPTION).collect::<String>(),
                "visibility": p.visibility,
            })).collect::<Vec<_>>()}))
        }
        "list_tasks" => {
            let Some(project) = uuid_arg(args, "project_id") else {
                return Ok(Err(ToolError::not_found()));
            };
            if data::project(conn, user.into(), conv.into(), project.into())
                .await?
                .is_none()
            {
                Err(ToolError::not_found())
            } else {
                let rows = data::tasks(
                    conn,
                    user.into(),
                    conv.into(),
                    project.into(),
                    status_arg(args),
                    LIST_LIMIT,
                )
                .await?;
                Ok(json!({"tasks": rows.iter().map(task_brief).collect::<Vec<_>>()}))
            }
        }
        "get_task" => match uuid_arg(args, "task_id") {
            Some(id) => match data::task(conn, user.into(), conv.into(), id.into()).await? {
                Some(t) => Ok(json!({"task": task_json(&t)})),
                None => Err(ToolError::not_found()),
            },
            None => Err(ToolError::not_found()),
        },
        "search_knowledge" => {
            let query = args.get("query").and_then(Value::as_str).unwrap_or("");
            Ok(search::search_knowledge(conn, ctx, knowledge, query).await?)
        }
        other => Err(ToolError(format!("{other} is not a read tool"))),
    })
}

/// A write call turned into a proposal, not yet stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    /// The project whose content it names (its result carries it, so the answer's provenance
    /// records the project: `tool_result_sources`).
    pub project_id: Uuid,
    /// The normalised arguments (what execution uses).
    pub arguments: Value,
    pub summary: String,
    pub before: Option<Value>,
    pub after: Value,
}

fn text_arg(args: &Value, name: &str) -> Option<String> {
    args.get(name)
        .and_then(Value::as_str)
        .map(|s| s.trim().to_owned())
}

async fn assignee_name(
    conn: &mut PgConnection,
    org_id: Uuid,
    project_id: Uuid,
    assignee: Option<Uuid>,
) -> Result<Result<Option<String>, ToolError>, Internal> {
    let Some(a) = assignee else {
        return Ok(Ok(None));
    };
    Ok(
        match data::assignable(conn, org_id.into(), project_id.into(), a.into()).await? {
            Some(name) => Ok(Some(name)),
            None => Err(ToolError(
                "assignee_id: does not name a member of this organization who can see the project"
                    .into(),
            )),
        },
    )
}

/// Check a write call (already schema-valid) against what the user may do now, and describe it.
pub async fn propose(
    conn: &mut PgConnection,
    ctx: &ToolCtx,
    name: &str,
    args: &Value,
) -> Result<Result<Proposal, ToolError>, Internal> {
    let (user, conv) = (ctx.user_id, ctx.conversation_id);
    match name {
        "create_task" => {
            let Some(project_id) = uuid_arg(args, "project_id") else {
                return Ok(Err(ToolError::not_found()));
            };
            let Some((project, org)) =
                data::project(conn, user.into(), conv.into(), project_id.into()).await?
            else {
                return Ok(Err(ToolError::not_found()));
            };
            let title = text_arg(args, "title").unwrap_or_default();
            if title.is_empty() {
                return Ok(Err(ToolError("title: must not be blank".into())));
            }
            let description = text_arg(args, "description").unwrap_or_default();
            let status = status_arg(args).unwrap_or(TaskStatus::Todo);
            let assignee = uuid_arg(args, "assignee_id");
            let who = match assignee_name(conn, org.into(), project.id.into(), assignee).await? {
                Ok(w) => w,
                Err(e) => return Ok(Err(e)),
            };
            let after = json!({
                "project_id": project.id, "title": title, "description": description,
                "status": status, "assignee_id": assignee,
            });
            let mut summary = format!(
                "Create task \"{title}\" in project \"{}\" (status {status}",
                project.name
            );
            if let Some(w) = who {
                summary.push_str(&format!(", assigned to {w}"));
            }
            summary.push(')');
            Ok(Ok(Proposal {
                project_id: project.id.into(),
                arguments: after.clone(),
                summary,
                before: None,
                after,
            }))
        }
        "update_task" => {
            let Some(task_id) = uuid_arg(args, "task_id") else {
                return Ok(Err(ToolError::not_found()));
            };
            let Some(task) = data::task(conn, user.into(), conv.into(), task_id.into()).await?
            else {
                return Ok(Err(ToolError::not_found()));
            };
            let mut before = serde_json::Map::new();
            let mut after = serde_json::Map::new();
            let mut changes = Vec::new();
            if let Some(title) = text_arg(args, "title") {
                if title.is_empty() {
                    return Ok(Err(ToolError("title: must not be blank".into())));
                }
                before.insert("title".into(), json!(task.title));
                after.insert("title".into(), json!(title));
                changes.push(format!("title \"{}\" → \"{title}\"", task.title));
            }
            if let Some(description) = text_arg(args, "description") {
                before.insert("description".into(), json!(task.description));
                after.insert("description".into(), json!(description));
                changes.push("description updated".to_owned());
            }
            if let Some(status) = status_arg(args) {
                before.insert("status".into(), json!(task.status));
                after.insert("status".into(), json!(status));
                changes.push(format!("status {} → {status}", task.status));
            }
            if args.get("assignee_id").is_some() {
                let new = uuid_arg(args, "assignee_id");
                let org = ctx.org_id;
                let who = match assignee_name(conn, org, task.project_id.into(), new).await? {
                    Ok(w) => w,
                    Err(e) => return Ok(Err(e)),
                };
                let old = match task.assignee_id {
                    Some(a) => data::member_name(conn, org.into(), a).await?,
                    None => None,
                };
                before.insert("assignee_id".into(), json!(task.assignee_id));
                after.insert("assignee_id".into(), json!(new));
                changes.push(format!(
                    "assignee {} → {}",
                    old.as_deref().unwrap_or("nobody"),
                    who.as_deref().unwrap_or("nobody")
                ));
            }
            if changes.is_empty() {
                return Ok(Err(ToolError(
                    "name at least one of title, description, status, assignee_id to change".into(),
                )));
            }
            let mut arguments = after.clone();
            arguments.insert("task_id".into(), json!(task.id));
            Ok(Ok(Proposal {
                project_id: task.project_id.into(),
                arguments: Value::Object(arguments),
                summary: format!("Update task \"{}\": {}", task.title, changes.join(", ")),
                before: Some(Value::Object(before)),
                after: Value::Object(after),
            }))
        }
        other => Ok(Err(ToolError(format!("{other} is not a write tool")))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn definitions_are_openai_functions_with_object_schemas() {
        let defs = definitions();
        assert_eq!(defs.len(), TOOLS.len());
        for d in &defs {
            assert_eq!(d["type"], "function");
            assert_eq!(d["function"]["parameters"]["type"], "object");
            assert!(d["function"]["name"].as_str().is_some());
        }
        let names: Vec<&str> = TOOLS.iter().map(|t| t.name).collect();
        assert_eq!(
            names,
            [
                "search_knowledge",
                "list_projects",
                "list_tasks",
                "get_task",
                "create_task",
                "update_task"
            ]
        );
        assert_eq!(find("create_task").unwrap().kind, ToolKind::Write);
        assert_eq!(find("get_task").unwrap().kind, ToolKind::Read);
    }

    #[test]
    fn calls_are_parsed_and_validated() {
        assert_eq!(
            parse_call("drop_tables", "{}").unwrap_err().0,
            "unknown tool \"drop_tables\""
        );
        assert!(
            parse_call("get_task", "{not json")
                .unwrap_err()
                .0
                .contains("not valid JSON")
        );
        assert_eq!(
            parse_call("get_task", r#"{"task_id": "x"}"#).unwrap_err().0,
            "task_id: must be a UUID"
        );
        assert_eq!(
            parse_call(
                "create_task",
                r#"{"project_id": "00000000-0000-0000-0000-000000000000"}"#
            )
            .unwrap_err()
            .0,
            "title: is required"
        );
        let (def, args) = parse_call("list_projects", "").unwrap();
        assert_eq!((def.name, args), ("list_projects", json!({})));
        let e = parse_call(
            "update_task",
            r#"{"task_id": "00000000-0000-0000-0000-000000000000", "status": "archived"}"#,
        )
        .unwrap_err();
        assert!(e.0.starts_with("status: must be one of"), "{}", e.0);
    }
}
