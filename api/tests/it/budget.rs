//! Per-org token budgets, through HTTP: admins set them, members and other orgs cannot; turns
//! at a budget's edge are admitted one after another and never pass it together; over it, 429
//! `budget_exceeded` with `Retry-After`, before anything is written or any model is called.
//! The turns that are admitted are answered by the real chat worker, through LiteLLM and the
//! fake upstream, and their real usage replaces their reservation.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use testkit::FakeClient;
use uuid::Uuid;

use crate::e2e::{RunningWorker, org_with_fake_models};
use crate::helpers::{Account, Resp, TestApp, email, spawn_app_with};

const RESERVE: i64 = 4000;

async fn put(app: &TestApp, token: &str, org: &str, body: Value) -> Resp {
    app.call(
        reqwest::Method::PUT,
        &format!("/v1/orgs/{org}/settings/budget"),
        Some(token),
        Some(body),
    )
    .await
}

async fn budget(app: &TestApp, token: &str, org: &str) -> Value {
    let r = app
        .get(&format!("/v1/orgs/{org}/settings/budget"), token)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

fn retry_after(r: &Resp) -> u64 {
    r.headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {:?}", r.headers))
}

fn limits(r: &Resp) -> (Value, Value) {
    (
        r.body["daily_tokens"].clone(),
        r.body["monthly_tokens"].clone(),
    )
}

#[tokio::test]
async fn admins_set_the_budget_members_and_other_orgs_cannot_and_bad_values_are_refused() {
    let app = spawn_app_with(&[
        ("BUDGET_TURN_RESERVE_TOKENS", "4000"),
        ("BUDGET_DEFAULT_MONTHLY_TOKENS", "900000"),
    ])
    .await;
    let owner = app.register(&email("budget-owner"), "Budgets").await;
    let admin = app
        .add_member(&owner, &email("budget-admin"), "admin")
        .await;
    let member = app
        .add_member(&owner, &email("budget-member"), "member")
        .await;
    let other = app.register(&email("budget-other"), "Other").await;
    let org = owner.org_id.as_str();

    // the operator's defaults until the org sets its own
    let b = budget(&app, &owner.token, org).await;
    assert_eq!(b["source"], "default", "{b}");
    assert_eq!(b["daily_tokens"], Value::Null);
    assert_eq!(b["monthly_tokens"], 900_000);
    assert_eq!(b["remaining_today"], Value::Null);
    assert_eq!(b["remaining_this_month"], 900_000);
    assert_eq!(b["used_today"], 0);
    assert_eq!(b["reserved_tokens"], 0);
    assert_eq!(b["turn_reserve_tokens"], RESERVE);
    let resets: DateTime<Utc> = b["day_resets_at"].as_str().unwrap().parse().unwrap();
    let left = resets - Utc::now();
    assert!(
        left > chrono::Duration::zero() && left <= chrono::Duration::days(1),
        "{b}"
    );

    // members may not read or change it; another org's admin does not see it
    let path = format!("/v1/orgs/{org}/settings/budget");
    assert_eq!(app.get(&path, &member.token).await.status, 403);
    let r = put(&app, &member.token, org, json!({"daily_tokens": 50_000})).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = app.get(&path, &other.token).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "not_found");
    let r = put(&app, &other.token, org, json!({"daily_tokens": 1})).await;
    assert_eq!(r.status, 404, "{}", r.body);

    // bad values: 400 naming the field; nothing changes
    for (body, field) in [
        (json!({"daily_tokens": -1}), "daily_tokens"),
        (
            json!({"monthly_tokens": 10_000_000_000_000_000i64}),
            "monthly_tokens",
        ),
        (json!({"daily_tokens": "lots"}), "daily_tokens"),
        (json!({"daily_tokens": 1.5}), "daily_tokens"),
        (json!({"daily_tokens": 100, "colour": 1}), "colour"),
    ] {
        let r = put(&app, &admin.token, org, body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.body["error"]["code"], "invalid_input");
        let message = r.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{body}: {}", r.body);
    }
    assert_eq!(budget(&app, &owner.token, org).await["source"], "default");

    // an admin sets a daily limit; the monthly one stays the operator's default
    let r = put(&app, &admin.token, org, json!({"daily_tokens": 50_000})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["source"], "org");
    assert_eq!(limits(&r), (json!(50_000), json!(900_000)));
    assert_eq!(r.body["remaining_today"], 50_000);
    // a field left out keeps its limit; null goes back to the default; 0 allows nothing
    let r = put(
        &app,
        &owner.token,
        org,
        json!({"monthly_tokens": 2_000_000}),
    )
    .await;
    assert_eq!(limits(&r), (json!(50_000), json!(2_000_000)));
    let r = put(&app, &owner.token, org, json!({"daily_tokens": null})).await;
    assert_eq!(limits(&r), (Value::Null, json!(2_000_000)));
    let r = put(&app, &owner.token, org, json!({"daily_tokens": 0})).await;
    assert_eq!(limits(&r), (json!(0), json!(2_000_000)));
    assert_eq!(r.body["remaining_today"], 0);
    let conversation = app.conversation(&member.token).await;
    let r = app
        .post(
            &format!("/v1/conversations/{conversation}/messages"),
            &member.token,
            json!({"content": "hello"}),
        )
        .await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "budget_exceeded");
    assert_eq!(app.count("messages").await, 0);
    // back to the defaults
    let body = json!({"daily_tokens": null, "monthly_tokens": null});
    let r = put(&app, &owner.token, org, body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["source"], "default");
    assert_eq!(limits(&r), (Value::Null, json!(900_000)));
    // the other org is untouched by all this
    let b = budget(&app, &other.token, &other.org_id).await;
    assert_eq!(b["source"], "default");
}

#[tokio::test]
async fn fifty_concurrent_turns_at_the_budget_edge_never_pass_it() {
    let app = spawn_app_with(&[
        ("BUDGET_TURN_RESERVE_TOKENS", "4000"),
        ("MESSAGE_RATE_LIMIT", "1000"),
        ("JSON_WAIT_SECS", "1"),
    ])
    .await;
    let (token, primary, _fallback) = org_with_fake_models(&app).await;
    let fake = FakeClient::shared();
    let me = app.get("/v1/me", &token).await;
    let org = me.body["org"]["id"].as_str().unwrap().to_owned();
    let owner = Account {
        token: token.clone(),
        user_id: me.body["user"]["id"].as_str().unwrap().to_owned(),
        org_id: org.clone(),
        email: String::new(),
    };
    // room for three turns' reservations exactly
    let limit = 3 * RESERVE;
    let r = put(&app, &token, &org, json!({"daily_tokens": limit})).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // 50 turns at once from five members' conversations, before any worker runs: three are
    // admitted, the rest refused
    let mut posters = Vec::new();
    for i in 0..5 {
        let m = app
            .add_member(&owner, &email(&format!("edge{i}")), "member")
            .await;
        let conversation = app.conversation(&m.token).await;
        posters.push((
            m.token,
            format!("/v1/conversations/{conversation}/messages"),
        ));
    }
    let turns = (0..50).map(|i| {
        let (app, (token, path)) = (&app, &posters[i % posters.len()]);
        async move {
            let body = json!({"content": format!("turn {i}")});
            app.call(reqwest::Method::POST, path, Some(token), Some(body))
                .await
        }
    });
    let answers = futures::future::join_all(turns).await;
    let admitted = answers.iter().filter(|r| r.status == 202).count();
    let refused: Vec<&Resp> = answers.iter().filter(|r| r.status == 429).collect();
    assert_eq!(
        (admitted, refused.len()),
        (3, 47),
        "{:?}",
        answers
            .iter()
            .map(|r| (r.status, r.body.clone()))
            .collect::<Vec<_>>()
    );
    for r in &refused {
        assert_eq!(r.body["error"]["code"], "budget_exceeded", "{}", r.body);
        // the open turns hold the rest: Retry-After runs until the day resets (the HTTP contract)
        let midnight = (chrono::Utc::now() + chrono::Duration::days(1))
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc();
        let to_reset = (midnight - chrono::Utc::now()).num_seconds();
        assert!(
            (retry_after(r) as i64 - to_reset).abs() <= 5,
            "{} vs {to_reset}",
            retry_after(r)
        );
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("still running"),
            "{}",
            r.body
        );
    }
    let b = budget(&app, &token, &org).await;
    assert_eq!(b["reserved_tokens"], 3 * RESERVE, "{b}");
    assert_eq!(b["remaining_today"], 0, "{b}");
    // nothing of a refused turn was written: three user messages in all
    assert_eq!(app.count("messages").await, 3);

    // the real worker answers the three; their usage replaces their reservations
    let worker = RunningWorker::start(&app);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let b = loop {
        let b = budget(&app, &token, &org).await;
        if b["reserved_tokens"] == 0 {
            break b;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "turns never finished: {b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    worker.stop().await;
    let used = b["used_today"].as_i64().unwrap();
    assert!(used > 0 && used <= limit, "{b}");
    assert_eq!(b["remaining_today"], limit - used, "{b}");
    assert_eq!(fake.requests(&primary).await.unwrap().len(), 3);
    let stored: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0)::bigint FROM usage_daily WHERE org_id = $1",
    )
    .bind(Uuid::parse_str(&org).unwrap())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(stored, used);

    // a limit the recorded usage alone fills: refused until the day resets, and no model call
    let r = put(&app, &token, &org, json!({"daily_tokens": used})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let day_resets: DateTime<Utc> = r.body["day_resets_at"].as_str().unwrap().parse().unwrap();
    let (member_token, path) = &posters[0];
    let r = app
        .post(path, member_token, json!({"content": "one more"}))
        .await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "budget_exceeded");
    let wait = retry_after(&r) as i64;
    let expected = (day_resets - Utc::now()).num_seconds();
    assert!(
        (wait - expected).abs() <= 5,
        "Retry-After {wait}, the day resets in {expected} s"
    );
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("daily")
    );
    assert_eq!(fake.requests(&primary).await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_retried_turn_is_answered_even_when_the_budget_is_full() {
    let app = spawn_app_with(&[
        ("BUDGET_TURN_RESERVE_TOKENS", "4000"),
        ("JSON_WAIT_SECS", "1"),
    ])
    .await;
    let owner = app.register(&email("budget-retry"), "Retry").await;
    let org = owner.org_id.clone();
    let r = put(&app, &owner.token, &org, json!({"daily_tokens": RESERVE})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let conversation = app.conversation(&owner.token).await;
    let send = |key: &'static str, content: &'static str| {
        app.http
            .post(app.url(&format!("/v1/conversations/{conversation}/messages")))
            .bearer_auth(&owner.token)
            .header("Idempotency-Key", key)
            .json(&json!({"content": content}))
            .send()
    };
    let first = send("key-1", "hello").await.unwrap();
    assert_eq!(first.status().as_u16(), 202);
    let first: Value = first.json().await.unwrap();
    // the one turn holds the whole budget: another is refused, the same one retried is not
    let other = send("key-2", "another").await.unwrap();
    assert_eq!(other.status().as_u16(), 429);
    let again = send("key-1", "hello").await.unwrap();
    assert_eq!(again.status().as_u16(), 202);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["response_id"], first["response_id"]);
}
