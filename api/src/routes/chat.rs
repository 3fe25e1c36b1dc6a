//! A chat turn, API side (docs/ARCHITECTURE.md, "The chat turn (API side)"): write the user's
//! message and the response row, publish `message.created`, subscribe to the response's
//! events, enqueue the `chat` job, then relay the events (SSE) or wait for the answer (JSON).
//! The API never calls a model.

use std::time::Duration;

use futures::StreamExt;
use jobs::events::{EventId, ResponseEvent};
use poem::Request;
use poem_openapi::param::{Header, Path};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, ResponseContent};
use serde::Deserialize;
use serde::de::Error as _;
use serde_json::Value;
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

/// Generation parameters are fixed by the system configuration (SPEC §2): a body naming one
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

/// JSON mode: the answer takes longer than `JSON_WAIT_SECS`; follow it on
/// `GET /v1/conversations/{id}/responses/{response_id}/events`.
#[derive(Object)]
pub struct TurnAccepted {
    response_id: Uuid,
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
    /// 202 `{response_id}` when it takes longer than the wait, 502 when the models failed).
    #[oai(path = "/conversations/:id/messages", method = "post")]
    async fn post_message(
        &self,
        req: &Request,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: JsonBody<NewMessage>,
    ) -> Result<TurnResponse, ApiError> {
        let caller = auth.0;
        let body = body.0;
        let content = validate::text("content", &body.content, CONTENT_MAX)?;
        let sse_mode = wants_sse(req, body.stream);
        let state = &self.state;

        // SSE mode: a stream of the caller's, within the per-user cap (429 before anything is
        // written).
        let permit = if sse_mode {
            Some(state.streams.acquire(caller.user_id)?)
        } else {
            None
        };
        // The per-user limit (Redis), then the turn in ONE autocommitted statement that also
        // checks ownership (404: nothing written). Nothing holds a pooled database connection
        // while Redis answers. (A post to a conversation that is not the caller's counts
        // against the caller's own limit; it reveals nothing about the conversation.)
        ratelimit::message_posted(state, caller.user_id).await?;
        let (message, response) = {
            let mut conn = state.db.acquire().await?;
            store::conversations::start_own_turn(&mut conn, caller.user_id, id.0, &content)
                .await?
                .ok_or(ApiError::NotFound)?
        };
        let conversation_id = response.conversation_id;
        let response_id = response.id;

        // `message.created` names the user's message (the assistant's does not exist yet); it
        // is the first event of the replay stream, so resuming clients see it too.
        let created = ResponseEvent::MessageCreated {
            message_id: message.id,
            response_id,
        };
        if let Err(e) = state.publisher.publish(response_id, &created).await {
            tracing::error!(error = %e, %response_id, "cannot publish message.created");
            return Err(abandon(state, response_id).await);
        }
        // Listen before the job exists, so that no event can slip past.
        let events = state.hub.events(response_id, None);
        let job = jobs::kinds::Chat {
            conversation_id,
            message_id: message.id,
            response_id,
            user_id: caller.user_id,
            org_id: caller.org_id,
        };
        let traceparent = req
            .extensions()
            .get::<crate::middleware::TraceContext>()
            .map(|t| t.traceparent.clone());
        let envelope = jobs::Envelope::new(job).with_trace(traceparent);
        if let Err(e) = state.bus.enqueue_envelope(&envelope).await {
            tracing::error!(error = %e, %response_id, "cannot enqueue the chat job");
            let failed = ResponseEvent::Error {
                code: "unavailable".into(),
                message: "the answer could not be started; please try again".into(),
            };
            if let Err(e) = state.publisher.publish(response_id, &failed).await {
                tracing::warn!(error = %e, %response_id, "cannot publish the error event");
            }
            return Err(abandon(state, response_id).await);
        }

        if let Some(permit) = permit {
            return Ok(TurnResponse::Ok(TurnContent::Events(sse::respond(
                state,
                permit,
                Vec::new(),
                events,
            ))));
        }

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
        match outcome {
            Some(ResponseEvent::MessageCompleted { .. }) => {
                let mut conn = state.db.acquire().await?;
                match store::conversations::answer_of(&mut conn, response_id).await? {
                    Some(m) => {
                        let actions =
                            store::actions::list_for_response(&mut conn, response_id).await?;
                        Ok(TurnResponse::Ok(TurnContent::Answer(Json(TurnAnswer {
                            message: m.into(),
                            actions: actions.into_iter().map(Into::into).collect(),
                        }))))
                    }
                    // announced but not readable yet: the client fetches it later
                    None => Ok(TurnResponse::Accepted(Json(TurnAccepted { response_id }))),
                }
            }
            Some(ResponseEvent::Error { code, message }) => {
                // The model side failed → 502; our own side (database, Redis) → 503.
                let ours = matches!(code.as_str(), "internal_error" | "unavailable");
                let body = Json(ErrorBody {
                    error: ErrorBodyDetail { code, message },
                });
                Ok(if ours {
                    TurnResponse::Unavailable(body)
                } else {
                    TurnResponse::BadGateway(body)
                })
            }
            _ => Ok(TurnResponse::Accepted(Json(TurnAccepted { response_id }))),
        }
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
        let mut conn = state.db.acquire().await?;
        let response =
            store::conversations::get_response_own(&mut conn, caller.user_id, id.0, response_id.0)
                .await?
                .ok_or(ApiError::NotFound)?;
        let permit = state.streams.acquire(caller.user_id)?;
        let events = state.hub.events(response.id, after);
        let replayable = state.hub.exists(response.id).await.map_err(|e| {
            tracing::error!(error = %e, "redis unavailable for response events");
            ApiError::Unavailable("response events are temporarily unavailable".into())
        })?;
        let finished = matches!(response.status.as_str(), "completed" | "failed");
        if replayable && finished {
            // A finished response: its recorded events are all there is. Sent from the replay
            // stream alone, so that a client resuming after the last event gets an empty stream
            // that ends, not one that waits forever. (Finished in Postgres but the terminal
            // event not yet published: follow it live below.)
            let all = state.hub.replay(response.id, None).await.map_err(|e| {
                tracing::error!(error = %e, "redis unavailable for response events");
                ApiError::Unavailable("response events are temporarily unavailable".into())
            })?;
            if all.iter().any(|e| e.event.is_terminal()) {
                drop(events);
                let rest = all
                    .into_iter()
                    .filter(|e| after.is_none_or(|a| e.id > a))
                    .map(|e| SseEvent::new(e.id, &e.event))
                    .collect();
                return Ok(EventsResponse::Events(sse::respond(
                    state,
                    permit,
                    rest,
                    futures::stream::empty(),
                )));
            }
        }
        if replayable || !finished {
            return Ok(EventsResponse::Events(sse::respond(
                state,
                permit,
                Vec::new(),
                events,
            )));
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
            return Ok(EventsResponse::Events(sse::respond(
                state,
                permit,
                Vec::new(),
                futures::stream::empty(),
            )));
        }
        let event = if response.status == "completed" {
            match store::conversations::answer_of(&mut conn, response.id).await? {
                Some(m) => {
                    let c = store::public::PublicMessage::from(m).completed();
                    ResponseEvent::MessageCompleted {
                        message: c.message,
                        model: c.model,
                        usage: c.usage,
                    }
                }
                None => expired_error(),
            }
        } else {
            ResponseEvent::Error {
                code: response
                    .error_code
                    .unwrap_or_else(|| "model_unavailable".into()),
                message: response
                    .error_message
                    .unwrap_or_else(|| "the answer failed".into()),
            }
        };
        Ok(EventsResponse::Events(sse::respond(
            state,
            permit,
            vec![SseEvent::new(id, &event)],
            futures::stream::empty(),
        )))
    }
}

fn expired_error() -> ResponseEvent {
    ResponseEvent::Error {
        code: "events_expired".into(),
        message: "the events of this response are no longer available".into(),
    }
}

/// The turn could not be started: fail the response (nothing is left pending) and answer 503.
async fn abandon(state: &AppState, response_id: Uuid) -> ApiError {
    let failed = async {
        let mut conn = state.db.acquire().await?;
        store::conversations::fail(
            &mut conn,
            response_id,
            "unavailable",
            "the answer could not be started",
        )
        .await
    };
    if let Err(e) = failed.await {
        tracing::error!(error = ?e, %response_id, "cannot mark the abandoned response failed");
    }
    ApiError::Unavailable("the assistant is temporarily unavailable; please try again".into())
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
