//! Tool rounds of a chat turn (docs/ARCHITECTURE.md, "Scope and tools"): the model caller's
//! calls, repeated while the model calls tools.
//!
//! A model call that answers with tool calls starts a round: read calls run at once with the
//! user's visibility, write calls become proposals, invalid calls get a tool error; the
//! assistant's calls and one result per call are stored together (once per response and round),
//! and the model is called again with them — at most `TOOL_MAX_ROUNDS` rounds, after which the
//! model is called without tools. A round that proposed something ends the turn: each proposal
//! is announced with `action.proposed` and the answer asks the user to confirm (published as one
//! `token`, then stored as usual); no further model call happens.
//!
//! A restarted turn (lost worker, redelivered job) resumes after the rounds already stored and
//! never repeats a proposal (unique per response and tool call).
//!
//! Text a model streams along with tool calls goes out as `token`s like any other text and is
//! kept on the round's assistant message; the final message holds the last call's text only.

use std::collections::HashMap;
use std::time::Duration;

use jobs::JobError;
use jobs::events::ResponseEvent;
use serde_json::{Value, json};
use store::actions::{self, Action, NewProposal, Round};
use store::conversations::Message as StoredMessage;
use uuid::Uuid;

use super::{ToolCtx, ToolError, ToolKind, metrics};
use crate::handlers::db_error;
use crate::ledger::Run;
use crate::model::embed::MAX_QUERY_CHARS;
use crate::model::{Answered, CallOutcome, ModelCaller, QueryEmbedder};

/// The answer when the model still calls tools after the last round.
pub const ROUND_LIMIT_MESSAGE: &str = "I could not finish looking this up within the allowed number of steps. Please narrow the question down.";

/// The result of a call that failed with `e`, counted for `tool` under `outcome`.
fn failed(tool: &str, outcome: &'static str, e: &ToolError) -> String {
    metrics::tool_call(tool, outcome);
    e.to_result()
}

/// Runs the tool rounds of chat turns: the database, the query embedder (`search_knowledge`)
/// and `[tools]`.
#[derive(Clone)]
pub struct ToolRounds {
    db: sqlx::PgPool,
    embedder: QueryEmbedder,
    tools: config::ToolsSettings,
}

/// The tool state of one run of a turn.
pub struct ToolTurn {
    pub ctx: ToolCtx,
    pub response_id: Uuid,
    /// The prompt so far (grows by each round).
    pub messages: Vec<llm::Message>,
    pub rounds_done: u32,
    /// A restarted turn whose proposals are already stored answers with this at once.
    pub proposed: Option<String>,
}

/// The answer that ends a turn that proposed `actions`.
pub fn proposal_answer(actions: &[Action]) -> String {
    let mut text = String::from(
        "I have prepared the following change for you. Nothing has been changed yet: please confirm or reject it.\n",
    );
    for a in actions {
        text.push_str(&format!("\n- {}", a.summary));
    }
    text
}

/// The `action` of an `action.proposed` event.
pub fn proposed_event(a: &Action) -> ResponseEvent {
    ResponseEvent::ActionProposed {
        action: json!({"id": a.id, "tool": a.tool, "arguments": a.arguments, "summary": a.summary}),
    }
}

/// The prompt form of stored history: user and assistant messages in order, and each tool
/// exchange (an assistant message with `tool_calls` followed by one `tool` result per call)
/// only when every call's result is in `messages` — the window may cut a call from its result,
/// and a proposal waits for its decision; a lone half confuses models. Results follow their
/// call directly (the last stored result of a call wins).
pub fn history(messages: &[StoredMessage]) -> Vec<llm::Message> {
    let mut results: HashMap<&str, &StoredMessage> = HashMap::new();
    for m in messages.iter().filter(|m| m.role == "tool") {
        if let Some(id) = m.tool_call_id.as_deref() {
            results.insert(id, m);
        }
    }
    let mut out = Vec::with_capacity(messages.len());
    for m in messages {
        match (m.role.as_str(), &m.tool_calls) {
            ("user", _) => out.push(llm::Message::user(m.content.clone())),
            ("assistant", None) => out.push(llm::Message::assistant(m.content.clone())),
            ("assistant", Some(calls)) => {
                let Some(calls) = calls.as_array().filter(|c| !c.is_empty()) else {
                    continue;
                };
                let ids: Vec<&str> = calls
                    .iter()
                    .map(|c| c.get("id").and_then(Value::as_str).unwrap_or(""))
                    .collect();
                if !ids.iter().all(|id| results.contains_key(id)) {
                    continue;
                }
                out.push(llm::Message {
                    role: "assistant".into(),
                    content: (!m.content.is_empty()).then(|| m.content.clone()),
                    tool_calls: Some(calls.clone()),
                    tool_call_id: None,
                    name: None,
                });
                for id in ids {
                    if let Some(r) = results.get(id) {
                        out.push(tool_message(id, &r.content));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

fn tool_message(call_id: &str, content: &str) -> llm::Message {
    llm::Message {
        role: "tool".into(),
        content: Some(content.to_owned()),
        tool_calls: None,
        tool_call_id: Some(call_id.to_owned()),
        name: None,
    }
}

/// `recent` followed by the response's own stored exchange (rounds of a restarted turn, or the
/// decided proposal of a continuation), without duplicates, in order.
pub fn with_exchange(
    mut recent: Vec<StoredMessage>,
    exchange: Vec<StoredMessage>,
) -> Vec<StoredMessage> {
    for m in exchange {
        if !recent.iter().any(|r| r.id == m.id) {
            recent.push(m);
        }
    }
    recent.sort_by_key(|m| m.seq);
    recent
}

impl ToolRounds {
    pub fn new(db: sqlx::PgPool, embedder: QueryEmbedder, settings: &config::Settings) -> Self {
        metrics::describe();
        Self {
            db,
            embedder,
            tools: settings.tools.clone(),
        }
    }

    /// Call `model` through `caller`, running tool rounds until it answers with text (or the
    /// turn proposed something, or the rounds ran out).
    pub async fn call_with_tools(
        &self,
        run: &Run,
        caller: &ModelCaller,
        model: &str,
        tt: &mut ToolTurn,
    ) -> Result<CallOutcome, JobError> {
        if let Some(text) = tt.proposed.take() {
            run.stream_text(&text).await?;
            return Ok(CallOutcome::Answered(Answered {
                model: model.to_owned(),
                text,
                usage: None,
                latency: Duration::ZERO,
                tool_calls: Vec::new(),
            }));
        }
        // every round's tokens count (the turn's usage, against the org's budget), not only the
        // last call's
        let mut spent: Option<llm::Usage> = None;
        loop {
            let offer = tt.rounds_done < self.tools.max_rounds;
            let defs = if offer {
                super::definitions()
            } else {
                Vec::new()
            };
            let outcome = caller.stream(run, model, &tt.messages, &defs).await?;
            let CallOutcome::Answered(mut a) = outcome else {
                return Ok(outcome);
            };
            spent = add_usage(spent, a.usage);
            a.usage = spent;
            if a.tool_calls.is_empty() {
                return Ok(CallOutcome::Answered(a));
            }
            if !offer {
                tracing::warn!(
                    rounds = tt.rounds_done,
                    "the model still calls tools after the last round"
                );
                if a.text.trim().is_empty() {
                    a.text = ROUND_LIMIT_MESSAGE.to_owned();
                    run.stream_text(&a.text).await?;
                }
                a.tool_calls.clear();
                return Ok(CallOutcome::Answered(a));
            }
            if let Some(text) = self.run_round(run, tt, &a).await? {
                run.stream_text(&text).await?;
                a.text = text;
                a.tool_calls.clear();
                return Ok(CallOutcome::Answered(a));
            }
        }
    }

    /// Run one round of calls and store it (only while this run holds the response);
    /// `Some(answer)` when it proposed something.
    async fn run_round(
        &self,
        run: &Run,
        tt: &mut ToolTurn,
        a: &Answered,
    ) -> Result<Option<String>, JobError> {
        let round = tt.rounds_done + 1;
        let round_i32 = i32::try_from(round).unwrap_or(i32::MAX);
        let ctx = tt.ctx;
        // search_knowledge queries are embedded before the round's transaction (a model call
        // must not hold a database transaction open)
        let mut query_embeddings = std::collections::HashMap::new();
        for (i, call) in a.tool_calls.iter().enumerate() {
            if let Ok((def, args)) = super::parse_call(&call.name, &call.arguments)
                && def.name == "search_knowledge"
                && let Some(q) = args.get("query").and_then(serde_json::Value::as_str)
            {
                let text: String = q.chars().take(MAX_QUERY_CHARS).collect();
                let v = self.embedder.embed(ctx.org_id, &text).await;
                query_embeddings.insert(i, v);
            }
        }
        let mut tx = self.db.begin().await.map_err(db_error)?;
        // the round and its proposals are this run's writes: refused once another run holds
        // the response (which waits for this transaction)
        run.ledger.hold(&mut tx, &run.fence).await?;
        let mut calls = Vec::with_capacity(a.tool_calls.len());
        let mut results: Vec<(String, String)> = Vec::with_capacity(a.tool_calls.len());
        let mut proposals: Vec<Action> = Vec::new();
        // (at most ten years: the arithmetic stays far from chrono's limits)
        let expiry = self.tools.action_expiry_secs.min(315_360_000);
        let expires_at = chrono::Utc::now()
            + chrono::Duration::seconds(i64::try_from(expiry).unwrap_or(315_360_000));
        let mut seen = std::collections::HashSet::new();
        for (i, call) in a.tool_calls.iter().enumerate() {
            // every call of a round needs its own id (its result answers it)
            let id = if call.id.trim().is_empty() || seen.contains(call.id.as_str()) {
                format!("call_{round}_{i}")
            } else {
                call.id.clone()
            };
            seen.insert(id.clone());
            calls.push(json!({
                "id": id, "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }));
            let content = match super::parse_call(&call.name, &call.arguments) {
                Err(e) => {
                    tracing::info!(tool = %call.name, error = %e.0, "invalid tool call; not run");
                    failed(&call.name, "invalid", &e)
                }
                Ok((def, args)) => match def.kind {
                    ToolKind::Read => {
                        let knowledge = super::search::Knowledge {
                            embedding: query_embeddings.get(&i).and_then(Option::as_ref),
                            model: &self.embedder.model,
                            dim: self.embedder.dim,
                            tuning: self.embedder.tuning,
                        };
                        match super::run_read(&mut tx, &ctx, &knowledge, def.name, &args)
                            .await
                            .map_err(db_error)?
                        {
                            Ok(v) => {
                                metrics::tool_call(def.name, "ok");
                                v.to_string()
                            }
                            Err(e) => failed(def.name, "error", &e),
                        }
                    }
                    ToolKind::Write => {
                        match super::propose(&mut tx, &ctx, def.name, &args)
                            .await
                            .map_err(db_error)?
                        {
                            Err(e) => failed(def.name, "error", &e),
                            Ok(p) => {
                                metrics::tool_call(def.name, "proposed");
                                let (action, _) = actions::insert_proposal(
                                    &mut tx,
                                    &NewProposal {
                                        org_id: ctx.org_id.into(),
                                        conversation_id: ctx.conversation_id.into(),
                                        user_id: ctx.user_id.into(),
                                        response_id: tt.response_id.into(),
                                        tool_call_id: &id,
                                        tool: def.name,
                                        arguments: &p.arguments,
                                        summary: &p.summary,
                                        before: p.before.as_ref(),
                                        after: &p.after,
                                        expires_at,
                                    },
                                )
                                .await
                                .map_err(db_error)?;
                                let c = json!({
                                    "status": "pending_confirmation",
                                    "action_id": action.id,
                                    "project_id": p.project_id,
                                    "summary": action.summary,
                                    "message": "Proposed to the user; nothing changes unless they confirm.",
                                });
                                proposals.push(action);
                                c.to_string()
                            }
                        }
                    }
                },
            };
            results.push((id, content));
        }
        let calls = Value::Array(calls);
        let stored = actions::insert_round(
            &mut tx,
            &Round {
                conversation_id: ctx.conversation_id.into(),
                response_id: tt.response_id.into(),
                round: round_i32,
                content: &a.text,
                model: &a.model,
                tool_calls: &calls,
                results: &results,
            },
        )
        .await
        .map_err(db_error)?;
        if !stored {
            // Another run of this turn stored this round meanwhile: retry from what is stored.
            return Err(JobError::retryable(format!(
                "round {round} of this response was stored by another run"
            )));
        }
        tx.commit().await.map_err(db_error)?;
        metrics::action("proposed", proposals.len() as u64);
        for p in &proposals {
            run.emit(&proposed_event(p)).await?;
        }
        tracing::info!(
            round,
            calls = results.len(),
            proposals = proposals.len(),
            "tool round"
        );
        tt.messages.push(llm::Message {
            role: "assistant".into(),
            content: (!a.text.is_empty()).then(|| a.text.clone()),
            tool_calls: calls.as_array().cloned(),
            tool_call_id: None,
            name: None,
        });
        for (id, content) in &results {
            tt.messages.push(tool_message(id, content));
        }
        tt.rounds_done = round;
        Ok((!proposals.is_empty()).then(|| proposal_answer(&proposals)))
    }
}

/// The tokens of two calls together (`None` when neither model reported any).
fn add_usage(a: Option<llm::Usage>, b: Option<llm::Usage>) -> Option<llm::Usage> {
    match (a, b) {
        (Some(a), Some(b)) => Some(llm::Usage {
            prompt_tokens: a.prompt_tokens.saturating_add(b.prompt_tokens),
            completion_tokens: a.completion_tokens.saturating_add(b.completion_tokens),
        }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use chrono::Utc;

    fn msg(role: &str, content: &str, seq: i64) -> StoredMessage {
        StoredMessage {
            id: Uuid::now_v7(),
            conversation_id: Uuid::nil(),
            seq,
            role: role.into(),
            content: content.into(),
            response_id: None,
            model: None,
            prompt_tokens: None,
            completion_tokens: None,
            latency_ms: None,
            tool_calls: None,
            tool_call_id: None,
            citations: json!([]),
            created_at: Utc::now(),
        }
    }

    fn call(seq: i64, ids: &[&str]) -> StoredMessage {
        let mut m = msg("assistant", "", seq);
        m.tool_calls = Some(Value::Array(
            ids.iter()
                .map(|id| json!({"id": id, "type": "function", "function": {"name": "get_task", "arguments": "{}"}}))
                .collect(),
        ));
        m
    }

    fn result(seq: i64, id: &str, content: &str) -> StoredMessage {
        let mut m = msg("tool", content, seq);
        m.tool_call_id = Some(id.into());
        m
    }

    #[test]
    fn complete_exchanges_are_kept_and_halves_dropped() {
        let history = history(&[
            result(1, "cut", "its call is outside the window"),
            msg("user", "a", 2),
            call(3, &["c1", "c2"]),
            result(4, "c1", "r1"),
            result(5, "c2", "r2"),
            msg("assistant", "b", 6),
            call(7, &["pending"]),
            msg("assistant", "please confirm", 8),
            msg("user", "c", 9),
        ]);
        let roles: Vec<&str> = history.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(
            roles,
            [
                "user",
                "assistant",
                "tool",
                "tool",
                "assistant",
                "assistant",
                "user"
            ]
        );
        assert_eq!(history[1].tool_calls.as_ref().unwrap().len(), 2);
        assert_eq!(history[1].content, None);
        assert_eq!(history[2].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(history[3].content.as_deref(), Some("r2"));
        assert_eq!(history[5].content.as_deref(), Some("please confirm"));
    }

    #[test]
    fn a_decided_proposal_is_answered_by_its_latest_result() {
        let history = history(&[
            msg("user", "make a task", 1),
            call(2, &["p"]),
            result(3, "p", "pending"),
            msg("assistant", "confirm?", 4),
            call(5, &["decided"]),
            result(6, "decided", "executed"),
        ]);
        let roles: Vec<&str> = history.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(
            roles,
            [
                "user",
                "assistant",
                "tool",
                "assistant",
                "assistant",
                "tool"
            ]
        );
        assert_eq!(history[5].content.as_deref(), Some("executed"));
    }

    #[test]
    fn the_response_exchange_is_merged_in_order_once() {
        let a = msg("user", "q", 1);
        let b = call(2, &["x"]);
        let c = result(3, "x", "r");
        let merged = with_exchange(vec![a.clone(), b.clone()], vec![b.clone(), c.clone()]);
        let ids: Vec<Uuid> = merged.iter().map(|m| m.id).collect();
        assert_eq!(ids, [a.id, b.id, c.id]);
    }
}
