//! A chat turn, API side (docs/architecture/chat.md, "API side"): write the user's
//! message and the response row, publish `message.created`, subscribe to the response's
//! events, enqueue the `chat` job, then relay the events (SSE) or wait for the answer (JSON).
//! The API never calls a model.
//!
//! Here: the endpoints and their answers. The request body of a turn is in `body.rs`; starting
//! the turn and answering it (the JSON wait, the SSE stream, a retried turn) in `turn.rs`.

mod body;
mod turn;

use jobs::events::{EventId, ResponseEvent};
use poem::Request;
use poem_openapi::param::{Header, Path};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, ResponseContent};
use store::conversations::{NewTurn, TurnKey, TurnStarted};
use uuid::Uuid;

use self::body::{CONTENT_MAX, NewMessage, idempotency_key, request_hash};
use super::Tag;
use crate::auth::BearerAuth;
use crate::body::JsonBody;
use crate::error::{ApiError, ErrorBody};
use crate::routes::actions::ActionView;
use crate::sse::SseStream;
use crate::state::AppState;
use crate::views::MessageView;
use crate::{ratelimit, sse, validate};

pub struct ChatApi {
    pub state: AppState,
}

/// JSON mode: the assistant's answer.
#[derive(Object)]
pub struct TurnAnswer {
    message: MessageView,
    /// The write actions the assistant proposed in this turn (confirm or reject them with
    /// `POST /v1/actions/{id}/confirm|reject`).
    actions: Vec<ActionView>,
}

/// JSON mode: the answer takes longer than `JSON_WAIT_SECS` (or could not be followed right
/// now); follow it on `GET /v1/conversations/{id}/responses/{response_id}/events`.
#[derive(Object)]
pub struct TurnAccepted {
    response_id: Uuid,
    /// The user's message of this turn.
    message_id: Uuid,
    /// The turn still waits: where it stands (as the `queued` event says), `null` when it
    /// does not wait (it runs, or its state is not known).
    #[oai(nullable)]
    queued: Option<QueuedView>,
}

/// Where a waiting turn stands (the `queued` event's payload).
#[derive(Object, Clone)]
pub struct QueuedView {
    /// 1: next.
    position: u64,
    /// `backlog` (other turns go first) or `rate_limited` (the model's rate limit).
    reason: String,
    /// `rate_limited`: when the model is tried again.
    #[oai(nullable)]
    retry_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl QueuedView {
    fn of(event: &ResponseEvent) -> Option<Self> {
        match event {
            ResponseEvent::Queued {
                position,
                reason,
                retry_at,
            } => Some(Self {
                position: *position,
                reason: reason.clone(),
                retry_at: *retry_at,
            }),
            _ => None,
        }
    }
}

#[derive(ResponseContent)]
pub enum TurnContent {
    Answer(Json<TurnAnswer>),
    Events(SseStream),
}

#[derive(ApiResponse)]
pub enum TurnResponse {
    /// JSON mode: the complete answer. SSE mode: the response's events.
    #[oai(status = 200)]
    Ok(TurnContent),
    /// JSON mode: not complete within the wait.
    #[oai(status = 202)]
    Accepted(Json<TurnAccepted>),
    /// JSON mode: the model failed (`model_unavailable`: the primary and the fallback both
    /// failed), with the worker's error code.
    #[oai(status = 502)]
    BadGateway(Json<ErrorBody>),
    /// JSON mode: our own dependency failed while answering (`internal_error`, `unavailable`).
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

#[derive(ApiResponse)]
pub enum EventsResponse {
    /// The response's events, after `Last-Event-ID` when given.
    #[oai(status = 200)]
    Events(SseStream),
}

/// Whether the client asked for an event stream.
fn wants_sse(req: &Request, stream: Option<bool>) -> bool {
    stream.unwrap_or(false)
        || req
            .headers()
            .get_all(poem::http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
            })
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Conversations")]
impl ChatApi {
    /// Post a message and get the assistant's answer: streamed as Server-Sent Events
    /// (`stream: true` or `Accept: text/event-stream`), or as one JSON body (200 once complete,
    /// 202 `{response_id, message_id}` when it takes longer than the wait, 502 when the models
    /// failed). With an `Idempotency-Key`, a retry answers with the same turn.
    #[oai(path = "/conversations/:id/messages", method = "post")]
    async fn post_message(
        &self,
        req: &Request,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: JsonBody<NewMessage>,
        /// Makes a retry safe: the same key (per user, kept at least a day) answers with the
        /// same turn — its answer, or its events from the start — instead of starting another;
        /// the same key with another conversation or content is a 409.
        #[oai(name = "Idempotency-Key")]
        idempotency: Header<Option<String>>,
    ) -> Result<TurnResponse, ApiError> {
        let caller = auth.0;
        let body = body.0;
        let content = validate::text("content", &body.content, CONTENT_MAX)?;
        let key = idempotency_key(idempotency.0.as_deref())?;
        let sse_mode = wants_sse(req, body.stream);
        let state = &self.state;

        // SSE mode: a stream of the caller's, within the per-user cap (429 before anything is
        // written).
        let permit = if sse_mode {
            Some(state.streams.acquire(caller.user_id)?)
        } else {
            None
        };
        let hash = request_hash(id.0, &content);
        let turn_key = key.map(|key| TurnKey {
            key,
            request_hash: &hash,
        });
        // The per-user limit (Redis) first — retries count too — then, for a keyed request, the
        // turn the key started, then the new turn in ONE autocommitted statement that also
        // checks ownership (404: nothing written). Nothing holds a pooled database connection
        // while Redis answers. (A post to a conversation that is not the caller's counts
        // against the caller's own limit; it reveals nothing about the conversation.)
        ratelimit::message_posted(state, caller.user_id).await?;
        if let Some(k) = turn_key {
            let found = {
                let mut conn = state.db.acquire().await?;
                store::conversations::keyed_turn(&mut conn, caller.user_id, k).await?
            };
            if let Some(found) = found {
                return self.started_before(found, permit).await;
            }
        }
        let turn = NewTurn {
            user_id: caller.user_id,
            conversation_id: id.0,
            content: &content,
            message_id: Uuid::now_v7(),
            response_id: Uuid::now_v7(),
            job_id: Uuid::now_v7(),
            key: turn_key,
        };
        let response = match self.start(caller.org_id, &turn).await? {
            // (read back after an unknown commit: this request's own turn, which goes on)
            TurnStarted::New(response) => response,
            TurnStarted::Existing(r) if r.id == turn.response_id => r,
            found => return self.started_before(found, permit).await,
        };
        let (conversation_id, response_id, message_id) = (
            response.conversation_id,
            response.id,
            response.user_message_id,
        );

        // From here on the turn is committed: PostgreSQL records it with its job, so a failure
        // below (Redis unreachable, this process killed) delays the answer but never loses it
        // — the scheduler's reconciler enqueues a job the bus does not have.
        //
        // `message.created` names the user's message (the assistant's does not exist yet); it
        // is the first event of the replay stream, so resuming clients see it too.
        let created = ResponseEvent::MessageCreated {
            message_id,
            response_id,
        };
        let job = jobs::kinds::Chat {
            conversation_id: conversation_id.into(),
            message_id: message_id.into(),
            response_id: response_id.into(),
            user_id: caller.user_id.into(),
            org_id: caller.org_id.into(),
        };
        let traceparent = req
            .extensions()
            .get::<crate::middleware::TraceContext>()
            .map(|t| t.traceparent.clone());
        let mut envelope = jobs::Envelope::new(job).with_trace(traceparent);
        envelope.id = turn.job_id;
        if let Err(e) = state.publisher.publish(response_id, &created).await {
            tracing::error!(error = %e, %response_id, "cannot publish message.created; the turn goes on");
            // (Redis may be back already: the job goes out now if it can, else the
            // reconciler sends it)
            let _ = state.bus.enqueue_envelope(&envelope).await;
            if sse_mode {
                return Err(ApiError::Unavailable(
                    "the answer cannot be streamed right now; it was accepted: retry with the \
                     same Idempotency-Key to follow it"
                        .into(),
                ));
            }
            return Ok(accepted(response_id, message_id));
        }
        // Listen before the job exists, so that no event can slip past.
        let events = state.hub.events(response_id, None);
        match state.bus.enqueue_envelope(&envelope).await {
            Ok(()) => self.watch_queue(response_id, envelope),
            Err(e) => {
                tracing::error!(error = %e, %response_id, "cannot enqueue the chat job; the reconciler will");
            }
        }

        if let Some(permit) = permit {
            return Ok(TurnResponse::Ok(TurnContent::Events(sse::respond(
                state,
                permit,
                Vec::new(),
                events,
            ))));
        }
        self.await_answer(response_id, message_id, events).await
    }

    /// The events of a response, as Server-Sent Events: resumed after `Last-Event-ID` when
    /// given (replayed events keep their ids), also after the response finished (within the
    /// events retention window; past it, a single `message.completed` rebuilt from the stored
    /// answer, or an `error`).
    #[oai(
        path = "/conversations/:id/responses/:response_id/events",
        method = "get"
    )]
    async fn events(
        &self,
        auth: BearerAuth,
        id: Path<Uuid>,
        response_id: Path<Uuid>,
        /// Resume after this event id (the `id:` of the last event received).
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<String>>,
    ) -> Result<EventsResponse, ApiError> {
        let caller = auth.0;
        let state = &self.state;
        let after = match last_event_id.0.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(raw) => Some(EventId::parse(raw).ok_or_else(|| {
                ApiError::invalid("Last-Event-ID: not an event id of this stream")
            })?),
        };
        let response = {
            let mut conn = state.db.acquire().await?;
            store::conversations::get_response_own(&mut conn, caller.user_id, id.0, response_id.0)
                .await?
                .ok_or(ApiError::NotFound)?
        };
        let permit = state.streams.acquire(caller.user_id)?;
        Ok(EventsResponse::Events(
            self.stream_of(permit, &response, after).await?,
        ))
    }
}

fn accepted(response_id: Uuid, message_id: Uuid) -> TurnResponse {
    accepted_queued(response_id, message_id, None)
}

fn accepted_queued(
    response_id: Uuid,
    message_id: Uuid,
    queued: Option<QueuedView>,
) -> TurnResponse {
    TurnResponse::Accepted(Json(TurnAccepted {
        response_id,
        message_id,
        queued,
    }))
}

fn redis_unavailable(e: jobs::events::EventsError) -> ApiError {
    tracing::error!(error = %e, "redis unavailable for response events");
    ApiError::Unavailable("response events are temporarily unavailable".into())
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::body::FIXED_PARAMS;
    use super::*;

    fn parse(v: Value) -> Result<NewMessage, String> {
        crate::body::parse::<NewMessage>(v.to_string().as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn generation_parameters_are_named() {
        for field in FIXED_PARAMS {
            let mut body = serde_json::json!({"content": "hi"});
            body[*field] = Value::from(1);
            let e = parse(body).err().unwrap_or_default();
            assert_eq!(
                e,
                format!("{field}: generation parameters are fixed by the system configuration")
            );
        }
        let e = parse(serde_json::json!({"content": "hi", "colour": 1}))
            .err()
            .unwrap_or_default();
        assert!(e.contains("colour"), "{e}");
        let e = parse(serde_json::json!({"content": null}))
            .err()
            .unwrap_or_default();
        assert!(e.starts_with("content:"), "{e}");
        let m = parse(serde_json::json!({"content": "hi", "stream": true})).ok();
        assert!(m.is_some_and(|m| m.content == "hi" && m.stream == Some(true)));
    }

    #[test]
    fn sse_is_chosen_by_flag_or_accept() {
        let req = |accept: Option<&str>| {
            let mut b = Request::builder();
            if let Some(a) = accept {
                b = b.header("Accept", a);
            }
            b.finish()
        };
        assert!(wants_sse(&req(None), Some(true)));
        assert!(!wants_sse(&req(None), None));
        assert!(!wants_sse(&req(Some("application/json")), Some(false)));
        assert!(wants_sse(
            &req(Some("application/json, Text/Event-Stream;q=0.9")),
            None
        ));
    }
}
