//! The scheduler's sweep of proposed actions (docs/ARCHITECTURE.md, "Scope and tools"):
//! pending proposals past `ACTION_EXPIRY_SECS` become `expired`; confirmed ones whose
//! execution job never ran (lost before it reached the bus) are enqueued again; and decided
//! ones whose continuation never started get their `chat` job again. The steps are idempotent —
//! a guarded `UPDATE`, an execution that happens once however often it is enqueued, a chat turn
//! that stores one answer per response — so every scheduler process may sweep; no lease is
//! needed. (A continuation still waiting in a long queue after `tools.stale_confirmed_secs`
//! may be enqueued twice: the turn then answers once, possibly after a second model call.)

use std::time::Duration;

use jobs::Bus;
use jobs::kinds::{Chat, ExecuteAction};
use tokio_util::sync::CancellationToken;

/// How often the sweep runs.
pub const SWEEP_EVERY: Duration = Duration::from_secs(15);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: u64,
    pub requeued: usize,
    pub continued: usize,
}

/// One sweep.
pub async fn sweep_once(
    db: &sqlx::PgPool,
    bus: &Bus,
    settings: &config::ToolsSettings,
) -> anyhow::Result<SweepReport> {
    let expired = store::actions::expire_due(db).await?;
    crate::handlers::chat::tools::metrics::action("expired", expired);
    let grace = Duration::from_secs(settings.stale_confirmed_secs);
    let stale = store::actions::stale_confirmed(db, grace).await?;
    for action_id in &stale {
        bus.enqueue(ExecuteAction {
            action_id: *action_id,
        })
        .await?;
    }
    let lost = store::actions::stale_continuations(db, grace).await?;
    for c in &lost {
        bus.enqueue(Chat {
            conversation_id: c.conversation_id,
            message_id: c.message_id,
            response_id: c.response_id,
            user_id: c.user_id,
            org_id: c.org_id,
        })
        .await?;
    }
    if expired > 0 || !stale.is_empty() || !lost.is_empty() {
        tracing::info!(
            expired,
            requeued = stale.len(),
            continued = lost.len(),
            "proposed actions swept"
        );
    }
    Ok(SweepReport {
        expired,
        requeued: stale.len(),
        continued: lost.len(),
    })
}

/// Sweep every [`SWEEP_EVERY`] until `stop`.
pub async fn run(
    db: sqlx::PgPool,
    bus: Bus,
    settings: config::ToolsSettings,
    stop: CancellationToken,
) {
    loop {
        if let Err(e) = sweep_once(&db, &bus, &settings).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "the proposed-actions sweep failed; retrying"
            );
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(SWEEP_EVERY) => {}
        }
    }
}
