-- Memory (SPEC §3), hidden from users: no user-facing endpoint reads these tables.
--
-- conversation_summaries: one running summary per conversation; `summarized_up_to` is the seq
-- of the last message folded into it. The summarize job locks the row (FOR UPDATE) and folds
-- only messages with seq in (summarized_up_to, new_up_to], so two jobs never fold a message
-- twice or skip one.
--
-- conversation_memories: durable facts in three tiers. The owner of an entry is the org
-- (tier org), a project (tier project) or a user within the org (tier user); the shape check
-- enforces exactly that. Visibility is evaluated at query time (visible_projects via
-- conversation_projects_visible), never copied here. The embedding column is dimensionless
-- (`dim` + `model` record what produced it; NULL when embedding failed): at memory scale (at
-- most the tier's capacity per owner) an exact scan ranks them, no ANN index is needed.

CREATE TABLE conversation_summaries (
    conversation_id  uuid PRIMARY KEY REFERENCES conversations (id) ON DELETE CASCADE,
    summary          text NOT NULL DEFAULT '',
    summarized_up_to bigint NOT NULL DEFAULT 0,
    model            text,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE conversation_memories (
    id                     uuid PRIMARY KEY,
    org_id                 uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    tier                   text NOT NULL CHECK (tier IN ('org', 'project', 'user')),
    project_id             uuid,
    user_id                uuid REFERENCES users (id) ON DELETE CASCADE,
    content                text NOT NULL CHECK (char_length(content) BETWEEN 1 AND 2000),
    -- where it was learnt (NULL for operator-added entries)
    source_conversation_id uuid REFERENCES conversations (id) ON DELETE SET NULL,
    source_message_ids     uuid[] NOT NULL DEFAULT '{}',
    model                  text,
    dim                    integer CHECK (dim > 0),
    embedding              vector,
    created_at             timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at             timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT conversation_memories_project_fkey FOREIGN KEY (org_id, project_id)
        REFERENCES projects (org_id, id) ON DELETE CASCADE,
    CONSTRAINT conversation_memories_owner_shape CHECK (
        (tier = 'org' AND project_id IS NULL AND user_id IS NULL)
        OR (tier = 'project' AND project_id IS NOT NULL AND user_id IS NULL)
        OR (tier = 'user' AND user_id IS NOT NULL AND project_id IS NULL)),
    CONSTRAINT conversation_memories_embedding_shape CHECK ((embedding IS NULL) = (dim IS NULL))
);
-- One owner's entries, newest first (retention trims from the other end; prompts scan them).
CREATE INDEX conversation_memories_owner_idx
    ON conversation_memories (org_id, tier, project_id, user_id, updated_at);
CREATE INDEX conversation_memories_user_idx ON conversation_memories (user_id) WHERE user_id IS NOT NULL;
CREATE INDEX conversation_memories_project_idx ON conversation_memories (project_id) WHERE project_id IS NOT NULL;

-- The assistant messages a `remember` job has learnt from, written in the same transaction as
-- the facts: a redelivered job finds its row and stores nothing twice.
CREATE TABLE memory_extractions (
    message_id  uuid PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    facts       integer NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now()
);
