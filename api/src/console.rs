//! `GET /console`: the web console (api/console/), compiled into the binary — plain HTML, CSS
//! and JavaScript, no build step. It is a client of the public API like any other: it signs in
//! through `/v1/auth/*`, keeps the token in the tab's `sessionStorage`, and sends it only in
//! `Authorization` headers (never in a URL).
//!
//! Every answer under `/console` carries a strict Content-Security-Policy ([`CSP`]: scripts and
//! styles from this origin only, nothing inline, no framing, no form posts, API calls to this
//! origin only), plus `nosniff`, `no-referrer` and `DENY` framing. `/docs` (Swagger UI) is not
//! covered: it needs inline script and style.
//!
//! Caching: the page is `no-cache` (revalidated each time); it names its script and stylesheet
//! with a `?v=` digest of their content, so those are cached for a year and a new binary's
//! assets are fetched at once.

use std::sync::LazyLock;

use poem::http::{HeaderValue, StatusCode, header};
use poem::{Endpoint, EndpointExt, Response, Route, get, handler};
use sha2::Digest;

/// The Content-Security-Policy of every `/console` answer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

const INDEX_HTML: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const APP_CSS: &str = include_str!("../console/app.css");

/// The page, its asset references stamped with the assets' digest.
static INDEX: LazyLock<(String, String)> = LazyLock::new(|| {
    let mut h = sha2::Sha256::new();
    h.update(APP_JS.as_bytes());
    h.update(APP_CSS.as_bytes());
    let digest = h.finalize();
    let version: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    (INDEX_HTML.replace("__ASSET_VERSION__", &version), version)
});

/// The paths served here (for the request metrics' route labels).
pub const PATHS: [&str; 3] = ["/console", "/console/app.js", "/console/app.css"];

fn asset(content_type: &'static str, body: &'static str, cache: &'static str) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, cache)
        .body(body)
}

#[handler]
fn index() -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(INDEX.0.as_str())
}

#[handler]
fn app_js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        APP_JS,
        "public, max-age=31536000, immutable",
    )
}

#[handler]
fn app_css() -> Response {
    asset(
        "text/css; charset=utf-8",
        APP_CSS,
        "public, max-age=31536000, immutable",
    )
}

/// The console's routes, each answer with the security headers (also its 404s and 405s).
pub fn routes() -> impl Endpoint<Output = Response> {
    Route::new()
        .at("/", get(index))
        .at("/app.js", get(app_js))
        .at("/app.css", get(app_css))
        .after(|res| async move {
            let mut resp = match res {
                Ok(r) => r,
                Err(e) => crate::error::normalize_error(e).await,
            };
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            );
            h.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            h.insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
            h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
            Ok(resp)
        })
}

/// The version stamped into the page's asset URLs (a digest of the script and stylesheet).
pub fn asset_version() -> &'static str {
    INDEX.1.as_str()
}
