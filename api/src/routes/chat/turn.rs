//! A turn after its request is checked: started in PostgreSQL (an unknown commit read back),
//! a retried turn answered with the turn it started, the JSON wait for the answer, and the
//! SSE stream of a response's events (replayed, live, or rebuilt past the retention window).

use std::time::Duration;

use futures::{Stream, StreamExt};
use jobs::events::{EventId, EventsError, ResponseEvent, StoredEvent};
use poem_openapi::payload::Json;
use store::conversations::{NewTurn, Response, TurnStarted};
use uuid::Uuid;

use super::{
    ChatApi, QueuedView, TurnAnswer, TurnContent, TurnResponse, accepted, accepted_queued,
    redis_unavailable,
};
use crate::error::{ApiError, ErrorBody, ErrorBodyDetail};
use crate::sse::{self, SseEvent, SseStream};

impl ChatApi {
    /// Start the turn, within the org's token budget (`store::budgets::start_turn`: over it,
    /// 429 `budget_exceeded` and nothing written). When the database drops the statement and
    /// it cannot be told whether it committed, the turn is read back by its ids (chosen here,
    /// before the write), for about two seconds (a statement cut off may still be finishing):
    /// found, it goes on; not found (or the database still unreachable), 503 — and a retry with
    /// the same `Idempotency-Key` is safe either way. A statement that never left (no pooled
    /// connection) is a plain 503.
    pub(super) async fn start(
        &self,
        org_id: Uuid,
        turn: &NewTurn<'_>,
    ) -> Result<TurnStarted, ApiError> {
        let state = &self.state;
        let policy = store::budgets::Policy::from_settings(&state.settings.budget);
        let written = async {
            let mut conn = state.db.acquire().await?;
            store::budgets::start_turn(&mut conn, &policy, org_id.into(), turn).await
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

    /// While the turn waits for fair admission (`[queues.chat] fair`), tell its listeners where
    /// it stands: a `queued` event when its position changes, looked at every
    /// [`QUEUE_WATCH_EVERY`] (the first time at once), until it is admitted (or gone), the API
    /// stops, or [`QUEUE_WATCH_MAX`] has passed. Best effort: a Redis failure ends it.
    pub(super) fn watch_queue(&self, response_id: Uuid, envelope: jobs::Envelope) {
        let state = self.state.clone();
        tokio::spawn(async move {
            let until = tokio::time::Instant::now() + QUEUE_WATCH_MAX;
            let mut told = None;
            loop {
                let position = match state.bus.fair_position(&envelope).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(error = %e, %response_id, "cannot read the turn's place in the queue");
                        None
                    }
                };
                let Some(position) = position else { break };
                if told != Some(position) {
                    let event = ResponseEvent::queued_backlog(position);
                    if let Err(e) = state.publisher.publish(response_id, &event).await {
                        tracing::warn!(error = %e, %response_id, "cannot tell the turn's place in the queue");
                        break;
                    }
                    told = Some(position);
                }
                if tokio::time::Instant::now() >= until {
                    break;
                }
                tokio::select! {
                    () = state.shutdown.cancelled() => break,
                    () = tokio::time::sleep(QUEUE_WATCH_EVERY) => {}
                }
            }
        });
    }

    /// The answer to a turn that was started before: by an earlier request with the same
    /// `Idempotency-Key` (or this one, when its write's outcome had to be read back). SSE: the
    /// response's events from the start, with their original ids; JSON: its answer, or 202
    /// with its ids while it runs.
    pub(super) async fn started_before(
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
    pub(super) async fn await_answer(
        &self,
        response_id: Uuid,
        message_id: Uuid,
        events: impl Stream<Item = Result<StoredEvent, EventsError>> + Send + 'static,
    ) -> Result<TurnResponse, ApiError> {
        let state = &self.state;
        let wait = tokio::time::sleep(Duration::from_secs(state.settings.api.json_wait_secs));
        let shutdown = state.shutdown.clone();
        let mut events = std::pin::pin!(events);
        let mut wait = std::pin::pin!(wait);
        // the last `queued` event, while nothing came after it: the 202 says where it waits
        let mut queued = None;
        let outcome = loop {
            tokio::select! {
                item = events.next() => match item {
                    Some(Ok(ev)) if ev.event.is_terminal() => break Some(ev.event),
                    Some(Ok(ev)) => queued = QueuedView::of(&ev.event),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "response events unavailable during a JSON wait");
                        break None;
                    }
                    None => break None,
                },
                () = &mut wait => break None,
                () = shutdown.cancelled() => break None,
            }
        };
        let Some(outcome) = outcome else {
            return Ok(accepted_queued(response_id, message_id, queued));
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
    pub(super) async fn stream_of(
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

/// How often a waiting turn's place in the queue is looked at (`ChatApi::watch_queue`).
const QUEUE_WATCH_EVERY: Duration = Duration::from_secs(2);
/// How long at most a turn's place is followed.
const QUEUE_WATCH_MAX: Duration = Duration::from_secs(3600);

fn expired_error() -> ResponseEvent {
    ResponseEvent::Error {
        code: store::ErrorCode::EventsExpired.to_string(),
        message: "the events of this response are no longer available".into(),
    }
}
