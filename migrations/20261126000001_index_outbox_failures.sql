-- A source that cannot be indexed fails alone (workers/src/handlers/index): the batch goes on
-- without it, its outbox rows count the attempt and wait (`retry_at`) before the next one,
-- and after a bounded number of attempts — at once when the failure cannot change, e.g. the
-- database refused the content — they are dead-lettered: kept, with `dead_at` and the last
-- error, for operators (`worker index --dead`), and no longer claimed. A later change of the
-- same source writes a new row as usual; when that one is indexed, the dead rows go too.
ALTER TABLE index_outbox
    ADD COLUMN attempts   integer NOT NULL DEFAULT 0,
    ADD COLUMN retry_at   timestamptz,
    ADD COLUMN last_error text,
    ADD COLUMN dead_at    timestamptz;

-- The claim takes the orgs in turn (one org's backlog or poison never starves another's):
-- it walks the distinct orgs with pending rows, then each org's oldest rows.
CREATE INDEX index_outbox_org_idx ON index_outbox (org_id, id) WHERE dead_at IS NULL;
