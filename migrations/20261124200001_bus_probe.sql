-- The bus's diagnostic job (`probe`): what its handler did, so that tests, the benchmark and
-- operators can check that every job took effect exactly once.

-- One row per job that took effect: the idempotency key of the probe handler. The handler
-- inserts it with ON CONFLICT (job_id) DO NOTHING in the same transaction as its effect.
CREATE TABLE bus_probe_effects (
    job_id      uuid PRIMARY KEY,
    key         text NOT NULL,
    consumer    text NOT NULL,
    attempt     integer NOT NULL,
    handled_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bus_probe_effects_key ON bus_probe_effects (key);

-- The effect itself: a per-key counter, bumped only when the row above was new.
CREATE TABLE bus_probe_totals (
    key      text PRIMARY KEY,
    handled  bigint NOT NULL
);

-- Every run of the handler, successful or not (a log, not idempotent): attempts, who ran
-- them, and when each was due, so that retry delays can be checked from recorded times.
CREATE TABLE bus_probe_runs (
    id           bigserial PRIMARY KEY,
    job_id       uuid NOT NULL,
    key          text NOT NULL,
    attempt      integer NOT NULL,
    consumer     text NOT NULL,
    due_at       timestamptz NOT NULL,
    started_at   timestamptz NOT NULL,
    failed       boolean NOT NULL
);
CREATE INDEX bus_probe_runs_job ON bus_probe_runs (job_id, attempt);
