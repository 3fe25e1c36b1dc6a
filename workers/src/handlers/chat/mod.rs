//! `chat`: answer one user message — prompt → LiteLLM (streamed) → `token` events → one stored
//! assistant message and `message.completed` — with the rate-limit, cooldown and fallback
//! policy of SPEC §2 (docs/ARCHITECTURE.md, "The chat turn (worker side)").
//!
//! - [`prompt`]: prompt assembly ([`PromptBuilder`]);
//! - [`policy`]: model choice, model-wide cooldowns, when rate-limit waiting becomes an error;
//! - [`stream`]: one model call, its tokens published as they arrive;
//! - [`retrieval`]: hybrid retrieval of workspace data for the prompt, and citations;
//! - [`handler`]: the turn: restart and redelivery handling, fallback, completion, failures;
//! - [`memory`]: the summary and memory entries of the prompt, and the follow-up jobs;
//! - [`metrics`]: model and chat metrics;
//! - [`tools`], [`rounds`]: the tool registry and the tool rounds of a turn.

mod handler;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod prompt;
pub mod retrieval;
pub mod rounds;
mod stream;
pub mod tools;

use std::sync::Arc;
use std::time::Duration;

use jobs::events::EventPublisher;
use jobs::kinds::Chat;
use jobs::{RedisHandle, Registry};

pub use policy::Models;
pub use prompt::PromptBuilder;

/// Error codes of the `error` event (API.md "Conversations").
pub mod codes {
    /// Rate limits lasted longer than `RATE_LIMIT_MAX_WAIT_SECS`.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The primary and the fallback both failed before the first token.
    pub const MODEL_UNAVAILABLE: &str = "model_unavailable";
    /// The model failed after tokens had reached the client.
    pub const MODEL_STREAM_FAILED: &str = "model_stream_failed";
    /// Our own infrastructure (database, Redis) kept failing until the last attempt.
    pub const INTERNAL_ERROR: &str = "internal_error";
}

/// The `chat` handler; cheap to clone (one per job).
#[derive(Clone)]
pub struct ChatHandler {
    inner: Arc<Inner>,
}

struct Inner {
    db: sqlx::PgPool,
    events: EventPublisher,
    llm: llm::LlmClient,
    cooldowns: policy::Cooldowns,
    chat: config::ChatSettings,
    retrieval: config::RetrievalSettings,
    embedding: config::EmbeddingSettings,
    queue: config::QueueSettings,
    /// Memory: the prompt's summary and entries, follow-up jobs (summarize, remember).
    memory: config::MemorySettings,
    bus: jobs::Bus,
    tools: config::ToolsSettings,
    /// Upper bound of the model calls of one run (primary and fallback together):
    /// `litellm.request_timeout_secs`. (The bus's heartbeat keeps the job claimed meanwhile.)
    call_limit: Duration,
    /// A run's lease on its response (`LEDGER_LEASE_SECS`), renewed every third of it.
    lease: Duration,
}

impl ChatHandler {
    pub fn new(
        db: sqlx::PgPool,
        redis: Arc<RedisHandle>,
        settings: &config::Settings,
    ) -> Result<Self, llm::LlmError> {
        metrics::describe();
        retrieval::describe();
        tools::metrics::describe();
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                events: EventPublisher::new(redis.clone(), &settings.events),
                llm: llm::LlmClient::new(&settings.litellm)?,
                cooldowns: policy::Cooldowns::new(
                    redis.clone(),
                    Duration::from_secs(settings.chat.model_timeout_secs),
                ),
                chat: settings.chat.clone(),
                retrieval: settings.retrieval.clone(),
                embedding: settings.embedding.clone(),
                queue: settings.queues.chat.clone(),
                memory: settings.memory.clone(),
                bus: jobs::Bus::new(redis.clone(), &settings.queues),
                tools: settings.tools.clone(),
                call_limit: Duration::from_secs(settings.litellm.request_timeout_secs),
                lease: Duration::from_secs(settings.ledger.lease_secs),
            }),
        })
    }

    /// Register this handler for `chat` jobs.
    pub fn register(self, registry: &mut Registry) {
        let dead = self.clone();
        registry.register::<Chat, _, _>(move |ctx, job| {
            let h = self.clone();
            async move { h.run(ctx, job).await }
        });
        // A turn whose job dies without its handler ending it (it kept losing its worker, or a
        // handler failure) still ends for the client, with an `error` event.
        registry.on_dead::<Chat, _, _>(move |job_id, job, _error| {
            let h = dead.clone();
            async move { h.give_up(job_id, &job).await }
        });
    }
}
