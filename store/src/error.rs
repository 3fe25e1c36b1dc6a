/// Errors of the store. Callers map them to HTTP or job outcomes; the text of a database error
/// is for logs only, never for a response body.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database configuration")]
    Config(#[source] sqlx::Error),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A unique constraint was hit: the thing already exists (HTTP 409). `message` is safe to
    /// show to a client.
    #[error("{message}")]
    Conflict { message: &'static str },
    /// A reference in the request does not name anything usable (a foreign key, or a
    /// same-org/visibility rule; HTTP 422). `field` names the request field.
    #[error("{field}: {message}")]
    InvalidReference {
        field: &'static str,
        message: &'static str,
    },
    /// A chat turn would pass the org's `period` ("daily" or "monthly") token budget
    /// (`budgets::start_turn`); nothing was written. `until_reset`: recorded usage alone fills
    /// the budget, so only the period's end frees it (else the org's open turns hold the rest).
    #[error("the organization's {period} token budget is used up")]
    OverBudget {
        period: &'static str,
        until_reset: bool,
        retry_after_secs: u64,
    },
}

impl StoreError {
    /// True when the failure is about reaching the database rather than the statement: worth
    /// retrying a job, or answering 503.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_),
            ) => true,
            // the server going down or refusing connections: connection exceptions (08xxx),
            // shutdown and restart (57P01-57P03), too many connections (53300)
            StoreError::Database(sqlx::Error::Database(db)) => db.code().is_some_and(|c| {
                c.starts_with("08") || matches!(c.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
            }),
            _ => false,
        }
    }

    /// Whether a job that failed with this is worth another attempt. Every failure of a
    /// statement is: the database may be back, a deadlock or serialization failure gone, and
    /// a conflict or invalid reference may settle once what it raced with has (a project
    /// deleted while a memory run derived facts from it: the next run derives without it).
    /// Configuration and migration failures are not: they repeat until someone fixes them.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, StoreError::Config(_) | StoreError::Migrate(_))
    }

    /// The name of the constraint a failed statement violated, if that is what happened.
    pub fn constraint(&self) -> Option<&str> {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => db.constraint(),
            _ => None,
        }
    }
}

/// Turn the violation of a named constraint into a domain error at the query that hit it
/// (never by matching error text in handlers).
pub(crate) trait OnConstraint<T> {
    fn on_constraint(self, name: &str, to: StoreError) -> Result<T, StoreError>;
}

impl<T, E: Into<StoreError>> OnConstraint<T> for Result<T, E> {
    fn on_constraint(self, name: &str, to: StoreError) -> Result<T, StoreError> {
        self.map_err(|e| {
            let e = e.into();
            if e.constraint() == Some(name) { to } else { e }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configuration_and_migration_failures_are_not_retried() {
        assert!(StoreError::Database(sqlx::Error::PoolTimedOut).is_retryable());
        assert!(StoreError::Database(sqlx::Error::RowNotFound).is_retryable());
        assert!(StoreError::Conflict { message: "m" }.is_retryable());
        assert!(
            StoreError::InvalidReference {
                field: "f",
                message: "m"
            }
            .is_retryable()
        );
        assert!(!StoreError::Config(sqlx::Error::PoolClosed).is_retryable());
    }
}
