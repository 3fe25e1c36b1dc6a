//! What a chat turn asks of the memory queue (docs/ARCHITECTURE.md, "Memory"): after a new
//! answer, `remember` and, past the threshold, `summarize`; before a prompt, the rebuild of a
//! summary that drew on a source its user can no longer see. Best effort: a failure is logged
//! and counted, never fails the turn.

use jobs::kinds::{Remember, Summarize};
use uuid::Uuid;

/// Summarize runs by outcome (the `summarize` handler's, and `reset` here).
pub const SUMMARIES: &str = "memory_summaries_total";
pub const FOLLOW_UP_FAILURES: &str = "chat_follow_up_enqueue_failures_total";

/// Enqueues the memory follow-ups of chat turns.
#[derive(Clone)]
pub struct FollowUps {
    db: sqlx::PgPool,
    bus: jobs::Bus,
    memory: config::MemorySettings,
    /// `RECENT_MESSAGES`: what falls out of this window unsummarized counts for `summarize`.
    recent_messages: usize,
}

impl FollowUps {
    pub fn new(db: sqlx::PgPool, bus: jobs::Bus, settings: &config::Settings) -> Self {
        Self {
            db,
            bus,
            memory: settings.memory.clone(),
            recent_messages: settings.chat.recent_messages,
        }
    }

    /// Enqueue a `summarize` of the conversation; a failure is counted and logged as "cannot
    /// enqueue `what`". True when it was enqueued.
    async fn enqueue_summarize(&self, conversation_id: Uuid, what: &str) -> bool {
        let job = Summarize {
            conversation_id: conversation_id.into(),
        };
        match self.bus.enqueue(job).await {
            Ok(_) => true,
            Err(e) => {
                metrics::counter!(FOLLOW_UP_FAILURES, "kind" => "summarize").increment(1);
                tracing::warn!(error = %e, "cannot enqueue {what}");
                false
            }
        }
    }

    /// Reset a summary that drew on a source its user can no longer see and enqueue a fold
    /// that rebuilds it without that source. Until it is rebuilt the prompt simply has no
    /// summary.
    pub async fn rebuild_summary(
        &self,
        conn: &mut sqlx::PgConnection,
        user_id: Uuid,
        conversation_id: Uuid,
    ) {
        match store::memory::reset_hidden_summary(conn, user_id, conversation_id).await {
            Ok(true) => {
                metrics::counter!(SUMMARIES, "outcome" => "reset").increment(1);
                if self
                    .enqueue_summarize(conversation_id, "the summary's rebuild")
                    .await
                {
                    tracing::info!("the summary drew on a source no longer visible; rebuilding it");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot reset the summary"),
        }
    }

    /// After a new answer was committed: `remember` (fact extraction) and, when enough
    /// messages fell out of the recent window unsummarized, `summarize`.
    pub async fn after_answer(
        &self,
        conversation_id: Uuid,
        user_id: Uuid,
        org_id: Uuid,
        answer_id: Uuid,
    ) {
        if self.memory.remember {
            let job = Remember {
                conversation_id: conversation_id.into(),
                message_id: answer_id.into(),
                user_id: user_id.into(),
                org_id: org_id.into(),
            };
            if let Err(e) = self.bus.enqueue(job).await {
                metrics::counter!(FOLLOW_UP_FAILURES, "kind" => "remember").increment(1);
                tracing::warn!(error = %e, "cannot enqueue remember");
            }
        }
        let pending = async {
            let mut conn = self.db.acquire().await.map_err(store::StoreError::from)?;
            store::memory::unsummarized_beyond_window(
                &mut conn,
                conversation_id,
                i64::try_from(self.recent_messages).unwrap_or(i64::MAX),
            )
            .await
        };
        match pending.await {
            Ok(n) if n >= i64::try_from(self.memory.summarize_threshold).unwrap_or(i64::MAX) => {
                if self.enqueue_summarize(conversation_id, "summarize").await {
                    tracing::info!(unsummarized = n, "summarize enqueued");
                }
            }
            Ok(_) => {}
            Err(e) => {
                metrics::counter!(FOLLOW_UP_FAILURES, "kind" => "summarize").increment(1);
                tracing::warn!(error = %e, "cannot count unsummarized messages");
            }
        }
    }
}
