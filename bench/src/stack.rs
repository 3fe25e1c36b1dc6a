//! An in-process Switchboard for the benches that drive the chat path over HTTP: the API (on
//! `settings.api.addr`, port 0 for a free one) and chat workers, stopped together.

use std::sync::Arc;
use std::time::Duration;

use jobs::{Queue, Worker, WorkerOptions};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct Stack {
    /// `http://<addr>` of the API.
    pub base: String,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Stack {
    /// The API and `workers` chat workers on `settings` (what started is stopped again when a
    /// later part fails).
    pub async fn start(settings: &config::Settings, workers: usize) -> anyhow::Result<Self> {
        let mut stack = Self {
            base: String::new(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        match stack.spawn(settings, workers).await {
            Ok(base) => {
                stack.base = base;
                Ok(stack)
            }
            Err(e) => {
                stack.stop().await;
                Err(e)
            }
        }
    }

    async fn spawn(&self, settings: &config::Settings, workers: usize) -> anyhow::Result<String> {
        let app = api::Application::build(settings.clone()).await?;
        let base = format!("http://{}", app.addr());
        let stop = self.stop.clone();
        self.tasks
            .spawn(async move { app.run_until_stopped(stop).await });
        let pool = store::pool(&settings.database)?;
        let redis = Arc::new(jobs::RedisHandle::new(&settings.redis)?);
        for _ in 0..workers {
            let mut registry = jobs::Registry::new();
            workers::handlers::chat::ChatHandler::new(pool.clone(), redis.clone(), settings)?
                .register(&mut registry);
            let worker = Worker::new(
                jobs::Bus::new(redis.clone(), &settings.queues),
                registry,
                WorkerOptions::from_settings(settings, vec![Queue::Chat]),
            );
            let stop = self.stop.clone();
            self.tasks.spawn(async move {
                if let Err(e) = worker.run(stop).await {
                    tracing::error!(error = %e, "chat worker stopped");
                }
            });
        }
        Ok(base)
    }

    /// Stop the API and the workers, waiting up to 30 s.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(30), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("API or worker did not stop within 30 s");
        }
    }
}
