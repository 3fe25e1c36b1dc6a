//! `chat`: answer one user message — prompt → LiteLLM (streamed) → `token` events → one stored
//! assistant message and `message.completed` — with the rate-limit, cooldown and fallback
//! policy of docs/ARCHITECTURE.md, "The chat turn (worker side)".
//!
//! A turn, in the order it runs (each part owns only what it uses):
//! 1. [`run`]: the entry (`ChatHandler::run`): take the response and its fence
//!    (`crate::ledger`), admit the first model, then the steps below, the primary and the
//!    fallback once, waits on rate limits;
//! 2. [`context`]: the turn-context loader — the recent window, [`retrieval`], [`memory`]
//!    (summary and entries), the response's own tool exchange, assembled by [`prompt`];
//! 3. `crate::model`: the model caller — cooldowns, model choice, the streamed call and its
//!    tokens, error classes, metrics; `crate::tools::rounds` repeats its calls while the model
//!    calls tools;
//! 4. [`outcome`]: complete or fail, and the terminal event (`crate::follow_ups` after an
//!    answer).

pub mod context;
pub mod memory;
pub mod outcome;
pub mod prompt;
pub mod retrieval;
mod run;

use std::sync::Arc;
use std::time::Duration;

use jobs::kinds::Chat;
use jobs::{RedisHandle, Registry};

pub use prompt::PromptBuilder;

use crate::follow_ups::FollowUps;
use crate::ledger::Ledger;
use crate::model::{ModelCaller, QueryEmbedder};
use crate::tools::rounds::ToolRounds;

/// The `chat` handler; cheap to clone (one per job).
#[derive(Clone)]
pub struct ChatHandler {
    parts: Arc<Parts>,
}

/// The parts of a turn, and the two settings the entry itself reads.
struct Parts {
    ledger: Ledger,
    context: context::ContextLoader,
    model: ModelCaller,
    tools: ToolRounds,
    outcome: outcome::Outcome,
    /// The chat queue's retry settings (attempts; the jitter of rate-limit waits).
    queue: config::QueueSettings,
    /// `RATE_LIMIT_MAX_WAIT_SECS`.
    rate_limit_max_wait: Duration,
}

impl ChatHandler {
    pub fn new(
        db: sqlx::PgPool,
        redis: Arc<RedisHandle>,
        settings: &config::Settings,
    ) -> Result<Self, llm::LlmError> {
        let llm = llm::LlmClient::new(&settings.litellm)?;
        let ledger = Ledger::new(db.clone(), redis.clone(), settings);
        let embedder = QueryEmbedder::new(llm.clone(), db.clone(), settings);
        let follow_ups = FollowUps::new(
            db.clone(),
            jobs::Bus::new(redis.clone(), &settings.queues),
            settings,
        );
        Ok(Self {
            parts: Arc::new(Parts {
                context: context::ContextLoader::new(
                    db.clone(),
                    embedder.clone(),
                    follow_ups.clone(),
                    settings,
                ),
                model: ModelCaller::new(llm, redis, settings),
                tools: ToolRounds::new(db.clone(), embedder, settings),
                outcome: outcome::Outcome::new(db, ledger.clone(), follow_ups),
                ledger,
                queue: settings.queues.chat.clone(),
                rate_limit_max_wait: Duration::from_secs(settings.chat.rate_limit_max_wait_secs),
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
            async move { h.parts.outcome.give_up(job_id, &job).await }
        });
    }
}
