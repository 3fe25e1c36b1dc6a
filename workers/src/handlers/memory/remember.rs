//! `remember`: learn durable facts from a finished exchange (the user's message and the
//! assistant's answer).
//!
//! The model is asked for strict JSON `{"facts": [{"tier": "user"|"project", "project_id":
//! ..., "content": ...}]}`. The whole answer is validated with serde before anything is
//! stored: malformed output (not JSON, unknown fields, a bad tier, a project fact without a
//! project, too many or too long facts) stores nothing and is counted.
//!
//! The model proposes; code decides the tier (docs/ARCHITECTURE.md, "Provenance"). Every fact
//! carries the provenance of the answer it came from (what the turn drew on: chunks, memories,
//! summary, tool results, the recent window) and its author (the conversation's user). A
//! proposed project fact is stored at project tier only for a project the conversation may
//! draw on for its user at insert time (`conversation_projects_visible`), and only when nothing
//! the exchange drew on besides the user's own message is narrower than that project — no
//! restricted document (directly or through something derived from one), no other project;
//! otherwise it is demoted to the
//! user's own tier (`memory_facts_total{outcome="demoted"}`). Nothing a user says ever becomes
//! an org fact or another user's. A near-duplicate refreshes an entry of the same owner (and,
//! at project tier, the same author); each tier keeps at most its capacity per owner, and each
//! author at most `MEMORY_CAPACITY_PROJECT_PER_AUTHOR` of a project's.
//!
//! Idempotent by the assistant message: the facts and a `memory_extractions` row commit
//! together, and a run that finds the row stores nothing.

use jobs::kinds::Remember;
use jobs::worker::HandlerResult;
use jobs::{JobContext, JobError};
use serde::Deserialize;
use store::memory::{self, Inserted, NewEntry, Owner};
use store::provenance::Provenance;
use uuid::Uuid;

use super::{EXTRACTIONS, FACTS, MemoryHandlers, db_error, find_conversation, truncate_chars};

/// The extractor's instructions.
pub const REMEMBER_PROMPT: &str = "\
You pick out durable facts worth remembering from one exchange between a user and Switchboard, \
the assistant of a work-management application: the user's stable preferences, role, goals \
and working habits, and lasting facts about a project (decisions, conventions, deadlines). \
Ignore small talk, one-off requests, questions and anything already obvious from the project \
data. Answer with JSON only, no prose, exactly in this shape:
{\"facts\": [{\"tier\": \"user\", \"content\": \"...\"}, {\"tier\": \"project\", \"project_id\": \"<one of the listed project ids>\", \"content\": \"...\"}]}
Use tier \"user\" for facts about the user (the default). Use tier \"project\" only for facts \
about one of the listed projects, with its id. Each content is one short self-contained \
sentence. At most 5 facts; {\"facts\": []} when there is nothing worth remembering.";

/// Facts one exchange may yield; more is treated as malformed.
pub const MAX_FACTS: usize = 8;
/// The longest fact accepted.
pub const MAX_FACT_CHARS: usize = 500;
/// A message's text in the extractor's input is cut to this many characters.
const MESSAGE_MAX_CHARS: usize = 4000;

/// One validated fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fact {
    User(String),
    Project(Uuid, String),
}

impl Fact {
    pub fn content(&self) -> &str {
        match self {
            Fact::User(c) | Fact::Project(_, c) => c,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Extraction {
    facts: Vec<RawFact>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFact {
    tier: RawTier,
    #[serde(default)]
    project_id: Option<Uuid>,
    content: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawTier {
    User,
    Project,
}

/// Parse and validate the extractor's answer, all or nothing. A JSON code fence around the
/// whole answer is tolerated; anything else that is not the exact shape is an error.
pub fn parse_facts(text: &str) -> Result<Vec<Fact>, String> {
    let mut body = text.trim();
    if let Some(rest) = body.strip_prefix("```") {
        let rest = rest.strip_prefix("json").unwrap_or(rest);
        body = rest
            .strip_suffix("```")
            .ok_or_else(|| "an unterminated code fence".to_owned())?
            .trim();
    }
    let parsed: Extraction =
        serde_json::from_str(body).map_err(|e| format!("not the expected JSON: {e}"))?;
    if parsed.facts.len() > MAX_FACTS {
        return Err(format!(
            "{} facts (at most {MAX_FACTS})",
            parsed.facts.len()
        ));
    }
    parsed
        .facts
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let content = f.content.trim().to_owned();
            if content.is_empty() {
                return Err(format!("facts[{i}].content is empty"));
            }
            if content.chars().count() > MAX_FACT_CHARS {
                return Err(format!("facts[{i}].content is too long"));
            }
            match (f.tier, f.project_id) {
                (RawTier::User, None) => Ok(Fact::User(content)),
                (RawTier::User, Some(_)) => Err(format!("facts[{i}]: a user fact names a project")),
                (RawTier::Project, Some(p)) => Ok(Fact::Project(p, content)),
                (RawTier::Project, None) => {
                    Err(format!("facts[{i}]: a project fact without project_id"))
                }
            }
        })
        .collect()
}

/// The extractor's input: the exchange and the projects it may attach facts to.
pub fn remember_prompt(
    exchange: &[store::conversations::Message],
    projects: &[(Uuid, String)],
) -> Vec<llm::Message> {
    let mut text = String::from("Projects of this conversation (id: name):\n");
    if projects.is_empty() {
        text.push_str("(none)\n");
    }
    for (id, name) in projects {
        text.push_str(&format!("{id}: {}\n", truncate_chars(name, 200)));
    }
    text.push_str("\nThe exchange:\n");
    for m in exchange.iter().filter(|m| m.tool_calls.is_none()) {
        let who = match m.role.as_str() {
            "user" => "User",
            "assistant" => "Assistant",
            _ => continue,
        };
        text.push_str(&format!(
            "{who}: {}\n",
            truncate_chars(m.content.trim(), MESSAGE_MAX_CHARS)
        ));
    }
    vec![
        llm::Message::system(REMEMBER_PROMPT),
        llm::Message::user(text),
    ]
}

/// Where a proposed project fact goes, with the provenance it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decided {
    /// Project knowledge: the exchange drew on nothing narrower than the project.
    Project(Provenance),
    /// The user's own: the exchange drew on something narrower (a restricted document, another
    /// project). It remembers the project it was about, so it goes when
    /// the user loses that project.
    Demoted(Provenance),
}

/// The tier rule (code's, not the model's) for a fact the model filed under `project`, from an
/// exchange whose answer has `provenance` (the user's own message draws on nothing).
pub fn tier_of_project_fact(provenance: &Provenance, project: Uuid) -> Decided {
    if provenance.project_fact_allowed(project.into()) {
        Decided::Project(provenance.clone())
    } else {
        let mut p = provenance.clone();
        if !p.source_project_ids.contains(&project.into()) {
            p.source_project_ids.push(project.into());
            p.source_project_ids.sort();
        }
        Decided::Demoted(p)
    }
}

impl MemoryHandlers {
    #[tracing::instrument(
        name = "remember",
        skip_all,
        fields(job_id = %ctx.id, conversation_id = %job.conversation_id, attempt = ctx.attempt)
    )]
    pub async fn remember(&self, ctx: JobContext, job: Remember) -> HandlerResult {
        let inner = &self.inner;
        let mut conn = inner.db.acquire().await.map_err(db_error)?;
        let Some(conversation) =
            find_conversation(&mut conn, job.conversation_id.into(), "remember").await?
        else {
            return Ok(());
        };
        if conversation.user_id != job.user_id.into_uuid()
            || conversation.org_id != job.org_id.into_uuid()
        {
            return Err(JobError::permanent(
                "the job names another user or org than the conversation's",
            ));
        }
        if memory::extracted(&mut conn, job.message_id.into())
            .await
            .map_err(db_error)?
        {
            metrics::counter!(EXTRACTIONS, "outcome" => "already_done").increment(1);
            return Ok(());
        }
        let exchange = store::conversations::recent_messages(
            &mut conn,
            conversation.id,
            job.message_id.into(),
            2,
        )
        .await
        .map_err(db_error)?;
        match exchange.last() {
            Some(m) if m.id == job.message_id.into_uuid() && m.role == "assistant" => {}
            _ => {
                return Err(JobError::permanent(
                    "the message to learn from is not an answer of this conversation",
                ));
            }
        }
        let projects =
            memory::usable_project_names(&mut conn, conversation.user_id, conversation.id)
                .await
                .map_err(db_error)?;
        // What the answer drew on (unknown: treated as narrow).
        let provenance = store::provenance::of_message(&mut conn, job.message_id)
            .await
            .map_err(db_error)?
            .unwrap_or(Provenance {
                narrow: true,
                ..Provenance::default()
            });
        drop(conn);

        let (text, _model) = self
            .complete_text(conversation.org_id, remember_prompt(&exchange, &projects))
            .await?;
        let facts = match parse_facts(&text) {
            Ok(f) => f,
            Err(reason) => {
                // Never stored half-parsed; the model's text is not logged (it is user data).
                metrics::counter!(EXTRACTIONS, "outcome" => "malformed").increment(1);
                tracing::warn!(reason, "malformed extraction output; nothing stored");
                return Ok(());
            }
        };
        let contents: Vec<String> = facts.iter().map(|f| f.content().to_owned()).collect();
        let vectors = if contents.is_empty() {
            None
        } else {
            self.embed(conversation.org_id, &contents).await
        };

        let mut tx = inner.db.begin().await.map_err(db_error)?;
        let count = i32::try_from(facts.len()).unwrap_or(i32::MAX);
        if !memory::record_extraction(&mut tx, job.message_id.into(), count)
            .await
            .map_err(db_error)?
        {
            metrics::counter!(EXTRACTIONS, "outcome" => "already_done").increment(1);
            return Ok(());
        }
        for (i, fact) in facts.iter().enumerate() {
            let user_tier = Owner::user(conversation.org_id, conversation.user_id);
            let (owner, provenance) = match fact {
                Fact::User(_) => (user_tier, provenance.clone()),
                Fact::Project(p, _) => {
                    if !memory::project_usable(&mut tx, conversation.user_id, conversation.id, *p)
                        .await
                        .map_err(db_error)?
                    {
                        metrics::counter!(FACTS, "outcome" => "not_visible").increment(1);
                        tracing::info!(
                            "a project fact for a project outside the conversation; skipped"
                        );
                        continue;
                    }
                    match tier_of_project_fact(&provenance, *p) {
                        Decided::Project(prov) => (Owner::project(conversation.org_id, *p), prov),
                        Decided::Demoted(prov) => {
                            metrics::counter!(FACTS, "outcome" => "demoted").increment(1);
                            tracing::info!(
                                "the exchange drew on sources narrower than the project; \
                                 the fact is the user's own"
                            );
                            (user_tier, prov)
                        }
                    }
                }
            };
            let entry = NewEntry {
                owner,
                content: fact.content().to_owned(),
                source_conversation_id: Some(conversation.id),
                source_message_ids: exchange.iter().map(|m| m.id).collect(),
                author_user_id: Some(conversation.user_id),
                provenance,
                embedding: vectors
                    .as_ref()
                    .and_then(|v| v.get(i))
                    .map(|v| (inner.embedding.model.clone(), v.clone())),
            };
            let done = memory::insert_with(
                &mut tx,
                &entry,
                inner.memory.capacity(owner.tier.as_str()),
                Some(inner.memory.capacity_project_per_author),
                inner.memory.dedup_distance,
            )
            .await
            .map_err(db_error)?;
            let outcome = match done {
                Inserted::New { .. } => "stored",
                Inserted::Refreshed { .. } => "refreshed",
            };
            metrics::counter!(FACTS, "outcome" => outcome).increment(1);
        }
        tx.commit().await.map_err(db_error)?;
        metrics::counter!(EXTRACTIONS, "outcome" => "ok").increment(1);
        tracing::info!(facts = facts.len(), "exchange learnt from");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn well_formed_facts_parse() {
        let p = Uuid::now_v7();
        let text = format!(
            r#"{{"facts":[{{"tier":"user","content":" Prefers short answers "}},{{"tier":"project","project_id":"{p}","content":"Ships on Fridays"}}]}}"#
        );
        assert_eq!(
            parse_facts(&text).unwrap(),
            vec![
                Fact::User("Prefers short answers".into()),
                Fact::Project(p, "Ships on Fridays".into())
            ]
        );
        assert_eq!(parse_facts(r#"{"facts": []}"#).unwrap(), vec![]);
        let fenced = "```json\n{\"facts\":[{\"tier\":\"user\",\"content\":\"x\"}]}\n```";
        assert_eq!(parse_facts(fenced).unwrap(), vec![Fact::User("x".into())]);
    }

    #[test]
    fn code_decides_the_tier_of_a_project_fact() {
        let p = Uuid::now_v7();
        let q = Uuid::now_v7();
        let plain = Provenance::default();
        assert_eq!(
            tier_of_project_fact(&plain, p),
            Decided::Project(plain.clone())
        );
        let restricted = Provenance {
            source_project_ids: vec![p.into()],
            source_document_ids: vec![Uuid::now_v7().into()],
            narrow: true,
        };
        assert!(matches!(
            tier_of_project_fact(&restricted, p),
            Decided::Demoted(_)
        ));
        let other = Provenance {
            source_project_ids: vec![q.into()],
            ..Provenance::default()
        };
        match tier_of_project_fact(&other, p) {
            Decided::Demoted(d) => {
                assert!(
                    d.source_project_ids.contains(&p.into())
                        && d.source_project_ids.contains(&q.into())
                )
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn anything_malformed_is_rejected_whole() {
        let too_many = format!(
            r#"{{"facts":[{}]}}"#,
            [r#"{"tier":"user","content":"x"}"#; MAX_FACTS + 1].join(",")
        );
        let long = format!(
            r#"{{"facts":[{{"tier":"user","content":"{}"}}]}}"#,
            "x".repeat(MAX_FACT_CHARS + 1)
        );
        for bad in [
            "Sure! The user likes tea.",
            r#"{"facts":[{"tier":"user","content":"ok"},{"tier":"org","content":"no"}]}"#,
            r#"{"facts":[{"tier":"user","content":"ok"},{"tier":"project","content":"no id"}]}"#,
            r#"{"facts":[{"tier":"user","project_id":"00000000-0000-0000-0000-000000000000","content":"x"}]}"#,
            r#"{"facts":[{"tier":"user","content":""}]}"#,
            r#"{"facts":[{"tier":"user","content":"x","extra":1}]}"#,
            r#"{"facts":{"tier":"user","content":"x"}}"#,
            r#"{"facts":[{"tier":"user","content":"x"}]} trailing"#,
            "```json\n{\"facts\":[]}",
            too_many.as_str(),
            long.as_str(),
        ] {
            assert!(parse_facts(bad).is_err(), "accepted: {bad}");
        }
    }
}
