-- Conversations, their messages and the responses that produce assistant messages (SPEC §5).
--
-- A conversation belongs to one user. It draws on every project that user can see, or — when
-- `scoped` — only on the listed `conversation_projects` that the user can (still) see; both are
-- evaluated at query time through visible_projects().
--
-- A response is one assistant turn: created with the user's message, streamed by a worker,
-- and completed with exactly one final assistant message (a partial unique index makes the
-- worker's insert idempotent when a job is redelivered).

CREATE TABLE conversations (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title       text NOT NULL DEFAULT '',
    scoped      boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conversations_user_created_idx ON conversations (user_id, created_at, id);

CREATE TABLE conversation_projects (
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    project_id      uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    PRIMARY KEY (conversation_id, project_id)
);
CREATE INDEX conversation_projects_project_idx ON conversation_projects (project_id);

CREATE TABLE messages (
    id                uuid PRIMARY KEY,
    conversation_id   uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    -- A total order over all messages (ids are v7 but two may share a millisecond).
    seq               bigint GENERATED ALWAYS AS IDENTITY,
    role              text NOT NULL CHECK (role IN ('user', 'assistant', 'tool')),
    content           text NOT NULL,
    response_id       uuid,
    model             text,
    prompt_tokens     integer,
    completion_tokens integer,
    latency_ms        integer,
    tool_calls        jsonb,
    tool_call_id      text,
    citations         jsonb NOT NULL DEFAULT '[]',
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_conversation_seq_idx ON messages (conversation_id, seq);

CREATE TABLE responses (
    id              uuid PRIMARY KEY,
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_message_id uuid NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'streaming', 'completed', 'failed')),
    -- The model that answered (primary or fallback), once known.
    model           text,
    error_code      text,
    error_message   text,
    -- How many times a worker started streaming this response (> 1 after a restart).
    starts          integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz
);
CREATE INDEX responses_conversation_idx ON responses (conversation_id, created_at);

ALTER TABLE messages
    ADD CONSTRAINT messages_response_fk FOREIGN KEY (response_id) REFERENCES responses (id) ON DELETE SET NULL;

-- Exactly one final answer per response (tool-call turns have tool_calls and do not count).
CREATE UNIQUE INDEX messages_one_answer_per_response
    ON messages (response_id) WHERE role = 'assistant' AND tool_calls IS NULL;

-- The projects a conversation may draw on for user p_user, right now.
CREATE FUNCTION conversation_projects_visible(p_user uuid, p_conversation uuid)
RETURNS TABLE (project_id uuid)
LANGUAGE sql STABLE
AS $$
    SELECT v.project_id
    FROM visible_projects(p_user) v
    JOIN conversations c ON c.id = p_conversation AND c.user_id = p_user
    WHERE NOT c.scoped
       OR EXISTS (SELECT 1 FROM conversation_projects cp
                  WHERE cp.conversation_id = c.id AND cp.project_id = v.project_id)
$$;
