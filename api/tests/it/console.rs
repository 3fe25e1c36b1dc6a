//! `/console` over HTTP (its assets and security headers) and CORS (`CORS_ALLOWED_ORIGINS`)
//! on every kind of answer. The console in a browser: `browser.rs`.

use reqwest::header::HeaderMap;
use serde_json::json;

use crate::helpers::{email, spawn_app, spawn_app_with};

const ALLOWED: &str = "https://app.example.com";

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn the_console_is_served_from_the_binary_with_a_strict_csp() {
    let app = spawn_app().await;
    let http = reqwest::Client::new();
    let page = http.get(app.url("/console")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let h = page.headers().clone();
    assert_eq!(header(&h, "content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(
        header(&h, "content-security-policy"),
        Some(api::console::CSP)
    );
    assert_eq!(header(&h, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&h, "x-frame-options"), Some("DENY"));
    assert_eq!(header(&h, "referrer-policy"), Some("no-referrer"));
    assert_eq!(header(&h, "cache-control"), Some("no-cache"));
    let html = page.text().await.unwrap();
    let version = api::console::asset_version();
    assert!(
        html.contains(&format!("/console/app.js?v={version}")),
        "{html}"
    );
    assert!(html.contains(&format!("/console/app.css?v={version}")));
    // nothing inline: every script has a src, no style attributes or elements, no handlers
    assert_eq!(
        html.matches("<script").count(),
        html.matches("<script src=").count()
    );
    for inline in [
        " style=",
        "<style",
        " onclick=",
        " onload=",
        " onerror=",
        "javascript:",
    ] {
        assert!(!html.contains(inline), "{inline} in the page");
    }
    for (path, ctype) in [
        ("/console/app.js", "text/javascript; charset=utf-8"),
        ("/console/app.css", "text/css; charset=utf-8"),
    ] {
        let r = http
            .get(app.url(&format!("{path}?v={version}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers().clone();
        assert_eq!(header(&h, "content-type"), Some(ctype), "{path}");
        assert_eq!(
            header(&h, "content-security-policy"),
            Some(api::console::CSP)
        );
        assert!(header(&h, "cache-control").unwrap().contains("immutable"));
        let body = r.text().await.unwrap();
        assert!(body.len() > 1000, "{path}");
        // data goes into the page as text only
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!body.contains(sink), "{sink} in {path}");
        }
    }
    // the token is kept per tab and sent in a header only
    let js = http
        .get(app.url("/console/app.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(js.contains("sessionStorage") && !js.contains("localStorage"));
    assert!(js.contains("'Authorization'") && !js.contains("access_token"));

    // a missing asset: the contract's 404, with the same headers
    let r = http.get(app.url("/console/nope.js")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        header(r.headers(), "content-security-policy"),
        Some(api::console::CSP)
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    // /docs keeps what Swagger UI needs (its inline script): not the console's policy
    let r = http.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(r.headers(), "content-security-policy"), None);
}

/// No list (the default): same origin only — no CORS header on anything, preflights included.
#[tokio::test]
async fn without_a_list_no_cors_header_is_sent() {
    let app = spawn_app().await;
    let http = reqwest::Client::new();
    let r = http
        .get(app.url("/v1/me"))
        .header("origin", ALLOWED)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(header(r.headers(), "access-control-allow-origin"), None);
    let r = http
        .request(reqwest::Method::OPTIONS, app.url("/v1/me"))
        .header("origin", ALLOWED)
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(header(r.headers(), "access-control-allow-origin"), None);
    assert_eq!(header(r.headers(), "access-control-allow-methods"), None);
}

#[tokio::test]
async fn allowed_origins_get_cors_on_every_answer_and_others_get_nothing() {
    let app = spawn_app_with(&[
        (
            "CORS_ALLOWED_ORIGINS",
            "https://app.example.com, http://127.0.0.1:5173",
        ),
        ("LOGIN_MAX_FAILURES", "1"),
        ("SSE_KEEP_ALIVE_SECS", "1"),
    ])
    .await;
    let http = reqwest::Client::new();
    let user = app.register(&email("cors"), "Cors Org").await;
    let conversation = app.conversation(&user.token).await;

    // preflight, on any path: granted for the listed origin, with the headers clients send
    let path = format!("/v1/conversations/{conversation}/messages");
    let preflight = |origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, app.url(&path))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, idempotency-key, last-event-id",
            )
            .send()
    };
    let r = preflight(ALLOWED).await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let h = r.headers();
    assert_eq!(header(h, "access-control-allow-origin"), Some(ALLOWED));
    let allowed_headers = header(h, "access-control-allow-headers").unwrap();
    for name in [
        "authorization",
        "content-type",
        "last-event-id",
        "idempotency-key",
    ] {
        assert!(allowed_headers.contains(name), "{name}: {allowed_headers}");
    }
    assert!(
        header(h, "access-control-allow-methods")
            .unwrap()
            .contains("POST")
    );
    assert_eq!(header(h, "access-control-allow-credentials"), None);
    assert!(
        header(h, "vary")
            .unwrap()
            .to_ascii_lowercase()
            .contains("origin")
    );
    // a refused origin's preflight is not granted (the browser then sends nothing)
    for origin in [
        "https://evil.example",
        "https://app.example.com.evil.example",
        "null",
    ] {
        let r = preflight(origin).await.unwrap();
        assert!(!r.status().is_success(), "{origin}: {}", r.status());
        assert_eq!(
            header(r.headers(), "access-control-allow-origin"),
            None,
            "{origin}"
        );
        assert_eq!(
            header(r.headers(), "access-control-allow-headers"),
            None,
            "{origin}"
        );
    }

    // answers, errors included, carry the origin and expose Retry-After
    let get = |path: String, token: Option<String>, origin: &'static str| {
        let mut rb = http.get(app.url(&path)).header("origin", origin);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send()
    };
    let check = |r: &reqwest::Response, want: u16| {
        assert_eq!(r.status().as_u16(), want);
        let h = r.headers();
        assert_eq!(
            header(h, "access-control-allow-origin"),
            Some(ALLOWED),
            "{want}"
        );
        let exposed = header(h, "access-control-expose-headers").unwrap();
        assert!(exposed.contains("retry-after"), "{exposed}");
    };
    check(
        &get("/v1/me".into(), Some(user.token.clone()), ALLOWED)
            .await
            .unwrap(),
        200,
    );
    check(&get("/v1/me".into(), None, ALLOWED).await.unwrap(), 401);
    let missing = format!("/v1/projects/{}", uuid::Uuid::now_v7());
    check(
        &get(missing, Some(user.token.clone()), ALLOWED)
            .await
            .unwrap(),
        404,
    );
    let r = get("/v1/me".into(), None, "https://evil.example")
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(header(r.headers(), "access-control-allow-origin"), None);

    // 429 (the login throttle) with Retry-After, readable cross-origin
    let mut throttled = None;
    for _ in 0..4 {
        let r = http
            .post(app.url("/v1/auth/login"))
            .header("origin", ALLOWED)
            .json(&json!({"email": user.email, "password": "wrong password!"}))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            throttled = Some(r);
            break;
        }
    }
    let r = throttled.expect("the login throttle answers 429");
    check(&r, 429);
    assert!(header(r.headers(), "retry-after").is_some());

    // the SSE stream too (its headers come before the first event)
    let r = http
        .post(app.url(&format!("/v1/conversations/{conversation}/messages")))
        .header("origin", ALLOWED)
        .bearer_auth(&user.token)
        .json(&json!({"content": "hello", "stream": true}))
        .send()
        .await
        .unwrap();
    check(&r, 200);
    assert!(
        header(r.headers(), "content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    drop(r);

    // /console and /docs answer cross-origin reads the same way (any path)
    check(&get("/console".into(), None, ALLOWED).await.unwrap(), 200);
}
