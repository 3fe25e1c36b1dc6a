//! Relaying a response's events as Server-Sent Events.
//!
//! Each event goes out with `id:` (its [`EventId`], usable as `Last-Event-ID`), `event:` (its
//! name) and `data:` (its fields as JSON); comment lines keep idle connections alive every
//! `api.sse_keep_alive_secs`. A stream ends after `message.completed` / `error`, when the hub
//! shuts down, and when the server shuts down (`take_until` the shutdown token), so a graceful
//! shutdown never waits on an open stream. A client that goes away only drops its listener:
//! the worker is never told, and the answer is completed and stored regardless.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::task::Poll;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use jobs::events::{EventId, EventsError, ResponseEvent, StoredEvent};
use poem::web::sse::Event;
use poem::{Body, IntoResponse, Response};
use poem_openapi::ApiResponse;
use poem_openapi::payload::{EventStream, Payload};
use poem_openapi::registry::{MetaResponses, MetaSchemaRef, Registry};

use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

pub const OPEN_STREAMS: &str = "sse_open_streams";

/// One SSE event as written (`id`, `event` and `data` are the SSE fields; documented as
/// `doc::Event`).
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// The event id (`<ms>-<seq>`); send it back as `Last-Event-ID` to resume after it.
    pub id: String,
    /// `message.created`, `token`, `action.proposed`, `message.completed`,
    /// `response.restarted` or `error`.
    pub event: String,
    /// The event's fields (`ResponseEvent`).
    pub data: serde_json::Value,
}

impl SseEvent {
    pub fn new(id: EventId, event: &ResponseEvent) -> Self {
        Self {
            id: id.to_string(),
            event: event.name().to_owned(),
            data: event.data(),
        }
    }
}

/// The `text/event-stream` payload of the chat endpoints: documented like poem-openapi's
/// `EventStream<SseEvent>`, but written straight from our event stream
/// (`Body::from_bytes_stream`, one `Bytes` per event or keep-alive) — poem's SSE response goes
/// through an `AsyncRead` adapter that holds a 4 KiB buffer per open stream.
pub struct SseStream {
    stream: BoxStream<'static, SseEvent>,
    keep_alive: Duration,
}

type Documented = EventStream<BoxStream<'static, doc::Event>>;

/// The events of a response and the schema of each one's `data` (JSON): the OpenAPI document
/// describes a `text/event-stream` answer as one of these events each (`crate::openapi`).
pub const EVENT_SCHEMAS: &[(&str, &str)] = &[
    ("message.created", "SseMessageCreated"),
    ("token", "SseToken"),
    ("action.proposed", "SseActionProposed"),
    ("message.completed", "SseMessageCompleted"),
    ("queued", "SseQueued"),
    ("response.restarted", "SseResponseRestarted"),
    ("error", "SseError"),
];

/// The events of a response as the OpenAPI document describes them: `data` is one of the
/// payloads below, by `event` name (the JSON the worker and the API publish,
/// `jobs::events::ResponseEvent`); `crate::openapi` rewrites `SseEvent` into one schema per
/// event, `data` a JSON string whose content is the payload (`contentSchema`).
mod doc {
    use chrono::{DateTime, Utc};
    use poem_openapi::{Enum, Object, Union};
    use uuid::Uuid;

    use crate::views::{MessageView, UsageView};

    /// One Server-Sent Event: the SSE fields `id`, `event` and `data` (JSON).
    #[derive(Object)]
    #[oai(rename = "SseEvent")]
    pub struct Event {
        /// The event id (`<ms>-<seq>`); send it back as `Last-Event-ID` to resume after it.
        pub id: String,
        pub event: EventName,
        pub data: EventData,
    }

    #[derive(Enum)]
    #[oai(rename = "SseEventName")]
    pub enum EventName {
        #[oai(rename = "message.created")]
        MessageCreated,
        #[oai(rename = "token")]
        Token,
        #[oai(rename = "action.proposed")]
        ActionProposed,
        #[oai(rename = "message.completed")]
        MessageCompleted,
        #[oai(rename = "queued")]
        Queued,
        #[oai(rename = "response.restarted")]
        ResponseRestarted,
        #[oai(rename = "error")]
        Error,
    }

    /// The payload of an event, by its name.
    #[derive(Union)]
    #[oai(rename = "SseEventData")]
    pub enum EventData {
        MessageCreated(MessageCreated),
        Token(Token),
        ActionProposed(ActionProposed),
        MessageCompleted(MessageCompleted),
        Queued(Queued),
        ResponseRestarted(ResponseRestarted),
        Error(ErrorEvent),
    }

    /// `message.created`: the user's message is stored and the response started.
    #[derive(Object)]
    #[oai(rename = "SseMessageCreated")]
    pub struct MessageCreated {
        /// The user's message.
        pub message_id: Uuid,
        pub response_id: Uuid,
    }

    /// `token`: a fragment of the answer, of any length; the concatenation is the answer.
    #[derive(Object)]
    #[oai(rename = "SseToken")]
    pub struct Token {
        pub text: String,
    }

    /// `action.proposed`: a write the assistant proposes (confirm or reject it).
    #[derive(Object)]
    #[oai(rename = "SseActionProposed")]
    pub struct ActionProposed {
        pub action: ProposedAction,
    }

    #[derive(Object)]
    #[oai(rename = "SseProposedAction")]
    pub struct ProposedAction {
        pub id: Uuid,
        /// `create_task` or `update_task`.
        pub tool: String,
        pub arguments: serde_json::Value,
        pub summary: String,
    }

    /// `message.completed`: the stored answer (as in the messages list), the model that
    /// answered and its token usage (null fields when the model reported none).
    #[derive(Object)]
    #[oai(rename = "SseMessageCompleted")]
    pub struct MessageCompleted {
        pub message: MessageView,
        pub model: String,
        #[oai(nullable)]
        pub usage: Option<UsageView>,
    }

    /// `queued`: the turn waits (behind a backlog, or for a rate limit until `retry_at`).
    #[derive(Object)]
    #[oai(rename = "SseQueued")]
    pub struct Queued {
        pub position: i64,
        /// `backlog` or `rate_limited`.
        pub reason: String,
        #[oai(nullable)]
        pub retry_at: Option<DateTime<Utc>>,
    }

    /// `response.restarted`: the worker was lost mid-answer; discard this response's text so
    /// far, the tokens that follow replace it.
    #[derive(Object)]
    #[oai(rename = "SseResponseRestarted")]
    pub struct ResponseRestarted {
        pub reason: String,
    }

    /// `error`: the turn ended without an answer.
    #[derive(Object)]
    #[oai(rename = "SseError")]
    pub struct ErrorEvent {
        pub code: String,
        pub message: String,
    }
}

impl Payload for SseStream {
    const CONTENT_TYPE: &'static str = "text/event-stream";

    fn schema_ref() -> MetaSchemaRef {
        <Documented as Payload>::schema_ref()
    }

    fn register(registry: &mut Registry) {
        <Documented as Payload>::register(registry);
    }
}

impl ApiResponse for SseStream {
    fn meta() -> MetaResponses {
        <Documented as ApiResponse>::meta()
    }

    fn register(registry: &mut Registry) {
        <Documented as ApiResponse>::register(registry);
    }
}

impl IntoResponse for SseStream {
    fn into_response(self) -> Response {
        let mut events = self.stream.map(|ev| {
            Bytes::from(
                Event::message(ev.data.to_string())
                    .id(ev.id)
                    .event_type(ev.event)
                    .to_string(),
            )
        });
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + self.keep_alive,
            self.keep_alive,
        );
        let body = futures::stream::poll_fn(move |cx| {
            if let Poll::Ready(item) = events.poll_next_unpin(cx) {
                return Poll::Ready(item.map(Ok::<_, std::io::Error>));
            }
            tick.poll_tick(cx)
                .map(|_| Some(Ok(Bytes::from_static(b":\n\n"))))
        });
        Response::builder()
            .content_type(Self::CONTENT_TYPE)
            .header("X-Accel-Buffering", "no")
            .header("Cache-Control", "no-cache")
            .body(Body::from_bytes_stream(body))
    }
}

/// Counts an open SSE stream in the `sse_open_streams` gauge for as long as it lives.
pub struct OpenStreamGuard(());

impl OpenStreamGuard {
    pub fn new() -> Self {
        metrics::gauge!(OPEN_STREAMS).increment(1.0);
        Self(())
    }
}

impl Default for OpenStreamGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for OpenStreamGuard {
    fn drop(&mut self) {
        metrics::gauge!(OPEN_STREAMS).decrement(1.0);
    }
}

/// The per-user cap on concurrently open SSE streams in this process
/// (`api.sse_max_streams_per_user`, `SSE_MAX_STREAMS_PER_USER`): POST messages in SSE mode and
/// GET .../events take a [`StreamPermit`] first; past the cap, 429 `too_many_streams` with
/// `Retry-After`. A permit is returned when its stream is dropped: at once when the client
/// closes its connection (the server's pending read sees it), else at the next write (an event
/// or the keep-alive, hence `Retry-After` = the keep-alive interval).
pub struct StreamLimits {
    max: usize,
    retry_after_secs: u64,
    open: Mutex<HashMap<Uuid, usize>>,
}

/// One open stream of one user, counted until dropped.
pub struct StreamPermit {
    limits: Arc<StreamLimits>,
    user_id: Uuid,
}

impl StreamLimits {
    pub fn new(settings: &config::ApiSettings) -> Self {
        Self {
            max: settings.sse_max_streams_per_user,
            retry_after_secs: settings.sse_keep_alive_secs.max(1),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, usize>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count one more open stream of `user_id`, or 429 when they already hold the maximum.
    pub fn acquire(self: &Arc<Self>, user_id: Uuid) -> Result<StreamPermit, ApiError> {
        let mut open = self.lock();
        let n = open.entry(user_id).or_insert(0);
        if *n >= self.max {
            if *n == 0 {
                open.remove(&user_id);
            }
            return Err(ApiError::TooManyStreams {
                limit: self.max,
                retry_after_secs: self.retry_after_secs,
            });
        }
        *n += 1;
        Ok(StreamPermit {
            limits: self.clone(),
            user_id,
        })
    }

    /// Streams `user_id` holds open now.
    pub fn open(&self, user_id: Uuid) -> usize {
        self.lock().get(&user_id).copied().unwrap_or(0)
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.limits.lock();
        if let Some(n) = open.get_mut(&self.user_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.user_id);
            }
        }
    }
}

/// What an open stream holds until it is dropped.
struct Held {
    _open: OpenStreamGuard,
    _permit: StreamPermit,
}

/// The SSE response for a stream of hub events (plus `before`, events to send first), holding
/// the caller's stream `permit` for as long as it is open.
pub fn respond(
    state: &AppState,
    permit: StreamPermit,
    before: Vec<SseEvent>,
    events: impl Stream<Item = Result<StoredEvent, EventsError>> + Send + 'static,
) -> SseStream {
    let held = Held {
        _open: OpenStreamGuard::new(),
        _permit: permit,
    };
    let relayed = events
        .take_while(|item| {
            if let Err(e) = item {
                // The client resumes with its Last-Event-ID; the answer goes on regardless.
                tracing::warn!(error = %e, "response events unavailable; ending the stream");
            }
            futures::future::ready(item.is_ok())
        })
        .filter_map(|item| {
            futures::future::ready(item.ok().map(|ev| SseEvent::new(ev.id, &ev.event)))
        })
        .map(move |ev| {
            let _held = &held;
            ev
        });
    let stream = futures::stream::iter(before)
        .chain(relayed)
        .take_until(state.shutdown.clone().cancelled_owned())
        .boxed();
    SseStream {
        stream,
        keep_alive: Duration::from_secs(state.settings.api.sse_keep_alive_secs),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn streams_are_capped_per_user_and_released_on_drop() {
        let mut api = config::Settings::load_from(None, |_| None).unwrap().api;
        api.sse_max_streams_per_user = 2;
        api.sse_keep_alive_secs = 15;
        let limits = Arc::new(StreamLimits::new(&api));
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let p1 = limits.acquire(a).unwrap();
        let _p2 = limits.acquire(a).unwrap();
        let Err(ApiError::TooManyStreams {
            limit: 2,
            retry_after_secs: 15,
        }) = limits.acquire(a)
        else {
            panic!("a third stream of the same user is refused");
        };
        let _other = limits.acquire(b).unwrap();
        drop(p1);
        assert_eq!(limits.open(a), 1);
        let _p3 = limits.acquire(a).unwrap();
        assert_eq!(limits.open(a), 2);
    }
}
