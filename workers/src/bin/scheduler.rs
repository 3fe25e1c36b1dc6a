//! `scheduler` — under a leader lease: enqueues periodic jobs (the batched re-index) and runs
//! the ledger's reconciler (lost work re-enqueued, proposals expired).

use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

// (`docs/bench-bus.md`: the allocator was a quarter of a job's CPU with glibc's malloc)
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let opts = workers::scheduler::SchedulerOptions::from_settings(&rt.settings);
    // Install the signal handlers before announcing readiness.
    let stop_signal = jobs::telemetry::shutdown_signal();
    tracing::info!(
        index_interval_secs = rt.settings.index.interval_secs,
        owner = opts.owner,
        "scheduler ready"
    );
    let shutdown = CancellationToken::new();
    let metrics_stop = CancellationToken::new();
    let metrics_task = match workers::metrics_server::serve(
        &rt.settings.scheduler.metrics_addr,
        rt.bus.clone(),
        metrics_stop.clone(),
    )
    .await
    {
        Ok((_, task)) => task,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), addr = %rt.settings.scheduler.metrics_addr, "cannot bind the metrics listener");
            return ExitCode::FAILURE;
        }
    };
    let done = CancellationToken::new();
    let signal = async {
        tokio::select! {
            () = stop_signal => {
                tracing::info!("scheduler stopping");
                shutdown.cancel();
            }
            () = done.cancelled() => {}
        }
    };
    let reconciler = workers::reconciler::Reconciler::new(
        rt.db.clone(),
        rt.bus.clone(),
        rt.redis.clone(),
        &rt.settings,
        opts.owner.clone(),
    );
    let work = async {
        let r = workers::scheduler::run(&rt.bus, &opts, reconciler, shutdown.clone()).await;
        done.cancel();
        r
    };
    let ((), result) = tokio::join!(signal, work);
    metrics_stop.cancel();
    let _ = metrics_task.await;
    rt.db.close().await;
    match result {
        Ok(()) => {
            tracing::info!("scheduler stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "scheduler failed");
            ExitCode::FAILURE
        }
    }
}
