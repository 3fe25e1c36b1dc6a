//! The model names the LiteLLM proxy serves, cached for `api.models_cache_secs` so that model
//! settings are checked against the proxy without asking it on every request. A name is served
//! when the proxy lists it, or when it falls under one of the proxy's wildcard routes (e.g.
//! `fake/*`, `openai/*`), which LiteLLM's `/v1/models` names only with
//! `return_wildcard_routes=true` ([`llm::matches_route`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::error::ApiError;

pub struct ModelCatalog {
    client: llm::LlmClient,
    ttl: Duration,
    cached: Mutex<Option<(Instant, Arc<HashSet<String>>)>>,
}

impl ModelCatalog {
    pub fn new(client: llm::LlmClient, ttl: Duration) -> Self {
        Self {
            client,
            ttl,
            cached: Mutex::new(None),
        }
    }

    /// The served names; 503 when the proxy cannot be asked and nothing fresh is cached.
    pub async fn served(&self) -> Result<Arc<HashSet<String>>, ApiError> {
        let mut cached = self.cached.lock().await;
        if let Some((at, names)) = cached.as_ref()
            && at.elapsed() < self.ttl
        {
            return Ok(names.clone());
        }
        match self.client.models().await {
            Ok(names) => {
                let names = Arc::new(names.into_iter().collect::<HashSet<_>>());
                *cached = Some((Instant::now(), names.clone()));
                Ok(names)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot list the LiteLLM proxy's models");
                Err(ApiError::Unavailable(
                    "the model proxy is unavailable; try again later".into(),
                ))
            }
        }
    }

    /// 422 `unknown_model` naming `field` unless the proxy serves `name` (listed, or under
    /// a wildcard route).
    pub async fn check(&self, field: &str, name: &str) -> Result<(), ApiError> {
        let served = self.served().await?;
        let listed = !name.contains('*') && served.contains(name);
        if listed
            || served
                .iter()
                .filter(|route| route.contains('*'))
                .any(|route| llm::matches_route(route, name))
        {
            Ok(())
        } else {
            Err(ApiError::Unprocessable {
                code: "unknown_model",
                message: format!("{field}: the model proxy does not serve a model named {name:?}"),
            })
        }
    }
}
