//! Request body size limits on every route (413 too large; docs/architecture/api.md).
//!
//! A declared `Content-Length` over the limit is refused before anything is read; a body
//! without one (chunked) is read up to the limit and refused as soon as it passes it.

use poem::http::header;
use poem::{Endpoint, Middleware, Request, Result};

use crate::error::ApiError;

/// Limits request bodies; `upload_limit` applies to paths accepted by `is_upload`.
#[derive(Clone, Copy)]
pub struct BodyLimit {
    pub default_limit: usize,
    pub upload_limit: usize,
    pub is_upload: fn(&str) -> bool,
}

impl<E: Endpoint> Middleware<E> for BodyLimit {
    type Output = BodyLimitEndpoint<E>;

    fn transform(&self, ep: E) -> Self::Output {
        BodyLimitEndpoint {
            inner: ep,
            cfg: *self,
        }
    }
}

pub struct BodyLimitEndpoint<E> {
    inner: E,
    cfg: BodyLimit,
}

impl<E: Endpoint> Endpoint for BodyLimitEndpoint<E> {
    type Output = E::Output;

    async fn call(&self, mut req: Request) -> Result<Self::Output> {
        let limit = if (self.cfg.is_upload)(req.uri().path()) {
            self.cfg.upload_limit
        } else {
            self.cfg.default_limit
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match declared {
            Some(len) if len > limit as u64 => {
                return Err(ApiError::PayloadTooLarge { limit }.into());
            }
            Some(_) => {}
            None if req.headers().contains_key(header::TRANSFER_ENCODING) => {
                let body = req.take_body();
                let bytes = body
                    .into_bytes_limit(limit)
                    .await
                    .map_err(|_| ApiError::PayloadTooLarge { limit })?;
                req.set_body(bytes);
            }
            None => {}
        }
        self.inner.call(req).await
    }
}

/// The request id of the current request (from a valid `x-request-id`, or generated).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The W3C trace context of the current request: the caller's `traceparent` when valid, else a
/// new one whose trace id is the request id (when that is 32 hex digits, as generated ones are).
/// Jobs enqueued for the request carry it, so the worker's log lines share the trace id.
#[derive(Debug, Clone)]
pub struct TraceContext {
    pub trace_id: String,
    pub traceparent: String,
}

impl TraceContext {
    fn for_request(header: Option<&str>, request_id: &str) -> Self {
        let span_id = &uuid::Uuid::new_v4().simple().to_string()[..16];
        if let Some(trace_id) = header.and_then(parse_traceparent) {
            return Self {
                traceparent: format!("00-{trace_id}-{span_id}-01"),
                trace_id,
            };
        }
        let trace_id =
            if request_id.len() == 32 && request_id.bytes().all(|b| b.is_ascii_hexdigit()) {
                request_id.to_ascii_lowercase()
            } else {
                uuid::Uuid::new_v4().simple().to_string()
            };
        Self {
            traceparent: format!("00-{trace_id}-{span_id}-01"),
            trace_id,
        }
    }
}

/// The trace id of a valid W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero).
fn parse_traceparent(v: &str) -> Option<String> {
    let parts: Vec<&str> = v.trim().split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if parts.len() != 4
        || !hex(parts[0], 2)
        || parts[0] == "ff"
        || !hex(parts[1], 32)
        || !hex(parts[2], 16)
        || !hex(parts[3], 2)
    {
        return None;
    }
    if parts[1].bytes().all(|b| b == b'0') || parts[2].bytes().all(|b| b == b'0') {
        return None;
    }
    Some(parts[1].to_ascii_lowercase())
}

/// Route templates of the API (from the OpenAPI document) for bounded metric labels.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    templates: Vec<Vec<String>>,
}

impl RouteTable {
    pub fn new<'a>(templates: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            templates: templates
                .into_iter()
                .map(|t| t.trim_matches('/').split('/').map(str::to_owned).collect())
                .collect(),
        }
    }

    /// The template a path matches (`/v1/projects/{id}`), or `unmatched`.
    pub fn label(&self, path: &str) -> String {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        self.templates
            .iter()
            .find(|t| {
                t.len() == segments.len()
                    && t.iter()
                        .zip(&segments)
                        .all(|(a, b)| a == b || (a.starts_with('{') && a.ends_with('}')))
            })
            .map(|t| format!("/{}", t.join("/")))
            .unwrap_or_else(|| "unmatched".to_owned())
    }
}

/// Outermost layer: request id (echoed in `x-request-id`), a tracing span carrying it for every
/// log line of the request, an access log line, and HTTP metrics by route template and status.
pub struct RequestContext {
    pub routes: std::sync::Arc<RouteTable>,
}

impl<E: Endpoint> Middleware<E> for RequestContext {
    type Output = RequestContextEndpoint<E>;

    fn transform(&self, ep: E) -> Self::Output {
        RequestContextEndpoint {
            inner: ep,
            routes: self.routes.clone(),
        }
    }
}

pub struct RequestContextEndpoint<E> {
    inner: E,
    routes: std::sync::Arc<RouteTable>,
}

fn valid_request_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl<E: Endpoint> Endpoint for RequestContextEndpoint<E> {
    type Output = poem::Response;

    async fn call(&self, mut req: Request) -> Result<Self::Output> {
        use poem::IntoResponse;
        use tracing::Instrument;

        let request_id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| valid_request_id(v))
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
        let trace = TraceContext::for_request(
            req.headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok()),
            &request_id,
        );
        let trace_id = trace.trace_id.clone();
        req.extensions_mut().insert(RequestId(request_id.clone()));
        req.extensions_mut().insert(trace);
        let method = req.method().to_string();
        let route = self.routes.label(req.uri().path());
        let span = tracing::info_span!("request", request_id = %request_id, trace_id = %trace_id, method = %method, route = %route);
        let started = std::time::Instant::now();
        let result = self.inner.call(req).instrument(span.clone()).await;
        let mut resp = match result {
            Ok(r) => r.into_response(),
            Err(e) => {
                crate::error::normalize_error(e)
                    .instrument(span.clone())
                    .await
            }
        };
        let elapsed = started.elapsed();
        let status = resp.status().as_u16();
        if let Ok(v) = header::HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        span.in_scope(|| {
            tracing::info!(
                status,
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                "request finished"
            );
        });
        let labels = [
            ("method", method),
            ("route", route),
            ("status", status.to_string()),
        ];
        metrics::counter!("http_requests_total", &labels).increment(1);
        metrics::histogram!("http_request_duration_seconds", &labels).record(elapsed.as_secs_f64());
        Ok(resp)
    }
}
