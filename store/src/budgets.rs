//! Per-org token budgets (docs/architecture/api.md, "Budgets"): `org_budgets` holds what an
//! org's admins set; the operator's defaults (`[budget]`) apply where they set nothing.
//!
//! Spend is counted in PostgreSQL, never in Redis: the tokens of the period in `usage_daily`
//! (every model call of the org, recorded by the worker with the result it stores) plus the
//! reservations of the org's open turns (`responses.budget_reserved`, queued or running). A
//! turn is admitted by [`start_turn`] under a lock on the org's row, so that concurrent turns
//! at a budget's edge are decided one after another and never overrun it: each holds the
//! configured worst case (`BUDGET_TURN_RESERVE_TOKENS`) until it finishes, when its real usage
//! takes its place in the same transaction that stores its outcome.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use sqlx::{Connection, PgConnection, PgPool};

use crate::StoreError;
use crate::conversations::{NewTurn, TurnStarted, start_own_turn};
use crate::types::OrgId;

/// How budgets apply: the operator's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Tokens a turn holds from admission until its real usage is recorded.
    pub turn_reserve: i64,
    /// The limits of an org that has set none (0: unlimited).
    pub default_daily: i64,
    pub default_monthly: i64,
}

impl Policy {
    pub fn from_settings(s: &config::BudgetSettings) -> Self {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Self {
            turn_reserve: clamp(s.turn_reserve_tokens),
            default_daily: clamp(s.default_daily_tokens),
            default_monthly: clamp(s.default_monthly_tokens),
        }
    }
}

/// What an org's admins set (`None`: the operator's default; 0: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Budget {
    pub daily_tokens: Option<i64>,
    pub monthly_tokens: Option<i64>,
}

/// A budget period: the UTC day or the UTC month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "daily",
            Period::Month => "monthly",
        }
    }

    /// When the period that contains `now` ends (UTC).
    pub fn resets_at(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let today = now.date_naive();
        let next = match self {
            Period::Day => today.succ_opt(),
            Period::Month => {
                let (y, m) = if today.month() == 12 {
                    (today.year() + 1, 1)
                } else {
                    (today.year(), today.month() + 1)
                };
                NaiveDate::from_ymd_opt(y, m, 1)
            }
        };
        next.and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| Utc.from_utc_datetime(&t))
            .unwrap_or(now)
    }
}

/// An org's budget and spend at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// What the org set.
    pub budget: Budget,
    /// The limits that apply (the org's, else the operator's default); `None`: unlimited.
    pub daily_limit: Option<i64>,
    pub monthly_limit: Option<i64>,
    /// Tokens recorded today and this month (UTC).
    pub used_today: i64,
    pub used_this_month: i64,
    /// Tokens the org's open turns hold.
    pub reserved: i64,
}

/// Why a turn was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub period: Period,
    /// The limit is used up by recorded usage alone: only the period's end frees it. Else
    /// what the org's open turns hold is in the way, and frees as they finish.
    pub until_reset: bool,
}

impl Standing {
    /// Tokens left today (limit − used − reserved, at least 0); `None`: unlimited.
    pub fn remaining_today(&self) -> Option<i64> {
        self.daily_limit
            .map(|l| (l - self.used_today - self.reserved).max(0))
    }

    pub fn remaining_this_month(&self) -> Option<i64> {
        self.monthly_limit
            .map(|l| (l - self.used_this_month - self.reserved).max(0))
    }

    /// Whether one more turn holding `reserve` tokens would pass a limit: the daily one first.
    pub fn refuses(&self, reserve: i64) -> Option<Refusal> {
        let check = |limit: Option<i64>, used: i64, period| {
            let limit = limit?;
            (used.saturating_add(self.reserved).saturating_add(reserve) > limit).then_some(
                Refusal {
                    period,
                    until_reset: used.saturating_add(reserve) > limit,
                },
            )
        };
        check(self.daily_limit, self.used_today, Period::Day)
            .or_else(|| check(self.monthly_limit, self.used_this_month, Period::Month))
    }
}

fn effective(own: Option<i64>, default: i64) -> Option<i64> {
    match own.unwrap_or(default) {
        0 => None,
        l => Some(l),
    }
}

/// What the org's admins set.
pub async fn get(conn: &mut PgConnection, org_id: OrgId) -> Result<Budget, StoreError> {
    Ok(sqlx::query_as::<_, Budget>(
        "SELECT daily_tokens, monthly_tokens FROM org_budgets WHERE org_id = $1",
    )
    .bind(org_id)
    .fetch_optional(conn)
    .await?
    .unwrap_or_default())
}

/// Set the org's budget (`None`: back to the operator's default).
pub async fn put(pool: &PgPool, org_id: OrgId, budget: Budget) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO org_budgets (org_id, daily_tokens, monthly_tokens) VALUES ($1, $2, $3)
         ON CONFLICT (org_id) DO UPDATE
         SET daily_tokens = EXCLUDED.daily_tokens, monthly_tokens = EXCLUDED.monthly_tokens,
             updated_at = now()",
    )
    .bind(org_id)
    .bind(budget.daily_tokens)
    .bind(budget.monthly_tokens)
    .execute(pool)
    .await?;
    Ok(())
}

/// The org's budget and spend at `now`.
pub async fn standing(
    conn: &mut PgConnection,
    policy: &Policy,
    org_id: OrgId,
    now: DateTime<Utc>,
) -> Result<Standing, StoreError> {
    let today = now.date_naive();
    let month_start = today.with_day(1).unwrap_or(today);
    let (daily, monthly, used_today, used_this_month, reserved): (
        Option<i64>,
        Option<i64>,
        i64,
        i64,
        i64,
    ) = sqlx::query_as(
        "SELECT b.daily_tokens, b.monthly_tokens,
                (SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM usage_daily
                  WHERE org_id = $1 AND day = $2)::bigint,
                (SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM usage_daily
                  WHERE org_id = $1 AND day >= $3 AND day <= $2)::bigint,
                (SELECT coalesce(sum(r.budget_reserved), 0)
                   FROM responses r JOIN conversations c ON c.id = r.conversation_id
                  WHERE c.org_id = $1 AND r.budget_reserved > 0
                    AND r.status IN ('queued', 'running'))::bigint
         FROM (SELECT 1) one LEFT JOIN org_budgets b ON b.org_id = $1",
    )
    .bind(org_id)
    .bind(today)
    .bind(month_start)
    .fetch_one(conn)
    .await?;
    Ok(Standing {
        budget: Budget {
            daily_tokens: daily,
            monthly_tokens: monthly,
        },
        daily_limit: effective(daily, policy.default_daily),
        monthly_limit: effective(monthly, policy.default_monthly),
        used_today,
        used_this_month,
        reserved,
    })
}

/// Start a turn of `org_id` within its budget: without a limit, [`start_own_turn`] as it is
/// (one statement); with one, in a transaction that locks the org's row (so concurrent turns of
/// the org are admitted one after another), refuses the turn when its reservation would pass a
/// limit ([`StoreError::OverBudget`], nothing written), and else writes the turn with its
/// reservation.
pub async fn start_turn(
    conn: &mut PgConnection,
    policy: &Policy,
    org_id: OrgId,
    turn: &NewTurn<'_>,
) -> Result<Option<TurnStarted>, StoreError> {
    let budget = get(&mut *conn, org_id).await?;
    let limited = effective(budget.daily_tokens, policy.default_daily).is_some()
        || effective(budget.monthly_tokens, policy.default_monthly).is_some();
    if !limited {
        return start_own_turn(conn, turn).await;
    }
    let mut tx = conn.begin().await?;
    // (NO KEY UPDATE: inserts that reference the org, by other requests, are not blocked)
    sqlx::query("SELECT 1 FROM organizations WHERE id = $1")
        .bind(org_id)
        .execute(&mut *tx)
        .await?;
    let now = Utc::now();
    let standing = standing(&mut tx, policy, org_id, now).await?;
    if let Some(refusal) = standing.refuses(policy.turn_reserve) {
        let retry_after_secs = if refusal.until_reset {
            let left = (refusal.period.resets_at(now) - now).num_seconds();
            u64::try_from(left).unwrap_or(0).max(1)
        } else {
            OPEN_TURNS_RETRY_SECS
        };
        return Err(StoreError::OverBudget {
            period: refusal.period.as_str(),
            until_reset: refusal.until_reset,
            retry_after_secs,
        });
    }
    let started = start_own_turn(&mut tx, turn).await?;
    if let Some(TurnStarted::New(r)) = &started {
        sqlx::query("UPDATE responses SET budget_reserved = $2 WHERE id = $1")
            .bind(r.id)
            .bind(i32::try_from(policy.turn_reserve).unwrap_or(i32::MAX))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(started)
}

/// The `Retry-After` of a turn refused because the org's open turns hold the rest of its
/// budget: they free it as they finish.
pub const OPEN_TURNS_RETRY_SECS: u64 = 5;

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, 30, 0).unwrap()
    }

    #[test]
    fn periods_reset_at_the_next_utc_day_and_month() {
        let now = at(2026, 12, 31, 23);
        assert_eq!(
            Period::Day.resets_at(now),
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(
            Period::Month.resets_at(now),
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(
            Period::Month.resets_at(at(2028, 2, 29, 1)),
            Utc.with_ymd_and_hms(2028, 3, 1, 0, 0, 0).unwrap()
        );
    }

    #[test]
    fn a_turn_is_refused_when_its_reservation_would_pass_a_limit() {
        let s = Standing {
            budget: Budget::default(),
            daily_limit: Some(1000),
            monthly_limit: Some(5000),
            used_today: 600,
            used_this_month: 4000,
            reserved: 200,
        };
        assert_eq!(s.refuses(200), None);
        assert_eq!(
            s.refuses(201),
            Some(Refusal {
                period: Period::Day,
                until_reset: false
            })
        );
        assert_eq!(
            s.refuses(401),
            Some(Refusal {
                period: Period::Day,
                until_reset: true
            })
        );
        assert_eq!(s.remaining_today(), Some(200));
        let month = Standing {
            daily_limit: None,
            used_this_month: 4900,
            ..s
        };
        assert_eq!(month.refuses(1).map(|r| r.period), Some(Period::Month));
        assert_eq!(month.remaining_today(), None);
        assert_eq!(month.remaining_this_month(), Some(0));
    }
}
