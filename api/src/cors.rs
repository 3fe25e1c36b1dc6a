//! Cross-origin requests from browser pages on other origins (`CORS_ALLOWED_ORIGINS`).
//!
//! Empty list (the default): same origin only — no CORS header is ever sent, and a browser
//! refuses cross-origin reads. Otherwise, for a request whose `Origin` is on the list:
//! - a preflight (`OPTIONS` with `Access-Control-Request-Method`) is answered here, on every
//!   path, 204 with the allowed methods and the request headers clients need
//!   ([`ALLOW_HEADERS`]);
//! - every other answer (successes, every error from 401 to 503, SSE streams) carries
//!   `Access-Control-Allow-Origin` and exposes [`EXPOSE_HEADERS`] (`Retry-After` of a 429).
//!
//! An origin not on the list gets nothing: its preflight goes on to the router like any
//! `OPTIONS` (405, no CORS header), so the browser does not send the request. Credentials
//! (cookies) are never allowed: the API authenticates with a bearer token in `Authorization`.
//! This layer sits outside the error normaliser, so error answers are covered too.

use std::sync::Arc;

use poem::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use poem::{Endpoint, IntoResponse, Middleware, Request, Response, Result};

/// Request headers a cross-origin client may send.
pub const ALLOW_HEADERS: &str =
    "authorization, content-type, last-event-id, idempotency-key, x-request-id, traceparent";
/// Response headers a cross-origin client may read.
pub const EXPOSE_HEADERS: &str = "retry-after, x-request-id, www-authenticate";
const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE";
/// How long a browser may cache a preflight answer.
const MAX_AGE_SECS: &str = "600";

/// The CORS layer; `origins` as [`config::parse_origins`] returns them.
#[derive(Clone)]
pub struct Cors {
    origins: Arc<Vec<String>>,
}

impl Cors {
    pub fn new(origins: Vec<String>) -> Self {
        Self {
            origins: Arc::new(origins),
        }
    }
}

impl<E: Endpoint> Middleware<E> for Cors {
    type Output = CorsEndpoint<E>;

    fn transform(&self, ep: E) -> Self::Output {
        CorsEndpoint {
            inner: ep,
            origins: self.origins.clone(),
        }
    }
}

pub struct CorsEndpoint<E> {
    inner: E,
    origins: Arc<Vec<String>>,
}

impl<E: Endpoint> CorsEndpoint<E> {
    /// The request's `Origin` when it is on the list.
    fn allowed(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        let text = origin.to_str().ok()?;
        self.origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(text))
            .then(|| origin.clone())
    }
}

impl<E: Endpoint> Endpoint for CorsEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Self::Output> {
        if self.origins.is_empty() {
            return self.inner.call(req).await.map(IntoResponse::into_response);
        }
        let origin = self.allowed(req.headers());
        let preflight = req.method() == Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if let (Some(origin), true) = (&origin, preflight) {
            let mut resp = Response::builder()
                .status(StatusCode::NO_CONTENT)
                .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone())
                .header(header::ACCESS_CONTROL_ALLOW_METHODS, ALLOW_METHODS)
                .header(header::ACCESS_CONTROL_ALLOW_HEADERS, ALLOW_HEADERS)
                .header(header::ACCESS_CONTROL_MAX_AGE, MAX_AGE_SECS)
                .finish();
            vary_origin(resp.headers_mut());
            return Ok(resp);
        }
        let mut resp = match self.inner.call(req).await {
            Ok(r) => r.into_response(),
            Err(e) => crate::error::normalize_error(e).await,
        };
        let headers = resp.headers_mut();
        // the answer depends on the Origin whenever a list is configured (shared caches)
        vary_origin(headers);
        if let Some(origin) = origin {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            headers.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(EXPOSE_HEADERS),
            );
        }
        Ok(resp)
    }
}

fn vary_origin(headers: &mut HeaderMap) {
    headers.append(header::VARY, HeaderValue::from_static("origin"));
}
