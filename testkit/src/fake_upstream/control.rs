//! The control API (`/_control/...`): its handlers, and [`FakeClient`], which tests script
//! the fake through.

use poem::handler;
use poem::http::StatusCode;
use poem::web::{Data, Json, Query};
use serde::Deserialize;
use serde_json::json;

use super::{Behaviour, Recorded, Shared, State, lock};

#[derive(Deserialize)]
struct ScriptBody {
    model: String,
    behaviours: Vec<Behaviour>,
}

#[handler]
pub(super) async fn control_script(state: Data<&Shared>, Json(b): Json<ScriptBody>) -> StatusCode {
    lock(state.0)
        .queues
        .entry(b.model)
        .or_default()
        .extend(b.behaviours);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct DefaultBody {
    model: String,
    behaviour: Behaviour,
}

#[handler]
pub(super) async fn control_default(
    state: Data<&Shared>,
    Json(b): Json<DefaultBody>,
) -> StatusCode {
    lock(state.0).defaults.insert(b.model, b.behaviour);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct ModelQuery {
    model: Option<String>,
}

#[handler]
pub(super) async fn control_requests(
    state: Data<&Shared>,
    Query(q): Query<ModelQuery>,
) -> Json<Vec<Recorded>> {
    let s = lock(state.0);
    Json(
        s.log
            .iter()
            .filter(|r| q.model.as_deref().is_none_or(|m| m == r.model))
            .cloned()
            .collect(),
    )
}

#[handler]
pub(super) async fn control_reset(state: Data<&Shared>, Query(q): Query<ModelQuery>) -> StatusCode {
    let mut s = lock(state.0);
    match q.model {
        Some(m) => {
            s.queues.remove(&m);
            s.defaults.remove(&m);
            s.log.retain(|r| r.model != m);
        }
        None => *s = State::default(),
    }
    StatusCode::NO_CONTENT
}

/// Scripts a fake upstream (in-process or the shared process) over its control API.
#[derive(Clone)]
pub struct FakeClient {
    base: String,
    http: reqwest::Client,
}

impl FakeClient {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into().trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// The shared fake behind LiteLLM (`FAKE_UPSTREAM_URL`, set by scripts/test).
    pub fn shared() -> Self {
        Self::new(crate::env::require("FAKE_UPSTREAM_URL"))
    }

    /// Queue behaviours for `model` (taken one per request, in order).
    pub async fn script(&self, model: &str, behaviours: Vec<Behaviour>) -> anyhow::Result<()> {
        self.http
            .post(format!("{}/_control/script", self.base))
            .json(&json!({"model": model, "behaviours": behaviours}))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// What `model` does once its queue is empty.
    pub async fn set_default(&self, model: &str, behaviour: Behaviour) -> anyhow::Result<()> {
        self.http
            .post(format!("{}/_control/default", self.base))
            .json(&json!({"model": model, "behaviour": behaviour}))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// The requests received for `model`, oldest first.
    pub async fn requests(&self, model: &str) -> anyhow::Result<Vec<Recorded>> {
        Ok(self
            .http
            .get(format!(
                "{}/_control/requests?model={}",
                self.base,
                urlencode(model)
            ))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
