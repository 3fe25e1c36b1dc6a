use std::time::Duration;

/// How a model call failed. `RateLimited` is re-queued with backoff; everything else is a
/// failure of that model (fallback-eligible before the first token reached the client).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    #[error("rate limited by the model provider")]
    RateLimited { retry_after: Option<Duration> },
    #[error("model provider answered {status}: {message}")]
    Upstream { status: u16, message: String },
    #[error("model call timed out: {0}")]
    Timeout(String),
    #[error("cannot reach the model proxy: {0}")]
    Connection(String),
    #[error("malformed model response: {0}")]
    Malformed(String),
    #[error("the model stream ended early: {0}")]
    Cut(String),
    #[error("the model returned an empty answer")]
    Empty,
}

impl LlmError {
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, LlmError::RateLimited { .. })
    }

    /// Whether the same request may succeed later. An upstream 4xx other than 408 (timeout)
    /// and 429 (rate limit) is about the request itself (too long, refused by a content
    /// policy): sending it again fails again. Everything else (5xx, timeouts, connections,
    /// malformed or cut streams, empty answers) is the provider's state of the moment.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, LlmError::Upstream { status, .. }
            if (400..500).contains(status) && *status != 408 && *status != 429)
    }

    /// Whether the provider is unavailable whatever the request: rate limited, timed out,
    /// unreachable. (A caller with bounded inputs stops the whole run on these instead of
    /// blaming one input.)
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            LlmError::RateLimited { .. } | LlmError::Timeout(_) | LlmError::Connection(_)
        )
    }

    /// The provider's `Retry-After`, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LlmError::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }

    /// A short, stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            LlmError::RateLimited { .. } => "rate_limited",
            LlmError::Upstream { .. } => "upstream_error",
            LlmError::Timeout(_) => "timeout",
            LlmError::Connection(_) => "connection",
            LlmError::Malformed(_) => "malformed",
            LlmError::Cut(_) => "cut",
            LlmError::Empty => "empty",
        }
    }

    pub(crate) fn from_reqwest(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            LlmError::Timeout(e.to_string())
        } else if e.is_connect() {
            LlmError::Connection(e.to_string())
        } else if e.is_body() || e.is_decode() {
            LlmError::Cut(e.to_string())
        } else {
            LlmError::Connection(e.to_string())
        }
    }
}

/// `Retry-After` in seconds (or an HTTP date we do not try to parse), also under the names the
/// LiteLLM proxy relays it as (`llm_provider-retry-after`) and the millisecond variant.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = get("retry-after-ms").or_else(|| get("llm_provider-retry-after-ms"))
        && let Ok(ms) = ms.parse::<f64>()
    {
        return Some(Duration::from_millis(ms.max(0.0) as u64));
    }
    let secs = get("retry-after").or_else(|| get("llm_provider-retry-after"))?;
    secs.parse::<f64>()
        .ok()
        .map(|s| Duration::from_millis((s.max(0.0) * 1000.0) as u64))
}

/// Turn a non-success response into an error. Only the error's *type* is kept, never the
/// provider's message: those often quote the prompt (context length, content policy), and the
/// error ends up in logs and dead letters.
pub(crate) async fn check_status(resp: reqwest::Response) -> Result<reqwest::Response, LlmError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry = retry_after(resp.headers());
    let body = resp.bytes().await.unwrap_or_default();
    let body = &body[..body.len().min(16 * 1024)];
    let kind = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/type").and_then(|m| m.as_str()).map(|t| {
                t.chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .take(64)
                    .collect::<String>()
            })
        })
        .filter(|t| !t.is_empty());
    let message = match kind {
        Some(kind) => format!("{kind} (HTTP {})", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    };
    if status.as_u16() == 429 {
        return Err(LlmError::RateLimited { retry_after: retry });
    }
    Err(LlmError::Upstream {
        status: status.as_u16(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(status: u16) -> LlmError {
        LlmError::Upstream {
            status,
            message: String::new(),
        }
    }

    #[test]
    fn a_rejected_request_is_not_retried() {
        assert!(!upstream(400).is_retryable());
        assert!(!upstream(422).is_retryable());
        assert!(upstream(429).is_retryable());
        assert!(upstream(408).is_retryable());
        assert!(upstream(500).is_retryable());
        assert!(LlmError::Timeout("t".into()).is_retryable());
        assert!(LlmError::Empty.is_retryable());
    }

    #[test]
    fn unavailable_is_about_the_provider_not_the_request() {
        assert!(LlmError::RateLimited { retry_after: None }.is_unavailable());
        assert!(LlmError::Timeout("t".into()).is_unavailable());
        assert!(LlmError::Connection("c".into()).is_unavailable());
        assert!(!upstream(500).is_unavailable());
        assert!(!upstream(400).is_unavailable());
        assert!(!LlmError::Cut("c".into()).is_unavailable());
    }
}
