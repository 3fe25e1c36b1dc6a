//! HTTP endpoints, one module per area, all declared with poem-openapi so that
//! `/openapi.json` and `/docs` come from the code.

pub mod actions;
pub mod auth;
pub mod budget;
pub mod chat;
pub mod conversations;
pub mod documents;
pub mod health;
pub mod metrics;
pub mod model_settings;
pub mod orgs;
pub mod projects;
pub mod tasks;
pub mod teams;

/// The OpenAPI tags.
#[derive(poem_openapi::Tags)]
pub enum Tag {
    /// Registration, login and the caller
    Auth,
    /// Organizations, their members and teams
    Organizations,
    /// Projects and their members
    Projects,
    /// Project tasks
    Tasks,
    /// Documents uploaded into projects (indexed for retrieval)
    Documents,
    /// Conversations with the assistant: messages, streamed answers (SSE), resumption
    Conversations,
    /// Per-organization model settings
    Models,
    /// Actions the assistant proposed (supervised writes): list, confirm, reject
    Actions,
}
