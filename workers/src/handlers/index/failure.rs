//! How one source's failure is classified: what the embedder or the database said, whether
//! retrying can help, and what operators and the document's user are told.

use llm::LlmError;
use store::StoreError;

/// Why one source could not be indexed in this batch.
#[derive(Debug, Clone)]
pub(super) enum Failure {
    /// The embedder rejects its content (a 4xx): retrying cannot help.
    Rejected,
    /// The database refuses its rows (data exception, constraint, program limit): retrying
    /// cannot help.
    Refused(String),
    /// Anything else that hit this source alone; it is tried again later.
    Transient(String),
}

impl Failure {
    pub(super) fn permanent(&self) -> bool {
        !matches!(self, Failure::Transient(_))
    }

    /// For operators (`index_outbox.last_error`): never shown to users.
    pub(super) fn detail(&self) -> String {
        match self {
            Failure::Rejected => "the embedder rejected the content".to_owned(),
            Failure::Refused(e) => format!("the database refused the rows: {e}"),
            Failure::Transient(e) => e.clone(),
        }
    }

    /// What a document's `failure_reason` says: shown to users, so no provider or database text.
    pub(super) fn reason(&self, attempts: u32) -> String {
        match self {
            Failure::Rejected => FAILED_REJECTED.to_owned(),
            Failure::Refused(_) => FAILED_REFUSED.to_owned(),
            Failure::Transient(_) => format!(
                "indexing this document failed {attempts} times; upload it again later, or split it into smaller documents"
            ),
        }
    }
}

/// The failure of one source's statements, or `None` when the connection itself failed (the
/// whole batch is lost then).
pub(super) fn db_failure(e: &StoreError) -> Option<Failure> {
    let StoreError::Database(sqlx::Error::Database(db)) = e else {
        return None;
    };
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    let text = format!("{code}: {}", db.message());
    // SQLSTATE classes 22 (data exception), 23 (integrity constraint), 54 (program limit
    // exceeded, e.g. a tsvector over 1 MB): the same rows would be refused again
    if ["22", "23", "54"].iter().any(|c| code.starts_with(c)) {
        Some(Failure::Refused(text))
    } else {
        Some(Failure::Transient(text))
    }
}

const FAILED_REJECTED: &str = "the embedding model rejected this document's content";
const FAILED_REFUSED: &str = "the search index cannot store this document's text; remove unusual content (very long lines or headings, binary data) or split it into smaller documents, then upload it again";
pub(super) const FAILED_UNAVAILABLE: &str =
    "the embedding model was unavailable on every attempt; upload the document again later";

/// A failure the embedder will repeat for the same input (not a rate limit, a timeout or a
/// server error).
pub(super) fn is_permanent(e: &LlmError) -> bool {
    matches!(e, LlmError::Upstream { status, .. }
        if (400..500).contains(status) && *status != 408 && *status != 429)
}

/// A failure that says the embedder is unavailable, whatever the input: rate limits,
/// timeouts, connection errors. (Inputs are bounded, so a timeout is not the input's fault.)
pub(super) fn is_unavailable(e: &LlmError) -> bool {
    matches!(
        e,
        LlmError::RateLimited { .. } | LlmError::Timeout(_) | LlmError::Connection(_)
    )
}
