//! Retrieval through whole chat turns: the real chat worker embeds the user's message through
//! the LiteLLM proxy (the fake upstream's deterministic embeddings), searches the index with
//! the live visibility filter and puts what it finds into the prompt; the fake chat model's
//! request log shows what the model received. A marker reaches exactly the prompts of users
//! allowed to see it, at the moment of asking.

use std::time::Duration;

use jobs::events::{EventHub, ResponseEvent};
use jobs::kinds::Chat;
use serde_json::{Value, json};
use store::conversations as conv;
use store::{Role, Visibility};
use testkit::retrieval as fx;
use testkit::{Behaviour, FakeClient, TestDb, TestRedis, test_settings, unique_model, via_litellm};
use uuid::Uuid;

use crate::bus::bus_for;

/// One test's world: settings with a unique embedding model, and the chat model per org.
struct Ctx {
    db: TestDb,
    _redis: TestRedis,
    settings: config::Settings,
    embed: String,
}

impl Ctx {
    async fn new() -> Self {
        let db = TestDb::new().await;
        let redis = TestRedis::new();
        let embed = unique_model("embed");
        let mut settings = test_settings(
            &db,
            &redis,
            &[("EMBEDDING_MODEL", via_litellm(&embed).as_str())],
        );
        settings.queues.chat.backoff_base_ms = 100;
        settings.queues.chat.backoff_cap_ms = 1000;
        settings.queues.chat.jitter = config::Jitter::None;
        Self {
            db,
            _redis: redis,
            settings,
            embed,
        }
    }

    fn model(&self) -> String {
        self.settings.embedding.model.clone()
    }

    /// A new org whose chat model is a unique fake one answering "ok"; returns (org, model).
    async fn org(&self) -> (Uuid, String) {
        let mut c = self.db.pool.acquire().await.unwrap();
        let org = fx::org(&mut c).await;
        let primary = unique_model("chat");
        conv::set_org_models(
            &self.db.pool,
            org,
            &via_litellm(&primary),
            &via_litellm(&primary),
        )
        .await
        .unwrap();
        FakeClient::shared()
            .set_default(&primary, Behaviour::reply("ok"))
            .await
            .unwrap();
        (org, primary)
    }

    async fn conversation(&self, org: Uuid, user: Uuid, projects: Option<&[Uuid]>) -> Uuid {
        let mut c = self.db.pool.acquire().await.unwrap();
        conv::create(&mut c, org, user, "c", projects)
            .await
            .unwrap()
            .id
    }

    /// One whole turn through the worker: the prompt the chat model received (all message
    /// contents joined) and the stored answer's citations (also checked against the
    /// `message.completed` event).
    async fn ask(
        &self,
        org: (Uuid, &str),
        user: Uuid,
        conversation: Uuid,
        question: &str,
    ) -> (String, Value) {
        let mut tx = self.db.pool.begin().await.unwrap();
        let (message, response) = testkit::turns::start(&mut tx, conversation, question).await;
        tx.commit().await.unwrap();
        let job = Chat {
            conversation_id: conversation.into(),
            message_id: message.id.into(),
            response_id: response.id.into(),
            user_id: user.into(),
            org_id: org.0.into(),
        };
        let before = FakeClient::shared().requests(org.1).await.unwrap().len();
        bus_for(&self.settings).enqueue(job.clone()).await.unwrap();
        let report = crate_drain(&self.db, &self.settings).await;
        assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");
        let calls = FakeClient::shared().requests(org.1).await.unwrap();
        assert_eq!(calls.len(), before + 1, "one model call for the turn");
        let prompt: Vec<String> = calls[before].body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap_or_default().to_owned())
            .collect();
        let stored: Value = sqlx::query_scalar(
            "SELECT citations FROM messages WHERE response_id = $1 AND role = 'assistant'",
        )
        .bind(response.id)
        .fetch_one(&self.db.pool)
        .await
        .unwrap();
        let evs = completed(&self.settings, response.id).await;
        assert_eq!(
            evs["citations"], stored,
            "message.completed carries the citations"
        );
        (prompt.join("\n---\n"), stored)
    }
}

async fn crate_drain(db: &TestDb, settings: &config::Settings) -> jobs::RunReport {
    let redis = std::sync::Arc::new(jobs::RedisHandle::new(&settings.redis).unwrap());
    let mut registry = workers::handlers::registry(db.pool.clone());
    workers::handlers::chat::ChatHandler::new(db.pool.clone(), redis, settings)
        .unwrap()
        .register(&mut registry);
    let mut opts = jobs::WorkerOptions::from_settings(settings, vec![jobs::Queue::Chat]);
    opts.read_block = Duration::from_millis(200);
    jobs::Worker::new(bus_for(settings), registry, opts)
        .drain_until_empty(Duration::from_secs(90))
        .await
        .expect("the chat queue empties")
}

/// The `message` of the response's `message.completed` event.
async fn completed(settings: &config::Settings, response_id: Uuid) -> Value {
    let redis = std::sync::Arc::new(jobs::RedisHandle::new(&settings.redis).unwrap());
    let events = EventHub::new(redis)
        .replay(response_id, None)
        .await
        .unwrap();
    events
        .into_iter()
        .find_map(|e| match e.event {
            ResponseEvent::MessageCompleted { message, .. } => Some(message),
            _ => None,
        })
        .expect("message.completed")
}

fn marker(label: &str) -> String {
    format!("{label}{}", &Uuid::new_v4().simple().to_string()[..10])
}

#[tokio::test]
async fn a_private_chunk_reaches_members_only_and_stops_at_removal_and_deletion() {
    let ctx = Ctx::new().await;
    let (org, chat) = ctx.org().await;
    let (org2, chat2) = ctx.org().await;
    let mut c = ctx.db.pool.acquire().await.unwrap();
    let alice = fx::user(&mut c, org, Role::Member).await;
    let bob = fx::user(&mut c, org, Role::Member).await;
    let eve = fx::user(&mut c, org2, Role::Owner).await;
    let private = fx::project(&mut c, org, alice, Visibility::Private, None).await;
    let doc = fx::document(&mut c, org, private, "Launch plan").await;
    let secret = marker("ZEBRA");
    let question = "What is the launch code word of the rocket?";
    let content = format!("The launch code word of the rocket is {secret}.");
    // embedded as the question: the vector search finds it (the full-text one too)
    fx::insert(
        &mut c,
        &[fx::project_chunk(
            org,
            private,
            "document",
            doc,
            "Launch plan",
            &content,
            question,
            &ctx.model(),
            384,
        )],
    )
    .await;
    // the same words in the other org, under another marker
    let p2 = fx::project(&mut c, org2, eve, Visibility::Org, None).await;
    let theirs = marker("OTHER");
    fx::insert(
        &mut c,
        &[fx::project_chunk(
            org2,
            p2,
            "task",
            Uuid::now_v7(),
            "Code",
            &format!("The launch code word of the rocket is {theirs}."),
            question,
            &ctx.model(),
            384,
        )],
    )
    .await;

    let alice_conv = ctx.conversation(org, alice, None).await;
    let (prompt, citations) = ctx.ask((org, &chat), alice, alice_conv, question).await;
    assert!(
        prompt.contains(&secret),
        "a member's prompt has it: {prompt}"
    );
    assert!(
        prompt.contains("<workspace_data>") && prompt.contains("document \"Launch plan\""),
        "{prompt}"
    );
    assert!(!prompt.contains(&theirs), "never another org's");
    assert_eq!(
        citations,
        json!([{"source_kind": "document", "source_id": doc, "title": "Launch plan", "chunk": 0}])
    );
    // the query embedding went through LiteLLM to the fake, with the configured model
    let embeds = FakeClient::shared().requests(&ctx.embed).await.unwrap();
    assert_eq!(embeds.len(), 1);
    assert_eq!(embeds[0].path, "/v1/embeddings");

    let bob_conv = ctx.conversation(org, bob, None).await;
    let (prompt, citations) = ctx.ask((org, &chat), bob, bob_conv, question).await;
    assert!(
        !prompt.contains(&secret),
        "a non-member's prompt never has it: {prompt}"
    );
    assert!(
        !prompt.contains("<workspace_data>"),
        "nothing at all for bob: {prompt}"
    );
    assert_eq!(citations, json!([]));

    let eve_conv = ctx.conversation(org2, eve, None).await;
    let (prompt, _) = ctx.ask((org2, &chat2), eve, eve_conv, question).await;
    assert!(
        !prompt.contains(&secret),
        "another org's prompt never has it"
    );
    assert!(prompt.contains(&theirs), "but its own data: {prompt}");

    // removed from the project: the very next turn no longer gets it (no re-index ran)
    store::projects::remove_member(&mut c, private.into(), alice.into())
        .await
        .unwrap();
    let (prompt, citations) = ctx.ask((org, &chat), alice, alice_conv, question).await;
    assert!(!prompt.contains(&secret), "after removal: {prompt}");
    assert_eq!(citations, json!([]));

    // back in: it returns; then the document is deleted (rows still there): gone again
    store::projects::add_member(&mut c, org.into(), private.into(), alice.into())
        .await
        .unwrap();
    let (prompt, _) = ctx.ask((org, &chat), alice, alice_conv, question).await;
    assert!(prompt.contains(&secret));
    sqlx::query("UPDATE documents SET deleted_at = now() WHERE id = $1")
        .bind(doc)
        .execute(&mut *c)
        .await
        .unwrap();
    let (prompt, _) = ctx.ask((org, &chat), alice, alice_conv, question).await;
    assert!(!prompt.contains(&secret), "after deletion: {prompt}");
}

#[tokio::test]
async fn restricted_documents_owned_messages_and_narrowed_conversations() {
    let ctx = Ctx::new().await;
    let (org, chat) = ctx.org().await;
    let mut c = ctx.db.pool.acquire().await.unwrap();
    let owner = fx::user(&mut c, org, Role::Owner).await;
    let alice = fx::user(&mut c, org, Role::Member).await;
    let bob = fx::user(&mut c, org, Role::Member).await;
    let carol = fx::user(&mut c, org, Role::Member).await;
    let team = store::tenancy::insert_team(&mut c, org.into(), "core")
        .await
        .unwrap()
        .id;
    store::tenancy::add_team_member(&ctx.db.pool, org.into(), team, carol.into())
        .await
        .unwrap();
    let open = fx::project(&mut c, org, owner, Visibility::Org, None).await;
    let other = fx::project(&mut c, org, owner, Visibility::Org, None).await;
    let model = ctx.model();

    // a restricted document in an org-wide project: alice by name, carol through her team
    let question = "what are the salary bands for next year";
    let bands = marker("BANDS");
    let doc = fx::document(&mut c, org, open, "Salaries").await;
    let mut restricted = fx::project_chunk(
        org,
        open,
        "document",
        doc,
        "Salaries",
        &format!("Salary bands for next year: {bands}"),
        question,
        &model,
        384,
    );
    restricted.allowed_user_ids = vec![alice.into()];
    restricted.allowed_team_ids = vec![team];
    // an earlier conversation message of alice's
    let q2 = "which hotel did we book for the offsite";
    let hotel = marker("HOTEL");
    let mut msg = fx::message_chunk(
        org,
        alice,
        Uuid::now_v7(),
        &format!("We booked the hotel {hotel} for the offsite"),
        &model,
        384,
    );
    msg.embedding = pgvector::Vector::from(testkit::fake_upstream::fake_embedding(q2, 384));
    // the same question answered in two projects
    let q3 = "who is the release manager";
    let (in_open, in_other) = (marker("OPENRM"), marker("OTHERRM"));
    fx::insert(
        &mut c,
        &[
            restricted,
            msg,
            fx::project_chunk(
                org,
                open,
                "task",
                Uuid::now_v7(),
                "RM",
                &format!("The release manager is {in_open}"),
                q3,
                &model,
                384,
            ),
            fx::project_chunk(
                org,
                other,
                "task",
                Uuid::now_v7(),
                "RM",
                &format!("The release manager is {in_other}"),
                q3,
                &model,
                384,
            ),
        ],
    )
    .await;

    let conv_of = |u| ctx.conversation(org, u, None);
    let (a, b, cc, o) = (
        conv_of(alice).await,
        conv_of(bob).await,
        conv_of(carol).await,
        conv_of(owner).await,
    );
    assert!(
        ctx.ask((org, &chat), alice, a, question)
            .await
            .0
            .contains(&bands),
        "listed user"
    );
    assert!(
        ctx.ask((org, &chat), carol, cc, question)
            .await
            .0
            .contains(&bands),
        "team member"
    );
    assert!(
        !ctx.ask((org, &chat), bob, b, question)
            .await
            .0
            .contains(&bands),
        "sees the project, not the document"
    );
    assert!(
        !ctx.ask((org, &chat), owner, o, question)
            .await
            .0
            .contains(&bands),
        "not even the org owner"
    );
    store::tenancy::remove_team_member(&ctx.db.pool, org.into(), team, carol.into())
        .await
        .unwrap();
    assert!(
        !ctx.ask((org, &chat), carol, cc, question)
            .await
            .0
            .contains(&bands),
        "left the team"
    );

    // conversation messages: only their owner's turns retrieve them
    let (prompt, citations) = ctx.ask((org, &chat), alice, a, q2).await;
    assert!(prompt.contains(&hotel), "{prompt}");
    assert!(prompt.contains("earlier conversation"), "{prompt}");
    assert_eq!(citations[0]["source_kind"], "message");
    assert!(!ctx.ask((org, &chat), bob, b, q2).await.0.contains(&hotel));
    assert!(!ctx.ask((org, &chat), owner, o, q2).await.0.contains(&hotel));

    // a conversation narrowed to `other` draws on it alone
    let narrow = ctx.conversation(org, bob, Some(&[other])).await;
    let prompt = ctx.ask((org, &chat), bob, narrow, q3).await.0;
    assert!(
        prompt.contains(&in_other) && !prompt.contains(&in_open),
        "{prompt}"
    );
    let prompt = ctx.ask((org, &chat), bob, b, q3).await.0;
    assert!(
        prompt.contains(&in_other) && prompt.contains(&in_open),
        "{prompt}"
    );
}

#[tokio::test]
async fn an_embedder_failure_falls_back_to_full_text_and_the_answer_still_comes() {
    let ctx = Ctx::new().await;
    let (org, chat) = ctx.org().await;
    let mut c = ctx.db.pool.acquire().await.unwrap();
    let alice = fx::user(&mut c, org, Role::Member).await;
    let p = fx::project(&mut c, org, alice, Visibility::Private, None).await;
    let secret = marker("KIWI");
    let task = Uuid::now_v7();
    fx::insert(
        &mut c,
        &[fx::project_chunk(
            org,
            p,
            "task",
            task,
            "Budget",
            &format!("The marketing budget is {secret}"),
            "unrelated vector text",
            &ctx.model(),
            384,
        )],
    )
    .await;
    FakeClient::shared()
        .set_default(&ctx.embed, Behaviour::status(500))
        .await
        .unwrap();
    let conv = ctx.conversation(org, alice, None).await;
    let (prompt, citations) = ctx
        .ask(
            (org, &chat),
            alice,
            conv,
            "How big is the marketing budget?",
        )
        .await;
    assert!(prompt.contains(&secret), "found by full text: {prompt}");
    assert_eq!(citations[0]["source_id"], json!(task));
    assert!(
        !FakeClient::shared()
            .requests(&ctx.embed)
            .await
            .unwrap()
            .is_empty(),
        "the embedder was tried"
    );
}

/// The question is embedded once per turn, shared by retrieval and memory, and not at all by
/// an attempt that only waits for its model's cooldown (the re-queued attempt would repeat it).
#[tokio::test]
async fn a_turn_embeds_its_question_once_and_not_while_its_model_cools_down() {
    let ctx = Ctx::new().await;
    let (org, chat) = ctx.org().await;
    let mut c = ctx.db.pool.acquire().await.unwrap();
    let alice = fx::user(&mut c, org, Role::Member).await;
    let project = fx::project(&mut c, org, alice, Visibility::Org, None).await;
    let doc = fx::document(&mut c, org, project, "Plan").await;
    let question = "When does the rollout start?";
    fx::insert(
        &mut c,
        &[fx::project_chunk(
            org,
            project,
            "document",
            doc,
            "Plan",
            "The rollout starts on Monday.",
            question,
            &ctx.model(),
            384,
        )],
    )
    .await;
    // an org memory entry: memory ranks by the question's embedding too
    fx::memory(
        &ctx.db.pool,
        store::memory::Owner::org(org),
        "The team prefers short answers.",
    )
    .await;
    drop(c);

    // the chat model cools down (another worker saw a 429) when the turn arrives
    let redis = std::sync::Arc::new(jobs::RedisHandle::new(&ctx.settings.redis).unwrap());
    workers::model::Cooldowns::new(redis, Duration::from_secs(30))
        .start(&via_litellm(&chat), Duration::from_millis(1500))
        .await
        .unwrap();
    let conversation = ctx.conversation(org, alice, None).await;
    let mut tx = ctx.db.pool.begin().await.unwrap();
    let (message, response) = testkit::turns::start(&mut tx, conversation, question).await;
    tx.commit().await.unwrap();
    bus_for(&ctx.settings)
        .enqueue(Chat {
            conversation_id: conversation.into(),
            message_id: message.id.into(),
            response_id: response.id.into(),
            user_id: alice.into(),
            org_id: org.into(),
        })
        .await
        .unwrap();
    let report = crate_drain(&ctx.db, &ctx.settings).await;
    assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");
    assert!(report.retried >= 1, "the turn waited for the cooldown");
    let embeds = FakeClient::shared().requests(&ctx.embed).await.unwrap();
    assert_eq!(
        embeds.len(),
        1,
        "one embedding call for the turn, none while it waited"
    );
    // that call counts in the org's usage (its budget), with the tokens the upstream reported
    let counted: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT requests, prompt_tokens FROM usage_daily WHERE org_id = $1 AND model = $2",
    )
    .bind(org)
    .bind(ctx.model())
    .fetch_all(&ctx.db.pool)
    .await
    .unwrap();
    let reported = question.len() as i64 / 4 + 1;
    assert_eq!(counted, [(1, reported)]);
    let calls = FakeClient::shared().requests(&chat).await.unwrap();
    let prompt = calls[0].body["messages"].to_string();
    assert!(prompt.contains("Monday"), "retrieval used it: {prompt}");
    assert!(prompt.contains("short answers"), "memory used it: {prompt}");
}
