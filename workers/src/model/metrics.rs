//! Chat and model metrics through the `metrics` facade. Labels are bounded: model names come
//! from configuration and org settings (checked against the proxy's model list), outcomes
//! from `LlmError::kind`; never ids.

use std::time::Duration;

pub const MODEL_REQUESTS: &str = "model_requests_total";
pub const MODEL_TTFT: &str = "model_time_to_first_token_seconds";
pub const MODEL_DURATION: &str = "model_duration_seconds";
pub const MODEL_TOKENS: &str = "model_tokens_total";
pub const FALLBACKS: &str = "chat_fallbacks_total";
pub const RATE_LIMIT_WAITS: &str = "chat_rate_limit_waits_total";

pub fn describe() {
    metrics::describe_counter!(
        MODEL_REQUESTS,
        "Model calls by model and outcome (ok or the failure kind)"
    );
    metrics::describe_histogram!(
        MODEL_TTFT,
        metrics::Unit::Seconds,
        "Time from sending a model call to its first token"
    );
    metrics::describe_histogram!(
        MODEL_DURATION,
        metrics::Unit::Seconds,
        "Duration of successful model calls, request to last token"
    );
    metrics::describe_counter!(
        MODEL_TOKENS,
        "Tokens by model and kind (prompt, completion)"
    );
    metrics::describe_counter!(
        FALLBACKS,
        "Chat turns answered by the fallback model's call"
    );
    metrics::describe_counter!(
        RATE_LIMIT_WAITS,
        "Chat turns re-queued because their model was rate limited or cooling down"
    );
}

pub fn request(model: &str, outcome: &'static str) {
    metrics::counter!(MODEL_REQUESTS, "model" => model.to_owned(), "outcome" => outcome)
        .increment(1);
}

pub fn first_token(model: &str, after: Duration) {
    metrics::histogram!(MODEL_TTFT, "model" => model.to_owned()).record(after.as_secs_f64());
}

pub fn finished(model: &str, took: Duration, usage: Option<llm::Usage>) {
    metrics::histogram!(MODEL_DURATION, "model" => model.to_owned()).record(took.as_secs_f64());
    if let Some(u) = usage {
        metrics::counter!(MODEL_TOKENS, "model" => model.to_owned(), "kind" => "prompt")
            .increment(u64::from(u.prompt_tokens));
        metrics::counter!(MODEL_TOKENS, "model" => model.to_owned(), "kind" => "completion")
            .increment(u64::from(u.completion_tokens));
    }
}

pub fn fallback(from: &str, to: &str) {
    metrics::counter!(FALLBACKS, "from_model" => from.to_owned(), "to_model" => to.to_owned())
        .increment(1);
}

pub fn rate_limit_wait(model: &str) {
    metrics::counter!(RATE_LIMIT_WAITS, "model" => model.to_owned()).increment(1);
}
