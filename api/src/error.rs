//! The one place where failures become HTTP responses.
//!
//! Every error body is `{"error": {"code": "...", "message": "..."}}` (`error_body`). Internal
//! errors are logged with their cause chain and answered with a generic 500: no SQL, no stack
//! trace, no internal name ever reaches a client.

use poem::http::{HeaderValue, StatusCode, header};
use poem::{Body, IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the message names the offending field.
    #[error("{message}")]
    InvalidInput { message: String },
    /// 401: no or invalid bearer token.
    #[error("authentication required")]
    Unauthorized,
    /// 401: login with an unknown email or a wrong password (the same answer for both).
    #[error("invalid email or password")]
    InvalidCredentials,
    /// 403: authenticated, visible, but not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// 404: missing *or not visible*; the same answer for both, always.
    #[error("not found")]
    NotFound,
    /// 409
    #[error("{0}")]
    Conflict(String),
    /// 413
    #[error("request body too large (limit {limit} bytes)")]
    PayloadTooLarge { limit: usize },
    /// 415
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: well-formed but semantically invalid.
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    /// 429: the API's own per-user limits.
    #[error("too many requests")]
    TooManyRequests { retry_after_secs: u64 },
    /// 429: the per-user cap on open event streams (`SSE_MAX_STREAMS_PER_USER`).
    #[error(
        "too many open event streams (at most {limit} per user); close one, or retry after {retry_after_secs} s"
    )]
    TooManyStreams { limit: usize, retry_after_secs: u64 },
    /// 429: the org's token budget is used up, or held by its open turns (`store::budgets`);
    /// `Retry-After` says when the period resets.
    #[error("{message}")]
    BudgetExceeded {
        message: String,
        retry_after_secs: u64,
    },
    /// 503: a dependency is down.
    #[error("{0}")]
    Unavailable(String),
    /// 503: this process is at capacity for expensive work (password hashing); retry shortly.
    #[error("too many sign-ins in progress; retry after {retry_after_secs} s")]
    Busy { retry_after_secs: u64 },
    /// 500: logged with its cause, answered generically.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidInput {
            message: message.into(),
        }
    }

    pub fn internal(e: impl Into<anyhow::Error>) -> Self {
        Self::Internal(e.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidInput { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::InvalidCredentials => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. }
            | ApiError::TooManyStreams { .. }
            | ApiError::BudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) | ApiError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidInput { .. } => "invalid_input",
            ApiError::Unauthorized => "unauthorized",
            ApiError::InvalidCredentials => "invalid_credentials",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Unprocessable { code, .. } => code,
            ApiError::TooManyRequests { .. } => "rate_limited",
            ApiError::TooManyStreams { .. } => "too_many_streams",
            ApiError::BudgetExceeded { .. } => "budget_exceeded",
            ApiError::Unavailable(_) | ApiError::Busy { .. } => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<store::StoreError> for ApiError {
    fn from(e: store::StoreError) -> Self {
        if let store::StoreError::Conflict { message } = e {
            return ApiError::Conflict(message.into());
        }
        if let store::StoreError::OverBudget {
            period,
            until_reset,
            retry_after_secs,
        } = e
        {
            let message = if until_reset {
                format!(
                    "the organization's {period} token budget is used up; it resets in {retry_after_secs} s"
                )
            } else {
                format!(
                    "the rest of the organization's {period} token budget is held by turns still running; it may free up as they finish, and resets in {retry_after_secs} s"
                )
            };
            return ApiError::BudgetExceeded {
                message,
                retry_after_secs,
            };
        }
        if let store::StoreError::InvalidReference { field, message } = e {
            return ApiError::Unprocessable {
                code: "invalid_reference",
                message: format!("{field} {message}"),
            };
        }
        if e.is_unavailable() {
            tracing::error!(error = ?e, "database unavailable");
            ApiError::Unavailable("the database is unavailable".into())
        } else {
            ApiError::Internal(e.into())
        }
    }
}

impl From<sqlx::Error> for ApiError {
    /// Beginning, committing or acquiring: the same mapping as any store error.
    fn from(e: sqlx::Error) -> Self {
        store::StoreError::from(e).into()
    }
}

/// The JSON error body of every error: `{"error": {"code", "message"}}`.
pub fn error_body(code: &str, message: &str) -> serde_json::Value {
    json!({ "error": { "code": code, "message": message } })
}

/// Build the response for a status, code and message, with the headers the contract asks for.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let mut resp = Response::builder()
        .status(status)
        .content_type("application/json; charset=utf-8")
        .body(Body::from_json(error_body(code, message)).unwrap_or_else(|_| Body::empty()));
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

impl poem::error::ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        ApiError::status(self)
    }

    fn as_response(&self) -> Response {
        if let ApiError::Internal(cause) = self {
            tracing::error!(error = ?cause, "internal error");
        }
        let mut resp = error_response(self.status(), self.code(), &self.to_string());
        if let ApiError::TooManyRequests { retry_after_secs }
        | ApiError::TooManyStreams {
            retry_after_secs, ..
        }
        | ApiError::Busy { retry_after_secs }
        | ApiError::BudgetExceeded {
            retry_after_secs, ..
        } = self
            && let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

/// Lets handlers return `Result<T, ApiError>` and registers the error body's schema. Which
/// error statuses each operation answers is written into the OpenAPI document by
/// `crate::openapi::finish`, per status (it knows the operation's shape; this type does not).
impl poem_openapi::ApiResponse for ApiError {
    fn meta() -> poem_openapi::registry::MetaResponses {
        poem_openapi::registry::MetaResponses { responses: vec![] }
    }

    fn register(registry: &mut poem_openapi::registry::Registry) {
        use poem_openapi::types::Type as _;
        ErrorBody::register(registry);
    }
}

/// The error body of [`error_body`] (for the OpenAPI document).
#[derive(poem_openapi::Object)]
pub struct ErrorBody {
    pub error: ErrorBodyDetail,
}

#[derive(poem_openapi::Object)]
pub struct ErrorBodyDetail {
    /// machine-readable code, e.g. `invalid_input`, `not_found`
    pub code: String,
    /// human-readable text; for 400 it names the field
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        poem::error::ResponseError::as_response(&self)
    }
}

/// Turn any error that escaped a handler (poem's own 404/405, poem-openapi's parse errors, our
/// `ApiError`s) into the contract's body. Used as the outermost `catch_all_error`.
pub async fn normalize_error(err: poem::Error) -> Response {
    if let Some(api) = err.downcast_ref::<ApiError>() {
        return poem::error::ResponseError::as_response(api);
    }
    // A malformed id in a path names nothing: answer exactly like an id that does not exist
    // (poem-openapi does not keep the parameter's name, only a positional `param0`).
    if err.is::<poem_openapi::error::ParsePathError>() {
        return poem::error::ResponseError::as_response(&ApiError::NotFound);
    }
    let status = err.status();
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("not_found", "not found".to_owned()),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "method not allowed".to_owned()),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "request body too large".to_owned()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported_media_type",
            "unsupported content type; send application/json".to_owned(),
        ),
        StatusCode::UNAUTHORIZED => ("unauthorized", "authentication required".to_owned()),
        s if s.is_client_error() => ("invalid_input", client_message(&err)),
        _ => {
            tracing::error!(error = %err, status = %status, "unhandled error");
            ("internal", "internal error".to_owned())
        }
    };
    error_response(status, code, &message)
}

/// poem-openapi's request-parsing errors describe the request (which parameter is malformed);
/// say it in our words, naming the parameter, bounded in length.
fn client_message(err: &poem::Error) -> String {
    let mut msg = if let Some(e) = err.downcast_ref::<poem_openapi::error::ParseParamError>() {
        format!("parameter `{}` is invalid", e.name)
    } else if err.is::<poem_openapi::error::ParseRequestPayloadError>() {
        "the request body is not valid JSON for this endpoint".to_owned()
    } else {
        err.to_string()
    };
    if msg.len() > 300 {
        let mut cut = 300;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
    }
    msg
}

/// A handler that panicked answers 500 in the contract's shape instead of a dropped
/// connection (poem's `CatchPanic` around every route; the panic itself is reported by the
/// panic hook). Handlers do not panic by design (`clippy::panic`, `unwrap_used` are denied);
/// this is the net under a dependency that does.
#[derive(Clone, Copy, Debug, Default)]
pub struct PanicAsInternal;

impl poem::middleware::PanicHandler for PanicAsInternal {
    type Response = Response;

    fn get_response(&self, _panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
        tracing::error!("a request handler panicked");
        error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use poem::{Endpoint, EndpointExt};

    #[tokio::test]
    async fn a_panicking_handler_answers_500_in_the_contracts_shape() {
        let ep = poem::endpoint::make_sync(|_| -> &'static str { panic!("boom") })
            .with(poem::middleware::CatchPanic::new().with_handler(PanicAsInternal));
        let resp = ep.get_response(poem::Request::default()).await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body: serde_json::Value =
            serde_json::from_slice(&resp.into_body().into_vec().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "internal");
        assert!(!body.to_string().contains("boom"), "no panic text: {body}");
    }
}
