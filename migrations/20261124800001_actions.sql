-- Supervised writes (SPEC §5, docs/ARCHITECTURE.md "Scope and tools"): a write tool call of
-- the assistant only stores a proposal here; the user confirms or rejects it; a worker executes
-- a confirmed one exactly once (the status transition confirmed → executed commits in the same
-- transaction as the task write), and every executed action leaves an audit record.

-- The tool-call rounds of one response: an assistant message with `tool_calls` and the `tool`
-- messages answering it carry the round number, so a restarted turn finds the rounds already
-- done instead of repeating them (idempotency key: response, round, role, tool call id).
ALTER TABLE messages ADD COLUMN tool_round integer;
CREATE UNIQUE INDEX messages_one_tool_round_entry
    ON messages (response_id, tool_round, role, coalesce(tool_call_id, ''))
    WHERE tool_round IS NOT NULL;

CREATE TABLE proposed_actions (
    id                       uuid PRIMARY KEY,
    org_id                   uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    conversation_id          uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    -- the conversation's owner: the only one who may confirm or reject
    user_id                  uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- the response (turn) whose tool call proposed it, and that call's id
    response_id              uuid NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
    tool_call_id             text NOT NULL,
    tool                     text NOT NULL CHECK (tool IN ('create_task', 'update_task')),
    -- the validated arguments, normalised
    arguments                jsonb NOT NULL,
    summary                  text NOT NULL,
    -- for updates: the changed fields before and after (as proposed); for creates: after only
    before                   jsonb,
    after                    jsonb,
    status                   text NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'confirmed', 'executed', 'rejected',
                                               'expired', 'failed')),
    -- executed: what was written (the task); failed: why nothing was
    result                   jsonb,
    failure_reason           text,
    -- the response that continues the conversation after a confirm
    continuation_response_id uuid REFERENCES responses (id) ON DELETE SET NULL,
    created_at               timestamptz NOT NULL DEFAULT now(),
    expires_at               timestamptz NOT NULL,
    decided_at               timestamptz,
    executed_at              timestamptz,
    CONSTRAINT proposed_actions_one_per_call UNIQUE (response_id, tool_call_id)
);
CREATE INDEX proposed_actions_conversation_idx ON proposed_actions (conversation_id, created_at);
CREATE INDEX proposed_actions_pending_expiry_idx ON proposed_actions (expires_at)
    WHERE status = 'pending';

-- One record per executed action: who confirmed it, when, and what changed.
CREATE TABLE action_audit (
    id           uuid PRIMARY KEY,
    action_id    uuid NOT NULL UNIQUE REFERENCES proposed_actions (id) ON DELETE CASCADE,
    org_id       uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    confirmed_by uuid REFERENCES users (id) ON DELETE SET NULL,
    confirmed_at timestamptz NOT NULL,
    executed_at  timestamptz NOT NULL DEFAULT now(),
    tool         text NOT NULL,
    task_id      uuid,
    before       jsonb,
    after        jsonb NOT NULL
);
CREATE INDEX action_audit_org_idx ON action_audit (org_id, executed_at);
