//! The turn-context loader: everything the prompt of a turn needs, read before the first model
//! call — the response's start (org models, whether there is an index, a stored tool exchange,
//! proposals) and the recent window, then the retrieved chunks ([`super::retrieval`]), the
//! summary and memories ([`super::memory`]) and the response's own tool exchange, assembled
//! by [`super::prompt::PromptBuilder`] — with what the answer will record of them.

use std::time::Duration;

use jobs::kinds::Chat;
use jobs::{JobContext, JobError};
use serde_json::Value;
use store::conversations::{self as conv, Message};
use store::responses::{self, TurnStart};
use uuid::Uuid;

use super::prompt::PromptBuilder;
use super::retrieval::Question;
use crate::follow_ups::FollowUps;
use crate::handlers::db_error;
use crate::model::QueryEmbedder;
use crate::tools::rounds::{proposal_answer, with_exchange};

/// Loads the context of chat turns: the database, the query embedder, and the settings of the
/// recent window, retrieval and the memory budget.
pub struct ContextLoader {
    pub(super) db: sqlx::PgPool,
    pub(super) embedder: QueryEmbedder,
    pub(super) retrieval: config::RetrievalSettings,
    /// `MEMORY_TOKEN_BUDGET`.
    pub(super) memory_budget: usize,
    /// A summary that turned invisible is rebuilt.
    pub(super) follow_ups: FollowUps,
    /// `RECENT_MESSAGES`.
    recent_messages: usize,
}

/// What an answer records besides its text: the citations of the chunks it was given and its
/// provenance (docs/ARCHITECTURE.md, "Provenance").
pub struct TurnRecord {
    pub citations: Value,
    pub provenance: store::provenance::Provenance,
    pub given: Value,
    /// The recent window (the answer inherits its messages' provenance).
    pub context: Vec<Uuid>,
}

/// What a turn's model calls start from.
pub struct TurnContext {
    /// The prompt.
    pub messages: Vec<llm::Message>,
    pub record: TurnRecord,
    /// Tool rounds this response already stored (a restarted turn resumes after them).
    pub rounds_done: u32,
    /// The answer of a restarted turn whose proposals are already stored.
    pub proposed: Option<String>,
}

/// A response's stored tool exchange, its rounds and its proposals.
#[derive(Default)]
struct OwnExchange {
    messages: Vec<Message>,
    rounds: u32,
    proposed: Vec<store::actions::Action>,
}

impl ContextLoader {
    pub fn new(
        db: sqlx::PgPool,
        embedder: QueryEmbedder,
        follow_ups: FollowUps,
        settings: &config::Settings,
    ) -> Self {
        super::retrieval::describe();
        Self {
            db,
            embedder,
            retrieval: settings.retrieval.clone(),
            memory_budget: settings.memory.token_budget,
            follow_ups,
            recent_messages: settings.chat.recent_messages,
        }
    }

    /// Two independent reads at once, each on its own pooled connection: the take of the
    /// response (the ledger's compare-and-set, for `lease`) with everything else a run needs
    /// to know first (org models, whether there is an index, a tool exchange, proposals), and
    /// the recent window.
    pub async fn start(
        &self,
        ctx: &JobContext,
        job: &Chat,
        lease: Duration,
    ) -> (
        Result<Option<TurnStart>, store::StoreError>,
        Result<Vec<Message>, store::StoreError>,
    ) {
        let recent_n = i64::try_from(self.recent_messages).unwrap_or(i64::MAX);
        tokio::join!(
            async {
                let mut conn = self.db.acquire().await?;
                responses::take(
                    &mut conn,
                    &responses::JobTurn {
                        job_id: ctx.id.into(),
                        user_id: job.user_id,
                        org_id: job.org_id,
                        conversation_id: job.conversation_id,
                        response_id: job.response_id,
                    },
                    &self.embedder.model,
                    lease,
                )
                .await
            },
            async {
                let mut conn = self.db.acquire().await?;
                conv::recent_messages(
                    &mut conn,
                    job.conversation_id.into(),
                    job.message_id.into(),
                    recent_n,
                )
                .await
            }
        )
    }

    /// The prompt of the turn answering the last message of `recent`, and its record.
    pub async fn load(
        &self,
        job: &Chat,
        start: &TurnStart,
        recent: Vec<Message>,
    ) -> Result<TurnContext, JobError> {
        // Retrieval, memory and this response's own tool exchange are independent reads; the
        // question is embedded once, and only if retrieval or memory has something to rank.
        let question = Question::new(
            job.org_id.into_uuid(),
            recent
                .last()
                .map(|m| m.content.as_str())
                .unwrap_or_default(),
        );
        let (retrieved, memory, exchange) = tokio::join!(
            self.retrieve(job, &recent, &question, start.has_index),
            self.memory_context(job, &question),
            self.own_exchange(start)
        );
        let (retrieved, memory, exchange) = (retrieved?, memory?, exchange?);
        // Provenance: what this turn gives the model besides its recent window (whose own
        // provenance, and that of the tool results, `conv::complete` adds).
        let mut sources = store::provenance::TurnSources::new();
        for c in &retrieved.chunks {
            sources.chunk(c);
        }
        for m in &memory.entries {
            sources.memory(m);
        }
        if memory.summary.is_some() {
            sources.summary(&memory.summary_provenance);
        }
        let record = TurnRecord {
            citations: retrieved.citations(),
            provenance: sources.provenance(),
            given: sources.given(),
            context: recent.iter().map(|m| m.id).collect(),
        };
        let recent = with_exchange(recent, exchange.messages);
        let messages = PromptBuilder::new()
            .memories(memory.memories)
            .summary(memory.summary)
            .retrieved(&retrieved.chunks)
            .recent_messages(&recent)
            .build();
        Ok(TurnContext {
            messages,
            record,
            rounds_done: exchange.rounds,
            proposed: (!exchange.proposed.is_empty()).then(|| proposal_answer(&exchange.proposed)),
        })
    }

    /// What this response already stored of its tool exchange (the rounds of a restarted
    /// turn, the decided proposal of a continuation) and its proposals; no query when the turn
    /// start saw none.
    async fn own_exchange(&self, start: &TurnStart) -> Result<OwnExchange, JobError> {
        let mut own = OwnExchange::default();
        if !start.has_exchange && !start.has_proposals {
            return Ok(own);
        }
        let mut conn = self.db.acquire().await.map_err(db_error)?;
        if start.has_exchange {
            let (messages, rounds) =
                store::actions::response_exchange(&mut conn, start.response.id.into())
                    .await
                    .map_err(db_error)?;
            own.messages = messages;
            own.rounds = u32::try_from(rounds).unwrap_or(0);
        }
        if start.has_proposals {
            own.proposed = store::actions::list_for_response(&mut conn, start.response.id.into())
                .await
                .map_err(db_error)?;
        }
        Ok(own)
    }
}
