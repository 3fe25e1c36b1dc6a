//! The scheduler's sweep of proposed actions (docs/ARCHITECTURE.md, "Scope and tools"):
//! pending proposals past `ACTION_EXPIRY_SECS` become `expired`, and confirmed ones whose
//! execution job never ran (lost before it reached the bus) are enqueued again. Both steps are
//! idempotent — a guarded `UPDATE`, and an execution that happens once however often it is
//! enqueued — so every scheduler process may sweep; no lease is needed.

use std::time::Duration;

use jobs::Bus;
use jobs::kinds::ExecuteAction;
use tokio_util::sync::CancellationToken;

/// How often the sweep runs.
pub const SWEEP_EVERY: Duration = Duration::from_secs(15);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: u64,
    pub requeued: usize,
}

/// One sweep.
pub async fn sweep_once(
    db: &sqlx::PgPool,
    bus: &Bus,
    settings: &config::ToolsSettings,
) -> anyhow::Result<SweepReport> {
    let expired = store::actions::expire_due(db).await?;
    let stale =
        store::actions::stale_confirmed(db, Duration::from_secs(settings.stale_confirmed_secs))
            .await?;
    for action_id in &stale {
        bus.enqueue(ExecuteAction {
            action_id: *action_id,
        })
        .await?;
    }
    if expired > 0 || !stale.is_empty() {
        tracing::info!(expired, requeued = stale.len(), "proposed actions swept");
    }
    Ok(SweepReport {
        expired,
        requeued: stale.len(),
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
