use testkit::{TestDb, TestRedis, test_settings};
use tokio_util::sync::CancellationToken;

/// A running API on a random port with its own database and Redis prefix.
pub struct TestApp {
    pub addr: String,
    pub http: reqwest::Client,
    /// Kept alive (and dropped) with the app.
    #[allow(dead_code)]
    pub db: TestDb,
    #[allow(dead_code)]
    pub redis: TestRedis,
    #[allow(dead_code)]
    pub settings: config::Settings,
    /// Cancelling it shuts the app down (as SIGTERM would).
    #[allow(dead_code)]
    pub shutdown: CancellationToken,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Spawn with setting overrides (environment variable names).
pub async fn spawn_app_with(extra: &[(&str, &str)]) -> TestApp {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, extra);
    let app = api::Application::build(settings.clone())
        .await
        .expect("app builds");
    let addr = app.addr().to_string();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move { app.run_until_stopped(token).await });
    TestApp {
        addr,
        http: reqwest::Client::new(),
        db,
        redis,
        settings,
        shutdown,
    }
}

/// A response, read whole: status, JSON body (Null when empty or not JSON) and headers.
#[allow(dead_code)]
pub struct Resp {
    pub status: u16,
    pub body: serde_json::Value,
    pub headers: reqwest::header::HeaderMap,
}

/// A registered user: their token and ids.
#[allow(dead_code)]
#[derive(Clone, Debug)]
pub struct Account {
    pub token: String,
    pub user_id: String,
    pub org_id: String,
    pub email: String,
}

#[allow(dead_code)]
impl TestApp {
    /// Send a request with an optional bearer token and JSON body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Resp {
        let mut rb = self.http.request(method, self.url(path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.expect("request sent");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let bytes = r.bytes().await.expect("body read");
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Resp {
            status,
            body,
            headers,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.call(reqwest::Method::GET, path, Some(token), None)
            .await
    }

    pub async fn post(&self, path: &str, token: &str, body: serde_json::Value) -> Resp {
        self.call(reqwest::Method::POST, path, Some(token), Some(body))
            .await
    }

    pub async fn patch(&self, path: &str, token: &str, body: serde_json::Value) -> Resp {
        self.call(reqwest::Method::PATCH, path, Some(token), Some(body))
            .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Resp {
        self.call(reqwest::Method::DELETE, path, Some(token), None)
            .await
    }

    /// Register a new user with a new org (they own it).
    pub async fn register(&self, email: &str, org_name: &str) -> Account {
        let r = self
            .call(
                reqwest::Method::POST,
                "/v1/auth/register",
                None,
                Some(serde_json::json!({
                    "email": email,
                    "password": "correct horse battery",
                    "name": "Test User",
                    "org_name": org_name,
                })),
            )
            .await;
        assert_eq!(r.status, 201, "register {email}: {}", r.body);
        Account {
            token: r.body["token"].as_str().unwrap().to_owned(),
            user_id: r.body["user"]["id"].as_str().unwrap().to_owned(),
            org_id: r.body["org"]["id"].as_str().unwrap().to_owned(),
            email: email.to_owned(),
        }
    }

    /// Log in (password of `register`/`add_member`).
    pub async fn login(&self, email: &str) -> String {
        let r = self
            .call(
                reqwest::Method::POST,
                "/v1/auth/login",
                None,
                Some(serde_json::json!({"email": email, "password": "correct horse battery"})),
            )
            .await;
        assert_eq!(r.status, 200, "login {email}: {}", r.body);
        r.body["token"].as_str().unwrap().to_owned()
    }

    /// `admin` creates a member of their org with `role`, who then logs in.
    pub async fn add_member(&self, admin: &Account, email: &str, role: &str) -> Account {
        let r = self
            .post(
                &format!("/v1/orgs/{}/members", admin.org_id),
                &admin.token,
                serde_json::json!({
                    "email": email,
                    "password": "correct horse battery",
                    "name": "Member",
                    "role": role,
                }),
            )
            .await;
        assert_eq!(r.status, 201, "add member {email}: {}", r.body);
        let token = self.login(email).await;
        Account {
            token,
            user_id: r.body["id"].as_str().unwrap().to_owned(),
            org_id: admin.org_id.clone(),
            email: email.to_owned(),
        }
    }

    /// Row count of a table of the test database (table names are fixed by the tests).
    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }
}

/// A unique email for a test.
#[allow(dead_code)]
pub fn email(label: &str) -> String {
    format!(
        "{label}-{}@example.com",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}
