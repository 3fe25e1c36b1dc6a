//! `scheduler` — enqueues periodic jobs (the batched re-index) under a leader lease.

use std::process::ExitCode;
use std::time::Duration;

#[tokio::main]
async fn main() -> ExitCode {
    let settings = match workers::load_settings("scheduler") {
        Ok(s) => s,
        Err(code) => return code,
    };
    let rt = match workers::Runtime::connect(settings, Duration::from_secs(30)).await {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "scheduler cannot start");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        index_interval_secs = rt.settings.index.interval_secs,
        "scheduler ready"
    );
    jobs::telemetry::shutdown_signal().await;
    tracing::info!("scheduler stopping");
    rt.db.close().await;
    tracing::info!("scheduler stopped");
    ExitCode::SUCCESS
}
