//! Memory (docs/architecture/memory.md) end to end against real PostgreSQL, Redis and the LiteLLM
//! proxy in front of the shared scripted fake upstream: summary + recent prompts, race-safe
//! summarize jobs, fact extraction, and who may see which memory entry.

use std::sync::Arc;
use std::time::Duration;

use jobs::kinds::{Chat, Remember, Summarize};
use jobs::{Queue, RedisHandle, Worker, WorkerOptions};
use serde_json::{Value, json};
use store::Role;
use store::conversations::{self as conv, Answer};
use store::memory::{self, NewEntry, Owner};
use testkit::{Behaviour, FakeClient, TestDb, TestRedis, test_settings};
use testkit::{unique_model, via_litellm};
use uuid::Uuid;

use crate::bus::bus_for;

struct Ctx {
    db: TestDb,
    _redis: TestRedis,
    settings: config::Settings,
    org: Uuid,
    /// the fake model behind the org's model (chat, summarize and remember calls)
    model: String,
}

/// An org whose chat model is a fresh fake model; memory embeddings through a fake model too.
/// A reply of `text` whose first token comes after `delay_ms`.
fn slow_reply(text: &str, delay_ms: u64) -> Behaviour {
    Behaviour::Reply {
        text: text.into(),
        tokens: None,
        first_token_delay_ms: delay_ms,
        token_delay_ms: 0,
    }
}

async fn ctx(extra: &[(&str, &str)]) -> Ctx {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let embed = via_litellm(&unique_model("embed"));
    let mut vars: Vec<(&str, &str)> = vec![("EMBEDDING_MODEL", embed.as_str())];
    vars.extend_from_slice(extra);
    let mut settings = test_settings(&db, &redis, &vars);
    settings.queues.memory.backoff_base_ms = 100;
    settings.queues.memory.backoff_cap_ms = 500;
    settings.queues.chat.backoff_base_ms = 100;
    settings.queues.chat.backoff_cap_ms = 500;
    let mut c = db.pool.acquire().await.unwrap();
    let org = store::tenancy::insert_org(&mut c, "acme").await.unwrap().id;
    drop(c);
    let model = unique_model("mem");
    conv::set_org_models(
        &db.pool,
        org.into(),
        &via_litellm(&model),
        &via_litellm(&model),
    )
    .await
    .unwrap();
    Ctx {
        db,
        _redis: redis,
        settings,
        org: org.into(),
        model,
    }
}

impl Ctx {
    async fn user(&self, role: Role) -> Uuid {
        let mut c = self.db.pool.acquire().await.unwrap();
        let user = store::tenancy::insert_user(
            &mut c,
            &format!("u-{}@x.io", Uuid::new_v4().simple()),
            "U",
            "x",
        )
        .await
        .unwrap()
        .id;
        store::tenancy::insert_membership(&mut c, self.org.into(), user, role)
            .await
            .unwrap();
        user.into()
    }

    async fn conversation(&self, user: Uuid) -> Uuid {
        let mut c = self.db.pool.acquire().await.unwrap();
        conv::create(&mut c, self.org, user, "plans", None)
            .await
            .unwrap()
            .id
    }

    /// A user turn as the API makes it; returns the job that answers it.
    async fn turn(&self, user: Uuid, conversation: Uuid, content: &str) -> Chat {
        let mut tx = self.db.pool.begin().await.unwrap();
        let (message, response) = testkit::turns::start(&mut tx, conversation, content).await;
        tx.commit().await.unwrap();
        Chat {
            conversation_id: conversation.into(),
            message_id: message.id.into(),
            response_id: response.id.into(),
            user_id: user.into(),
            org_id: self.org.into(),
        }
    }

    /// A member's conversation with `turns` finished turns (`q1`/`a1` ... `qN`/`aN`).
    async fn chatted(&self, turns: usize) -> (Uuid, Uuid) {
        let user = self.user(Role::Member).await;
        let conversation = self.conversation(user).await;
        for i in 1..=turns {
            self.past_turn(user, conversation, &format!("q{i}"), &format!("a{i}"))
                .await;
        }
        (user, conversation)
    }

    /// A finished earlier turn; returns the stored answer's id.
    async fn past_turn(&self, user: Uuid, conversation: Uuid, q: &str, a: &str) -> Uuid {
        let job = self.turn(user, conversation, q).await;
        let mut tx = self.db.pool.begin().await.unwrap();
        let (m, _) = testkit::turns::answer(
            &mut tx,
            job.response_id.into(),
            &Answer {
                content: a,
                model: "earlier",
                prompt_tokens: None,
                completion_tokens: None,
                latency_ms: 1,
                citations: json!([]),
                sources: Default::default(),
            },
        )
        .await;
        tx.commit().await.unwrap();
        m.id
    }

    fn worker(&self, queues: Vec<Queue>, concurrency: usize) -> Worker {
        let redis = Arc::new(RedisHandle::new(&self.settings.redis).unwrap());
        let mut registry = workers::handlers::registry(self.db.pool.clone());
        workers::handlers::chat::ChatHandler::new(
            self.db.pool.clone(),
            redis.clone(),
            &self.settings,
        )
        .unwrap()
        .register(&mut registry);
        workers::handlers::memory::MemoryHandlers::new(self.db.pool.clone(), redis, &self.settings)
            .unwrap()
            .register(&mut registry);
        let mut opts = WorkerOptions::from_settings(&self.settings, queues);
        opts.read_block = Duration::from_millis(200);
        opts.concurrency = concurrency;
        Worker::new(bus_for(&self.settings), registry, opts)
    }

    async fn drain(&self, queue: Queue, concurrency: usize) -> jobs::RunReport {
        self.worker(vec![queue], concurrency)
            .drain_until_empty(Duration::from_secs(90))
            .await
            .expect("the queue empties")
    }

    /// Answer `job` through the chat handler with `reply`; returns the messages the model got.
    async fn chat(&self, job: Chat, reply: &str) -> Vec<(String, String)> {
        let before = self.calls().await.len();
        FakeClient::shared()
            .script(&self.model, vec![Behaviour::reply(reply)])
            .await
            .unwrap();
        bus_for(&self.settings).enqueue(job).await.unwrap();
        let report = self.drain(Queue::Chat, 1).await;
        assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");
        let calls = self.calls().await;
        assert_eq!(calls.len(), before + 1);
        sent(&calls[before].body)
    }

    async fn calls(&self) -> Vec<testkit::fake_upstream::Recorded> {
        FakeClient::shared()
            .requests(&self.model)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.path.ends_with("/chat/completions"))
            .collect()
    }

    /// Wait (up to 5 s) until the model has received a request: a run is in its model call.
    async fn wait_for_model_call(&self) {
        for _ in 0..250 {
            if !self.calls().await.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the model was never called");
    }

    /// The org's calls of its model counted in `usage_daily` (from yesterday on: a test may
    /// straddle midnight UTC), each with its tokens (embedding calls count apart, under the
    /// embedding model).
    async fn model_requests(&self) -> i64 {
        let since = chrono::Utc::now().date_naive() - chrono::Days::new(1);
        let rows = store::usage::report(&self.db.pool, Some(self.org.into()), since)
            .await
            .unwrap();
        let embed = &self.settings.embedding.model;
        assert!(
            rows.iter().all(
                |r| (r.model == via_litellm(&self.model) || &r.model == embed)
                    && r.prompt_tokens > 0
            ),
            "{rows:?}"
        );
        rows.iter()
            .filter(|r| r.model == via_litellm(&self.model))
            .map(|r| r.requests)
            .sum()
    }

    async fn summary(&self, conversation: Uuid) -> memory::Summary {
        let mut c = self.db.pool.acquire().await.unwrap();
        memory::summary(&mut c, conversation)
            .await
            .unwrap()
            .unwrap_or_default()
    }

    async fn entries(&self) -> Vec<memory::Entry> {
        let mut c = self.db.pool.acquire().await.unwrap();
        memory::list(&mut c, self.org, None, None, None, 1000)
            .await
            .unwrap()
    }

    async fn add(&self, owner: Owner, content: &str) {
        testkit::retrieval::memory(&self.db.pool, owner, content).await;
    }

    /// Member `u`'s conversation in which an answer ("The plan is PLANX.") drew on a private
    /// project of `owner`'s that `u` belongs to, followed by two more turns. Returns the
    /// project, the conversation and the answer's sequence number.
    async fn conversation_drawing_on_a_project(&self, owner: Uuid, u: Uuid) -> (Uuid, Uuid, i64) {
        let mut conn = self.db.pool.acquire().await.unwrap();
        let p = store::projects::insert_project(
            &mut conn,
            &store::projects::NewProject {
                org_id: self.org.into(),
                created_by: owner.into(),
                name: "Apollo",
                description: "",
                visibility: store::Visibility::Private,
                team_id: None,
            },
        )
        .await
        .unwrap()
        .id;
        store::projects::add_member(&mut conn, self.org.into(), p, u.into())
            .await
            .unwrap();
        drop(conn);
        let conversation = self.conversation(u).await;
        // an earlier answer that drew on the project, then two more turns
        let job = self.turn(u, conversation, "what is the plan?").await;
        let mut tx = self.db.pool.begin().await.unwrap();
        let (a1, _) = testkit::turns::answer(
            &mut tx,
            job.response_id.into(),
            &Answer {
                content: "The plan is PLANX.",
                model: "earlier",
                prompt_tokens: None,
                completion_tokens: None,
                latency_ms: 1,
                citations: json!([]),
                sources: conv::AnswerSources {
                    provenance: store::provenance::Provenance {
                        source_project_ids: vec![p],
                        ..Default::default()
                    },
                    ..Default::default()
                },
            },
        )
        .await;
        tx.commit().await.unwrap();
        self.past_turn(u, conversation, "q2", "a2").await;
        self.past_turn(u, conversation, "q3", "a3").await;
        (p.into(), conversation, a1.seq)
    }

    async fn seq_of(&self, content: &str) -> i64 {
        sqlx::query_scalar("SELECT seq FROM messages WHERE content = $1")
            .bind(content)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }
}

fn sent(body: &Value) -> Vec<(String, String)> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn all_text(messages: &[(String, String)]) -> String {
    messages
        .iter()
        .map(|(_, c)| c.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Everything but the system messages.
fn dialogue(messages: &[(String, String)]) -> Vec<(String, String)> {
    messages
        .iter()
        .filter(|(r, _)| r != "system")
        .cloned()
        .collect()
}

fn pair(role: &str, content: &str) -> (String, String) {
    (role.to_owned(), content.to_owned())
}

#[tokio::test]
async fn prompts_hold_the_summary_and_exactly_the_last_n_messages_and_turns_enqueue_follow_ups() {
    // one partition: the scripted model answers remember, then summarize, in enqueue order
    let c = ctx(&[
        ("RECENT_MESSAGES", "4"),
        ("SUMMARIZE_THRESHOLD", "2"),
        ("QUEUE_PARTITIONS", "1"),
    ])
    .await;
    let (user, conversation) = c.chatted(6).await;
    // the first summary: everything before the last 4 messages (q1..a4)
    FakeClient::shared()
        .script(&c.model, vec![Behaviour::reply("SUMMARY-ONE")])
        .await
        .unwrap();
    bus_for(&c.settings)
        .enqueue(Summarize {
            conversation_id: conversation.into(),
        })
        .await
        .unwrap();
    let report = c.drain(Queue::Memory, 1).await;
    assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");
    // the summarize call counts against the org's budget
    assert_eq!(c.model_requests().await, 1);
    let s = c.summary(conversation).await;
    assert_eq!(s.summary, "SUMMARY-ONE");
    assert_eq!(s.summarized_up_to, c.seq_of("a4").await);
    let folded = sent(&c.calls().await[0].body);
    let input = all_text(&folded);
    for m in ["q1", "a1", "q2", "a2", "q3", "a3", "q4", "a4"] {
        assert!(
            input.contains(&format!(": {m}\n")) || input.ends_with(&format!(": {m}")),
            "{m} folded: {input}"
        );
    }
    for m in ["q5", "a5", "q6", "a6"] {
        assert!(
            !input.contains(&format!(": {m}")),
            "{m} is in the window: {input}"
        );
    }

    // the next turn: system prompt, the summary, then exactly the last 4 messages
    let job = c.turn(user, conversation, "q7").await;
    let prompt = c.chat(job, "a7").await;
    assert_eq!(prompt[0].0, "system");
    assert!(prompt.iter().any(|(r, t)| r == "system"
        && t.contains(&format!(
            "{}\nSUMMARY-ONE",
            workers::handlers::chat::prompt::SUMMARY_HEADER
        ))));
    assert_eq!(
        dialogue(&prompt),
        [
            pair("assistant", "a5"),
            pair("user", "q6"),
            pair("assistant", "a6"),
            pair("user", "q7"),
        ]
    );

    // the answered turn enqueued remember and (q5, a5 fell out of the window) summarize
    let stats = bus_for(&c.settings).stats(Queue::Memory).await.unwrap();
    assert_eq!(stats.length, 2, "{stats:?}");
    FakeClient::shared()
        .script(
            &c.model,
            vec![
                Behaviour::reply(
                    r#"{"facts":[{"tier":"user","content":"Prefers numbered plans"}]}"#,
                ),
                Behaviour::reply("SUMMARY-TWO"),
            ],
        )
        .await
        .unwrap();
    let report = c.drain(Queue::Memory, 1).await;
    assert_eq!((report.completed, report.dead), (2, 0), "{report:?}");
    // the first summary, the q7 answer, then remember and the second summary
    assert_eq!(c.model_requests().await, 4);
    let s = c.summary(conversation).await;
    assert_eq!(s.summary, "SUMMARY-TWO");
    assert_eq!(s.summarized_up_to, c.seq_of("a5").await);
    let calls = c.calls().await;
    let second = all_text(&sent(&calls[calls.len() - 1].body));
    assert!(second.contains("SUMMARY-ONE"), "{second}");
    assert!(
        second.contains(": q5") && second.contains(": a5"),
        "{second}"
    );
    for m in ["q4", "a4", "q6", "a6", "q7", "a7"] {
        assert!(
            !second.contains(&format!(": {m}\n")) && !second.ends_with(&format!(": {m}")),
            "{m} folded twice or early: {second}"
        );
    }
    let entries = c.entries().await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].tier, "user");
    assert_eq!(entries[0].user_id, Some(user));
    assert_eq!(entries[0].content, "Prefers numbered plans");
    assert_eq!(entries[0].source_conversation_id, Some(conversation));
}

#[tokio::test]
async fn concurrent_summarize_jobs_fold_each_message_once() {
    let c = ctx(&[("RECENT_MESSAGES", "2")]).await;
    let (user, conversation) = c.chatted(5).await;
    // one slow answer: the other runs find the summary claimed meanwhile and end
    FakeClient::shared()
        .script(&c.model, vec![slow_reply("S1", 800)])
        .await
        .unwrap();
    let bus = bus_for(&c.settings);
    for _ in 0..3 {
        bus.enqueue(Summarize {
            conversation_id: conversation.into(),
        })
        .await
        .unwrap();
    }
    // two workers, each running several jobs at once
    let (w1, w2) = (
        c.worker(vec![Queue::Memory], 3),
        c.worker(vec![Queue::Memory], 3),
    );
    let (r1, r2) = tokio::join!(
        w1.drain_until_empty(Duration::from_secs(90)),
        w2.drain_until_empty(Duration::from_secs(90))
    );
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    assert_eq!(r1.completed + r2.completed, 3, "{r1:?} {r2:?}");
    assert_eq!(r1.dead + r2.dead, 0);
    let calls = c.calls().await;
    assert_eq!(
        calls.len(),
        1,
        "one model call folds them; the others find nothing new"
    );
    let input = all_text(&sent(&calls[0].body));
    for i in 1..=4 {
        for m in [format!("q{i}"), format!("a{i}")] {
            assert_eq!(
                input.matches(&format!(": {m}\n")).count()
                    + usize::from(input.ends_with(&format!(": {m}"))),
                1,
                "{m}: {input}"
            );
        }
    }
    assert!(!input.contains(": q5") && !input.contains(": a5"));
    let s = c.summary(conversation).await;
    assert_eq!(
        (s.summary.as_str(), s.summarized_up_to),
        ("S1", c.seq_of("a4").await)
    );

    // two more turns: the next runs fold exactly the new messages beyond the window (q5..a6)
    for i in 6..=7 {
        c.past_turn(user, conversation, &format!("q{i}"), &format!("a{i}"))
            .await;
    }
    FakeClient::shared()
        .script(&c.model, vec![Behaviour::reply("S2")])
        .await
        .unwrap();
    for _ in 0..2 {
        bus.enqueue(Summarize {
            conversation_id: conversation.into(),
        })
        .await
        .unwrap();
    }
    let report = c.drain(Queue::Memory, 2).await;
    assert_eq!((report.completed, report.dead), (2, 0), "{report:?}");
    let calls = c.calls().await;
    assert_eq!(calls.len(), 2);
    let input = all_text(&sent(&calls[1].body));
    assert!(input.contains("Current summary:\nS1"), "{input}");
    let folded: Vec<&str> = input
        .lines()
        .filter_map(|l| {
            l.strip_prefix("User: ")
                .or_else(|| l.strip_prefix("Assistant: "))
        })
        .collect();
    assert_eq!(folded, ["q5", "a5", "q6", "a6"]);
    let s = c.summary(conversation).await;
    assert_eq!(
        (s.summary.as_str(), s.summarized_up_to),
        ("S2", c.seq_of("a6").await)
    );
}

#[tokio::test]
async fn a_users_memories_never_reach_another_users_prompt() {
    let c = ctx(&[]).await;
    let (u, v) = (c.user(Role::Member).await, c.user(Role::Admin).await);
    let marker = Uuid::new_v4().simple().to_string();
    c.add(Owner::user(c.org, u), &format!("U-SECRET-{marker}"))
        .await;
    c.add(Owner::user(c.org, v), &format!("V-FACT-{marker}"))
        .await;
    c.add(Owner::org(c.org), &format!("ORG-FACT-{marker}"))
        .await;
    // another org's entry
    let mut conn = c.db.pool.acquire().await.unwrap();
    let other = store::tenancy::insert_org(&mut conn, "other")
        .await
        .unwrap()
        .id;
    drop(conn);
    c.add(Owner::org(other.into()), &format!("OTHER-ORG-{marker}"))
        .await;

    let cv = c.conversation(v).await;
    let job = c.turn(v, cv, "what do you know?").await;
    let text = all_text(&c.chat(job, "ok").await);
    assert!(text.contains(&format!("ORG-FACT-{marker}")), "{text}");
    assert!(text.contains(&format!("V-FACT-{marker}")), "{text}");
    assert!(!text.contains(&format!("U-SECRET-{marker}")), "{text}");
    assert!(!text.contains(&format!("OTHER-ORG-{marker}")), "{text}");

    let cu = c.conversation(u).await;
    let job = c.turn(u, cu, "and for me?").await;
    let text = all_text(&c.chat(job, "ok").await);
    assert!(text.contains(&format!("U-SECRET-{marker}")), "{text}");
    assert!(text.contains(&format!("ORG-FACT-{marker}")), "{text}");
    assert!(!text.contains(&format!("V-FACT-{marker}")), "{text}");
}

#[tokio::test]
async fn project_memories_vanish_from_the_prompt_once_the_user_leaves_the_project() {
    let c = ctx(&[]).await;
    let (owner, u) = (c.user(Role::Owner).await, c.user(Role::Member).await);
    let mut conn = c.db.pool.acquire().await.unwrap();
    let project = store::projects::insert_project(
        &mut conn,
        &store::projects::NewProject {
            org_id: c.org.into(),
            created_by: owner.into(),
            name: "Apollo",
            description: "",
            visibility: store::Visibility::Private,
            team_id: None,
        },
    )
    .await
    .unwrap()
    .id;
    store::projects::add_member(&mut conn, c.org.into(), project, u.into())
        .await
        .unwrap();
    drop(conn);
    let marker = Uuid::new_v4().simple().to_string();
    c.add(
        Owner::project(c.org, project.into()),
        &format!("APOLLO-{marker}"),
    )
    .await;
    let conversation = c.conversation(u).await;

    let job = c.turn(u, conversation, "status?").await;
    let text = all_text(&c.chat(job, "fine").await);
    assert!(text.contains(&format!("APOLLO-{marker}")), "{text}");

    // a conversation narrowed to another project the user sees does not get it either
    let mut conn = c.db.pool.acquire().await.unwrap();
    let other = store::projects::insert_project(
        &mut conn,
        &store::projects::NewProject {
            org_id: c.org.into(),
            created_by: owner.into(),
            name: "Gemini",
            description: "",
            visibility: store::Visibility::Org,
            team_id: None,
        },
    )
    .await
    .unwrap()
    .id;
    let narrowed = conv::create(&mut conn, c.org, u, "gemini only", Some(&[other.into()]))
        .await
        .unwrap()
        .id;
    drop(conn);
    let job = c.turn(u, narrowed, "status?").await;
    let text = all_text(&c.chat(job, "fine").await);
    assert!(!text.contains(&format!("APOLLO-{marker}")), "{text}");

    let mut conn = c.db.pool.acquire().await.unwrap();
    assert!(
        store::projects::remove_member(&mut conn, project, u.into())
            .await
            .unwrap()
    );
    drop(conn);
    let job = c.turn(u, conversation, "status now?").await;
    let text = all_text(&c.chat(job, "fine").await);
    assert!(!text.contains(&format!("APOLLO-{marker}")), "{text}");
}

#[tokio::test]
async fn the_most_relevant_memories_fill_the_token_budget() {
    // room for one short entry only: the one closest to the question wins over newer ones
    let c = ctx(&[("MEMORY_TOKEN_BUDGET", "8")]).await;
    let u = c.user(Role::Member).await;
    let question = "Which colour does the launch deck use?";
    let relevant = "Launch deck colour is teal";
    let mut tx = c.db.pool.begin().await.unwrap();
    for content in [relevant, "Standup is at nine", "Prefers short replies"] {
        // the fake upstream embeds deterministically: the question itself is the nearest text
        let text = if content == relevant {
            question
        } else {
            content
        };
        let v = testkit::fake_upstream::fake_embedding(text, 384);
        memory::insert(
            &mut tx,
            &NewEntry {
                owner: Owner::user(c.org, u),
                content: content.into(),
                source_conversation_id: None,
                source_message_ids: vec![],
                author_user_id: None,
                provenance: Default::default(),
                embedding: Some((c.settings.embedding.model.clone(), v)),
            },
            50,
            0.1,
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    let conversation = c.conversation(u).await;
    let job = c.turn(u, conversation, question).await;
    let text = all_text(&c.chat(job, "teal").await);
    assert!(text.contains(relevant), "{text}");
    assert!(!text.contains("Standup is at nine"), "{text}");
    assert!(!text.contains("Prefers short replies"), "{text}");
}

async fn remember(c: &Ctx, user: Uuid, conversation: Uuid, answer: Uuid, reply: &str) {
    FakeClient::shared()
        .script(&c.model, vec![Behaviour::reply(reply)])
        .await
        .unwrap();
    bus_for(&c.settings)
        .enqueue(Remember {
            conversation_id: conversation.into(),
            message_id: answer.into(),
            user_id: user.into(),
            org_id: c.org.into(),
        })
        .await
        .unwrap();
    let report = c.drain(Queue::Memory, 1).await;
    assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");
}

#[tokio::test]
async fn malformed_extraction_stores_nothing_and_facts_respect_visibility_and_dedup() {
    let c = ctx(&[]).await;
    let (owner, u) = (c.user(Role::Owner).await, c.user(Role::Member).await);
    let mut conn = c.db.pool.acquire().await.unwrap();
    let project = |name: &'static str| store::projects::NewProject {
        org_id: c.org.into(),
        created_by: owner.into(),
        name,
        description: "",
        visibility: store::Visibility::Private,
        team_id: None,
    };
    let visible = store::projects::insert_project(&mut conn, &project("Seen"))
        .await
        .unwrap()
        .id;
    let hidden = store::projects::insert_project(&mut conn, &project("Hidden"))
        .await
        .unwrap()
        .id;
    store::projects::add_member(&mut conn, c.org.into(), visible, u.into())
        .await
        .unwrap();
    drop(conn);
    let conversation = c.conversation(u).await;
    let a1 = c.past_turn(u, conversation, "I like tea", "Noted").await;

    for bad in [
        "The user likes tea.".to_owned(),
        r#"{"facts":[{"tier":"user","content":"Likes tea"},{"tier":"project","content":"no project id"}]}"#.to_owned(),
        r#"{"facts":[{"tier":"user","content":"Likes tea"},{"tier":"team","content":"x"}]}"#.to_owned(),
        r#"{"facts":[{"tier":"user","content":"Likes tea"}"#.to_owned(),
    ] {
        remember(&c, u, conversation, a1, &bad).await;
        assert!(c.entries().await.is_empty(), "stored from {bad}");
    }
    let extracted: i64 = sqlx::query_scalar("SELECT count(*) FROM memory_extractions")
        .fetch_one(&c.db.pool)
        .await
        .unwrap();
    assert_eq!(extracted, 0);

    // well-formed: the user fact and the visible project's fact are stored; the hidden
    // project's is not
    let good = format!(
        r#"{{"facts":[{{"tier":"user","content":"Likes tea"}},{{"tier":"project","project_id":"{visible}","content":"Seen ships weekly"}},{{"tier":"project","project_id":"{hidden}","content":"Hidden is late"}}]}}"#
    );
    remember(&c, u, conversation, a1, &good).await;
    let entries = c.entries().await;
    let mut got: Vec<(String, Option<Uuid>, Option<Uuid>, String)> = entries
        .iter()
        .map(|e| (e.tier.clone(), e.project_id, e.user_id, e.content.clone()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (
                "project".into(),
                Some(visible.into()),
                None,
                "Seen ships weekly".into()
            ),
            ("user".into(), None, Some(u), "Likes tea".into()),
        ]
    );
    // the facts' embedding request counts in the org's usage, as the upstream reported it
    let embed_model = &c.settings.embedding.model;
    let sent = FakeClient::shared()
        .requests(embed_model.strip_prefix("fake/").unwrap())
        .await
        .unwrap();
    assert_eq!(sent.len(), 1);
    let reported: i64 = sent[0].body["input"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().len() as i64 / 4 + 1)
        .sum();
    let counted: (i64, i64) = sqlx::query_as(
        "SELECT requests, prompt_tokens FROM usage_daily WHERE org_id = $1 AND model = $2",
    )
    .bind(c.org)
    .bind(embed_model)
    .fetch_one(&c.db.pool)
    .await
    .unwrap();
    assert_eq!(counted, (1, reported));
    // a redelivered job for the same answer stores nothing more (and calls no model)
    let before = c.calls().await.len();
    bus_for(&c.settings)
        .enqueue(Remember {
            conversation_id: conversation.into(),
            message_id: a1.into(),
            user_id: u.into(),
            org_id: c.org.into(),
        })
        .await
        .unwrap();
    c.drain(Queue::Memory, 1).await;
    assert_eq!(c.calls().await.len(), before);
    assert_eq!(c.entries().await.len(), 2);

    // the same fact from a later exchange refreshes the entry instead of adding one
    let a2 = c.past_turn(u, conversation, "tea again", "Sure").await;
    remember(
        &c,
        u,
        conversation,
        a2,
        r#"{"facts":[{"tier":"user","content":"Likes tea"}]}"#,
    )
    .await;
    let after = c.entries().await;
    assert_eq!(after.len(), 2);
    let tea = after.iter().find(|e| e.content == "Likes tea").unwrap();
    let old = entries.iter().find(|e| e.content == "Likes tea").unwrap();
    assert_eq!(tea.id, old.id);
    assert!(tea.updated_at > old.updated_at);
    assert!(tea.source_message_ids.contains(&a2));
}

#[tokio::test]
async fn a_rate_limited_summarize_waits_and_then_folds() {
    let c = ctx(&[("RECENT_MESSAGES", "2")]).await;
    let (_, conversation) = c.chatted(3).await;
    FakeClient::shared()
        .script(
            &c.model,
            vec![Behaviour::rate_limited(1), Behaviour::reply("AFTER-WAIT")],
        )
        .await
        .unwrap();
    bus_for(&c.settings)
        .enqueue(Summarize {
            conversation_id: conversation.into(),
        })
        .await
        .unwrap();
    let report = c.drain(Queue::Memory, 1).await;
    assert_eq!(report.dead, 0, "{report:?}");
    assert!(report.retried >= 1, "{report:?}");
    let s = c.summary(conversation).await;
    assert_eq!(
        (s.summary.as_str(), s.summarized_up_to),
        ("AFTER-WAIT", c.seq_of("a2").await)
    );
    assert_eq!(c.calls().await.len(), 2, "no call during the cooldown");
}

#[tokio::test]
async fn a_long_backlog_is_folded_over_several_runs() {
    let c = ctx(&[("RECENT_MESSAGES", "2")]).await;
    let user = c.user(Role::Member).await;
    let conversation = c.conversation(user).await;
    // 16 messages beyond the window, 8 of them 4,000 characters: more than one run's input
    for i in 1..=9 {
        let long = format!("{i}{}", "x".repeat(3999));
        c.past_turn(user, conversation, &format!("q{i}"), &long)
            .await;
    }
    FakeClient::shared()
        .script(
            &c.model,
            vec![Behaviour::reply("PART-1"), Behaviour::reply("PART-2")],
        )
        .await
        .unwrap();
    bus_for(&c.settings)
        .enqueue(Summarize {
            conversation_id: conversation.into(),
        })
        .await
        .unwrap();
    let report = c.drain(Queue::Memory, 1).await;
    assert_eq!((report.completed, report.dead), (2, 0), "{report:?}");
    let calls = c.calls().await;
    assert_eq!(calls.len(), 2);
    assert!(all_text(&sent(&calls[1].body)).contains("Current summary:\nPART-1"));
    let s = c.summary(conversation).await;
    let last_long = format!("8{}", "x".repeat(3999));
    assert_eq!(
        (s.summary.as_str(), s.summarized_up_to),
        ("PART-2", c.seq_of(&last_long).await)
    );
}

/// A summarize run holds no database connection while the model writes: with a pool of one
/// connection, another query gets it during the (slow) model call.
#[tokio::test]
async fn a_summarize_run_holds_no_connection_across_its_model_call() {
    let c = ctx(&[("RECENT_MESSAGES", "2")]).await;
    let (_, conversation) = c.chatted(3).await;
    FakeClient::shared()
        .script(&c.model, vec![slow_reply("S1", 2000)])
        .await
        .unwrap();
    let mut one = c.settings.database.clone();
    one.max_connections = 1;
    let pool = store::pool(&one).unwrap();
    let redis = Arc::new(RedisHandle::new(&c.settings.redis).unwrap());
    let mut registry = workers::handlers::registry(pool.clone());
    workers::handlers::memory::MemoryHandlers::new(pool.clone(), redis, &c.settings)
        .unwrap()
        .register(&mut registry);
    let mut opts = WorkerOptions::from_settings(&c.settings, vec![Queue::Memory]);
    opts.read_block = Duration::from_millis(200);
    let worker = Worker::new(bus_for(&c.settings), registry, opts);
    bus_for(&c.settings)
        .enqueue(Summarize {
            conversation_id: conversation.into(),
        })
        .await
        .unwrap();
    let run = tokio::spawn(async move { worker.drain_until_empty(Duration::from_secs(60)).await });
    // once the model has the request, ask the pool for its one connection
    c.wait_for_model_call().await;
    let conn = tokio::time::timeout(Duration::from_millis(1000), pool.acquire()).await;
    assert!(
        matches!(conn, Ok(Ok(_))),
        "the pool's only connection is free during the model call"
    );
    drop(conn);
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");
    assert_eq!(c.summary(conversation).await.summary, "S1");
}

/// A run that finds the summary claimed ends at once; the running one counts the backlog again
/// after its write and enqueues the next run, so the messages the ended run came for are
/// folded too.
#[tokio::test]
async fn a_run_that_finds_the_summary_busy_is_taken_over_by_the_running_one() {
    let c = ctx(&[("RECENT_MESSAGES", "2"), ("SUMMARIZE_THRESHOLD", "2")]).await;
    let (user, conversation) = c.chatted(3).await;
    FakeClient::shared()
        .script(
            &c.model,
            vec![slow_reply("S1", 1500), Behaviour::reply("S2")],
        )
        .await
        .unwrap();
    let bus = bus_for(&c.settings);
    let job = Summarize {
        conversation_id: conversation.into(),
    };
    bus.enqueue(job.clone()).await.unwrap();
    let worker = c.worker(vec![Queue::Memory], 2);
    let run = tokio::spawn(async move { worker.drain_until_empty(Duration::from_secs(60)).await });
    c.wait_for_model_call().await;
    // while it writes: two more turns, and their summarize job (which finds the claim taken)
    for i in 4..=5 {
        c.past_turn(user, conversation, &format!("q{i}"), &format!("a{i}"))
            .await;
    }
    bus.enqueue(job).await.unwrap();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.dead, 0, "{report:?}");
    assert_eq!(
        c.calls().await.len(),
        2,
        "one model call per fold, none by the busy run"
    );
    let s = c.summary(conversation).await;
    assert_eq!(
        (s.summary.as_str(), s.summarized_up_to),
        ("S2", c.seq_of("a4").await),
        "the second fold covers what arrived during the first"
    );
}

#[tokio::test]
async fn a_summary_that_drew_on_a_lost_project_is_withheld_and_rebuilt_without_it() {
    let c = ctx(&[("RECENT_MESSAGES", "2")]).await;
    let (owner, u) = (c.user(Role::Owner).await, c.user(Role::Member).await);
    let (p, conversation, a1_seq) = c.conversation_drawing_on_a_project(owner, u).await;
    sqlx::query(
        "INSERT INTO conversation_summaries (conversation_id, summary, summarized_up_to,
                                             source_project_ids)
         VALUES ($1, 'The user asked for the plan: PLANX.', $2, $3)",
    )
    .bind(conversation)
    .bind(a1_seq)
    .bind(vec![p])
    .execute(&c.db.pool)
    .await
    .unwrap();

    // while the user is a member, the summary is in the prompt
    let job = c.turn(u, conversation, "and then?").await;
    let sent_before = c.chat(job, "ok").await;
    assert!(sent_before.iter().any(|(_, t)| t.contains("PLANX")));

    // removed from the project: withheld, reset, and rebuilt without the answer that drew on it
    let mut conn = c.db.pool.acquire().await.unwrap();
    store::projects::remove_member(&mut conn, p.into(), u.into())
        .await
        .unwrap();
    drop(conn);
    let job = c.turn(u, conversation, "what now?").await;
    let sent_after = c.chat(job, "ok").await;
    assert!(
        sent_after.iter().all(|(_, t)| !t.contains("PLANX")),
        "{sent_after:?}"
    );
    let (summary, up_to): (String, i64) = sqlx::query_as(
        "SELECT summary, summarized_up_to FROM conversation_summaries WHERE conversation_id = $1",
    )
    .bind(conversation)
    .fetch_one(&c.db.pool)
    .await
    .unwrap();
    assert_eq!((summary.as_str(), up_to), ("", 0));
    FakeClient::shared()
        .set_default(&c.model, Behaviour::reply("rebuilt summary"))
        .await
        .unwrap();
    let before = c.calls().await.len();
    c.drain(Queue::Memory, 1).await;
    let folds: Vec<String> = c.calls().await[before..]
        .iter()
        .map(|r| r.body.to_string())
        .filter(|b| b.contains("Current summary"))
        .collect();
    assert!(!folds.is_empty(), "the summary was rebuilt");
    assert!(folds.iter().all(|f| !f.contains("PLANX")), "{folds:?}");
    let summary: String =
        sqlx::query_scalar("SELECT summary FROM conversation_summaries WHERE conversation_id = $1")
            .bind(conversation)
            .fetch_one(&c.db.pool)
            .await
            .unwrap();
    assert_eq!(summary, "rebuilt summary");
}

/// The fold race: the model gets a message's text while the project it drew on is visible;
/// the user loses the project during the model call. The summary now holds that text, so it
/// must carry the project (recorded for the messages given, not re-checked at the write) and
/// be withheld and reset at the next turn.
#[tokio::test]
async fn a_fold_whose_source_is_lost_during_the_model_call_is_withheld_afterwards() {
    let c = ctx(&[("RECENT_MESSAGES", "2")]).await;
    let (owner, u) = (c.user(Role::Owner).await, c.user(Role::Member).await);
    let (p, conversation, _) = c.conversation_drawing_on_a_project(owner, u).await;

    // the fold reads the answer while the project is visible; the model is slow
    FakeClient::shared()
        .script(
            &c.model,
            vec![slow_reply("The user asked for the plan: PLANX.", 1500)],
        )
        .await
        .unwrap();
    bus_for(&c.settings)
        .enqueue(Summarize {
            conversation_id: conversation.into(),
        })
        .await
        .unwrap();
    let worker = c.worker(vec![Queue::Memory], 1);
    let run = tokio::spawn(async move { worker.drain_until_empty(Duration::from_secs(60)).await });
    c.wait_for_model_call().await;
    assert!(c.calls().await[0].body.to_string().contains("PLANX"));
    // meanwhile the user leaves the project
    let mut conn = c.db.pool.acquire().await.unwrap();
    store::projects::remove_member(&mut conn, p.into(), u.into())
        .await
        .unwrap();
    drop(conn);
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");
    assert!(c.summary(conversation).await.summary.contains("PLANX"));

    // the summary carries the project: the next prompt does not get it, and it is reset
    let job = c.turn(u, conversation, "what now?").await;
    let sent = c.chat(job, "ok").await;
    assert!(sent.iter().all(|(_, t)| !t.contains("PLANX")), "{sent:?}");
    let s = c.summary(conversation).await;
    assert_eq!((s.summary.as_str(), s.summarized_up_to), ("", 0));
}

/// A project's capacity is shared: when it is full, an author's new facts displace their own
/// oldest, and one who holds nothing else displaces a single fact of the others (the oldest of
/// whoever holds the most) — so filling the project evicts (almost) nothing of the others'.
#[tokio::test]
async fn a_member_filling_a_full_project_evicts_their_own_facts() {
    let c = ctx(&[
        ("MEMORY_CAPACITY_PROJECT", "5"),
        ("MEMORY_CAPACITY_PROJECT_PER_AUTHOR", "3"),
    ])
    .await;
    let owner = c.user(Role::Owner).await;
    let mut conn = c.db.pool.acquire().await.unwrap();
    let p = store::projects::insert_project(
        &mut conn,
        &store::projects::NewProject {
            org_id: c.org.into(),
            created_by: owner.into(),
            name: "Apollo",
            description: "",
            visibility: store::Visibility::Org,
            team_id: None,
        },
    )
    .await
    .unwrap()
    .id;
    drop(conn);
    let facts = |names: &[&str]| {
        let facts: Vec<Value> = names
            .iter()
            .map(|n| json!({"tier": "project", "project_id": p, "content": n}))
            .collect();
        json!({ "facts": facts }).to_string()
    };
    let learn = async |names: &[&str]| {
        let (user, conversation) = c.chatted(0).await;
        let answer = c.past_turn(user, conversation, "note", "noted").await;
        remember(&c, user, conversation, answer, &facts(names)).await;
        user
    };
    let bob = learn(&["bob 1", "bob 2", "bob 3"]).await;
    let carol = learn(&["carol 1", "carol 2"]).await;
    let alice = learn(&["alice 1", "alice 2", "alice 3"]).await;
    let kept: Vec<(Option<Uuid>, String)> = sqlx::query_as(
        "SELECT author_user_id, content FROM conversation_memories
         WHERE tier = 'project' AND project_id = $1 ORDER BY content",
    )
    .bind(p)
    .fetch_all(&c.db.pool)
    .await
    .unwrap();
    assert_eq!(
        kept,
        [
            (Some(alice), "alice 3".to_owned()),
            (Some(bob), "bob 2".to_owned()),
            (Some(bob), "bob 3".to_owned()),
            (Some(carol), "carol 1".to_owned()),
            (Some(carol), "carol 2".to_owned()),
        ],
        "alice displaced one fact of the largest holder, then her own"
    );
}
