//! Job kinds as apalis task functions: the [`Registry`] holds one [`task_fn`] service per kind,
//! and [`Dispatch`] is the service an apalis worker of one queue runs: it hands each task to the
//! task function of its kind.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis_core::error::BoxDynError;
use apalis_core::layers::Service;
use apalis_core::task::Task;
use apalis_core::task::from_request::FromRequest;
use apalis_core::task::task_fn::task_fn;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use uuid::Uuid;

use super::backend::Entry;
use crate::envelope::Envelope;
use crate::error::JobError;
use crate::kinds::{Job, JobKind};
use crate::queue::Queue;

/// What a handler knows about the job it runs. The backend puts it in every task's data (in
/// the task's bus entry); a task function takes it as an argument (it is an apalis
/// [`FromRequest`] extractor).
#[derive(Debug, Clone)]
pub struct JobContext {
    pub id: Uuid,
    pub queue: Queue,
    pub kind: &'static str,
    /// 1 for the first run.
    pub attempt: u32,
    pub enqueued_at: DateTime<Utc>,
    /// When the job became due (`not_before` or `enqueued_at`).
    pub due_at: DateTime<Utc>,
    /// W3C `traceparent` from the envelope.
    pub trace: Option<String>,
    /// The consumer (worker process) running it.
    pub consumer: Arc<str>,
}

/// A task reached a task function without the context the backend gives every task.
#[derive(Debug, thiserror::Error)]
#[error("the task carries no job context")]
pub struct NoJobContext;

impl<Args: Sync> FromRequest<Task<Args>> for JobContext {
    type Error = NoJobContext;

    async fn from_request(task: &Task<Args>) -> Result<Self, NoJobContext> {
        task.ctx()
            .data()
            .get::<Arc<Entry>>()
            .map(|e| e.ctx.clone())
            .ok_or(NoJobContext)
    }
}

pub type HandlerResult = Result<(), JobError>;

type KindService =
    Arc<dyn Fn(Task<Job>) -> BoxFuture<'static, Result<(), BoxDynError>> + Send + Sync>;
type BoxedDeadHook = Arc<dyn Fn(Uuid, Job, String) -> BoxFuture<'static, ()> + Send + Sync>;

/// How long a dead-letter hook may take before the job is dead-lettered anyway.
const DEAD_HOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Task functions by job kind. A worker consumes the queues of the kinds it has handlers for.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<&'static str, (Queue, KindService)>,
    dead_hooks: HashMap<&'static str, BoxedDeadHook>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register the handler of kind `J`: it becomes an apalis task function of `(J,
    /// JobContext)`.
    pub fn register<J, F, Fut>(&mut self, handler: F) -> &mut Self
    where
        J: JobKind,
        F: Fn(JobContext, J) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let service = task_fn(move |job: J, ctx: JobContext| {
            let handler = handler.clone();
            async move { handler(ctx, job).await }
        });
        let boxed: KindService = Arc::new(move |task: Task<Job>| {
            let mut service = service.clone();
            match task.try_map_args(|job| J::from_job(job).ok_or(WrongKind)) {
                Ok(task) => service.call(task),
                Err(e) => Box::pin(async move { Err(BoxDynError::from(e)) }),
            }
        });
        self.handlers.insert(J::NAME, (J::QUEUE, boxed));
        self
    }

    /// The home queues of the registered kinds (what a worker consumes by default).
    pub fn queues(&self) -> Vec<Queue> {
        let mut qs: Vec<Queue> = self.handlers.values().map(|(q, _)| *q).collect();
        qs.sort();
        qs.dedup();
        qs
    }

    pub fn kinds(&self) -> Vec<&'static str> {
        let mut k: Vec<&'static str> = self.handlers.keys().copied().collect();
        k.sort_unstable();
        k
    }

    /// Register what to do when a job of kind `J` is dead-lettered *without* its handler having
    /// ended it — it kept losing its worker, or failed for good — e.g. tell a waiting client.
    /// The hook gets the job and the last error; it runs before the job moves to the dead
    /// letters, bounded in time, and must be idempotent (the handler may have done it too).
    pub fn on_dead<J, F, Fut>(&mut self, hook: F) -> &mut Self
    where
        J: JobKind,
        F: Fn(Uuid, J, String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let hook = Arc::new(hook);
        let boxed: BoxedDeadHook = Arc::new(move |id: Uuid, job: Job, error: String| {
            let hook = hook.clone();
            Box::pin(async move {
                if let Some(j) = J::from_job(job) {
                    hook(id, j, error).await;
                }
            })
        });
        self.dead_hooks.insert(J::NAME, boxed);
        self
    }

    /// Run the dead-letter hook of the job's kind, if any (bounded by `DEAD_HOOK_TIMEOUT`).
    pub(super) async fn run_dead_hook(&self, env: &Envelope, error: &str) {
        if let Some(hook) = self.dead_hooks.get(env.job.name())
            && tokio::time::timeout(
                DEAD_HOOK_TIMEOUT,
                hook(env.id, env.job.clone(), error.to_owned()),
            )
            .await
            .is_err()
        {
            tracing::warn!("the dead-letter hook timed out");
        }
    }

    /// The service an apalis worker runs: each task goes to the task function of its kind.
    pub(super) fn dispatch(&self) -> Dispatch {
        Dispatch {
            handlers: Arc::new(
                self.handlers
                    .iter()
                    .map(|(k, (_, s))| (*k, s.clone()))
                    .collect(),
            ),
        }
    }
}

/// A task reached the task function of another kind.
#[derive(Debug, thiserror::Error)]
#[error("job routed to the wrong handler")]
struct WrongKind;

/// A task of a kind this worker has no task function for (another version of the workers
/// knows it): retried, so that a worker that does know it takes it.
#[derive(Debug, thiserror::Error)]
#[error("this worker has no handler for kind {0}")]
pub(super) struct UnknownKind(pub &'static str);

/// Routes a task to the task function of its kind (see [`Registry::register`]).
#[derive(Clone)]
pub(super) struct Dispatch {
    handlers: Arc<HashMap<&'static str, KindService>>,
}

impl Service<Task<Job>> for Dispatch {
    type Response = ();
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<(), BoxDynError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, task: Task<Job>) -> Self::Future {
        let kind = task.args.name();
        match self.handlers.get(kind) {
            Some(service) => service(task),
            None => Box::pin(async move { Err(BoxDynError::from(UnknownKind(kind))) }),
        }
    }
}

/// A wrong-kind routing is a bug that no retry fixes.
pub(super) fn is_wrong_kind(e: &(dyn std::error::Error + 'static)) -> bool {
    e.is::<WrongKind>()
}
