//! The reconciler: PostgreSQL is the ledger of in-flight work, and this pass makes sure that
//! every unfinished piece of it has a job on the bus (docs/ARCHITECTURE.md, "The ledger").
//!
//! The scheduler's leader runs [`Reconciler::pass`] every `RECONCILE_INTERVAL_MS`. Each
//! durable piece of work names the job that runs it, and every enqueue leaves a marker for that
//! job in its queue's slot (cleared at ack or dead letter, `jobs::bus`). A pass re-enqueues:
//! - a response `running` under an expired lease (its run died: restarted in seconds, not after
//!   the bus's visibility timeout), or `queued` for longer than `RECONCILE_GRACE_SECS` while
//!   its job has no marker (Redis lost it, or the API died between its commit and its enqueue).
//!   A response waiting in the delayed set (a rate-limit wait) or in a backlog has its marker
//!   and is left alone;
//! - a confirmed action whose `execute_action` job has no marker;
//! - a summary fold whose claim expired while its job is gone;
//! - an index run, when a document waited `queued` past the grace and no index job is on the
//!   bus (at most one such run per [`INDEX_WINDOW_SECS`]).
//!
//! Each re-enqueue is a compare-and-set on the row (the old job id → a new one, derived from the
//! row and its recovery count), then the enqueue: two passes racing re-enqueue once. Only real
//! re-enqueues count towards `MAX_RECOVERIES`, after which the work fails for good with a clear
//! error (the client's `error` event). The pass also expires pending proposals past their
//! expiry and forgets idempotency keys past their retention.

use std::time::Duration;

use jobs::events::{EventPublisher, ResponseEvent};
use jobs::kinds::{Chat, ExecuteAction, Index, IndexReason, Summarize};
use jobs::{Bus, Envelope, Job, Queue};
use uuid::Uuid;

/// Scanned per pass and kind at most (the oldest first; the rest wait for the next pass).
const BATCH: i64 = 1000;
/// At most one reconciler-requested index run per this many seconds.
pub const INDEX_WINDOW_SECS: u64 = 30;
/// The code and text of a response the reconciler gives up on.
const LOST_CODE: store::ErrorCode = store::ErrorCode::InternalError;
const LOST_MESSAGE: &str =
    "The answer could not be completed after repeated interruptions. Please ask again.";
const ACTION_LOST_REASON: &str =
    "the action could not be executed after repeated interruptions; nothing was changed";

/// The namespace of the job ids the reconciler derives (uuid v5).
const NAMESPACE: Uuid = Uuid::from_u128(0x5b1c_6f7e_0d2a_4c1b_9a57_3e0f_8d21_c4a9);

/// The id of the `n`-th recovery job of `what` (a response, an action, a summary claim).
pub fn recovery_job_id(kind: &str, what: Uuid, n: i64) -> Uuid {
    Uuid::new_v5(&NAMESPACE, format!("{kind}:{what}:{n}").as_bytes())
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Responses re-enqueued (expired leases, lost jobs).
    pub responses: u64,
    /// Responses failed after `MAX_RECOVERIES`.
    pub responses_failed: u64,
    /// Confirmed actions re-enqueued / failed.
    pub actions: u64,
    pub actions_failed: u64,
    /// Summary folds re-enqueued / dropped.
    pub folds: u64,
    pub folds_dropped: u64,
    /// An index run was requested for queued documents.
    pub index_runs: u64,
    /// Pending proposals expired.
    pub expired: u64,
}

impl Report {
    fn is_empty(&self) -> bool {
        *self == Report::default()
    }
}

pub struct Reconciler {
    db: sqlx::PgPool,
    bus: Bus,
    events: EventPublisher,
    ledger: config::LedgerSettings,
    owner: String,
    /// Where the last pass stopped in the queued responses (`None`: from the start).
    cursor: std::sync::Mutex<Option<(chrono::DateTime<chrono::Utc>, store::ResponseId)>>,
}

impl Reconciler {
    pub fn new(
        db: sqlx::PgPool,
        bus: Bus,
        redis: std::sync::Arc<jobs::RedisHandle>,
        settings: &config::Settings,
        owner: String,
    ) -> Self {
        Self {
            events: EventPublisher::new(redis, &settings.events),
            db,
            bus,
            ledger: settings.ledger.clone(),
            owner,
            cursor: std::sync::Mutex::new(None),
        }
    }

    fn grace(&self) -> Duration {
        Duration::from_secs(self.ledger.grace_secs)
    }

    fn max_recoveries(&self) -> i32 {
        i32::try_from(self.ledger.max_recoveries).unwrap_or(i32::MAX)
    }

    /// One pass over every kind of durable work. A kind whose step fails (PostgreSQL or Redis
    /// unreachable) is logged and tried again at the next pass; the others still run.
    pub async fn pass(&self) -> Report {
        let mut r = Report::default();
        let steps: [(&str, anyhow::Result<()>); 5] = [
            ("responses", self.responses(&mut r).await),
            ("actions", self.actions(&mut r).await),
            ("summaries", self.folds(&mut r).await),
            ("documents", self.documents(&mut r).await),
            ("housekeeping", self.housekeeping(&mut r).await),
        ];
        for (what, result) in steps {
            if let Err(e) = result {
                tracing::warn!(
                    what,
                    error = format!("{e:#}"),
                    "reconciler step failed; next pass tries again"
                );
            }
        }
        if !r.is_empty() {
            tracing::info!(report = ?r, "reconciled");
            metrics::counter!("reconciler_requeued_total", "kind" => "response")
                .increment(r.responses);
            metrics::counter!("reconciler_requeued_total", "kind" => "action").increment(r.actions);
            metrics::counter!("reconciler_requeued_total", "kind" => "summary").increment(r.folds);
            metrics::counter!("reconciler_gave_up_total", "kind" => "response")
                .increment(r.responses_failed);
            metrics::counter!("reconciler_gave_up_total", "kind" => "action")
                .increment(r.actions_failed);
        }
        r
    }

    /// Responses whose run died (expired lease) or whose job is gone. The queued ones are paged
    /// across passes (a cursor over `(enqueued_at, id)`), so a long healthy backlog — turns
    /// waiting out a rate limit with their jobs on the bus — never hides a lost one.
    async fn responses(&self, r: &mut Report) -> anyhow::Result<()> {
        // a `running` response whose lease expired is taken over whatever the bus still holds
        // (the dead worker's entry is stale once the response names another job)
        let mut lost = store::responses::expired(&self.db, BATCH).await?;
        let after = *self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let queued = store::responses::queued(&self.db, self.grace(), after, BATCH).await?;
        let next = if queued.len() < usize::try_from(BATCH).unwrap_or(usize::MAX) {
            None
        } else {
            queued.last().and_then(|u| Some((u.enqueued_at?, u.id)))
        };
        *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = next;
        // a `queued` one is lost only when its job's marker is gone
        let ids: Vec<Uuid> = queued
            .iter()
            .filter_map(|u| u.job_id.map(store::JobId::into_uuid))
            .collect();
        let on_bus = self.bus.markers(Queue::Chat, &ids).await?;
        lost.extend(
            queued
                .into_iter()
                .zip(on_bus)
                .filter(|(_, present)| !present)
                .map(|(u, _)| u),
        );
        for u in &lost {
            let Some(old) = u.job_id else { continue };
            if u.recoveries >= self.max_recoveries() {
                if store::responses::give_up(&self.db, u.id, old, LOST_CODE, LOST_MESSAGE).await? {
                    tracing::error!(response_id = %u.id, "a response lost its job too often; failed");
                    self.tell_failed(u.id.into()).await?;
                    r.responses_failed += 1;
                }
                continue;
            }
            let new = recovery_job_id("chat", u.id.into(), i64::from(u.recoveries) + 1);
            if !store::responses::recover(&self.db, u.id, old, new.into()).await? {
                continue;
            }
            let mut env = Envelope::new(Chat {
                conversation_id: u.conversation_id,
                message_id: u.user_message_id,
                response_id: u.id,
                user_id: u.user_id,
                org_id: u.org_id,
            });
            env.id = new;
            self.bus.enqueue_once(&env).await?;
            tracing::info!(
                response_id = %u.id,
                job_id = %new,
                expired_lease = u.expired,
                recoveries = u.recoveries + 1,
                "re-enqueued a response whose job was lost"
            );
            r.responses += 1;
        }
        Ok(())
    }

    /// The `error` event of a response the reconciler failed.
    async fn tell_failed(&self, response_id: Uuid) -> anyhow::Result<()> {
        self.events
            .publish(
                response_id,
                &ResponseEvent::Error {
                    code: LOST_CODE.to_string(),
                    message: LOST_MESSAGE.into(),
                },
            )
            .await?;
        Ok(())
    }

    /// Confirmed actions whose execution job is gone.
    async fn actions(&self, r: &mut Report) -> anyhow::Result<()> {
        let rows = store::actions::confirmed_waiting(&self.db, self.grace(), BATCH).await?;
        let ids: Vec<Uuid> = rows
            .iter()
            .filter_map(|a| a.job_id.map(store::JobId::into_uuid))
            .collect();
        let mut on_bus = self.bus.markers(Queue::Actions, &ids).await?.into_iter();
        for a in rows {
            // (a proposal confirmed before the ledger names no job: it is lost)
            if a.job_id.is_some() && on_bus.next().unwrap_or(true) {
                continue;
            }
            if a.recoveries >= self.max_recoveries() {
                if self.give_up_action(a.id.into()).await? {
                    r.actions_failed += 1;
                }
                continue;
            }
            let new = recovery_job_id("execute_action", a.id.into(), i64::from(a.recoveries) + 1);
            if !store::actions::recover(&self.db, a.id, a.job_id, new.into()).await? {
                continue;
            }
            let mut env = Envelope::new(ExecuteAction { action_id: a.id });
            env.id = new;
            self.bus.enqueue_once(&env).await?;
            tracing::info!(action_id = %a.id, job_id = %new, "re-enqueued a confirmed action whose job was lost");
            r.actions += 1;
        }
        Ok(())
    }

    /// Fail a confirmed action that kept losing its execution job, as an execution refused
    /// for a reason would: `failed`, the decided call answered with that, and the
    /// continuation handed to its `chat` job, so the assistant tells the user nothing changed.
    async fn give_up_action(&self, action_id: Uuid) -> anyhow::Result<bool> {
        let mut tx = self.db.begin().await?;
        let Some(action) = store::actions::lock(&mut tx, action_id.into()).await? else {
            return Ok(false);
        };
        if !store::actions::mark_failed(&mut tx, action_id.into(), ACTION_LOST_REASON).await? {
            return Ok(false);
        }
        let result = crate::tools::execute::refused_result(action_id, ACTION_LOST_REASON);
        let continuation =
            crate::tools::execute::answer_decision(&mut tx, &action, &result).await?;
        tx.commit().await?;
        tracing::error!(%action_id, "a confirmed action lost its execution job too often; failed");
        if let Some(env) = continuation {
            // (lost again, the reconciler enqueues it: the response names its job)
            self.bus.enqueue_once(&env).await?;
        }
        Ok(true)
    }

    /// Summary folds whose run died holding the claim, and whose job is gone.
    async fn folds(&self, r: &mut Report) -> anyhow::Result<()> {
        let rows = store::memory::expired_folds(&self.db, BATCH).await?;
        let ids: Vec<Uuid> = rows.iter().map(|f| f.folding_job).collect();
        let on_bus = self.bus.markers(Queue::Memory, &ids).await?;
        for (f, present) in rows.into_iter().zip(on_bus) {
            if present {
                continue;
            }
            if f.fold_recoveries >= self.max_recoveries() {
                // drop the claim: the next turn's backlog count enqueues a fold again
                if store::memory::recover_fold(&self.db, f.conversation_id, f.folding_job, None)
                    .await?
                {
                    r.folds_dropped += 1;
                }
                continue;
            }
            // (derived from the job it replaces: the count restarts at each saved fold)
            let new = recovery_job_id("summarize", f.folding_job, 1);
            if !store::memory::recover_fold(&self.db, f.conversation_id, f.folding_job, Some(new))
                .await?
            {
                continue;
            }
            let mut env = Envelope::new(Summarize {
                conversation_id: f.conversation_id.into(),
            });
            env.id = new;
            self.bus.enqueue_once(&env).await?;
            r.folds += 1;
        }
        Ok(())
    }

    /// Documents waiting in `queued` with no index job on the bus (the upload's request for a
    /// run was lost): ask for one.
    async fn documents(&self, r: &mut Report) -> anyhow::Result<()> {
        if self.bus.jobs_on_bus(Queue::Index).await? > 0
            || !store::documents::any_queued_since(&self.db, self.grace()).await?
        {
            return Ok(());
        }
        let window = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0) / INDEX_WINDOW_SECS;
        let job: Job = Index {
            reason: IndexReason::Requested,
        }
        .into();
        let fired = self
            .bus
            .enqueue_tick(
                "index-reconcile",
                window,
                &self.owner,
                Duration::from_secs(INDEX_WINDOW_SECS * 4),
                job,
            )
            .await?;
        if fired.is_some() {
            tracing::info!(
                "documents wait in queued with no index job on the bus; index run requested"
            );
            r.index_runs += 1;
        }
        Ok(())
    }

    /// Pending proposals past their expiry; idempotency keys past their retention.
    async fn housekeeping(&self, r: &mut Report) -> anyhow::Result<()> {
        r.expired = store::actions::expire_due(&self.db).await?;
        crate::tools::metrics::action("expired", r.expired);
        let retention = Duration::from_secs(self.ledger.idempotency_retention_secs);
        store::conversations::purge_turn_keys(&self.db, retention).await?;
        Ok(())
    }
}
