//! Entity ids: one newtype per entity over a UUID ([`id_type!`]).
//!
//! An id is transparent at every boundary: serde (a job payload, an event) sees the UUID string,
//! PostgreSQL the `uuid` (or `uuid[]` for a `Vec`). Converting from and to a bare [`Uuid`] is
//! explicit (`From`, [`OrgId::into_uuid`]) and belongs at the edges: HTTP path parameters and
//! OpenAPI objects, which keep `Uuid` so the published document does not change.

use std::fmt;
use std::str::FromStr;

use sqlx::postgres::{PgArgumentBuffer, PgHasArrayType, PgTypeInfo, PgValueRef};
use uuid::Uuid;

/// Define an id newtype over [`Uuid`].
macro_rules! id_type {
    ($($(#[$meta:meta])* $name:ident;)+) => {$(
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[derive(serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new, time-ordered id (UUID v7), for rows and jobs created now.
            pub fn new_v7() -> Self {
                Self(Uuid::now_v7())
            }

            pub const fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }

            pub const fn into_uuid(self) -> Uuid {
                self.0
            }

            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }

            /// The ids of many as bare UUIDs (for a boundary that takes `Uuid`s).
            pub fn uuids(ids: &[Self]) -> Vec<Uuid> {
                ids.iter().map(|id| id.0).collect()
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        /// As the bare UUID, so logs read the same as before the newtype.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::from_str(s).map(Self)
            }
        }

        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> PgTypeInfo {
                <Uuid as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <Uuid as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl PgHasArrayType for $name {
            fn array_type_info() -> PgTypeInfo {
                <Uuid as PgHasArrayType>::array_type_info()
            }

            fn array_compatible(ty: &PgTypeInfo) -> bool {
                <Uuid as PgHasArrayType>::array_compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(value: PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                <Uuid as sqlx::Decode<sqlx::Postgres>>::decode(value).map(Self)
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <Uuid as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&self.0, buf)
            }

            fn size_hint(&self) -> usize {
                <Uuid as sqlx::Encode<sqlx::Postgres>>::size_hint(&self.0)
            }
        }
    )+};
}

id_type! {
    /// An organization (a tenant).
    OrgId;
    /// A user (a member of one or more organizations).
    UserId;
    /// A team of an organization.
    TeamId;
    /// A project of an organization.
    ProjectId;
    /// A task of a project.
    TaskId;
    /// A conversation of a user.
    ConversationId;
    /// A message of a conversation (user, assistant or tool).
    MessageId;
    /// A response: the answer to one user message, or a continuation after a confirmed action.
    ResponseId;
    /// An uploaded document of a project.
    DocumentId;
    /// A proposed action (a write tool call awaiting, or past, the user's decision).
    ActionId;
    /// A memory entry (org, project or user tier).
    MemoryId;
    /// A job: the id of its envelope, the key its handler is idempotent by.
    JobId;
}
