-- Provenance (issue 17, docs/ARCHITECTURE.md "Provenance"): everything derived from workspace
-- data — an assistant answer, the chunks of a message, a memory fact, a conversation summary —
-- records what it drew on, and every read filters it by those sources against the live
-- membership tables, in SQL, like the rest of the visibility rule.
--
-- A derived item carries:
--   source_project_ids   the projects whose content it drew on (documents, tasks, projects,
--                        project facts, and transitively what earlier answers drew on);
--   source_document_ids  the documents it drew on (deleting one deletes or resets what drew on
--                        it; one its reader can no longer see hides it);
--   narrow               it drew on something narrower than its projects: a restricted
--                        document, or another narrow item. Such an item never
--                        becomes project knowledge (code decides the tier, not the model).
-- Empty arrays and `narrow = false`: drawn on nothing but the user's own words.

-- A document's content is visible to a user who can see its project and, when the document
-- is restricted (`visible_to_user_ids` / `visible_to_team_ids`), is listed, is in a listed
-- team, or uploaded it. Deleted documents are visible to nobody.
CREATE FUNCTION can_see_document(p_user uuid, p_document uuid)
RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT EXISTS (
        SELECT 1 FROM documents d
        WHERE d.id = p_document AND d.deleted_at IS NULL
          AND can_see_project(p_user, d.project_id)
          AND ((d.visible_to_user_ids = '{}' AND d.visible_to_team_ids = '{}')
               OR p_user = ANY(d.visible_to_user_ids)
               OR d.uploaded_by = p_user
               OR EXISTS (SELECT 1 FROM team_members tm
                          WHERE tm.user_id = p_user AND tm.team_id = ANY(d.visible_to_team_ids))))
$$;

-- Every listed document is visible to the user (true for none).
CREATE FUNCTION can_see_documents(p_user uuid, p_documents uuid[])
RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT p_documents = '{}' OR NOT EXISTS (
        SELECT 1 FROM unnest(p_documents) AS x(id) WHERE NOT can_see_document(p_user, x.id))
$$;

-- Some listed document is restricted now (or deleted): what drew on it is no longer project
-- knowledge.
CREATE FUNCTION any_document_narrowed(p_documents uuid[])
RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT p_documents <> '{}' AND EXISTS (
        SELECT 1 FROM unnest(p_documents) AS x(id)
        WHERE NOT EXISTS (
            SELECT 1 FROM documents d
            WHERE d.id = x.id AND d.deleted_at IS NULL
              AND d.visible_to_user_ids = '{}' AND d.visible_to_team_ids = '{}'))
$$;

-- The sorted, distinct union of two id lists.
CREATE FUNCTION uuid_union(a uuid[], b uuid[])
RETURNS uuid[]
LANGUAGE sql IMMUTABLE
AS $$
    SELECT coalesce(array_agg(DISTINCT x ORDER BY x), '{}') FROM unnest(a || b) AS u(x)
$$;

-- A tool result's text as JSON, NULL when it is not JSON.
CREATE FUNCTION try_jsonb(p text)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    RETURN p::jsonb;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;

-- What the tool results of a response named: projects (a task's or a search hit's
-- `project_id`, `list_projects`' ids), documents and earlier messages (search hits).
CREATE FUNCTION tool_result_sources(p_response uuid)
RETURNS TABLE (kind text, id uuid)
LANGUAGE sql STABLE
AS $$
    WITH j AS (
        SELECT try_jsonb(m.content) AS v FROM messages m
        WHERE m.response_id = p_response AND m.role = 'tool'),
    ids AS (
        SELECT 'project' AS kind, x #>> '{}' AS id
          FROM j, jsonb_path_query(j.v, 'lax $.**.project_id') AS x
        UNION
        SELECT 'project', x #>> '{}'
          FROM j, jsonb_path_query(j.v, 'lax $.projects[*].id') AS x
        UNION
        SELECT r ->> 'kind', r ->> 'id'
          FROM j, jsonb_path_query(j.v, 'lax $.results[*]') AS r
         WHERE r ->> 'kind' IN ('document', 'message'))
    SELECT kind, id::uuid FROM ids
    WHERE id ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
$$;

ALTER TABLE messages
    ADD COLUMN source_project_ids uuid[] NOT NULL DEFAULT '{}',
    ADD COLUMN source_document_ids uuid[] NOT NULL DEFAULT '{}',
    ADD COLUMN narrow boolean NOT NULL DEFAULT false,
    -- The turn's sources as given to the model: retrieved chunks (kind, id, project,
    -- restricted), memory entries, the summary, tool results.
    ADD COLUMN sources jsonb NOT NULL DEFAULT '[]';

ALTER TABLE conversation_memories
    ADD COLUMN source_project_ids uuid[] NOT NULL DEFAULT '{}',
    ADD COLUMN source_document_ids uuid[] NOT NULL DEFAULT '{}',
    ADD COLUMN narrow boolean NOT NULL DEFAULT false,
    -- Whose words or exchange it came from (NULL: an operator's entry).
    ADD COLUMN author_user_id uuid REFERENCES users (id) ON DELETE CASCADE;

ALTER TABLE conversation_summaries
    ADD COLUMN source_project_ids uuid[] NOT NULL DEFAULT '{}',
    ADD COLUMN source_document_ids uuid[] NOT NULL DEFAULT '{}',
    ADD COLUMN narrow boolean NOT NULL DEFAULT false;

ALTER TABLE embeddings
    ADD COLUMN source_project_ids uuid[] NOT NULL DEFAULT '{}',
    ADD COLUMN source_document_ids uuid[] NOT NULL DEFAULT '{}',
    ADD COLUMN narrow boolean NOT NULL DEFAULT false;

-- Deleting a document finds what drew on it.
CREATE INDEX conversation_memories_source_documents_idx
    ON conversation_memories USING gin (source_document_ids);
CREATE INDEX conversation_summaries_source_documents_idx
    ON conversation_summaries USING gin (source_document_ids);
CREATE INDEX embeddings_source_documents_idx ON embeddings USING gin (source_document_ids);
-- Per-author retention of project facts.
CREATE INDEX conversation_memories_author_idx
    ON conversation_memories (project_id, author_user_id, updated_at) WHERE tier = 'project';

-- Backfill, conservatively: what is not known is treated as narrow.
-- Answers: the projects and documents of their citations (what retrieval gave them); tool
-- results and memories of the past are unknown, so every earlier answer is narrow.
UPDATE messages m
   SET source_document_ids = coalesce((
           SELECT array_agg(DISTINCT (c ->> 'source_id')::uuid)
           FROM jsonb_array_elements(m.citations) c
           WHERE c ->> 'source_kind' = 'document'), '{}'),
       source_project_ids = coalesce((
           SELECT array_agg(DISTINCT p.project_id) FROM (
               SELECT d.project_id FROM jsonb_array_elements(m.citations) c
                 JOIN documents d ON d.id = (c ->> 'source_id')::uuid
                WHERE c ->> 'source_kind' = 'document'
               UNION
               SELECT t.project_id FROM jsonb_array_elements(m.citations) c
                 JOIN tasks t ON t.id = (c ->> 'source_id')::uuid
                WHERE c ->> 'source_kind' = 'task'
               UNION
               SELECT (c ->> 'source_id')::uuid FROM jsonb_array_elements(m.citations) c
                WHERE c ->> 'source_kind' = 'project') p), '{}'),
       narrow = true
 WHERE m.role = 'assistant' AND m.tool_calls IS NULL;

-- Message chunks carry their message's provenance.
UPDATE embeddings e
   SET source_project_ids = m.source_project_ids,
       source_document_ids = m.source_document_ids,
       narrow = m.narrow
  FROM messages m
 WHERE e.source_kind = 'message' AND e.source_id = m.id;

-- Summaries: everything folded into them.
UPDATE conversation_summaries s
   SET source_project_ids = coalesce((
           SELECT array_agg(DISTINCT p) FROM messages m, unnest(m.source_project_ids) p
           WHERE m.conversation_id = s.conversation_id AND m.seq <= s.summarized_up_to), '{}'),
       source_document_ids = coalesce((
           SELECT array_agg(DISTINCT d) FROM messages m, unnest(m.source_document_ids) d
           WHERE m.conversation_id = s.conversation_id AND m.seq <= s.summarized_up_to), '{}'),
       narrow = EXISTS (SELECT 1 FROM messages m
                        WHERE m.conversation_id = s.conversation_id
                          AND m.seq <= s.summarized_up_to AND m.narrow);

-- Facts learnt from a conversation: authored by its user; a project fact learnt before
-- provenance existed may have come from anything, so it becomes its author's own (user tier),
-- remembering its project.
UPDATE conversation_memories f
   SET author_user_id = c.user_id
  FROM conversations c
 WHERE c.id = f.source_conversation_id;
UPDATE conversation_memories
   SET source_project_ids = ARRAY[project_id], narrow = true,
       tier = 'user', user_id = author_user_id, project_id = NULL
 WHERE tier = 'project' AND author_user_id IS NOT NULL;
UPDATE conversation_memories
   SET narrow = true
 WHERE tier = 'user' AND source_conversation_id IS NOT NULL;

-- A restricted document's uploader keeps access: its chunks list the uploader too.
UPDATE embeddings e
   SET allowed_user_ids = e.allowed_user_ids || d.uploaded_by
  FROM documents d
 WHERE e.source_kind = 'document' AND e.source_id = d.id AND d.uploaded_by IS NOT NULL
   AND (d.visible_to_user_ids <> '{}' OR d.visible_to_team_ids <> '{}')
   AND NOT (d.uploaded_by = ANY(e.allowed_user_ids));
