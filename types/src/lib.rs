//! Typed ids and closed sets, defined once for every crate of the workspace.
//!
//! - [`ids`]: one newtype per entity id ([`OrgId`], [`ConversationId`], ...), so a response id
//!   can never be passed where a conversation id belongs. On the wire (serde) and in PostgreSQL
//!   (`uuid`) an id is exactly its UUID.
//! - [`enums`]: text-backed enums (statuses, roles, error codes), stored as `text` with a CHECK
//!   constraint and (de)serialised as their lowercase names, so a status is never a string
//!   compared by hand.
//!
//! Nothing here depends on another crate of ours: `store` and `jobs` both use it without
//! depending on each other.

pub mod enums;
pub mod ids;

pub use enums::{
    ActionStatus, DocumentStatus, ErrorCode, ResponseStatus, Role, TaskStatus, UnknownValue,
    Visibility,
};
pub use ids::{
    ActionId, ConversationId, DocumentId, JobId, MemoryId, MessageId, OrgId, ProjectId, ResponseId,
    TaskId, TeamId, UserId,
};
