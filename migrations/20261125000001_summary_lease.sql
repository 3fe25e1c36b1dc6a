-- A summarize run no longer holds the summary row locked (and a pooled connection) across its
-- model call. It claims the conversation's summary with a lease instead: `folding_until` and
-- `folding_job` are set while a run folds. Another run finding an unexpired lease of another
-- job ends at once (the running one re-checks the backlog after its write); the same job,
-- redelivered after a crash, takes its own lease back. The run's write is a compare-and-set
-- on `summarized_up_to`, so a run whose lease expired can never overwrite a later fold.
ALTER TABLE conversation_summaries
    ADD COLUMN folding_until timestamptz,
    ADD COLUMN folding_job uuid;
