//! The metrics listener of a worker or scheduler process: `GET /metrics` (Prometheus text,
//! queue depths refreshed at scrape time) and `GET /healthz`, on `WORKER_METRICS_ADDR` /
//! `SCHEDULER_METRICS_ADDR` (port 0 picks a free port; the bound address is logged).

use std::net::SocketAddr;

use poem::listener::TcpAcceptor;
use poem::web::Data;
use poem::{EndpointExt, Route, Server, get, handler};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct State {
    handle: metrics_exporter_prometheus::PrometheusHandle,
    bus: jobs::Bus,
}

#[handler]
async fn metrics(state: Data<&State>) -> poem::Response {
    jobs::metrics::refresh_queue_gauges(&state.bus).await;
    poem::Response::builder()
        .content_type("text/plain; version=0.0.4")
        .body(state.handle.render())
}

#[handler]
async fn healthz() -> &'static str {
    "ok"
}

/// Bind `addr` and serve until `shutdown`; returns the bound address and the server task
/// (await it at shutdown).
pub async fn serve(
    addr: &str,
    bus: jobs::Bus,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let acceptor = TcpAcceptor::from_tokio(listener)?;
    jobs::metrics::describe();
    let state = State {
        handle: jobs::telemetry::prometheus(),
        bus,
    };
    let app = Route::new()
        .at("/metrics", get(metrics))
        .at("/healthz", get(healthz))
        .data(state);
    let task = tokio::spawn(async move {
        if let Err(e) = Server::new_with_acceptor(acceptor)
            .run_with_graceful_shutdown(
                app,
                shutdown.cancelled_owned(),
                Some(std::time::Duration::from_secs(2)),
            )
            .await
        {
            tracing::error!(error = %e, "metrics listener failed");
        }
    });
    tracing::info!(addr = %bound, "metrics listening");
    Ok((bound, task))
}
