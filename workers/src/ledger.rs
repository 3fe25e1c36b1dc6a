//! A run's hold on its response (docs/ARCHITECTURE.md, "The ledger: PostgreSQL holds the work
//! in flight"): the run's identity ([`Fence`]), the lease it keeps while it runs, and the writes
//! and publishes only the holder may make ([`Ledger`]; [`Run`] binds the two for the parts of a
//! turn that stream and store: the model caller, the tool rounds).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use jobs::events::{EventPublisher, Published, ResponseEvent};
use jobs::{JobError, RedisHandle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::handlers::{db_error, redis_error};

/// A run's identity for everything it writes or publishes: the response, the run's number,
/// and the token cancelled when the run learns it no longer holds the response (its writes
/// and publishes were refused, or its lease was not renewed): the handler then stops without
/// effect.
#[derive(Clone)]
pub struct Fence {
    pub response_id: Uuid,
    pub run: i32,
    pub lost: CancellationToken,
    /// The run gave the response back (`running → queued`).
    pub released: Arc<AtomicBool>,
    /// `mark_streaming` happened in this run (before its first token).
    streaming: Arc<AtomicBool>,
}

impl Fence {
    pub fn new(response_id: Uuid, run: i32) -> Self {
        Self {
            response_id,
            run,
            lost: CancellationToken::new(),
            released: Arc::default(),
            streaming: Arc::default(),
        }
    }

    /// The error a run returns when it finds itself superseded (the handler turns it into a
    /// quiet stop, `lost` being cancelled).
    pub fn superseded(&self) -> JobError {
        self.lost.cancel();
        JobError::retryable("another run holds the response now")
    }
}

/// The fenced writes and publishes of the runs of responses.
#[derive(Clone)]
pub struct Ledger {
    db: sqlx::PgPool,
    events: EventPublisher,
    /// A run's lease on its response (`LEDGER_LEASE_SECS`), renewed every quarter of it.
    lease: Duration,
}

impl Ledger {
    pub fn new(db: sqlx::PgPool, redis: Arc<RedisHandle>, settings: &config::Settings) -> Self {
        Self {
            db,
            events: EventPublisher::new(redis, &settings.events),
            lease: Duration::from_secs(settings.ledger.lease_secs),
        }
    }

    /// How long a run's lease lasts.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Name `run` in the response's event fence; the run that holds it now (a later one: this
    /// run stops).
    pub async fn fence(&self, response_id: Uuid, run: i32) -> Result<i32, JobError> {
        self.events
            .fence(response_id, run)
            .await
            .map_err(redis_error)
    }

    /// Renew this run's lease every quarter of its length (each try bounded by that, so a
    /// slow pool never costs more than one) until another run takes the response over: then
    /// `fence.lost` is cancelled and this resolves, ending the run. A response this very run
    /// finished or gave back just stops being renewed (this never resolves then: the run ends
    /// by itself). A failed renewal is tried again; the run goes on, its writes being fenced.
    pub async fn keep_lease(&self, fence: &Fence) {
        let every = (self.lease / 4).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                () = fence.lost.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let renewed = tokio::time::timeout(
                every,
                store::responses::renew(
                    &self.db,
                    &[(fence.response_id.into(), fence.run)],
                    self.lease,
                ),
            )
            .await;
            match renewed {
                Ok(Ok(held)) if held.is_empty() => {
                    match store::responses::current_run(&self.db, fence.response_id.into()).await {
                        Ok(Some(r)) if r > fence.run => {
                            tracing::warn!(newer = r, "the run's lease was lost");
                            fence.lost.cancel();
                            return;
                        }
                        // finished or given back by this run: nothing left to renew
                        Ok(_) => return std::future::pending().await,
                        Err(e) => tracing::warn!(error = %e, "cannot read the response's run"),
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot renew the run's lease; trying again")
                }
                Err(_) => tracing::warn!("renewing the run's lease timed out; trying again"),
            }
        }
    }

    /// Give the response back (`running → queued`): the run waits (rate limit) or failed in a
    /// way its job retries. `fallback_only`: only the fallback is left for later runs.
    pub async fn release(&self, fence: &Fence, fallback_only: bool) -> bool {
        let released = async {
            let mut conn = self.db.acquire().await?;
            store::responses::release(
                &mut conn,
                fence.response_id.into(),
                fence.run,
                fallback_only,
            )
            .await
        };
        match released.await {
            Ok(true) => {
                fence.released.store(true, Ordering::Release);
                true
            }
            Ok(false) => {
                fence.lost.cancel();
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot release the response; its lease will expire");
                false
            }
        }
    }

    /// Before the first token of this run goes out: commit that this run starts streaming;
    /// if an earlier run had started (its worker was lost, it may have published tokens),
    /// tell the client to discard its partial text first (`response.restarted`, once per
    /// run). A run that no longer holds the response stops here.
    pub async fn begin_streaming(&self, fence: &Fence) -> Result<(), JobError> {
        if fence.streaming.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut conn = self.db.acquire().await.map_err(db_error)?;
        let before =
            store::responses::mark_streaming(&mut conn, fence.response_id.into(), fence.run)
                .await
                .map_err(db_error)?;
        drop(conn);
        let Some(before) = before else {
            return Err(fence.superseded());
        };
        fence.streaming.store(true, Ordering::Release);
        if before > 0 {
            tracing::info!(
                starts = before,
                "restarting a response whose worker was lost"
            );
            self.emit(
                fence,
                &ResponseEvent::ResponseRestarted {
                    reason: "worker_lost".into(),
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Publish an event of this run: refused (the run stops) unless the response's fence names
    /// this run. A fence Redis lost (a restart without persistence: the events this run
    /// published may be gone with it) also stops the run, after it gave the response back: the
    /// reconciler hands it to a new run, which tells the clients to restart.
    pub async fn emit(&self, fence: &Fence, event: &ResponseEvent) -> Result<(), JobError> {
        match self
            .events
            .publish_as(fence.response_id, fence.run, event)
            .await
            .map_err(redis_error)?
        {
            Published::Sent(_) | Published::AlreadyFinished(_) => Ok(()),
            Published::Fenced => Err(fence.superseded()),
            Published::NoFence => {
                tracing::warn!(
                    "the response's fence is gone from Redis (its events may be too); giving the response back"
                );
                self.release(fence, false).await;
                Err(fence.superseded())
            }
        }
    }

    /// Within the caller's transaction: whether this run still holds the response (its writes
    /// wait for any run taking it over); a run that does not learns it lost the response.
    pub async fn hold(&self, conn: &mut sqlx::PgConnection, fence: &Fence) -> Result<(), JobError> {
        if store::responses::hold(conn, fence.response_id.into(), fence.run)
            .await
            .map_err(db_error)?
        {
            Ok(())
        } else {
            fence.lost.cancel();
            Err(JobError::retryable("another run holds the response now"))
        }
    }

    /// Publish a terminal event outside the run's fence (the stored outcome speaks, whichever
    /// run stored it); the events publisher sends one terminal event per response.
    pub async fn publish_once(
        &self,
        response_id: Uuid,
        event: &ResponseEvent,
    ) -> Result<(), JobError> {
        match self.events.publish(response_id, event).await {
            Ok(Published::AlreadyFinished(_)) => {
                tracing::debug!("the terminal event went out before");
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(redis_error(e)),
        }
    }

    /// Tell the response's listeners something that ends nothing (`queued`): best effort, a
    /// failure is logged; refused once the terminal event went out.
    pub async fn tell(&self, response_id: Uuid, event: &ResponseEvent) {
        if let Err(e) = self.events.publish(response_id, event).await {
            tracing::warn!(error = %e, event = event.name(), "cannot tell the response's listeners");
        }
    }
}

/// One run of a turn as the parts that stream and store see it: its fence, the ledger that
/// checks it, and the time by which all its model calls end (`litellm.request_timeout_secs`
/// from the run's start). Cheap to clone.
#[derive(Clone)]
pub struct Run {
    pub ledger: Ledger,
    pub fence: Fence,
    pub deadline: tokio::time::Instant,
}

impl Run {
    pub async fn begin_streaming(&self) -> Result<(), JobError> {
        self.ledger.begin_streaming(&self.fence).await
    }

    pub async fn emit(&self, event: &ResponseEvent) -> Result<(), JobError> {
        self.ledger.emit(&self.fence, event).await
    }

    /// Publish text the turn writes itself (not the model) as one `token`, so that clients
    /// that render tokens show it too.
    pub async fn stream_text(&self, text: &str) -> Result<(), JobError> {
        self.begin_streaming().await?;
        self.emit(&ResponseEvent::Token {
            text: text.to_owned(),
        })
        .await
    }
}
