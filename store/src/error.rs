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
}

impl StoreError {
    /// True when the failure is about reaching the database rather than the statement: worth
    /// retrying a job, or answering 503.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Database(
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Tls(_)
            )
        )
    }
}
