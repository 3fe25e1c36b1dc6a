//! An organization's chat models (docs/architecture/api.md, "Model settings"). Any member reads
//! them (the system defaults `chat.default_model` / `chat.default_fallback_model` until the org
//! sets its own); owners and admins change them, to names the LiteLLM proxy serves (checked against
//! its model list, cached for `api.models_cache_secs`; the proxy unreachable → 503).
//!
//! `GET /v1/models` lists what they may choose: every name the proxy lists, as it lists it, but
//! the embedding model (`EMBEDDING_MODEL`, not a chat model). A wildcard route (`fake/*`,
//! `openai/*`) is listed as the route with `wildcard: true`: any name it matches is accepted
//! (`ModelCatalog::check`), and the caller completes it (the console offers it as a prefix).

use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};
use serde::Deserialize;
use uuid::Uuid;

use super::Tag;
use crate::auth::BearerAuth;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::state::AppState;

pub struct ModelSettingsApi {
    pub state: AppState,
}

#[derive(Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// The model that answers first.
    model: String,
    /// Tried once when the primary fails before its first token.
    fallback_model: String,
}

/// The models an org may choose (`GET /v1/models`).
#[derive(Object)]
pub struct ModelList {
    /// Sorted by name.
    items: Vec<ModelName>,
}

#[derive(Object)]
pub struct ModelName {
    /// A model name, or a wildcard route such as `fake/*`.
    name: String,
    /// True for a wildcard route: every name it matches is served (`fake/*` → `fake/any`).
    wildcard: bool,
}

const NAME_MAX: usize = 200;

fn model_name(field: &str, value: &str) -> Result<String, ApiError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(ApiError::invalid(format!("{field} must not be empty")));
    }
    if v.len() > NAME_MAX || v.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{field} must be a model name of at most {NAME_MAX} bytes"
        )));
    }
    Ok(v.to_owned())
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Models")]
impl ModelSettingsApi {
    /// The model names the caller's org may choose: those the LiteLLM proxy serves (any member;
    /// 503 when the proxy cannot be asked).
    #[oai(path = "/models", method = "get")]
    async fn list(&self, auth: BearerAuth) -> Result<Json<ModelList>, ApiError> {
        let _caller = auth.0;
        let served = self.state.models.served().await?;
        let embedding = &self.state.settings.embedding.model;
        let mut items: Vec<ModelName> = served
            .iter()
            .filter(|name| *name != embedding)
            .map(|name| ModelName {
                name: name.clone(),
                wildcard: name.contains('*'),
            })
            .collect();
        items.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Json(ModelList { items }))
    }

    /// The org's chat model and fallback model (any member).
    #[oai(path = "/orgs/:org_id/settings/model", method = "get")]
    async fn get(
        &self,
        auth: BearerAuth,
        org_id: Path<Uuid>,
    ) -> Result<Json<ModelSettings>, ApiError> {
        auth.0.require_org(org_id.0)?;
        let (model, fallback) = store::conversations::org_models(&self.state.db, org_id.0).await?;
        let chat = &self.state.settings.chat;
        Ok(Json(ModelSettings {
            model: model.unwrap_or_else(|| chat.default_model.clone()),
            fallback_model: fallback.unwrap_or_else(|| chat.default_fallback_model.clone()),
        }))
    }

    /// Set the org's chat model and fallback model (owners and admins); each must be a model
    /// the proxy serves (else 422 `unknown_model` naming the field).
    #[oai(path = "/orgs/:org_id/settings/model", method = "put")]
    async fn put(
        &self,
        auth: BearerAuth,
        org_id: Path<Uuid>,
        body: JsonBody<ModelSettings>,
    ) -> Result<Json<ModelSettings>, ApiError> {
        let caller = auth.0;
        caller.require_org(org_id.0)?;
        caller.require_admin()?;
        let model = model_name("model", &body.0.model)?;
        let fallback_model = model_name("fallback_model", &body.0.fallback_model)?;
        self.state.models.check("model", &model).await?;
        self.state
            .models
            .check("fallback_model", &fallback_model)
            .await?;
        store::conversations::set_org_models(&self.state.db, org_id.0, &model, &fallback_model)
            .await?;
        Ok(Json(ModelSettings {
            model,
            fallback_model,
        }))
    }
}
