//! An organization's token budget (docs/architecture/api.md, "Budgets"): owners and admins read
//! and set its daily and monthly token limits; unset, the operator's defaults apply
//! (`BUDGET_DEFAULT_DAILY_TOKENS`, `BUDGET_DEFAULT_MONTHLY_TOKENS`). The answer also shows what
//! the org used, what its open turns hold, and what is left (`store::budgets::Standing`).

use chrono::{DateTime, Utc};
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::types::MaybeUndefined;
use poem_openapi::{Object, OpenApi};
use serde::Deserialize;
use store::budgets::{Change, Period, Policy, Standing};
use uuid::Uuid;

use super::Tag;
use crate::auth::BearerAuth;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::state::AppState;

pub struct BudgetApi {
    pub state: AppState,
}

/// `PUT` body: each limit in tokens (prompt + completion, every model call of the org) per UTC
/// day or calendar month; 0 allows nothing, `null` means the operator's default, an absent
/// field keeps what is set.
#[derive(Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct BudgetUpdate {
    /// Tokens per UTC day.
    #[oai(nullable)]
    #[serde(default)]
    daily_tokens: MaybeUndefined<i64>,
    /// Tokens per UTC calendar month.
    #[oai(nullable)]
    #[serde(default)]
    monthly_tokens: MaybeUndefined<i64>,
}

/// The org's budget and where it stands.
#[derive(Object)]
pub struct BudgetView {
    /// The daily limit that applies (the org's own, else the operator's default); `null`:
    /// unlimited.
    #[oai(nullable)]
    daily_tokens: Option<i64>,
    /// The monthly limit that applies; `null`: unlimited.
    #[oai(nullable)]
    monthly_tokens: Option<i64>,
    /// `org` when the org set a limit of its own, `default` when the operator's defaults apply.
    source: String,
    /// Tokens used today and this month (UTC), every model call of the org.
    used_today: i64,
    used_this_month: i64,
    /// Tokens the org's turns still queued or running hold (each `turn_reserve_tokens` until
    /// its real usage is counted).
    reserved_tokens: i64,
    /// What one turn holds while it runs (or what is left, when less is).
    turn_reserve_tokens: i64,
    /// Tokens left (limit − used − reserved); `null`: unlimited.
    #[oai(nullable)]
    remaining_today: Option<i64>,
    #[oai(nullable)]
    remaining_this_month: Option<i64>,
    /// When today's and this month's counts start again (UTC).
    day_resets_at: DateTime<Utc>,
    month_resets_at: DateTime<Utc>,
}

fn view(s: Standing, policy: &Policy, now: DateTime<Utc>) -> BudgetView {
    let own = s.budget.daily_tokens.is_some() || s.budget.monthly_tokens.is_some();
    BudgetView {
        daily_tokens: s.daily_limit,
        monthly_tokens: s.monthly_limit,
        source: if own { "org" } else { "default" }.to_owned(),
        used_today: s.used_today,
        used_this_month: s.used_this_month,
        reserved_tokens: s.reserved,
        turn_reserve_tokens: policy.turn_reserve,
        remaining_today: s.remaining_today(),
        remaining_this_month: s.remaining_this_month(),
        day_resets_at: Period::Day.resets_at(now),
        month_resets_at: Period::Month.resets_at(now),
    }
}

/// A limit as sent: at most `config::MAX_BUDGET_TOKENS`.
fn change(field: &str, v: MaybeUndefined<i64>) -> Result<Change, ApiError> {
    let v = match v {
        MaybeUndefined::Undefined => return Ok(Change::Keep),
        MaybeUndefined::Null => return Ok(Change::Default),
        MaybeUndefined::Value(v) => v,
    };
    let max = i64::try_from(config::MAX_BUDGET_TOKENS).unwrap_or(i64::MAX);
    if !(0..=max).contains(&v) {
        return Err(ApiError::invalid(format!(
            "{field} must be between 0 and {max} tokens (or null for the default)"
        )));
    }
    Ok(Change::Limit(v))
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Organizations")]
impl BudgetApi {
    /// The org's token budget, what it used, what its open turns hold, and what is left (owners
    /// and admins).
    #[oai(path = "/orgs/:org_id/settings/budget", method = "get")]
    async fn get(
        &self,
        auth: BearerAuth,
        org_id: Path<Uuid>,
    ) -> Result<Json<BudgetView>, ApiError> {
        let caller = auth.0;
        caller.require_org(org_id.0)?;
        caller.require_admin()?;
        let policy = Policy::from_settings(&self.state.settings.budget);
        let now = Utc::now();
        let mut conn = self.state.db.acquire().await?;
        let s = store::budgets::standing(&mut conn, &policy, org_id.0.into(), now).await?;
        Ok(Json(view(s, &policy, now)))
    }

    /// Set the org's daily and monthly token limits (owners and admins): a number of tokens (0
    /// allows no turn), `null` for the operator's default; an absent field keeps its limit.
    #[oai(path = "/orgs/:org_id/settings/budget", method = "put")]
    async fn put(
        &self,
        auth: BearerAuth,
        org_id: Path<Uuid>,
        body: JsonBody<BudgetUpdate>,
    ) -> Result<Json<BudgetView>, ApiError> {
        let caller = auth.0;
        caller.require_org(org_id.0)?;
        caller.require_admin()?;
        let policy = Policy::from_settings(&self.state.settings.budget);
        let daily = change("daily_tokens", body.0.daily_tokens)?;
        let monthly = change("monthly_tokens", body.0.monthly_tokens)?;
        store::budgets::put(&self.state.db, org_id.0.into(), daily, monthly).await?;
        let now = Utc::now();
        let mut conn = self.state.db.acquire().await?;
        let s = store::budgets::standing(&mut conn, &policy, org_id.0.into(), now).await?;
        Ok(Json(view(s, &policy, now)))
    }
}
