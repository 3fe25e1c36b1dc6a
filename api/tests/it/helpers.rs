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
    shutdown: CancellationToken,
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
    let app = api::Application::build(settings).await.expect("app builds");
    let addr = app.addr().to_string();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move { app.run_until_stopped(token).await });
    TestApp {
        addr,
        http: reqwest::Client::new(),
        db,
        redis,
        shutdown,
    }
}
