//! An organization's token budget (docs/architecture/api.md, "Budgets"): owners and admins read
//! and set its daily and monthly token limits; unset, the operator's defaults apply
//! (`BUDGET_DEFAULT_DAILY_TOKENS`, `BUDGET_DEFAULT_MONTHLY_TOKENS`). The answer also shows what
//! the org used, what its open turns hold, and what is left (`store::budgets::Standing`).

use chrono::{DateTime, Utc};
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};
use serde::Deserialize;
use store::budgets::{Budget, Period, Policy, Standing};
use uuid::Uuid;

use super::Tag;
use crate::auth::BearerAuth;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::state::AppState;

pub struct BudgetApi {
    pub state: AppState,
}

/// `PUT` body: each limit in tokens (prompt + completion, every model call of the org); 0 means
/// unlimited, `null` or absent means the operator's default.
#[derive(Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct BudgetUpdate {
    /// Tokens per UTC day.
    #[oai(nullable)]
    daily_tokens: Option<i64>,
    /// Tokens per UTC calendar month.
    #[oai(nullable)]
    monthly_tokens: Option<i64>,
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
    /// `org` when the org set a limit, `default` when the operator's defaults apply.
    source: String,
    /// Tokens used today and this month (UTC), every model call of the org.
    used_today: i64,
    used_this_month: i64,
    /// Tokens the org's turns still queued or running hold (each `turn_reserve_tokens` until
    /// its real usage is counted).
    reserved_tokens: i64,
    /// What one turn holds while it runs: a limit below this admits no turn.
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

/// A limit as sent: 0 (unlimited) or at least one turn's reservation, at most
/// `config::MAX_BUDGET_TOKENS`.
fn limit(field: &str, v: Option<i64>, policy: &Policy) -> Result<Option<i64>, ApiError> {
    let Some(v) = v else { return Ok(None) };
    let max = i64::try_from(config::MAX_BUDGET_TOKENS).unwrap_or(i64::MAX);
    if !(0..=max).contains(&v) {
        return Err(ApiError::invalid(format!(
            "{field} must be between 0 (unlimited) and {max}"
        )));
    }
    if v > 0 && v < policy.turn_reserve {
        return Err(ApiError::Unprocessable {
            code: "budget_below_turn_reserve",
            message: format!(
                "{field}: {v} is less than one turn's reservation ({} tokens), so no turn could start; use 0 for unlimited",
                policy.turn_reserve
            ),
        });
    }
    Ok(Some(v))
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

    /// Set the org's daily and monthly token limits (owners and admins): 0 is unlimited, `null`
    /// or absent the operator's default. A limit below one turn's reservation
    /// (`turn_reserve_tokens`) is refused (422): no turn could start under it.
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
        let budget = Budget {
            daily_tokens: limit("daily_tokens", body.0.daily_tokens, &policy)?,
            monthly_tokens: limit("monthly_tokens", body.0.monthly_tokens, &policy)?,
        };
        store::budgets::put(&self.state.db, org_id.0.into(), budget).await?;
        let now = Utc::now();
        let mut conn = self.state.db.acquire().await?;
        let s = store::budgets::standing(&mut conn, &policy, org_id.0.into(), now).await?;
        Ok(Json(view(s, &policy, now)))
    }
}
