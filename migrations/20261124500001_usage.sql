-- Token usage per organization, day (UTC) and model (issue 9): one row per (org, day, model),
-- bumped by the chat worker in the same transaction that stores an answer, and only when that
-- answer was new, so a redelivered job never counts twice. Read by `api usage`.

CREATE TABLE usage_daily (
    org_id             uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    day                date NOT NULL,
    -- the model that answered, as configured (e.g. `fake/x`, `local-chat`)
    model              text NOT NULL,
    requests           bigint NOT NULL DEFAULT 0 CHECK (requests >= 0),
    prompt_tokens      bigint NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens  bigint NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    PRIMARY KEY (org_id, day, model)
);
-- reports across all orgs read a range of days
CREATE INDEX usage_daily_day ON usage_daily (day);
