//! Embedding with a fallback, and the token estimate: what every caller that embeds text for
//! retrieval or memory needs besides [`LlmClient::embed`] (the chat turn's question, the memory
//! entries of `remember`, the `search_knowledge` tool). An embedding that fails is never fatal
//! for them: the caller goes on without a vector (full-text retrieval, ranking by recency) and
//! logs and counts the failure it gets back here.

use std::time::Duration;

use crate::LlmClient;

/// Estimated tokens of a text: one per 4 characters, rounded up (0 for an empty text). The one
/// estimate of the workspace, used for every prompt budget.
pub fn estimate_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4)
}

/// What an embeddings response `body` for `inputs` cost: the upstream's `usage.prompt_tokens`
/// when above 0 (some providers report 0 through the proxy: an embedding is never free), else
/// the estimate of each input.
pub(crate) fn embedding_tokens(body: &serde_json::Value, inputs: &[String]) -> u64 {
    body.get("usage")
        .and_then(|u| u.get("prompt_tokens"))
        .and_then(serde_json::Value::as_u64)
        .filter(|&n| n > 0)
        .unwrap_or_else(|| inputs.iter().map(|t| estimate_tokens(t) as u64).sum())
}

/// What an embedding request must deliver to be usable.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expect {
    /// Each vector has exactly this many dimensions (`None`: not checked).
    pub dim: Option<u32>,
    /// The request ends by then, or counts as failed (`None`: the client's own limit).
    pub within: Option<Duration>,
}

/// Why an embedding was not usable (for the caller's log line: the failure kind, a dimension
/// mismatch, a missing vector or a timeout).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EmbedFailure(pub String);

impl LlmClient {
    /// Embed `texts` with `model`: one vector per text, in order, as [`Expect`]ed (and what the
    /// request cost), or the reason why not. The caller falls back (and logs, and counts) on
    /// `Err`.
    pub async fn embed_or_fail(
        &self,
        model: &str,
        texts: &[String],
        expect: Expect,
    ) -> Result<crate::Embeddings, EmbedFailure> {
        let call = self.embed(model, texts);
        let outcome = match expect.within {
            Some(limit) => tokio::time::timeout(limit, call)
                .await
                .map_err(|_| EmbedFailure("timeout".into()))?,
            None => call.await,
        };
        let embeddings = outcome.map_err(|e| EmbedFailure(e.kind().to_owned()))?;
        let vectors = &embeddings.vectors;
        if vectors.len() != texts.len() {
            return Err(EmbedFailure(if vectors.is_empty() {
                "no embedding".to_owned()
            } else {
                format!("{} embeddings for {} inputs", vectors.len(), texts.len())
            }));
        }
        if let Some(dim) = expect.dim
            && let Some(v) = vectors
                .iter()
                .find(|v| u32::try_from(v.len()).ok() != Some(dim))
        {
            return Err(EmbedFailure(format!(
                "{} dimensions, expected {dim}",
                v.len()
            )));
        }
        Ok(embeddings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_embedding_costs_what_was_reported_else_the_estimate() {
        let inputs = ["abcdefgh".to_owned(), "héllo".to_owned()];
        let reported = serde_json::json!({"usage": {"prompt_tokens": 7, "total_tokens": 7}});
        assert_eq!(embedding_tokens(&reported, &inputs), 7);
        // none reported, or 0: 2 + 2 estimated
        assert_eq!(
            embedding_tokens(&serde_json::json!({"data": []}), &inputs),
            4
        );
        let zero = serde_json::json!({"usage": {"prompt_tokens": 0}});
        assert_eq!(embedding_tokens(&zero, &inputs), 4);
    }

    #[test]
    fn four_characters_a_token_rounded_up() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
        assert_eq!(estimate_tokens("héllo"), 2);
    }
}
