//! Text-backed enums: closed sets stored as `text` (with a CHECK constraint where the database
//! owns the set) and (de)serialised as the same lowercase names, so only the listed values go
//! in or come out, and no caller compares the strings by hand.

use std::fmt;
use std::str::FromStr;

/// Define an enum stored as one of a fixed set of lowercase strings.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownValue),
                }
            }
        }

        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <String as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <String as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(
                value: sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let s = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                Ok(s.parse::<$name>()?)
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.as_str(), buf)
            }
        }
    };
}

/// A string that is not one of an enum's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown value")]
pub struct UnknownValue;

text_enum! {
    /// A user's role in an organization.
    Role {
        Owner => "owner",
        Admin => "admin",
        Member => "member",
    }
}

impl Role {
    /// Owners and admins manage the org and see every project of it.
    pub fn is_admin(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

text_enum! {
    /// Who sees a project (besides the org's owners and admins, who see all).
    Visibility {
        /// every member of the org
        Org => "org",
        /// the members of the project's team
        Team => "team",
        /// the project's explicit members
        Private => "private",
    }
}

text_enum! {
    /// A task's status.
    TaskStatus {
        Todo => "todo",
        InProgress => "in_progress",
        Done => "done",
    }
}

text_enum! {
    /// Where a response (the answer to one user message, or a continuation after a confirmed
    /// action) stands: `Queued → Running(run) → Completed | Failed`. The transitions are the
    /// compare-and-set statements of `store::responses`; a run's number fences its writes.
    ResponseStatus {
        /// Waiting for a job to take it (first time, or released by a run that waits on a
        /// rate limit).
        Queued => "queued",
        /// A run holds it under a lease (`responses.run`, `responses.leased_until`).
        Running => "running",
        /// The answer is stored.
        Completed => "completed",
        /// It ended with an error (`error_code`, `error_message`).
        Failed => "failed",
    }
}

impl ResponseStatus {
    /// Completed or failed: nothing runs it any more.
    pub fn is_finished(self) -> bool {
        matches!(self, ResponseStatus::Completed | ResponseStatus::Failed)
    }
}

text_enum! {
    /// Where a proposed action stands: `Pending → Confirmed → Executed | Failed`, or
    /// `Pending → Rejected | Expired` (`store::actions`; a pending proposal past its expiry
    /// reads as `Expired` before the sweep writes it down).
    ActionStatus {
        /// Waiting for the user's decision.
        Pending => "pending",
        /// Confirmed; an `execute_action` job runs it exactly once.
        Confirmed => "confirmed",
        /// Run: the write happened (`result`).
        Executed => "executed",
        /// Declined by the user.
        Rejected => "rejected",
        /// Not decided in time.
        Expired => "expired",
        /// Confirmed, but nothing was written (`failure_reason`).
        Failed => "failed",
    }
}

impl ActionStatus {
    /// Executed or failed: the execution is over.
    pub fn is_executed_or_failed(self) -> bool {
        matches!(self, ActionStatus::Executed | ActionStatus::Failed)
    }
}

text_enum! {
    /// Where an uploaded document stands in indexing.
    DocumentStatus {
        /// Waiting for an index run.
        Queued => "queued",
        /// Its chunks are searchable.
        Indexed => "indexed",
        /// Indexing gave up on it (`failure_reason`).
        Failed => "failed",
    }
}

text_enum! {
    /// The `code` of a response's `error` event (docs/ARCHITECTURE.md, "Events and SSE"), also
    /// stored as `responses.error_code`.
    ErrorCode {
        /// Rate limits lasted longer than `RATE_LIMIT_MAX_WAIT_SECS`.
        RateLimited => "rate_limited",
        /// The primary and the fallback both failed before the first token.
        ModelUnavailable => "model_unavailable",
        /// The model failed after tokens had reached the client.
        ModelStreamFailed => "model_stream_failed",
        /// Our own infrastructure (database, Redis) kept failing until the last attempt, or
        /// the response was lost.
        InternalError => "internal_error",
        /// The events of a finished response are no longer kept (and neither is its answer).
        EventsExpired => "events_expired",
    }
}
