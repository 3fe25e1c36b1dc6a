//! Malformed JSON, wrong types, unknown fields, oversized bodies, malformed ids: a clear 4xx
//! with the error shape, and nothing written.

use serde_json::{Value, json};

use crate::helpers::{TestApp, email, spawn_app, spawn_app_with};

async fn raw_post(app: &TestApp, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    let mut rb = app
        .http
        .post(app.url(path))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn assert_error(status: u16, body: &Value, want: u16, code: &str, ctx: &str) {
    assert_eq!(status, want, "{ctx}: {body}");
    assert_eq!(body["error"]["code"], code, "{ctx}: {body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!msg.is_empty(), "{ctx}");
    for leak in [
        "RegisterRequest",
        "NewProject",
        "NewTask",
        "serde",
        "sqlx",
        "::",
    ] {
        assert!(
            !msg.contains(leak),
            "{ctx}: internal name {leak:?} in {msg:?}"
        );
    }
}

#[tokio::test]
async fn register_rejects_bad_bodies_and_writes_nothing() {
    let app = spawn_app().await;
    let good =
        json!({"email": email("x"), "password": "long enough", "name": "N", "org_name": "O"});
    let mut unknown = good.clone();
    unknown["is_admin"] = json!(true);
    let mut wrong_type = good.clone();
    wrong_type["name"] = json!(42);
    let cases: Vec<(String, &str)> = vec![
        ("{\"email\": ".to_owned(), "malformed"),
        ("not json".to_owned(), "malformed"),
        ("[1,2]".to_owned(), "object"),
        ("".to_owned(), "required"),
        (unknown.to_string(), "is_admin"),
        (wrong_type.to_string(), "name"),
        (json!({"email": email("y")}).to_string(), "password"),
    ];
    for (body, needle) in cases {
        let (status, v) = raw_post(&app, "/v1/auth/register", None, &body).await;
        assert_error(status, &v, 400, "invalid_input", &body);
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{body}: {msg:?} should mention {needle:?}"
        );
    }
    assert_eq!(app.count("users").await, 0);
    assert_eq!(app.count("organizations").await, 0);
    // wrong content type
    let r = app
        .http
        .post(app.url("/v1/auth/register"))
        .header("content-type", "text/plain")
        .body(good.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unsupported_media_type");
    assert_eq!(app.count("users").await, 0);
}

#[tokio::test]
async fn project_and_task_bodies_are_checked_and_nothing_is_written() {
    let app = spawn_app_with(&[("MAX_BODY_BYTES", "4096")]).await;
    let owner = app.register(&email("o"), "Org").await;
    let t = Some(owner.token.as_str());
    let cases = [
        (r#"{"name": "p", "visibility": "public"}"#, "visibility"),
        (
            r#"{"name": "p", "visibility": "org", "colour": "red"}"#,
            "colour",
        ),
        (r#"{"name": 5, "visibility": "org"}"#, "name"),
        (r#"{"name": "p", "visibility": "team"}"#, "team_id"),
        (
            r#"{"name": "p", "visibility": "org", "team_id": "not-a-uuid"}"#,
            "team_id",
        ),
        (
            r#"{"name": "p", "visibility": "org", "team_id": "0190a0a0-0000-7000-8000-000000000000"}"#,
            "team_id",
        ),
        (r#"{"visibility": "org"}"#, "name"),
    ];
    for (body, needle) in cases {
        let (status, v) = raw_post(&app, "/v1/projects", t, body).await;
        assert_error(status, &v, 400, "invalid_input", body);
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{body}: {msg:?} should mention {needle:?}"
        );
    }
    assert_eq!(app.count("projects").await, 0);
    // oversized
    let big =
        json!({"name": "p", "visibility": "org", "description": "x".repeat(10_000)}).to_string();
    let (status, v) = raw_post(&app, "/v1/projects", t, &big).await;
    assert_error(status, &v, 413, "payload_too_large", "oversized");
    assert_eq!(app.count("projects").await, 0);

    let r = app
        .post(
            "/v1/projects",
            &owner.token,
            json!({"name": "p", "visibility": "org"}),
        )
        .await;
    let p = r.body["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/projects/{p}/tasks");
    let cases = [
        (r#"{"title": "t", "status": "later"}"#, "status"),
        (r#"{"title": "t", "priority": 1}"#, "priority"),
        (r#"{"title": ["t"]}"#, "title"),
        (r#"{"title": "t", "assignee_id": 7}"#, "assignee_id"),
        (r#"{"title": "   "}"#, "title"),
        (r#"{"title": "t""#, "malformed"),
    ];
    for (body, needle) in cases {
        let (status, v) = raw_post(&app, &path, t, body).await;
        assert_error(status, &v, 400, "invalid_input", body);
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{body}: {msg:?} should mention {needle:?}"
        );
    }
    assert_eq!(app.count("tasks").await, 0);
}

#[tokio::test]
async fn malformed_ids_in_paths_answer_like_missing_ones() {
    let app = spawn_app().await;
    let owner = app.register(&email("o"), "Org").await;
    let missing = app
        .get(
            &format!("/v1/projects/{}", uuid::Uuid::now_v7()),
            &owner.token,
        )
        .await;
    assert_eq!(missing.status, 404);
    for path in [
        "/v1/projects/not-a-uuid",
        "/v1/tasks/123",
        "/v1/projects/xyz/tasks",
    ] {
        let r = app.get(path, &owner.token).await;
        assert_error(r.status, &r.body, 404, "not_found", path);
        assert_eq!(r.body, missing.body, "{path}");
    }
    let r = app
        .patch("/v1/tasks/nope", &owner.token, json!({"title": "x"}))
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
    // without a token, authentication comes first
    let r = app
        .call(reqwest::Method::GET, "/v1/projects/not-a-uuid", None, None)
        .await;
    assert_eq!(r.status, 401);
}
