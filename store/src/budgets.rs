//! Per-org token budgets (docs/architecture/api.md, "Budgets"): `org_budgets` holds what an
//! org's admins set; the operator's defaults (`[budget]`) apply where they set nothing.
//!
//! Spend is counted in PostgreSQL, never in Redis: the tokens of the period in `usage_daily`
//! (every model call of the org, recorded by the worker with the result it stores) plus the
//! reservations of the org's open turns (`responses.budget_reserved`, queued or running). A
//! turn is admitted by [`start_turn`] under a lock on the org's row, so that concurrent turns
//! at a budget's edge are decided one after another: each holds the configured worst case
//! (`BUDGET_TURN_RESERVE_TOKENS`, or what is left when less is) until it finishes, when its
//! real usage takes its place in the same transaction that stores its outcome. So concurrent
//! turns never overrun a budget together; one turn may still use more than it holds (a
//! worst case set too low, or the last tokens of a period), and a turn whose model call failed
//! mid-stream reports no usage.

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

/// What an org's admins set (`None`: the operator's default; 0 allows nothing).
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
    /// The period whose limit is in the way (the one that frees last).
    pub period: Period,
    /// That limit is used up by recorded usage alone: only the period's end frees it. Else what
    /// the org's open turns hold is in the way, and frees as they finish.
    pub until_reset: bool,
}

/// What admitting one more turn comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The turn may start, holding this many tokens (the configured reserve, or what is left
    /// when less is left).
    Reserve(i64),
    Refused(Refusal),
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

    /// Whether one more turn may start, and what it holds: refused when a period has nothing
    /// left (the month's refusal wins over the day's when it is used up: it frees last); else
    /// it holds `reserve`, or what is left when that is less.
    pub fn admit(&self, reserve: i64) -> Admission {
        let refusal = |limit: Option<i64>, used: i64, period| {
            let limit = limit?;
            (used.saturating_add(self.reserved) >= limit).then_some(Refusal {
                period,
                until_reset: used >= limit,
            })
        };
        let day = refusal(self.daily_limit, self.used_today, Period::Day);
        let month = refusal(self.monthly_limit, self.used_this_month, Period::Month);
        let worst = match (day, month) {
            (_, Some(m)) if m.until_reset => Some(m),
            (Some(d), _) if d.until_reset => Some(d),
            (d, m) => m.or(d),
        };
        if let Some(r) = worst {
            return Admission::Refused(r);
        }
        let left = [self.remaining_today(), self.remaining_this_month()]
            .into_iter()
            .flatten()
            .min();
        Admission::Reserve(left.map_or(reserve, |l| l.min(reserve)))
    }
}

/// The limit that applies: the org's own (0 allows nothing), else the operator's default (0:
/// none).
fn effective(own: Option<i64>, default: i64) -> Option<i64> {
    own.or((default > 0).then_some(default))
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

/// A change to one limit of an org's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Keep what is set.
    Keep,
    /// Back to the operator's default.
    Default,
    /// This many tokens per period (0 allows nothing).
    Limit(i64),
}

impl Change {
    fn parts(self) -> (bool, Option<i64>) {
        match self {
            Change::Keep => (false, None),
            Change::Default => (true, None),
            Change::Limit(n) => (true, Some(n)),
        }
    }
}

/// Change the org's daily and monthly limits (one statement: two admins' changes to different
/// limits both hold).
pub async fn put(
    pool: &PgPool,
    org_id: OrgId,
    daily: Change,
    monthly: Change,
) -> Result<(), StoreError> {
    let (set_daily, daily) = daily.parts();
    let (set_monthly, monthly) = monthly.parts();
    sqlx::query(
        "INSERT INTO org_budgets AS b (org_id, daily_tokens, monthly_tokens) VALUES ($1, $2, $4)
         ON CONFLICT (org_id) DO UPDATE
         SET daily_tokens = CASE WHEN $3 THEN EXCLUDED.daily_tokens ELSE b.daily_tokens END,
             monthly_tokens = CASE WHEN $5 THEN EXCLUDED.monthly_tokens ELSE b.monthly_tokens END,
             updated_at = now()",
    )
    .bind(org_id)
    .bind(daily)
    .bind(set_daily)
    .bind(monthly)
    .bind(set_monthly)
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

/// Start a turn of `org_id` within its budget: without a limit, [`start_own_turn`] as it is;
/// with one, in a transaction that locks the org's row (so concurrent turns of the org are
/// admitted one after another), refuses the turn when a period has nothing left
/// ([`StoreError::OverBudget`], nothing written), and else writes the turn with its reservation
/// ([`Standing::admit`]).
pub async fn start_turn(
    conn: &mut PgConnection,
    policy: &Policy,
    org_id: OrgId,
    turn: &NewTurn<'_>,
) -> Result<Option<TurnStarted>, StoreError> {
    if !limited(&mut *conn, policy, org_id).await? {
        return start_own_turn(conn, turn).await;
    }
    let mut tx = conn.begin().await?;
    lock_org(&mut tx, org_id).await?;
    // a retried request (same key) is answered with its turn, whatever the budget says now
    if let Some(key) = turn.key
        && let Some(found) = crate::conversations::keyed_turn(&mut tx, turn.user_id, key).await?
    {
        tx.rollback().await?;
        return Ok(Some(found));
    }
    let reserve = admit_locked(&mut tx, policy, org_id).await?;
    let started = start_own_turn(&mut tx, turn).await?;
    if let Some(TurnStarted::New(r)) = &started {
        hold(&mut tx, r.id, reserve).await?;
    }
    tx.commit().await?;
    Ok(started)
}

/// Admit one more model turn of `org_id` that does not start with a user message (the
/// continuation after a confirmed action), inside the caller's transaction: `None` when the
/// org has no limit; else the tokens it may hold (give them to its response with [`hold`]), or
/// [`StoreError::OverBudget`]. Takes the org row's lock until the caller's transaction ends.
pub async fn admit(
    conn: &mut PgConnection,
    policy: &Policy,
    org_id: OrgId,
) -> Result<Option<i64>, StoreError> {
    if !limited(&mut *conn, policy, org_id).await? {
        return Ok(None);
    }
    lock_org(&mut *conn, org_id).await?;
    admit_locked(conn, policy, org_id).await.map(Some)
}

/// Record what a response holds against its org's budget until it finishes.
pub async fn hold(
    conn: &mut PgConnection,
    response_id: uuid::Uuid,
    tokens: i64,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE responses SET budget_reserved = $2 WHERE id = $1")
        .bind(response_id)
        .bind(i32::try_from(tokens).unwrap_or(i32::MAX))
        .execute(conn)
        .await?;
    Ok(())
}

/// Whether any limit applies to the org (its own or the operator's default).
async fn limited(
    conn: &mut PgConnection,
    policy: &Policy,
    org_id: OrgId,
) -> Result<bool, StoreError> {
    let budget = get(conn, org_id).await?;
    Ok(
        effective(budget.daily_tokens, policy.default_daily).is_some()
            || effective(budget.monthly_tokens, policy.default_monthly).is_some(),
    )
}

/// The org's row, locked until the transaction ends: the org's admissions one after another.
/// (NO KEY UPDATE: inserts that reference the org, by other requests, are not blocked.)
async fn lock_org(conn: &mut PgConnection, org_id: OrgId) -> Result<(), StoreError> {
    sqlx::query("SELECT 1 FROM organizations WHERE id = $1 FOR NO KEY UPDATE")
        .bind(org_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// With the org's row locked: the tokens one more turn may hold, or why not.
async fn admit_locked(
    conn: &mut PgConnection,
    policy: &Policy,
    org_id: OrgId,
) -> Result<i64, StoreError> {
    let now = Utc::now();
    let standing = standing(conn, policy, org_id, now).await?;
    match standing.admit(policy.turn_reserve) {
        Admission::Reserve(n) => Ok(n),
        Admission::Refused(refusal) => {
            // until the period resets (the HTTP contract), also when the org's open turns hold the rest:
            // they may free some as they settle, but no sooner is promised
            let left = (refusal.period.resets_at(now) - now).num_seconds();
            let retry_after_secs = u64::try_from(left).unwrap_or(0).max(1);
            Err(StoreError::OverBudget {
                period: refusal.period.as_str(),
                until_reset: refusal.until_reset,
                retry_after_secs,
            })
        }
    }
}

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
    fn a_turn_holds_the_reserve_or_what_is_left_and_is_refused_when_nothing_is() {
        let s = Standing {
            budget: Budget::default(),
            daily_limit: Some(1000),
            monthly_limit: Some(5000),
            used_today: 600,
            used_this_month: 4000,
            reserved: 200,
        };
        assert_eq!(s.admit(100), Admission::Reserve(100));
        // less is left than the reserve: the turn holds what is left
        assert_eq!(s.admit(8000), Admission::Reserve(200));
        assert_eq!(s.remaining_today(), Some(200));
        // open turns hold the rest: refused, but only until they finish
        let held = Standing { reserved: 400, ..s };
        assert_eq!(
            held.admit(1),
            Admission::Refused(Refusal {
                period: Period::Day,
                until_reset: false
            })
        );
        // used up today, and this month too: the month frees last
        let spent = Standing {
            used_today: 1000,
            used_this_month: 5000,
            reserved: 0,
            ..s
        };
        assert_eq!(
            spent.admit(1),
            Admission::Refused(Refusal {
                period: Period::Month,
                until_reset: true
            })
        );
        // the day used up while the month's rest is only held: until the day resets
        let day = Standing {
            used_today: 1000,
            used_this_month: 4000,
            reserved: 1000,
            ..s
        };
        assert_eq!(
            day.admit(1),
            Admission::Refused(Refusal {
                period: Period::Day,
                until_reset: true
            })
        );
        // a limit of 0 allows nothing; no limit allows the reserve
        let zero = Standing {
            daily_limit: Some(0),
            used_today: 0,
            reserved: 0,
            ..s
        };
        assert!(matches!(zero.admit(1), Admission::Refused(_)));
        let open = Standing {
            daily_limit: None,
            monthly_limit: None,
            ..s
        };
        assert_eq!(open.admit(8000), Admission::Reserve(8000));
        assert_eq!(open.remaining_today(), None);
        assert_eq!(effective(Some(0), 500), Some(0));
        assert_eq!(effective(None, 0), None);
        assert_eq!(effective(None, 500), Some(500));
    }
}
