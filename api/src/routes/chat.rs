//! A chat turn, API side (docs/ARCHITECTURE.md, "The chat turn (API side)"): write the user's
//! message and the response row, publish `message.created`, subscribe to the response's
//! events, enqueue the `chat` job, then relay the events (SSE) or wait for the answer (JSON).
//! The API never calls a model.

use std::time::Duration;

use futures::{Stream, StreamExt};
use jobs::events::{EventId, EventsError, ResponseEvent, StoredEvent};
use poem::Request;
use poem_openapi::param::{Header, Path};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, ResponseContent};
use serde::Deserialize;
use serde::de::Error as _;
use serde_json::Value;
use store::conversations::{NewTurn, Response, TurnKey, TurnStarted};
use uuid::Uuid;

use super::Tag;
use crate::auth::BearerAuth;
use crate::body::JsonBody;
use crate::error::{ApiError, ErrorBody, ErrorBodyDetail};
use crate::routes::actions::ActionView;
use crate::sse::{SseEvent, SseStream};
use crate::state::AppState;
use crate::views::MessageView;
use crate::{ratelimit, sse, validate};

pub struct ChatApi {
    pub state: AppState,
}

/// Generation parameters are fixed by the system configuration (`[chat]`): a body naming one
/// is refused with a 400 that names it.
const FIXED_PARAMS: &[&str] = &[
    "model",
    "fallback_model",
    "models",
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "max_completion_tokens",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "stop",
    "seed",
    "n",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "parallel_tool_calls",
    "system",
    "system_prompt",
    "reasoning_effort",
];

/// Longest message a user may post, in characters.
pub const CONTENT_MAX: usize = 32 * 1024;

/// A user message.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct NewMessage {
    /// The message text (at most 32768 characters).
    content: String,
    /// `true`: answer with `text/event-stream` (also chosen by `Accept: text/event-stream`).
    #[oai(nullable)]
    stream: Option<bool>,
}

impl<'de> Deserialize<'de> for NewMessage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            content: String,
            #[serde(default)]
            stream: Option<bool>,
        }
        let map = serde_json::Map::<String, Value>::deserialize(d)?;
        if let Some(k) = map.keys().find(|k| FIXED_PARAMS.contains(&k.as_str())) {
            return Err(D::Error::custom(format!(
                "{k}: generation parameters are fixed by the system configuration"
            )));
        }
        let f: Fields = serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." || path.is_empty() {
                D::Error::custom(inner)
            } else {
                D::Error::custom(format!("{path}: {inner}"))
            }
        })?;
        Ok(Self {
            content: f.content,
            stream: f.stream,
        })
    }
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
}

/// Longest `Idempotency-Key` accepted, in characters.
pub const IDEMPOTENCY_KEY_MAX: usize = 255;

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters.
fn idempotency_key(raw: Option<&str>) -> Result<Option<&str>, ApiError> {
    let Some(key) = raw else { return Ok(None) };
    if key.is_empty()
        || key.len() > IDEMPOTENCY_KEY_MAX
        || !key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(ApiError::invalid(format!(
            "Idempotency-Key: 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters"
        )));
    }
    Ok(Some(key))
}

/// What an idempotency key stands for: the conversation and the content it was sent with.
fn request_hash(conversation_id: Uuid, content: &str) -> Vec<u8> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(conversation_id.as_bytes());
    h.update(content.as_bytes());
    h.finalize().to_vec()
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
        let response = match self.start(&turn).await? {
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
        if let Err(e) = state.bus.enqueue_envelope(&envelope).await {
            tracing::error!(error = %e, %response_id, "cannot enqueue the chat job; the reconciler will");
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
    TurnResponse::Accepted(Json(TurnAccepted {
        response_id,
        message_id,
    }))
}

fn redis_unavailable(e: jobs::events::EventsError) -> ApiError {
    tracing::error!(error = %e, "redis unavailable for response events");
    ApiError::Unavailable("response events are temporarily unavailable".into())
}

impl ChatApi {
    /// Start the turn. When the database drops the statement and it cannot be told whether it
    /// committed, the turn is read back by its ids (chosen here, before the write), for about
    /// two seconds (a statement cut off may still be finishing): found, it goes on; not found
    /// (or the database still unreachable), 503 — and a retry with the same `Idempotency-Key`
    /// is safe either way. A statement that never left (no pooled connection) is a plain 503.
    async fn start(&self, turn: &NewTurn<'_>) -> Result<TurnStarted, ApiError> {
        let state = &self.state;
        let written = async {
            let mut conn = state.db.acquire().await?;
            store::conversations::start_own_turn(&mut conn, turn).await
        };
        let e = match written.await {
            Ok(Some(started)) => return Ok(started),
            Ok(None) => return Err(ApiError::NotFound),
            Err(store::StoreError::Database(sqlx::Error::PoolTimedOut)) => {
                return Err(ApiError::Unavailable(
                    "the database is busy; please try again".into(),
                ));
            }
            Err(e) if e.is_unavailable() => e,
            Err(e) => return Err(e.into()),
        };
        tracing::warn!(error = ?e, response_id = %turn.response_id, "the turn's write may or may not have committed; reading it back");
        for wait_ms in [0u64, 250, 500, 1000] {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            let read = tokio::time::timeout(Duration::from_millis(500), async {
                let mut conn = state.db.acquire().await?;
                store::conversations::get_response_own(
                    &mut conn,
                    turn.user_id,
                    turn.conversation_id,
                    turn.response_id,
                )
                .await
            });
            if let Ok(Ok(Some(response))) = read.await {
                tracing::info!(response_id = %response.id, "the turn had committed");
                return Ok(TurnStarted::Existing(response));
            }
        }
        Err(ApiError::Unavailable(
            "the database is unavailable; please try again (with the same Idempotency-Key)".into(),
        ))
    }

    /// The answer to a turn that was started before: by an earlier request with the same
    /// `Idempotency-Key` (or this one, when its write's outcome had to be read back). SSE: the
    /// response's events from the start, with their original ids; JSON: its answer, or 202
    /// with its ids while it runs.
    async fn started_before(
        &self,
        found: TurnStarted,
        permit: Option<sse::StreamPermit>,
    ) -> Result<TurnResponse, ApiError> {
        let response = match found {
            TurnStarted::Existing(r) | TurnStarted::New(r) => r,
            TurnStarted::KeyConflict => {
                return Err(ApiError::Conflict(
                    "Idempotency-Key: already used for another request".into(),
                ));
            }
        };
        tracing::info!(response_id = %response.id, "a retried turn: answering with the turn it started");
        if let Some(permit) = permit {
            return Ok(TurnResponse::Ok(TurnContent::Events(
                self.stream_of(permit, &response, None).await?,
            )));
        }
        if response.status.is_finished() {
            let outcome = self.outcome_of(&response).await?;
            return Ok(self
                .answer_body(response.id, outcome)
                .await?
                .unwrap_or_else(|| accepted(response.id, response.user_message_id)));
        }
        let events = self.state.hub.events(response.id, None);
        self.await_answer(response.id, response.user_message_id, events)
            .await
    }

    /// JSON mode: wait for the terminal event up to `JSON_WAIT_SECS`, then answer with it (or
    /// 202 with the turn's ids).
    async fn await_answer(
        &self,
        response_id: Uuid,
        message_id: Uuid,
        events: impl Stream<Item = Result<StoredEvent, EventsError>> + Send + 'static,
    ) -> Result<TurnResponse, ApiError> {
        let state = &self.state;
        let wait = Duration::from_secs(state.settings.api.json_wait_secs);
        let shutdown = state.shutdown.clone();
        let terminal = async move {
            let mut events = std::pin::pin!(events);
            while let Some(item) = events.next().await {
                match item {
                    Ok(ev) if ev.event.is_terminal() => return Some(ev.event),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "response events unavailable during a JSON wait");
                        return None;
                    }
                }
            }
            None
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout(wait, terminal) => r.ok().flatten(),
            () = shutdown.cancelled() => None,
        };
        let Some(outcome) = outcome else {
            return Ok(accepted(response_id, message_id));
        };
        // The turn is finished: whatever fails now (the database unreachable), the client is
        // told the turn's ids (202), never an error it would retry into a second turn.
        match self.answer_body(response_id, outcome).await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Ok(accepted(response_id, message_id)),
            Err(e) => {
                tracing::warn!(error = %e, %response_id, "cannot read the stored answer back; answering 202");
                Ok(accepted(response_id, message_id))
            }
        }
    }

    /// The JSON answer for a response's terminal event (`None`: the answer is not readable
    /// yet).
    async fn answer_body(
        &self,
        response_id: Uuid,
        outcome: ResponseEvent,
    ) -> Result<Option<TurnResponse>, ApiError> {
        match outcome {
            ResponseEvent::MessageCompleted { .. } => {
                let mut conn = self.state.db.acquire().await?;
                let Some(m) = store::conversations::answer_of(&mut conn, response_id).await? else {
                    return Ok(None);
                };
                let actions =
                    store::actions::list_for_response(&mut conn, response_id.into()).await?;
                Ok(Some(TurnResponse::Ok(TurnContent::Answer(Json(
                    TurnAnswer {
                        message: m.into(),
                        actions: actions.into_iter().map(Into::into).collect(),
                    },
                )))))
            }
            ResponseEvent::Error { code, message } => {
                // The model side failed → 502; our own side (database, Redis) → 503.
                let ours = matches!(code.as_str(), "internal_error" | "unavailable");
                let body = Json(ErrorBody {
                    error: ErrorBodyDetail { code, message },
                });
                Ok(Some(if ours {
                    TurnResponse::Unavailable(body)
                } else {
                    TurnResponse::BadGateway(body)
                }))
            }
            _ => Ok(None),
        }
    }

    /// The terminal event of a finished response, rebuilt from what is stored
    /// (`store::public::Outcome`, the builder the worker uses too); an answer that is gone
    /// reads as expired.
    async fn outcome_of(&self, response: &Response) -> Result<ResponseEvent, ApiError> {
        let mut conn = self.state.db.acquire().await?;
        let outcome = store::public::Outcome::of(&mut conn, response).await?;
        // (callers ask only about finished responses)
        let outcome = outcome.unwrap_or(store::public::Outcome::Failed {
            code: store::public::UNAVAILABLE_CODE,
            message: store::public::UNAVAILABLE_MESSAGE.to_owned(),
        });
        Ok(outcome
            .event(ResponseEvent::completed, |code, message| {
                ResponseEvent::error(code.to_string(), message)
            })
            .unwrap_or_else(expired_error))
    }

    /// The events of `response` after `after`, as an SSE stream: from its replay stream, then
    /// live; a finished response from its replay stream alone (a client resuming after the
    /// last event gets an empty stream that ends); past the retention window, its outcome
    /// rebuilt from PostgreSQL as one event.
    async fn stream_of(
        &self,
        permit: sse::StreamPermit,
        response: &Response,
        after: Option<EventId>,
    ) -> Result<SseStream, ApiError> {
        let state = &self.state;
        let events = state.hub.events(response.id, after);
        let replayable = state
            .hub
            .exists(response.id)
            .await
            .map_err(redis_unavailable)?;
        let finished = response.status.is_finished();
        if replayable && finished {
            // (Finished in PostgreSQL but the terminal event not yet published: follow it
            // live below.)
            let all = state
                .hub
                .replay(response.id, None)
                .await
                .map_err(redis_unavailable)?;
            if all.iter().any(|e| e.event.is_terminal()) {
                drop(events);
                let rest = all
                    .into_iter()
                    .filter(|e| after.is_none_or(|a| e.id > a))
                    .map(|e| SseEvent::new(e.id, &e.event))
                    .collect();
                return Ok(sse::respond(state, permit, rest, futures::stream::empty()));
            }
        }
        if replayable || !finished {
            if finished {
                // Finished in PostgreSQL but its terminal event never went out (the run died
                // between its commit and its publish): send it from what is stored — once per
                // response, whoever gets there first (the worker's redelivery, or this).
                let outcome = self.outcome_of(response).await?;
                if let Err(e) = state.publisher.publish(response.id, &outcome).await {
                    return Err(redis_unavailable(e));
                }
            }
            return Ok(sse::respond(state, permit, Vec::new(), events));
        }
        drop(events);
        // Past the retention window: the outcome, rebuilt from Postgres.
        let at = response.completed_at.unwrap_or(response.created_at);
        let id = EventId {
            ms: u64::try_from(at.timestamp_millis()).unwrap_or(0),
            seq: 0,
        };
        // Only a client that already has this very event gets nothing: any earlier id (even one
        // stamped later by another clock) still needs the outcome.
        if after == Some(id) {
            return Ok(sse::respond(
                state,
                permit,
                Vec::new(),
                futures::stream::empty(),
            ));
        }
        let event = self.outcome_of(response).await?;
        Ok(sse::respond(
            state,
            permit,
            vec![SseEvent::new(id, &event)],
            futures::stream::empty(),
        ))
    }
}

fn expired_error() -> ResponseEvent {
    ResponseEvent::Error {
        code: store::ErrorCode::EventsExpired.to_string(),
        message: "the events of this response are no longer available".into(),
    }
}

#[cfg(test)]
mod tests {
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
