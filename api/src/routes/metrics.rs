//! `GET /metrics`: Prometheus text exposition of this process's metrics.

use poem_openapi::payload::PlainText;
use poem_openapi::{OpenApi, Tags};

#[derive(Tags)]
enum Tag {
    /// Operations
    Operations,
}

pub struct MetricsApi {
    pub handle: metrics_exporter_prometheus::PrometheusHandle,
    /// Queue depths are read from Redis when scraped.
    pub bus: jobs::Bus,
}

#[OpenApi(tag = "Tag::Operations")]
impl MetricsApi {
    /// Prometheus metrics (text exposition format 0.0.4).
    #[oai(path = "/metrics", method = "get")]
    async fn metrics(&self) -> PlainText<String> {
        jobs::metrics::refresh_queue_gauges(&self.bus).await;
        PlainText(self.handle.render())
    }
}
