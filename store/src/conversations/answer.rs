//! Completing a turn: the assistant's final message, stored once by the run that holds the
//! response, with the provenance it inherits from what it was given.

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{MESSAGE_COLS, Message, lock_response, sql};
use crate::StoreError;
use crate::provenance::Provenance;
use crate::types::{DocumentId, ProjectId, ResponseStatus};

/// The final answer of a response.
pub struct Answer<'a> {
    pub content: &'a str,
    pub model: &'a str,
    pub prompt_tokens: Option<i32>,
    pub completion_tokens: Option<i32>,
    pub latency_ms: i32,
    pub citations: Value,
    /// What the turn drew on besides its tool results (added by [`complete`]).
    pub sources: AnswerSources<'a>,
}

/// The provenance of an answer as the worker knows it: what retrieval, memory and the summary
/// gave the model, and the messages of the prompt's window (whose own provenance the answer
/// inherits). The tool results of the response are read by [`complete`] itself.
#[derive(Debug, Clone, Default)]
pub struct AnswerSources<'a> {
    pub provenance: Provenance,
    /// `messages.sources`: what was given (a JSON array; `Null` counts as empty).
    pub given: Value,
    /// The prompt's recent window.
    pub context_message_ids: &'a [Uuid],
}

/// The provenance an answer inherits from the messages of its prompt's window and from the
/// tool results it was given — its response's, and those of earlier rounds in the window
/// (projects and documents they named, earlier messages a search found) — and the record of
/// those tool results. In the caller's transaction.
async fn inherited(
    conn: &mut PgConnection,
    conversation_id: Uuid,
    response_id: Uuid,
    context: &[Uuid],
) -> Result<(Provenance, Value), StoreError> {
    let (projects, documents, narrow, tools): (Vec<ProjectId>, Vec<DocumentId>, bool, Value) =
        sqlx::query_as(
            "WITH ctx AS (
                 SELECT m.source_project_ids, m.source_document_ids, m.narrow FROM messages m
                 WHERE m.conversation_id = $1 AND m.id = ANY($3)),
             tools AS (
                 SELECT DISTINCT t.kind, t.id
                 FROM (SELECT $2::uuid AS response_id
                       UNION
                       SELECT m.response_id FROM messages m
                       WHERE m.conversation_id = $1 AND m.id = ANY($3) AND m.role = 'tool'
                         AND m.response_id IS NOT NULL) r,
                      tool_result_sources(r.response_id) t),
             found AS (
                 SELECT m.source_project_ids, m.source_document_ids, m.narrow
                 FROM messages m JOIN conversations c ON c.id = m.conversation_id
                 JOIN conversations mine ON mine.id = $1 AND mine.user_id = c.user_id
                 JOIN tools t ON t.kind = 'message' AND t.id = m.id),
             docs AS (
                 SELECT d.id, d.project_id,
                        (d.visible_to_user_ids <> '{}' OR d.visible_to_team_ids <> '{}') AS restricted
                 FROM documents d JOIN tools t ON t.kind = 'document' AND t.id = d.id),
             projects AS (
                 SELECT x FROM ctx, unnest(ctx.source_project_ids) x
                 UNION SELECT x FROM found, unnest(found.source_project_ids) x
                 UNION SELECT id FROM tools WHERE kind = 'project'
                 UNION SELECT project_id FROM docs),
             documents AS (
                 SELECT x FROM ctx, unnest(ctx.source_document_ids) x
                 UNION SELECT x FROM found, unnest(found.source_document_ids) x
                 UNION SELECT id FROM docs)
             SELECT coalesce((SELECT array_agg(x ORDER BY x) FROM projects), '{}'),
                    coalesce((SELECT array_agg(x ORDER BY x) FROM documents), '{}'),
                    coalesce((SELECT bool_or(narrow) FROM ctx), false)
                      OR coalesce((SELECT bool_or(narrow) FROM found), false)
                      OR coalesce((SELECT bool_or(restricted) FROM docs), false),
                    coalesce((SELECT jsonb_agg(jsonb_build_object(
                                  'kind', 'tool_result', 'source_kind', kind, 'id', id)
                                  ORDER BY kind, id) FROM tools), '[]')",
        )
        .bind(conversation_id)
        .bind(response_id)
        .bind(context)
        .fetch_one(conn)
        .await?;
    Ok((
        Provenance {
            source_project_ids: projects,
            source_document_ids: documents,
            narrow,
        },
        tools,
    ))
}

/// Two provenances together.
fn union(a: &Provenance, b: &Provenance) -> Provenance {
    let mut projects: Vec<ProjectId> = a
        .source_project_ids
        .iter()
        .chain(&b.source_project_ids)
        .copied()
        .collect();
    projects.sort();
    projects.dedup();
    let mut documents: Vec<DocumentId> = a
        .source_document_ids
        .iter()
        .chain(&b.source_document_ids)
        .copied()
        .collect();
    documents.sort();
    documents.dedup();
    Provenance {
        source_project_ids: projects,
        source_document_ids: documents,
        narrow: a.narrow || b.narrow,
    }
}

/// What [`complete`] did.
#[derive(Debug)]
pub enum Completion {
    /// The answer is stored, by this call (`stored`) or by an earlier one of the same run (a
    /// commit whose acknowledgement was lost).
    Done { message: Box<Message>, stored: bool },
    /// The run no longer holds the response (taken over, or failed meanwhile): nothing written.
    NotHeld,
}

/// Inside the caller's transaction: store run `run`'s final assistant message and complete
/// the response — only while that run holds it (the response row is locked first). One answer
/// per response: an answer already stored is returned instead (`stored: false`), so that
/// effects that must happen once per answer (usage) commit with it in the caller's
/// transaction; the message's indexing outbox row is written here when this call stored it.
pub async fn complete(
    conn: &mut PgConnection,
    response_id: Uuid,
    run: i32,
    answer: &Answer<'_>,
) -> Result<Completion, StoreError> {
    let Some(locked) = lock_response(&mut *conn, response_id).await? else {
        return Ok(Completion::NotHeld);
    };
    if locked.status == ResponseStatus::Completed {
        return Ok(match answer_of(&mut *conn, response_id).await? {
            Some(message) => Completion::Done {
                message: Box::new(message),
                stored: false,
            },
            None => Completion::NotHeld,
        });
    }
    if locked.status != ResponseStatus::Running || locked.run != run {
        return Ok(Completion::NotHeld);
    }
    let (from_context, tools) = inherited(
        &mut *conn,
        locked.conversation_id,
        response_id,
        answer.sources.context_message_ids,
    )
    .await?;
    let provenance = union(&answer.sources.provenance, &from_context);
    let mut given = match &answer.sources.given {
        Value::Array(items) => items.clone(),
        _ => Vec::new(),
    };
    if let Value::Array(items) = tools {
        given.extend(items);
    }
    let inserted = sqlx::query_as::<_, Message>(sql(format!(
        "INSERT INTO messages (id, conversation_id, role, content, response_id, model,
                               prompt_tokens, completion_tokens, latency_ms, citations,
                               source_project_ids, source_document_ids, narrow, sources)
         VALUES ($1, $2, 'assistant', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         ON CONFLICT (response_id) WHERE role = 'assistant' AND tool_calls IS NULL DO NOTHING
         RETURNING {MESSAGE_COLS}"
    )))
    .bind(Uuid::now_v7())
    .bind(locked.conversation_id)
    .bind(answer.content)
    .bind(response_id)
    .bind(answer.model)
    .bind(answer.prompt_tokens)
    .bind(answer.completion_tokens)
    .bind(answer.latency_ms)
    .bind(&answer.citations)
    .bind(&provenance.source_project_ids)
    .bind(&provenance.source_document_ids)
    .bind(provenance.narrow)
    .bind(Value::Array(given))
    .fetch_optional(&mut *conn)
    .await?;
    let (message, stored) = match inserted {
        Some(m) => {
            crate::outbox::record_message(&mut *conn, m.conversation_id.into(), m.id.into())
                .await?;
            (m, true)
        }
        None => (
            answer_of(&mut *conn, response_id)
                .await?
                .ok_or(StoreError::Conflict {
                    message: "the response's answer disappeared",
                })?,
            false,
        ),
    };
    sqlx::query(
        "UPDATE responses SET status = 'completed', model = $2, leased_until = NULL,
                              completed_at = coalesce(completed_at, now()),
                              error_code = NULL, error_message = NULL
         WHERE id = $1",
    )
    .bind(response_id)
    .bind(&message.model)
    .execute(&mut *conn)
    .await?;
    Ok(Completion::Done {
        message: Box::new(message),
        stored,
    })
}

/// The final assistant message of a response, if stored.
pub async fn answer_of(
    conn: &mut PgConnection,
    response_id: Uuid,
) -> Result<Option<Message>, StoreError> {
    Ok(sqlx::query_as::<_, Message>(sql(format!(
        "SELECT {MESSAGE_COLS} FROM messages
         WHERE response_id = $1 AND role = 'assistant' AND tool_calls IS NULL"
    )))
    .bind(response_id)
    .fetch_optional(conn)
    .await?)
}
