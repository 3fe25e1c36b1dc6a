-- Per-org token budgets (issue 22, docs/architecture/api.md "Budgets"): daily and monthly token
-- limits set by an org's admins; unset (NULL) means the operator's default
-- (BUDGET_DEFAULT_DAILY_TOKENS / BUDGET_DEFAULT_MONTHLY_TOKENS, 0 = unlimited). Spend is
-- `usage_daily` (every model call of the org) plus what open turns hold in reserve, so a Redis
-- wipe never resets it.
CREATE TABLE org_budgets (
    org_id          uuid PRIMARY KEY REFERENCES organizations (id) ON DELETE CASCADE,
    -- NULL: the operator's default; 0: unlimited
    daily_tokens    bigint CHECK (daily_tokens >= 0),
    monthly_tokens  bigint CHECK (monthly_tokens >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The worst case a turn holds while it is queued or running (BUDGET_TURN_RESERVE_TOKENS,
-- written at admission, under the org's row lock). Once the turn finishes its real usage is
-- in `usage_daily` and the reservation no longer counts.
ALTER TABLE responses ADD COLUMN budget_reserved integer NOT NULL DEFAULT 0
    CHECK (budget_reserved >= 0);
CREATE INDEX responses_open_reservations ON responses (conversation_id)
    WHERE budget_reserved > 0 AND status IN ('queued', 'running');
