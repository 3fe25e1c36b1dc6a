use std::time::Duration;

use jobs::JobError;
use llm::LlmError;

use super::IndexError;
use super::failure::is_permanent;

#[test]
fn embedder_failures_are_classified() {
    let upstream = |status| LlmError::Upstream {
        status,
        message: String::new(),
    };
    assert!(is_permanent(&upstream(400)));
    assert!(is_permanent(&upstream(422)));
    assert!(!is_permanent(&upstream(429)));
    assert!(!is_permanent(&upstream(408)));
    assert!(!is_permanent(&upstream(500)));
    assert!(!is_permanent(&LlmError::Timeout("t".into())));
    // a rate limit's Retry-After replaces the queue's backoff
    let e = IndexError::Embed(LlmError::RateLimited {
        retry_after: Some(Duration::from_secs(7)),
    })
    .into_job_error();
    assert!(matches!(
        e,
        JobError::Retryable { retry_after: Some(d), .. } if d == Duration::from_secs(7)
    ));
    assert!(
        IndexError::Embed(upstream(503))
            .into_job_error()
            .is_retryable()
    );
}
