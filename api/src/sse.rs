//! Relaying a response's events as Server-Sent Events.
//!
//! Each event goes out with `id:` (its [`EventId`], usable as `Last-Event-ID`), `event:` (its
//! name) and `data:` (its fields as JSON); comment lines keep idle connections alive every
//! `api.sse_keep_alive_secs`. A stream ends after `message.completed` / `error`, when the hub
//! shuts down, and when the server shuts down (`take_until` the shutdown token), so a graceful
//! shutdown never waits on an open stream. A client that goes away only drops its listener:
//! the worker is never told, and the answer is completed and stored regardless.

use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use jobs::events::{EventId, EventsError, ResponseEvent, StoredEvent};
use poem::web::sse::Event;
use poem_openapi::Object;
use poem_openapi::payload::EventStream;

use crate::state::AppState;

pub const OPEN_STREAMS: &str = "sse_open_streams";

/// One SSE event (for the OpenAPI document: `id`, `event` and `data` are the SSE fields).
#[derive(Object, Debug, Clone)]
pub struct SseEvent {
    /// The event id (`<ms>-<seq>`); send it back as `Last-Event-ID` to resume after it.
    pub id: String,
    /// `message.created`, `token`, `action.proposed`, `message.completed`,
    /// `response.restarted` or `error`.
    pub event: String,
    /// The event's fields (API.md, "Conversations").
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

pub type SseStream = EventStream<BoxStream<'static, SseEvent>>;

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

/// The SSE response for a stream of hub events (plus `before`, events to send first).
pub fn respond(
    state: &AppState,
    before: Vec<SseEvent>,
    events: impl Stream<Item = Result<StoredEvent, EventsError>> + Send + 'static,
) -> SseStream {
    let guard = OpenStreamGuard::new();
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
            let _open = &guard;
            ev
        });
    let stream = futures::stream::iter(before)
        .chain(relayed)
        .take_until(state.shutdown.clone().cancelled_owned())
        .boxed();
    EventStream::new(stream)
        .keep_alive(Duration::from_secs(state.settings.api.sse_keep_alive_secs))
        .to_event(|ev| {
            Event::message(ev.data.to_string())
                .id(ev.id)
                .event_type(ev.event)
        })
}
