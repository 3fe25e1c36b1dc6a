//! `summarize`: fold a conversation's messages older than the `RECENT_MESSAGES` window into
//! its running summary.
//!
//! Race safety: the run locks the conversation's summary row (`SELECT ... FOR UPDATE`) for its
//! whole transaction — model call included — and folds exactly the messages with seq in
//! `(summarized_up_to, new_up_to]`. A concurrent run waits on the lock, then finds nothing new
//! (or only what arrived since), so no message is folded twice or lost; a run that fails
//! rolls back and leaves the summary as it was. One run folds a bounded batch; when more waits,
//! it enqueues the next run after its commit.

use jobs::JobContext;
use jobs::kinds::Summarize;
use jobs::worker::HandlerResult;
use store::conversations::Message;
use store::memory;

use super::{MemoryHandlers, SUMMARIES, db_error, truncate_chars};

/// The summarizer's instructions.
pub const SUMMARIZE_PROMPT: &str = "\
You maintain the running summary of a conversation between a user and Switchboard, the \
assistant of a work-management application. You get the current summary (possibly empty) and \
the messages that follow it. Answer with the updated summary only: a concise, factual account \
of what was discussed, decided and asked for, the user's goals and preferences, names of \
projects and tasks, and open questions. Keep what still matters from the current summary, drop \
small talk, do not invent anything, and write no preamble.";

/// A message's text in the summarizer's input is cut to this many characters.
const MESSAGE_MAX_CHARS: usize = 4000;
/// One run folds messages until their text reaches this many characters (at least one
/// message); the rest waits for the next run, which the next turn enqueues.
pub const INPUT_MAX_CHARS: usize = 24_000;

/// How many of `batch` (oldest first) one run folds: the longest prefix whose text fits
/// [`INPUT_MAX_CHARS`], at least one.
pub fn fold_count(batch: &[Message]) -> usize {
    let mut total = 0usize;
    for (i, m) in batch.iter().enumerate() {
        total += m.content.chars().count().min(MESSAGE_MAX_CHARS);
        if i > 0 && total > INPUT_MAX_CHARS {
            return i;
        }
    }
    batch.len()
}

/// The summarizer's input: the current summary, then the messages to fold (tool-call turns and
/// tool results left out; they are folded over all the same).
pub fn summarize_prompt(current: &str, messages: &[Message]) -> Option<Vec<llm::Message>> {
    let mut lines = Vec::new();
    for m in messages.iter().filter(|m| m.tool_calls.is_none()) {
        let who = match m.role.as_str() {
            "user" => "User",
            "assistant" => "Assistant",
            _ => continue,
        };
        let text = truncate_chars(m.content.trim(), MESSAGE_MAX_CHARS);
        if !text.is_empty() {
            lines.push(format!("{who}: {text}"));
        }
    }
    if lines.is_empty() {
        return None;
    }
    let current = if current.trim().is_empty() {
        "(none yet)"
    } else {
        current.trim()
    };
    Some(vec![
        llm::Message::system(SUMMARIZE_PROMPT),
        llm::Message::user(format!(
            "Current summary:\n{current}\n\nMessages that follow it:\n{}",
            lines.join("\n")
        )),
    ])
}

impl MemoryHandlers {
    #[tracing::instrument(
        name = "summarize",
        skip_all,
        fields(job_id = %ctx.id, conversation_id = %job.conversation_id, attempt = ctx.attempt)
    )]
    pub async fn summarize(&self, ctx: JobContext, job: Summarize) -> HandlerResult {
        let inner = &self.inner;
        let mut tx = inner.db.begin().await.map_err(db_error)?;
        let Some(conversation) = store::conversations::get(&mut tx, job.conversation_id)
            .await
            .map_err(db_error)?
        else {
            tracing::info!("the conversation is gone; nothing to summarize");
            return Ok(());
        };
        let state = memory::lock_summary(&mut tx, conversation.id)
            .await
            .map_err(db_error)?;
        let batch = memory::messages_to_fold(
            &mut tx,
            conversation.id,
            state.summarized_up_to,
            i64::try_from(inner.chat.recent_messages).unwrap_or(i64::MAX),
            i64::try_from(inner.memory.summarize_batch).unwrap_or(i64::MAX),
        )
        .await
        .map_err(db_error)?;
        let mut batch = batch;
        let fetched = batch.len();
        batch.truncate(fold_count(&batch));
        // more waits beyond this run's bounds: a follow-up run continues after the commit
        let more = batch.len() < fetched || fetched >= inner.memory.summarize_batch;
        let Some(up_to) = batch.last().map(|m| m.seq) else {
            tx.commit().await.map_err(db_error)?;
            metrics::counter!(SUMMARIES, "outcome" => "nothing_new").increment(1);
            tracing::info!("nothing new to summarize");
            return Ok(());
        };
        let (summary, model) = match summarize_prompt(&state.summary, &batch) {
            Some(prompt) => {
                let (text, model) = self.complete_text(conversation.org_id, prompt).await?;
                (
                    truncate_chars(text.trim(), inner.memory.summary_max_chars).to_owned(),
                    model,
                )
            }
            // only tool traffic: advance over it, the summary stays
            None => (state.summary.clone(), String::new()),
        };
        memory::save_summary(&mut tx, conversation.id, &summary, up_to, &model)
            .await
            .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        metrics::counter!(SUMMARIES, "outcome" => "folded").increment(1);
        if more {
            // best effort: otherwise the next turn's count enqueues it again
            if let Err(e) = inner.bus.enqueue(job.clone()).await {
                tracing::warn!(error = %e, "cannot enqueue the next summarize run");
            }
        }
        tracing::info!(
            folded = batch.len(),
            from = state.summarized_up_to,
            up_to,
            "summary updated"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(content: String, seq: i64) -> Message {
        Message {
            id: uuid::Uuid::now_v7(),
            conversation_id: uuid::Uuid::nil(),
            seq,
            role: "user".into(),
            content,
            response_id: None,
            model: None,
            prompt_tokens: None,
            completion_tokens: None,
            latency_ms: None,
            tool_calls: None,
            tool_call_id: None,
            citations: serde_json::json!([]),
            created_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn one_run_folds_a_bounded_prefix() {
        let small: Vec<Message> = (0..10).map(|i| msg("hello".into(), i)).collect();
        assert_eq!(fold_count(&small), 10);
        let big: Vec<Message> = (0..10).map(|i| msg("x".repeat(4000), i)).collect();
        assert_eq!(fold_count(&big), INPUT_MAX_CHARS / 4000);
        // a long message counts with its cut length
        let huge: Vec<Message> = (0..10).map(|i| msg("y".repeat(100_000), i)).collect();
        assert_eq!(fold_count(&huge), INPUT_MAX_CHARS / 4000);
        assert_eq!(fold_count(&[]), 0);
    }
}
