-- Retrieval (SPEC §4): uploaded documents, the indexing outbox and the `embeddings` index.
--
-- Visibility is NOT copied into the index as a decision: each chunk carries the facts the live
-- rule needs (org, project, owner user, allowed users/teams) and every query evaluates them
-- against visible_projects() / team membership at query time, so a revoked membership or a
-- narrowed conversation hides content on the very next retrieval, before any re-index.

CREATE TABLE documents (
    id                  uuid PRIMARY KEY,
    org_id              uuid NOT NULL,
    project_id          uuid NOT NULL,
    uploaded_by         uuid REFERENCES users (id) ON DELETE SET NULL,
    title               text NOT NULL CHECK (char_length(title) BETWEEN 1 AND 500),
    content_type        text NOT NULL CHECK (content_type IN
                            ('text/plain', 'text/markdown', 'text/html', 'application/pdf')),
    -- the size of what was uploaded, and the text extracted from it (what gets indexed)
    byte_size           bigint NOT NULL CHECK (byte_size >= 0),
    content             text NOT NULL,
    -- Optional restriction inside the project: when either list is non-empty, only these
    -- users / members of these teams (who can also see the project) may retrieve it.
    visible_to_user_ids uuid[] NOT NULL DEFAULT '{}',
    visible_to_team_ids uuid[] NOT NULL DEFAULT '{}',
    status              text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'indexed', 'failed')),
    failure_reason      text,
    -- Deleting hides at once (embeddings rows go in the same transaction); the row stays as a
    -- tombstone for the outbox and answers 404.
    deleted_at          timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    indexed_at          timestamptz,
    CONSTRAINT documents_project_fkey FOREIGN KEY (org_id, project_id)
        REFERENCES projects (org_id, id) ON DELETE CASCADE
);
CREATE INDEX documents_project_idx ON documents (project_id, created_at) WHERE deleted_at IS NULL;

-- Every change to an indexed source writes a row here in the same transaction as the change;
-- the `index` job drains it in batches (oldest first) and deletes what it processed.
CREATE TABLE index_outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id      uuid NOT NULL,
    source_kind text NOT NULL CHECK (source_kind IN ('document', 'project', 'task', 'message')),
    source_id   uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX index_outbox_source_idx ON index_outbox (source_kind, source_id);

-- One row per chunk of a source, per embedding model. The vector column has no fixed
-- dimension: `dim` records it, and the HNSW index is an expression index per configured
-- dimension (store::embeddings::ensure_vector_index), so changing EMBEDDING_MODEL or
-- EMBEDDING_DIM re-embeds beside the old rows instead of dropping them.
CREATE TABLE embeddings (
    id                  uuid PRIMARY KEY,
    org_id              uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    source_kind         text NOT NULL CHECK (source_kind IN ('document', 'project', 'task', 'message')),
    source_id           uuid NOT NULL,
    chunk_index         integer NOT NULL CHECK (chunk_index >= 0),
    -- visibility facts, evaluated live at query time:
    --   project content (document/project/task): project_id set, owner_user_id NULL;
    --   conversation messages: owner_user_id = the conversation's user, project_id NULL.
    project_id          uuid REFERENCES projects (id) ON DELETE CASCADE,
    owner_user_id       uuid REFERENCES users (id) ON DELETE CASCADE,
    allowed_user_ids    uuid[] NOT NULL DEFAULT '{}',
    allowed_team_ids    uuid[] NOT NULL DEFAULT '{}',
    -- content
    title               text NOT NULL DEFAULT '',
    content             text NOT NULL,
    content_hash        bytea NOT NULL,
    tsv                 tsvector GENERATED ALWAYS AS (to_tsvector('english', title || ' ' || content)) STORED,
    model               text NOT NULL,
    dim                 integer NOT NULL CHECK (dim > 0),
    embedding           vector NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT embeddings_visibility_shape CHECK ((project_id IS NULL) <> (owner_user_id IS NULL)),
    CONSTRAINT embeddings_chunk_key UNIQUE (source_kind, source_id, model, chunk_index)
);
CREATE INDEX embeddings_project_idx ON embeddings (project_id) WHERE project_id IS NOT NULL;
CREATE INDEX embeddings_owner_idx ON embeddings (owner_user_id) WHERE owner_user_id IS NOT NULL;
CREATE INDEX embeddings_org_idx ON embeddings (org_id);
CREATE INDEX embeddings_tsv_idx ON embeddings USING gin (tsv);
