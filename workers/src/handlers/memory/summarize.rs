//! `summarize`: fold a conversation's messages older than the `RECENT_MESSAGES` window into
//! its running summary.
//!
//! Race safety: the run claims the conversation's summary with a lease
//! (`store::memory::claim_summary`; no row lock, and no connection held across the model call)
//! and folds exactly the messages with seq in `(summarized_up_to, new_up_to]`, so one run at a
//! time calls the model and no message is folded twice. A concurrent run finds the lease and
//! ends; nothing it came for is lost, because the running one, after its write, counts what is
//! still unsummarized beyond the window and enqueues the next run when that reaches
//! `SUMMARIZE_THRESHOLD` (or when its own batch was cut short). The write is a compare-and-set
//! on `summarized_up_to` that ends the lease; a run whose model call fails ends it without
//! writing, leaving the summary as it was, and is retried. A run lost with its worker keeps the
//! lease until it expires or the bus redelivers the same job, which takes its lease back.

use std::time::Duration;

use jobs::JobContext;
use jobs::kinds::Summarize;
use jobs::worker::HandlerResult;
use store::conversations::Message;
use store::memory;

use super::{MemoryHandlers, SUMMARIES, db_error, find_conversation, truncate_chars};

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

/// End a run's claim after a failure, so that the retry (or another run) need not wait for the
/// lease to expire; if even that fails, the lease expires by itself.
async fn release(conn: &mut sqlx::PgConnection, conversation_id: uuid::Uuid, job_id: uuid::Uuid) {
    if let Err(e) = memory::release_summary(conn, conversation_id, job_id).await {
        tracing::warn!(error = %e, "cannot end the summary's claim; it expires by itself");
    }
}

impl MemoryHandlers {
    /// How long a summarize run's claim lasts: past its longest model call (the primary and the
    /// fallback, each bounded by the call limit), plus a margin for the reads and the write.
    fn summary_lease(&self) -> Duration {
        self.inner.model.call_limit() * 2 + Duration::from_secs(30)
    }

    /// After a run: enqueue the next one when `more` (its batch was cut short) or when what is
    /// unsummarized beyond the window — counted now, so the turns of runs that found this one
    /// busy count too — reaches `SUMMARIZE_THRESHOLD`. Best effort: otherwise the next turn's
    /// count enqueues it again; a failed count enqueues anyway (a run with nothing to do is
    /// cheap).
    async fn follow_up(&self, conn: &mut sqlx::PgConnection, job: &Summarize, more: bool) {
        let inner = &self.inner;
        let again = more
            || {
                let keep_recent = i64::try_from(inner.recent_messages).unwrap_or(i64::MAX);
                let threshold = i64::try_from(inner.memory.summarize_threshold).unwrap_or(i64::MAX);
                match memory::unsummarized_beyond_window(
                    conn,
                    job.conversation_id.into(),
                    keep_recent,
                )
                .await
                {
                    Ok(backlog) => backlog >= threshold,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot count the summary's backlog; enqueueing the next run");
                        true
                    }
                }
            };
        if again && let Err(e) = inner.bus.enqueue(job.clone()).await {
            tracing::warn!(error = %e, "cannot enqueue the next summarize run");
        }
    }

    #[tracing::instrument(
        name = "summarize",
        skip_all,
        fields(job_id = %ctx.id, conversation_id = %job.conversation_id, attempt = ctx.attempt)
    )]
    pub async fn summarize(&self, ctx: JobContext, job: Summarize) -> HandlerResult {
        let inner = &self.inner;
        let mut conn = inner.db.acquire().await.map_err(db_error)?;
        let Some(conversation) =
            find_conversation(&mut conn, job.conversation_id.into(), "summarize").await?
        else {
            return Ok(());
        };
        let claim = memory::claim_summary(&mut conn, conversation.id, ctx.id, self.summary_lease())
            .await
            .map_err(db_error)?;
        let state = match claim {
            memory::SummaryClaim::Claimed(state) => state,
            memory::SummaryClaim::Busy => {
                // the running one re-checks the backlog after its write
                metrics::counter!(SUMMARIES, "outcome" => "busy").increment(1);
                tracing::info!("another summarize run folds this conversation now");
                return Ok(());
            }
            memory::SummaryClaim::Gone => {
                tracing::info!("the conversation is gone; nothing to summarize");
                return Ok(());
            }
        };
        let batch = memory::messages_to_fold(
            &mut conn,
            conversation.id,
            state.summarized_up_to,
            i64::try_from(inner.recent_messages).unwrap_or(i64::MAX),
            i64::try_from(inner.memory.summarize_batch).unwrap_or(i64::MAX),
        )
        .await;
        let (mut batch, mut given): (Vec<Message>, Vec<bool>) = match batch {
            Ok(batch) => batch.into_iter().map(|f| (f.message, f.given)).unzip(),
            Err(e) => {
                release(&mut conn, conversation.id, ctx.id).await;
                return Err(db_error(e));
            }
        };
        let fetched = batch.len();
        batch.truncate(fold_count(&batch));
        given.truncate(batch.len());
        // the messages whose text the model gets: their sources go into the summary's
        // provenance even if one turns invisible during the model call
        let given: Vec<uuid::Uuid> = batch
            .iter()
            .zip(&given)
            .filter(|(_, given)| **given)
            .map(|(m, _)| m.id)
            .collect();
        // more waits beyond this run's bounds: a follow-up run continues after the write
        let more = batch.len() < fetched || fetched >= inner.memory.summarize_batch;
        let Some(up_to) = batch.last().map(|m| m.seq) else {
            release(&mut conn, conversation.id, ctx.id).await;
            metrics::counter!(SUMMARIES, "outcome" => "nothing_new").increment(1);
            tracing::info!("nothing new to summarize");
            // a run that found this one busy meanwhile may have come for new messages
            self.follow_up(&mut conn, &job, false).await;
            return Ok(());
        };
        let (summary, model) = match summarize_prompt(&state.summary, &batch) {
            Some(prompt) => {
                // no connection held across the model call
                drop(conn);
                let answer = self.complete_text(conversation.org_id, prompt).await;
                conn = inner.db.acquire().await.map_err(db_error)?;
                match answer {
                    Ok((text, model)) => (
                        truncate_chars(text.trim(), inner.memory.summary_max_chars).to_owned(),
                        model,
                    ),
                    Err(e) => {
                        release(&mut conn, conversation.id, ctx.id).await;
                        return Err(e);
                    }
                }
            }
            // only tool traffic: advance over it, the summary stays
            None => (state.summary.clone(), String::new()),
        };
        let written = memory::save_summary(
            &mut conn,
            conversation.id,
            ctx.id,
            state.summarized_up_to,
            &summary,
            up_to,
            &model,
            &given,
        )
        .await
        .map_err(db_error)?;
        if !written {
            // this run's lease ran out and another job took the claim: that run's fold stands
            metrics::counter!(SUMMARIES, "outcome" => "superseded").increment(1);
            tracing::warn!("the summary moved on during this run; its fold is dropped");
            return Ok(());
        }
        metrics::counter!(SUMMARIES, "outcome" => "folded").increment(1);
        self.follow_up(&mut conn, &job, more).await;
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
