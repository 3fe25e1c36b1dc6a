//! Hostile input against sign-in: the login throttle cannot be raced, registration is
//! throttled per client IP, and the client IP is the socket's unless a trusted proxy says
//! otherwise.

use serde_json::json;

use crate::helpers::{Resp, TestApp, email, spawn_app_with};

async fn login_from(app: &TestApp, email: &str, password: &str, forwarded: Option<&str>) -> Resp {
    let mut rb = app
        .http
        .post(app.url("/v1/auth/login"))
        .json(&json!({"email": email, "password": password}));
    if let Some(f) = forwarded {
        rb = rb.header("x-forwarded-for", f);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json().await.unwrap_or(serde_json::Value::Null);
    Resp {
        status,
        body,
        headers,
    }
}

/// Password verifications that ran (argon2), from the API's own metrics.
async fn verifications(app: &TestApp) -> u64 {
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("password_hash_total{")
                && l.contains("op=\"verify\"")
                && l.contains("outcome=\"done\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn forty_concurrent_wrong_logins_reach_the_password_check_at_most_the_limit_times() {
    let app = spawn_app_with(&[]).await;
    let who = email("raced");
    app.register(&who, "Raced Org").await;
    let before = verifications(&app).await;
    let attempts = (0..40).map(|i| {
        let (app, who) = (&app, &who);
        async move { login_from(app, who, &format!("wrong password {i}"), None).await }
    });
    let results = futures::future::join_all(attempts).await;
    let unauthorized = results.iter().filter(|r| r.status == 401).count();
    let throttled: Vec<&Resp> = results.iter().filter(|r| r.status == 429).collect();
    assert_eq!(unauthorized + throttled.len(), 40);
    // the limit (LOGIN_MAX_FAILURES, 5) and not one more
    assert_eq!(unauthorized, 5);
    assert_eq!(verifications(&app).await - before, 5);
    for r in throttled {
        assert_eq!(r.body["error"]["code"], "rate_limited", "{}", r.body);
        let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=900).contains(&after), "{after}");
    }
    // even the right password waits for the window now, and costs no verification
    let r = login_from(&app, &who, "correct horse battery", None).await;
    assert_eq!(r.status, 429);
    assert_eq!(verifications(&app).await - before, 5);
}

#[tokio::test]
async fn a_successful_login_clears_the_emails_failures() {
    let app = spawn_app_with(&[("LOGIN_MAX_FAILURES", "3")]).await;
    let who = email("clears");
    app.register(&who, "Clear Org").await;
    for _ in 0..2 {
        assert_eq!(login_from(&app, &who, "wrong", None).await.status, 401);
    }
    app.login(&who).await;
    for _ in 0..3 {
        assert_eq!(login_from(&app, &who, "wrong", None).await.status, 401);
    }
    assert_eq!(login_from(&app, &who, "wrong", None).await.status, 429);
}

#[tokio::test]
async fn registration_is_throttled_per_client_ip() {
    let app = spawn_app_with(&[("REGISTER_IP_MAX", "3")]).await;
    for i in 0..3 {
        app.register(&email(&format!("signup{i}")), "Org").await;
    }
    let r = app
        .call(
            reqwest::Method::POST,
            "/v1/auth/register",
            None,
            Some(json!({
                "email": email("signup-over"),
                "password": "correct horse battery",
                "name": "Over",
                "org_name": "Org",
            })),
        )
        .await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "rate_limited");
    assert!(r.headers.contains_key("retry-after"));
    // nothing was created
    assert_eq!(app.count("users").await, 3);
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_client_is_throttled_not_the_proxy() {
    let app = spawn_app_with(&[
        ("TRUSTED_PROXIES", "127.0.0.1/32, ::1"),
        ("LOGIN_IP_MAX_FAILURES", "2"),
    ])
    .await;
    let a = Some("203.0.113.7");
    for i in 0..2 {
        let r = login_from(&app, &email(&format!("nobody{i}")), "x", a).await;
        assert_eq!(r.status, 401);
    }
    assert_eq!(
        login_from(&app, &email("nobody-else"), "x", a).await.status,
        429
    );
    // another client behind the same proxy is not locked out
    let b = Some("198.51.100.1, 203.0.113.99");
    assert_eq!(
        login_from(&app, &email("someone"), "x", b).await.status,
        401
    );
}

#[tokio::test]
async fn a_forged_forwarded_header_from_an_untrusted_peer_changes_nothing() {
    let app = spawn_app_with(&[("LOGIN_IP_MAX_FAILURES", "2")]).await;
    for i in 0..2 {
        let forged = format!("192.0.2.{i}");
        let r = login_from(&app, &email(&format!("guess{i}")), "x", Some(&forged)).await;
        assert_eq!(r.status, 401);
    }
    // the socket's address is the client: its failures are counted whatever the header says
    let r = login_from(&app, &email("guess-more"), "x", Some("192.0.2.200")).await;
    assert_eq!(r.status, 429);
}
