//! What the API shows of the store's rows, and the enums of its contract.

use chrono::{DateTime, Utc};
use poem_openapi::{Enum, Object};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A role in an organization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Serialize, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum RoleName {
    Owner,
    Admin,
    Member,
}

impl From<RoleName> for store::Role {
    fn from(r: RoleName) -> Self {
        match r {
            RoleName::Owner => store::Role::Owner,
            RoleName::Admin => store::Role::Admin,
            RoleName::Member => store::Role::Member,
        }
    }
}

impl From<store::Role> for RoleName {
    fn from(r: store::Role) -> Self {
        match r {
            store::Role::Owner => RoleName::Owner,
            store::Role::Admin => RoleName::Admin,
            store::Role::Member => RoleName::Member,
        }
    }
}

/// Who sees a project (org owners and admins always do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Serialize, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum VisibilityName {
    /// every member of the org
    Org,
    /// the members of the project's team (`team_id`)
    Team,
    /// the project's explicit members
    Private,
}

impl From<VisibilityName> for store::Visibility {
    fn from(v: VisibilityName) -> Self {
        match v {
            VisibilityName::Org => store::Visibility::Org,
            VisibilityName::Team => store::Visibility::Team,
            VisibilityName::Private => store::Visibility::Private,
        }
    }
}

impl From<store::Visibility> for VisibilityName {
    fn from(v: store::Visibility) -> Self {
        match v {
            store::Visibility::Org => VisibilityName::Org,
            store::Visibility::Team => VisibilityName::Team,
            store::Visibility::Private => VisibilityName::Private,
        }
    }
}

/// A task's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Serialize, Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum StatusName {
    Todo,
    InProgress,
    Done,
}

impl From<StatusName> for store::TaskStatus {
    fn from(s: StatusName) -> Self {
        match s {
            StatusName::Todo => store::TaskStatus::Todo,
            StatusName::InProgress => store::TaskStatus::InProgress,
            StatusName::Done => store::TaskStatus::Done,
        }
    }
}

impl From<store::TaskStatus> for StatusName {
    fn from(s: store::TaskStatus) -> Self {
        match s {
            store::TaskStatus::Todo => StatusName::Todo,
            store::TaskStatus::InProgress => StatusName::InProgress,
            store::TaskStatus::Done => StatusName::Done,
        }
    }
}

#[derive(Debug, Object)]
pub struct UserView {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

impl From<store::tenancy::User> for UserView {
    fn from(u: store::tenancy::User) -> Self {
        Self {
            id: u.id.into(),
            email: u.email,
            name: u.name,
            created_at: u.created_at,
        }
    }
}

#[derive(Debug, Object)]
pub struct OrgView {
    pub id: Uuid,
    pub name: String,
    /// The org's model (null: the system default applies).
    #[oai(nullable)]
    pub model: Option<String>,
    /// The org's fallback model (null: the system default applies).
    #[oai(nullable)]
    pub fallback_model: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl From<store::tenancy::Org> for OrgView {
    fn from(o: store::tenancy::Org) -> Self {
        Self {
            id: o.id.into(),
            name: o.name,
            model: o.model,
            fallback_model: o.fallback_model,
            created_at: o.created_at,
        }
    }
}

/// A member of an organization: the user and their role.
#[derive(Debug, Object)]
pub struct MemberView {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub role: RoleName,
    pub org_id: Uuid,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Object)]
pub struct TeamView {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

impl From<store::tenancy::Team> for TeamView {
    fn from(t: store::tenancy::Team) -> Self {
        Self {
            id: t.id.into(),
            org_id: t.org_id.into(),
            name: t.name,
            created_at: t.created_at,
        }
    }
}

#[derive(Debug, Object)]
pub struct ProjectView {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    pub description: String,
    pub visibility: VisibilityName,
    #[oai(nullable)]
    pub team_id: Option<Uuid>,
    #[oai(nullable)]
    pub created_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<store::projects::Project> for ProjectView {
    fn from(p: store::projects::Project) -> Self {
        Self {
            id: p.id.into(),
            org_id: p.org_id.into(),
            name: p.name,
            description: p.description,
            visibility: p.visibility.into(),
            team_id: p.team_id.map(Into::into),
            created_by: p.created_by.map(Into::into),
            created_at: p.created_at,
            updated_at: p.updated_at,
        }
    }
}

#[derive(Debug, Object)]
pub struct TaskView {
    pub id: Uuid,
    pub project_id: Uuid,
    pub title: String,
    pub description: String,
    pub status: StatusName,
    #[oai(nullable)]
    pub assignee_id: Option<Uuid>,
    #[oai(nullable)]
    pub created_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<store::tasks::Task> for TaskView {
    fn from(t: store::tasks::Task) -> Self {
        Self {
            id: t.id.into(),
            project_id: t.project_id.into(),
            title: t.title,
            description: t.description,
            status: t.status.into(),
            assignee_id: t.assignee_id.map(Into::into),
            created_by: t.created_by.map(Into::into),
            created_at: t.created_at,
            updated_at: t.updated_at,
        }
    }
}

/// A member of a team.
#[derive(Debug, Object)]
pub struct TeamMemberView {
    pub team_id: Uuid,
    pub user_id: Uuid,
}

/// A member of a private project.
#[derive(Debug, Object)]
pub struct ProjectMemberView {
    pub project_id: Uuid,
    pub user_id: Uuid,
}

/// A conversation of the caller.
#[derive(Object)]
pub struct ConversationView {
    pub id: Uuid,
    pub title: String,
    /// The projects it is narrowed to; null when it draws on every project the caller can see.
    #[oai(nullable)]
    pub project_ids: Option<Vec<Uuid>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl ConversationView {
    pub fn new(c: store::conversations::Conversation, scope: Vec<Uuid>) -> Self {
        Self {
            id: c.id,
            title: c.title,
            project_ids: c.scoped.then_some(scope),
            created_at: c.created_at,
            updated_at: c.updated_at,
        }
    }
}

/// Token counts of an assistant message.
#[derive(Object, Clone, Serialize)]
pub struct UsageView {
    #[oai(nullable)]
    pub prompt_tokens: Option<i32>,
    #[oai(nullable)]
    pub completion_tokens: Option<i32>,
    #[oai(nullable)]
    pub total_tokens: Option<i32>,
}

/// A source the assistant was given for an answer (retrieved workspace data).
#[derive(Object, Clone, Serialize, Deserialize)]
pub struct CitationView {
    /// `document`, `project`, `task` or `message` (an earlier conversation of the caller).
    pub source_kind: String,
    pub source_id: Uuid,
    pub title: String,
    /// The chunk of the source (0-based).
    pub chunk: i32,
}

/// A message of a conversation (`user`, `assistant`, or `tool` for a tool result). Internal
/// memory and summaries are never messages and never shown. The documented twin of
/// `store::public::PublicMessage`, the one serializer of a message (listing, JSON-mode answer,
/// `message.completed`); a test checks both give the same JSON.
#[derive(Object, Clone, Serialize)]
pub struct MessageView {
    pub id: Uuid,
    pub role: String,
    pub content: String,
    /// The model that wrote it (assistant messages).
    #[oai(nullable)]
    pub model: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The response it answers (assistant messages).
    #[oai(nullable)]
    pub response_id: Option<Uuid>,
    #[oai(nullable)]
    pub usage: Option<UsageView>,
    /// The sources of the workspace data the answer was given (assistant messages; else empty).
    pub citations: Vec<CitationView>,
}

impl From<store::public::PublicMessage> for MessageView {
    fn from(m: store::public::PublicMessage) -> Self {
        Self {
            id: m.id.into(),
            role: m.role,
            content: m.content,
            model: m.model,
            created_at: m.created_at,
            response_id: m.response_id.map(Into::into),
            usage: m.usage.map(|u| UsageView {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                total_tokens: u.total_tokens,
            }),
            citations: m
                .citations
                .into_iter()
                .map(|c| CitationView {
                    source_kind: c.source_kind,
                    source_id: c.source_id,
                    title: c.title,
                    chunk: c.chunk,
                })
                .collect(),
        }
    }
}

impl From<store::conversations::Message> for MessageView {
    fn from(m: store::conversations::Message) -> Self {
        store::public::PublicMessage::from(m).into()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use poem_openapi::types::ToJSON as _;

    use super::*;

    /// What the API documents and sends (poem-openapi's serializer) is what the worker
    /// publishes (serde, `store::public`), with and without usage.
    #[test]
    fn message_view_serializes_like_the_public_message() {
        for (prompt, completion) in [(Some(3), Some(4)), (None, None), (Some(1), None)] {
            let m = store::conversations::Message {
                id: Uuid::now_v7(),
                conversation_id: Uuid::now_v7(),
                seq: 1,
                role: "assistant".into(),
                content: "hi".into(),
                response_id: Some(Uuid::now_v7()),
                model: None,
                prompt_tokens: prompt,
                completion_tokens: completion,
                latency_ms: None,
                tool_calls: None,
                tool_call_id: None,
                citations: serde_json::json!([{"source_kind": "task", "source_id": Uuid::now_v7(),
                    "title": "T", "chunk": 2}]),
                created_at: Utc::now(),
            };
            let public = store::public::PublicMessage::from(m.clone());
            assert_eq!(
                MessageView::from(m).to_json().unwrap(),
                serde_json::to_value(&public).unwrap()
            );
        }
    }
}
