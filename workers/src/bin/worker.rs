//! `worker` — consumes jobs from the Redis Streams bus.

use std::process::ExitCode;
use std::time::Duration;

#[tokio::main]
async fn main() -> ExitCode {
    let settings = match workers::load_settings("worker") {
        Ok(s) => s,
        Err(code) => return code,
    };
    let rt = match workers::Runtime::connect(settings, Duration::from_secs(30)).await {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "worker cannot start");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        concurrency = rt.settings.worker.concurrency,
        prefix = rt.redis.prefix(),
        "worker ready"
    );
    jobs::telemetry::shutdown_signal().await;
    tracing::info!("worker stopping");
    rt.db.close().await;
    tracing::info!("worker stopped");
    ExitCode::SUCCESS
}
