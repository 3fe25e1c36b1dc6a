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

-- Backfill, conservatively: what is not known is treated as narrow, and as drawn on every
-- project its conversation could draw on at migration time — so that losing any of them (a
-- revoked membership, a narrowed conversation) hides it.
--
-- What each earlier answer is known to have drawn on: its citations (what retrieval gave it)
-- and what the tool results of its conversation up to it named (its own rounds and earlier
-- ones: `tool_result_sources`).
CREATE TEMPORARY TABLE provenance_backfill_direct ON COMMIT DROP AS
WITH answers AS (
    SELECT m.id, m.conversation_id, m.seq, m.citations FROM messages m
     WHERE m.role = 'assistant' AND m.tool_calls IS NULL),
tool_responses AS (
    SELECT t.conversation_id, t.response_id, min(t.seq) AS seq FROM messages t
     WHERE t.role = 'tool' AND t.response_id IS NOT NULL
     GROUP BY t.conversation_id, t.response_id),
tool_sources AS (
    SELECT r.conversation_id, r.seq, s.kind, s.id::text AS id
      FROM tool_responses r, tool_result_sources(r.response_id) s),
raw AS (
    SELECT a.id AS message_id, c ->> 'source_kind' AS kind, c ->> 'source_id' AS id
      FROM answers a,
           jsonb_array_elements(CASE jsonb_typeof(a.citations)
                                WHEN 'array' THEN a.citations ELSE '[]' END) c
    UNION
    SELECT a.id, s.kind, s.id
      FROM answers a JOIN tool_sources s
        ON s.conversation_id = a.conversation_id AND s.seq < a.seq)
SELECT DISTINCT message_id, kind, id::uuid AS id FROM raw
 WHERE id ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$';

-- Answers: those sources (a document → it and its project; a task → its project; a project →
-- it), plus — for the memories, summaries and windows of the past, which no row records —
-- the projects of `conversation_projects_visible(user, conversation)` now. All narrow.
UPDATE messages m
   SET source_document_ids = coalesce((
           SELECT array_agg(DISTINCT s.id ORDER BY s.id) FROM provenance_backfill_direct s
            WHERE s.message_id = m.id AND s.kind = 'document'), '{}'),
       source_project_ids = coalesce((
           SELECT array_agg(DISTINCT p.id ORDER BY p.id) FROM (
               SELECT s.id FROM provenance_backfill_direct s
                WHERE s.message_id = m.id AND s.kind = 'project'
               UNION
               SELECT d.project_id FROM provenance_backfill_direct s
                 JOIN documents d ON d.id = s.id
                WHERE s.message_id = m.id AND s.kind = 'document'
               UNION
               SELECT t.project_id FROM provenance_backfill_direct s
                 JOIN tasks t ON t.id = s.id
                WHERE s.message_id = m.id AND s.kind = 'task'
               UNION
               SELECT v.project_id FROM conversations c,
                      conversation_projects_visible(c.user_id, c.id) v
                WHERE c.id = m.conversation_id) p(id)), '{}'),
       narrow = true
 WHERE m.role = 'assistant' AND m.tool_calls IS NULL;

-- Then propagate until nothing changes: an answer carries what the messages it cited (or a
-- search found) drew on, and the answers of one conversation carry what any of them drew on
-- (its summary and recent window gave later answers the earlier ones, unrecorded; giving the
-- earlier ones the later ones' sources too errs on the narrow side).
CREATE TEMPORARY TABLE provenance_backfill_cites ON COMMIT DROP AS
SELECT DISTINCT message_id AS answer, id AS cited FROM provenance_backfill_direct
 WHERE kind = 'message';

DO $$
DECLARE
    changed bigint;
    n bigint;
BEGIN
    FOR i IN 1..100 LOOP
        UPDATE messages m
           SET source_project_ids = uuid_union(m.source_project_ids, x.projects),
               source_document_ids = uuid_union(m.source_document_ids, x.documents)
          FROM (SELECT a.answer,
                       ARRAY(SELECT DISTINCT p FROM provenance_backfill_cites c
                               JOIN messages s ON s.id = c.cited, unnest(s.source_project_ids) p
                              WHERE c.answer = a.answer) AS projects,
                       ARRAY(SELECT DISTINCT d FROM provenance_backfill_cites c
                               JOIN messages s ON s.id = c.cited, unnest(s.source_document_ids) d
                              WHERE c.answer = a.answer) AS documents
                  FROM (SELECT DISTINCT answer FROM provenance_backfill_cites) a) x
         WHERE m.id = x.answer
           AND NOT (m.source_project_ids @> x.projects AND m.source_document_ids @> x.documents);
        GET DIAGNOSTICS changed = ROW_COUNT;
        UPDATE messages m
           SET source_project_ids = uuid_union(m.source_project_ids, x.projects),
               source_document_ids = uuid_union(m.source_document_ids, x.documents)
          FROM (SELECT c.conversation_id,
                       ARRAY(SELECT DISTINCT p FROM messages a, unnest(a.source_project_ids) p
                              WHERE a.conversation_id = c.conversation_id
                                AND a.role = 'assistant' AND a.tool_calls IS NULL) AS projects,
                       ARRAY(SELECT DISTINCT d FROM messages a, unnest(a.source_document_ids) d
                              WHERE a.conversation_id = c.conversation_id
                                AND a.role = 'assistant' AND a.tool_calls IS NULL) AS documents
                  FROM (SELECT DISTINCT conversation_id FROM messages
                         WHERE role = 'assistant' AND tool_calls IS NULL) c) x
         WHERE m.conversation_id = x.conversation_id
           AND m.role = 'assistant' AND m.tool_calls IS NULL
           AND NOT (m.source_project_ids @> x.projects AND m.source_document_ids @> x.documents);
        GET DIAGNOSTICS n = ROW_COUNT;
        EXIT WHEN changed + n = 0;
    END LOOP;
END
$$;

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

-- Facts learnt from a conversation: authored by its user; they carry what the messages they
-- were learnt from drew on, and (those may be gone) what the conversation could draw on now.
-- A user fact whose conversation is gone: what its user can see in the org now. A project fact
-- whose conversation is gone has no known author nor source: it goes. (Operators' entries —
-- no conversation, no messages — are the operators' words and stay as they are.)
UPDATE conversation_memories f
   SET author_user_id = c.user_id
  FROM conversations c
 WHERE c.id = f.source_conversation_id;
UPDATE conversation_memories f
   SET source_project_ids = uuid_union(
           coalesce((SELECT array_agg(DISTINCT p) FROM messages m, unnest(m.source_project_ids) p
                      WHERE m.id = ANY(f.source_message_ids)), '{}'),
           ARRAY(SELECT v.project_id FROM conversations c,
                        conversation_projects_visible(c.user_id, c.id) v
                  WHERE c.id = f.source_conversation_id)),
       source_document_ids = coalesce((
           SELECT array_agg(DISTINCT d) FROM messages m, unnest(m.source_document_ids) d
            WHERE m.id = ANY(f.source_message_ids)), '{}'),
       narrow = true
 WHERE f.source_conversation_id IS NOT NULL;
UPDATE conversation_memories f
   SET author_user_id = f.user_id,
       source_project_ids = ARRAY(SELECT v.project_id FROM visible_projects(f.user_id) v
                                    JOIN projects p ON p.id = v.project_id
                                   WHERE p.org_id = f.org_id ORDER BY 1),
       narrow = true
 WHERE f.tier = 'user' AND f.source_conversation_id IS NULL AND f.source_message_ids <> '{}';
DELETE FROM conversation_memories
 WHERE tier = 'project' AND source_conversation_id IS NULL AND source_message_ids <> '{}';
-- A project fact learnt before provenance existed may have come from anything: it becomes its
-- author's own (user tier), remembering its project.
UPDATE conversation_memories
   SET source_project_ids = uuid_union(source_project_ids, ARRAY[project_id]), narrow = true,
       tier = 'user', user_id = author_user_id, project_id = NULL
 WHERE tier = 'project' AND author_user_id IS NOT NULL;

-- A restricted document's uploader keeps access: its chunks list the uploader too.
UPDATE embeddings e
   SET allowed_user_ids = e.allowed_user_ids || d.uploaded_by
  FROM documents d
 WHERE e.source_kind = 'document' AND e.source_id = d.id AND d.uploaded_by IS NOT NULL
   AND (d.visible_to_user_ids <> '{}' OR d.visible_to_team_ids <> '{}')
   AND NOT (d.uploaded_by = ANY(e.allowed_user_ids));
