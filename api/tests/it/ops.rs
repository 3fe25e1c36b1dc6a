use serde_json::Value;

use crate::helpers::{spawn_app, spawn_app_with};

/// A local port with nothing listening on it.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn healthz_answers_ok() {
    let app = spawn_app().await;
    let r = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "ok");
}

#[tokio::test]
async fn readyz_is_200_when_postgres_and_redis_answer() {
    let app = spawn_app().await;
    let r = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["postgres"], "ok");
    assert_eq!(v["redis"], "ok");
}

#[tokio::test]
async fn readyz_is_503_when_redis_is_unreachable() {
    let url = format!("redis://127.0.0.1:{}", closed_port());
    let app = spawn_app_with(&[("REDIS_URL", &url)]).await;
    // healthz stays up: the process is alive, only not ready
    assert_eq!(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_ready");
    assert_eq!(v["checks"]["redis"], "unavailable");
    assert_eq!(v["checks"]["postgres"], "ok");
    assert!(
        !v.to_string().contains(&url),
        "no connection string in the body"
    );
}

#[tokio::test]
async fn readyz_is_503_when_postgres_is_unreachable() {
    let url = format!("postgres://postgres@127.0.0.1:{}/nowhere", closed_port());
    let app = spawn_app_with(&[("DATABASE_URL", &url)]).await;
    let r = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["checks"]["postgres"], "unavailable");
    assert_eq!(v["checks"]["redis"], "ok");
}

#[tokio::test]
async fn unknown_routes_answer_the_error_shape() {
    let app = spawn_app().await;
    let r = app
        .http
        .get(app.url("/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found");
    assert!(v["error"]["message"].is_string());
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_413() {
    let app = spawn_app_with(&[("MAX_BODY_BYTES", "1024")]).await;
    let big = "x".repeat(4096);
    // declared length
    let r = app
        .http
        .post(app.url("/healthz"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "payload_too_large");
    // chunked, no length
    let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(big.into_bytes())]);
    let r = app
        .http
        .post(app.url("/healthz"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
}

#[tokio::test]
async fn request_id_is_echoed_or_generated() {
    let app = spawn_app().await;
    let r = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "abc-123_x.y")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123_x.y");
    let r = app.http.get(app.url("/healthz")).send().await.unwrap();
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 32, "{generated}");
    // an unsafe id (spaces, too long) is replaced, never echoed
    let r = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_ne!(r.headers()["x-request-id"], "bad id with spaces");
    // errors carry it too
    let r = app
        .http
        .get(app.url("/nope"))
        .header("x-request-id", "err-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-request-id"], "err-1");
}

#[tokio::test]
async fn metrics_count_requests_by_route_template_and_status() {
    let app = spawn_app().await;
    for _ in 0..3 {
        app.http.get(app.url("/healthz")).send().await.unwrap();
    }
    app.http
        .get(app.url("/no/such/route/123"))
        .send()
        .await
        .unwrap();
    let r = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("http_requests_total{") && l.contains(r#"route="/healthz""#))
        .unwrap_or_else(|| panic!("no healthz series in:\n{text}"));
    assert!(
        line.contains(r#"method="GET""#) && line.contains(r#"status="200""#),
        "{line}"
    );
    assert!(line.trim_end().ends_with(" 3"), "{line}");
    // unknown paths share one label value: no unbounded label cardinality
    assert!(
        text.contains(r#"route="unmatched",status="404""#) || text.contains(r#"route="unmatched""#),
        "{text}"
    );
    assert!(
        !text.contains("/no/such/route"),
        "raw path leaked into labels"
    );
    assert!(
        text.contains("http_request_duration_seconds_bucket"),
        "{text}"
    );
}
