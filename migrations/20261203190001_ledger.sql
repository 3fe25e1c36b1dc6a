-- PostgreSQL is the ledger of in-flight work (docs/ARCHITECTURE.md, "The ledger"): Redis
-- carries jobs, but whether a response, a confirmed action or a summary fold is finished is
-- decided here, and the scheduler's reconciler re-enqueues what Redis lost.

-- A response's lifecycle: queued → running(run) → completed | failed. `streaming` becomes
-- `running`: a run holds the response from the moment it takes it, not from its first token.
ALTER TABLE responses DROP CONSTRAINT responses_status_check;
UPDATE responses SET status = 'running' WHERE status = 'streaming';
ALTER TABLE responses ADD CONSTRAINT responses_status_check
    CHECK (status IN ('queued', 'running', 'completed', 'failed'));

ALTER TABLE responses
    -- The number of the run that holds (or last held) the response; a worker takes it with a
    -- compare-and-set that adds one, and every write of a run names its number (fencing).
    ADD COLUMN run integer NOT NULL DEFAULT 0,
    -- While `running`: the holder's lease, renewed while it runs. Past it, the run is dead.
    ADD COLUMN leased_until timestamptz,
    -- The job that may run this response (a job with another id is stale and does nothing),
    -- and when it was handed to the bus. NULL: nothing is due yet (a continuation waiting for
    -- its action to run).
    ADD COLUMN job_id uuid,
    ADD COLUMN enqueued_at timestamptz,
    -- How many times the reconciler re-enqueued it (bounded; then the response fails).
    ADD COLUMN recoveries integer NOT NULL DEFAULT 0,
    -- The primary failed before its first token in an earlier run: only the fallback is left.
    ADD COLUMN fallback_only boolean NOT NULL DEFAULT false;

-- Unfinished rows from before the ledger: each handed to a job of its own (any job still on
-- the bus for them is stale from now on; the reconciler enqueues the new one after its grace),
-- a `running` one with an expired lease. A continuation waiting for its confirmed action to
-- run keeps no job: the execution hands it to one.
UPDATE responses r SET job_id = gen_random_uuid(), enqueued_at = now(),
                       leased_until = CASE WHEN r.status = 'running' THEN now() END
 WHERE r.status IN ('queued', 'running')
   AND NOT EXISTS (SELECT 1 FROM proposed_actions a
                   WHERE a.continuation_response_id = r.id AND a.status = 'confirmed');

-- What the reconciler scans: the few responses not finished yet.
CREATE INDEX responses_unfinished_idx ON responses (enqueued_at)
    WHERE status IN ('queued', 'running');

-- Confirmed actions: the execution job that may run it, and how often it was re-enqueued.
ALTER TABLE proposed_actions
    ADD COLUMN job_id uuid,
    ADD COLUMN recoveries integer NOT NULL DEFAULT 0;
CREATE INDEX proposed_actions_confirmed_idx ON proposed_actions (decided_at)
    WHERE status = 'confirmed';

-- Summary folds whose run died with the claim: re-enqueued a bounded number of times.
ALTER TABLE conversation_summaries
    ADD COLUMN fold_recoveries integer NOT NULL DEFAULT 0;
CREATE INDEX conversation_summaries_claimed_idx ON conversation_summaries (folding_until)
    WHERE folding_job IS NOT NULL;

-- Documents waiting to be indexed (the reconciler asks for an index run when none is queued).
CREATE INDEX documents_queued_idx ON documents (updated_at)
    WHERE status = 'queued' AND deleted_at IS NULL;

-- `Idempotency-Key` of `POST /v1/conversations/{id}/messages`, per user: the same key answers
-- with the same turn. `request_hash` is the SHA-256 of what the key was first used for (the
-- conversation and the content); another body with the same key is a conflict. Kept at least
-- `IDEMPOTENCY_RETENTION_SECS` (purged by the reconciler after that).
CREATE TABLE turn_requests (
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key             text NOT NULL,
    request_hash    bytea NOT NULL,
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    response_id     uuid NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
CREATE INDEX turn_requests_created_idx ON turn_requests (created_at);
