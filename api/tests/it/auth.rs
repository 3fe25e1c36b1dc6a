//! Registration, login, `/v1/me`, login throttling and JWT validation.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestApp, email, spawn_app, spawn_app_with};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str, org: &str) -> Value {
    json!({
        "sub": sub, "org": org, "iat": now(), "exp": now() + 600,
        "iss": "switchboard", "aud": "switchboard-api",
    })
}

fn hs256(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// Asserts a 401 with `WWW-Authenticate: Bearer` and the error shape.
async fn assert_rejected(app: &TestApp, token: &str, what: &str) {
    let r = app.call(Method::GET, "/v1/me", Some(token), None).await;
    assert_eq!(r.status, 401, "{what}: {}", r.body);
    assert_eq!(
        r.headers
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap()),
        Some("Bearer"),
        "{what}"
    );
    assert_eq!(r.body["error"]["code"], "unauthorized", "{what}");
}

/// An RSA key pair made with the openssl CLI: (private PEM path, public PEM path).
fn rsa_keys(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let private = dir.join("private.pem");
    let public = dir.join("public.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private)
        .output()
        .expect("openssl is installed")
        .status
        .success();
    assert!(ok, "openssl genpkey");
    let ok = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok, "openssl pkey -pubout");
    (private, public)
}

fn temp_dir(label: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sb-{label}-{}", uuid::Uuid::new_v4().simple()))
}

#[tokio::test]
async fn protected_endpoints_need_a_token() {
    let app = spawn_app().await;
    for path in ["/v1/me", "/v1/projects"] {
        let r = app.call(Method::GET, path, None, None).await;
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(r.headers["www-authenticate"], "Bearer", "{path}");
        assert_eq!(r.body["error"]["code"], "unauthorized");
    }
    assert_rejected(&app, "not-a-jwt", "garbage").await;
}

#[tokio::test]
async fn register_login_and_me() {
    let app = spawn_app().await;
    let mail = email("ann");
    let r = app
        .call(
            Method::POST,
            "/v1/auth/register",
            None,
            Some(json!({"email": mail, "password": "correct horse battery",
                        "name": "Ann", "org_name": "Acme"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["user"]["email"], mail.as_str());
    assert_eq!(r.body["org"]["name"], "Acme");
    assert!(r.body["org"]["model"].is_null());
    assert!(r.body["user"].get("password_hash").is_none());
    let token = r.body["token"].as_str().unwrap().to_owned();

    let me = app.get("/v1/me", &token).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.body["user"]["email"], mail.as_str());
    assert_eq!(me.body["org"]["id"], r.body["org"]["id"]);
    assert_eq!(me.body["role"], "owner");

    // login is case-insensitive on the email
    let login = app
        .call(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"email": mail.to_uppercase(), "password": "correct horse battery"})),
        )
        .await;
    assert_eq!(login.status, 200, "{}", login.body);
    assert!(login.body["expires_at"].as_str().unwrap().contains('T'));
    let me2 = app
        .get("/v1/me", login.body["token"].as_str().unwrap())
        .await;
    assert_eq!(me2.body["user"]["id"], r.body["user"]["id"]);
    // the password is stored as an argon2id hash
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
}

#[tokio::test]
async fn duplicate_email_is_a_conflict_case_insensitively() {
    let app = spawn_app().await;
    let mail = email("dup");
    app.register(&mail, "One").await;
    let r = app
        .call(
            Method::POST,
            "/v1/auth/register",
            None,
            Some(
                json!({"email": mail.to_uppercase(), "password": "another password",
                        "name": "B", "org_name": "Two"}),
            ),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "conflict");
    // nothing of the second registration remains (its org was rolled back)
    assert_eq!(app.count("organizations").await, 1);
    assert_eq!(app.count("users").await, 1);
}

#[tokio::test]
async fn register_validates_and_names_the_field() {
    let app = spawn_app().await;
    let cases = [
        (
            json!({"email": "nope", "password": "long enough", "name": "A", "org_name": "O"}),
            "email",
        ),
        (
            json!({"email": email("a"), "password": "short", "name": "A", "org_name": "O"}),
            "password",
        ),
        (
            json!({"email": email("a"), "password": "long enough", "name": " ", "org_name": "O"}),
            "name",
        ),
        (
            json!({"email": email("a"), "password": "long enough", "name": "A", "org_name": "x".repeat(201)}),
            "org_name",
        ),
        (
            json!({"email": email("a"), "password": "long enough", "name": "A"}),
            "org_name",
        ),
    ];
    for (body, field) in cases {
        let r = app
            .call(Method::POST, "/v1/auth/register", None, Some(body.clone()))
            .await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.body["error"]["code"], "invalid_input");
        let msg = r.body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(field), "{field} not named in {msg:?}");
    }
    assert_eq!(app.count("users").await, 0);
}

#[tokio::test]
async fn login_failures_are_indistinguishable() {
    let app = spawn_app().await;
    let mail = email("known");
    app.register(&mail, "Org").await;
    let wrong = app
        .call(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"email": mail, "password": "wrong password"})),
        )
        .await;
    let unknown = app
        .call(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"email": email("unknown"), "password": "wrong password"})),
        )
        .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(unknown.status, 401);
    assert_eq!(wrong.body, unknown.body);
    assert_eq!(wrong.body["error"]["code"], "invalid_credentials");
}

/// A login email with a control character (NUL cannot even be stored) is malformed input, not a
/// server error (schemathesis found the 500).
#[tokio::test]
async fn a_login_email_with_a_control_character_is_invalid_input() {
    let app = spawn_app().await;
    for bad in [")\u{16}\u{98}\u{0}", "a\u{0}@example.com"] {
        let r = app
            .call(
                Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({"email": bad, "password": "whatever password"})),
            )
            .await;
        assert_eq!(r.status, 400, "{bad:?}: {}", r.body);
        assert_eq!(r.body["error"]["code"], "invalid_input");
    }
}

#[tokio::test]
async fn repeated_login_failures_are_throttled() {
    let app = spawn_app_with(&[("LOGIN_MAX_FAILURES", "3"), ("LOGIN_WINDOW_SECS", "600")]).await;
    let mail = email("victim");
    app.register(&mail, "Org").await;
    let attempt = |password: &'static str| {
        app.call(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"email": mail, "password": password})),
        )
    };
    for _ in 0..3 {
        assert_eq!(attempt("wrong password").await.status, 401);
    }
    let r = attempt("wrong password").await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "rate_limited");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=600).contains(&retry), "{retry}");
    // even the right password waits until the window ends
    assert_eq!(attempt("correct horse battery").await.status, 429);
    // another email from the same client is not affected below the IP limit
    let other = email("other");
    app.register(&other, "Org2").await;
    app.login(&other).await;
    // the counters live under the test's REDIS_PREFIX
    let mut conn = crate::redis_conn(&app.redis).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:login:fail:*", app.redis.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
}

#[tokio::test]
async fn forged_and_invalid_tokens_are_rejected_hs256() {
    let app = spawn_app().await;
    let acct = app.register(&email("jwt"), "Org").await;
    let secret = testkit::TEST_JWT_SECRET.as_bytes();
    // a good token made the same way works (the test forges correctly)
    let good = hs256(&claims(&acct.user_id, &acct.org_id), secret);
    assert_eq!(app.get("/v1/me", &good).await.status, 200);

    // alg none
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims(&acct.user_id, &acct.org_id).to_string());
    assert_rejected(&app, &format!("{header}.{payload}."), "alg none").await;
    // wrong key
    let wrong = hs256(
        &claims(&acct.user_id, &acct.org_id),
        b"another-secret-0123456789abcdef0123456789",
    );
    assert_rejected(&app, &wrong, "wrong key").await;
    // expired (beyond the leeway)
    let mut c = claims(&acct.user_id, &acct.org_id);
    c["exp"] = json!(now() - 3600);
    c["iat"] = json!(now() - 7200);
    assert_rejected(&app, &hs256(&c, secret), "expired").await;
    // wrong audience, wrong issuer, missing audience
    let mut c = claims(&acct.user_id, &acct.org_id);
    c["aud"] = json!("someone-else");
    assert_rejected(&app, &hs256(&c, secret), "wrong aud").await;
    let mut c = claims(&acct.user_id, &acct.org_id);
    c["iss"] = json!("evil");
    assert_rejected(&app, &hs256(&c, secret), "wrong iss").await;
    let mut c = claims(&acct.user_id, &acct.org_id);
    c.as_object_mut().unwrap().remove("aud");
    assert_rejected(&app, &hs256(&c, secret), "no aud").await;
    // tampered payload: swap in another org id, keep the signature
    let other = app.register(&email("other"), "Other").await;
    let parts: Vec<&str> = good.split('.').collect();
    let forged_payload = URL_SAFE_NO_PAD.encode(claims(&acct.user_id, &other.org_id).to_string());
    assert_rejected(
        &app,
        &format!("{}.{}.{}", parts[0], forged_payload, parts[2]),
        "tampered",
    )
    .await;
    // a validly signed token naming an org the user is not a member of
    let cross = hs256(&claims(&acct.user_id, &other.org_id), secret);
    assert_rejected(&app, &cross, "not a member of that org").await;
    // RS256 token given to an HS256 app
    let dir = temp_dir("rs-to-hs");
    let (private, _) = rsa_keys(&dir);
    let rs = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims(&acct.user_id, &acct.org_id),
        &EncodingKey::from_rsa_pem(&std::fs::read(&private).unwrap()).unwrap(),
    )
    .unwrap();
    assert_rejected(&app, &rs, "RS256 to HS256 app").await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn rs256_is_pinned_and_confusion_is_rejected() {
    let dir = temp_dir("rs256");
    let (private, public) = rsa_keys(&dir);
    let app = spawn_app_with(&[
        ("JWT_ALGORITHM", "RS256"),
        ("JWT_PUBLIC_KEY_PATH", public.to_str().unwrap()),
        ("JWT_PRIVATE_KEY_PATH", private.to_str().unwrap()),
    ])
    .await;
    // the app issues RS256 tokens, and they work
    let acct = app.register(&email("rsa"), "Org").await;
    let header = jsonwebtoken::decode_header(&acct.token).unwrap();
    assert_eq!(header.alg, Algorithm::RS256);
    assert_eq!(app.get("/v1/me", &acct.token).await.status, 200);
    // HS256 signed with the public key's bytes (the classic confusion attack)
    let public_pem = std::fs::read(&public).unwrap();
    let confused = hs256(&claims(&acct.user_id, &acct.org_id), &public_pem);
    assert_rejected(&app, &confused, "HS256 with the public key").await;
    // HS256 with the (still configured by default) test secret
    let hs = hs256(
        &claims(&acct.user_id, &acct.org_id),
        testkit::TEST_JWT_SECRET.as_bytes(),
    );
    assert_rejected(&app, &hs, "HS256 with the secret").await;
    // RS256 signed by another key
    let (other_private, _) = rsa_keys(&dir.join("other"));
    let foreign = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims(&acct.user_id, &acct.org_id),
        &EncodingKey::from_rsa_pem(&std::fs::read(&other_private).unwrap()).unwrap(),
    )
    .unwrap();
    assert_rejected(&app, &foreign, "RS256 by another key").await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_removed_member_loses_access_with_a_valid_token() {
    let app = spawn_app().await;
    let owner = app.register(&email("owner"), "Org").await;
    let member = app.add_member(&owner, &email("member"), "member").await;
    assert_eq!(app.get("/v1/me", &member.token).await.status, 200);
    let r = app
        .delete(
            &format!("/v1/orgs/{}/members/{}", owner.org_id, member.user_id),
            &owner.token,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_rejected(&app, &member.token, "removed member").await;
    // the last owner cannot be removed or demoted
    let r = app
        .delete(
            &format!("/v1/orgs/{}/members/{}", owner.org_id, owner.user_id),
            &owner.token,
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
}

#[tokio::test]
async fn api_token_command_prints_a_working_token() {
    let app = spawn_app().await;
    let acct = app.register(&email("cli"), "Org").await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_api"))
        .args(["token", "--user-email", &acct.email.to_uppercase()])
        .env("DATABASE_URL", &app.db.url)
        .env("REDIS_URL", &app.redis.url)
        .env("REDIS_PREFIX", &app.redis.prefix)
        .env("JWT_SECRET", testkit::TEST_JWT_SECRET)
        .env_remove("JWT_ALGORITHM")
        .env_remove("SWITCHBOARD_CONFIG")
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "api token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "only the token on stdout: {stdout:?}");
    let me = app.get("/v1/me", lines[0]).await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.body["user"]["id"], acct.user_id.as_str());

    // an unknown email fails, with nothing on stdout
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_api"))
        .args(["token", "--user-email", "nobody@example.com"])
        .env("DATABASE_URL", &app.db.url)
        .env("REDIS_URL", &app.redis.url)
        .env("JWT_SECRET", testkit::TEST_JWT_SECRET)
        .env_remove("SWITCHBOARD_CONFIG")
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn failures_from_one_client_ip_are_throttled_across_emails() {
    let app = spawn_app_with(&[("LOGIN_IP_MAX_FAILURES", "3"), ("LOGIN_MAX_FAILURES", "10")]).await;
    let known = email("known");
    app.register(&known, "Org").await;
    for _ in 0..3 {
        let r = app
            .call(
                Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({"email": email("guess"), "password": "wrong password"})),
            )
            .await;
        assert_eq!(r.status, 401);
    }
    let r = app
        .call(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"email": known, "password": "correct horse battery"})),
        )
        .await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.headers.contains_key("retry-after"));
}

#[tokio::test]
async fn login_answers_503_when_redis_is_down() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = spawn_app_with(&[("REDIS_URL", &format!("redis://127.0.0.1:{port}"))]).await;
    let mail = email("r");
    // both sign-in endpoints count attempts in Redis before hashing a password
    let r = app
        .call(
            Method::POST,
            "/v1/auth/register",
            None,
            Some(json!({"email": mail, "password": "correct horse battery", "name": "R", "org_name": "Org"})),
        )
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "unavailable");
    let r = app
        .call(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"email": mail, "password": "correct horse battery"})),
        )
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "unavailable");
    assert!(!r.body.to_string().contains(&port.to_string()));
}
