//! Proposed actions through the API: only the conversation's owner sees, confirms or rejects a
//! proposal (anyone else, same org or not, gets 404); a confirm is accepted once (concurrent
//! confirms: one 202, the rest 409) and enqueues one execution; rejected and expired proposals
//! answer 409; JSON-mode turns list the proposals they made.
//!
//! The proposals are stored as the chat worker stores them (`store::actions::insert_proposal`);
//! the worker side (execution exactly once, re-checks) is tested in the workers crate.

use std::time::Duration;

use chrono::Utc;
use jobs::{Envelope, Job, Queue};
use redis::AsyncCommands;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::chat_helpers::FakeWorker;
use crate::helpers::{Account, TestApp, email, spawn_app};

struct Setup {
    owner: Account,
    member: Account,
    stranger: Account,
    project: String,
    conversation: String,
}

async fn setup(app: &TestApp) -> Setup {
    let owner = app.register(&email("owner"), "Acme").await;
    let member = app.add_member(&owner, &email("member"), "member").await;
    let stranger = app.register(&email("stranger"), "Other").await;
    let r = app
        .post(
            "/v1/projects",
            &owner.token,
            json!({"name": "Apollo", "description": "", "visibility": "org"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let project = r.body["id"].as_str().unwrap().to_owned();
    let conversation = app.conversation(&member.token).await;
    Setup {
        owner,
        member,
        stranger,
        project,
        conversation,
    }
}

fn uuid(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap()
}

/// A proposal of a turn of the member's conversation (as the chat worker stores it); with
/// `response`, of that response.
async fn proposal(app: &TestApp, s: &Setup, response: Option<Uuid>, title: &str) -> String {
    let mut tx = app.db.pool.begin().await.unwrap();
    let response_id = match response {
        Some(r) => r,
        None => {
            testkit::turns::start(&mut tx, uuid(&s.conversation), "add a task")
                .await
                .1
                .id
        }
    };
    let args = json!({"project_id": s.project, "title": title, "description": "",
                      "status": "todo", "assignee_id": null});
    let (action, inserted) = store::actions::insert_proposal(
        &mut tx,
        &store::actions::NewProposal {
            org_id: uuid(&s.member.org_id).into(),
            conversation_id: uuid(&s.conversation).into(),
            user_id: uuid(&s.member.user_id).into(),
            response_id: response_id.into(),
            tool_call_id: &format!("call-{title}"),
            tool: "create_task",
            arguments: &args,
            summary: &format!("Create task \"{title}\" in project \"Apollo\" (status todo)"),
            before: None,
            after: &args,
            expires_at: Utc::now() + chrono::Duration::hours(1),
        },
    )
    .await
    .unwrap();
    assert!(inserted);
    tx.commit().await.unwrap();
    action.id.to_string()
}

async fn execution_jobs(app: &TestApp) -> Vec<Uuid> {
    let handle = jobs::RedisHandle::new(&app.settings.redis).unwrap();
    let bus = jobs::Bus::new(std::sync::Arc::new(handle), &app.settings.queues);
    let mut conn = bus.redis().conn().await.unwrap();
    let mut out = Vec::new();
    for p in bus.parts(Queue::Actions) {
        let entries: redis::streams::StreamRangeReply =
            conn.xrange_all(&bus.keys(p).stream).await.unwrap();
        out.extend(entries.ids.iter().filter_map(|e| {
            let body: String = e.get("j")?;
            match Envelope::from_json(&body).ok()?.job {
                Job::ExecuteAction(j) => Some(j.action_id.into_uuid()),
                _ => None,
            }
        }));
    }
    out
}

#[tokio::test]
async fn only_the_conversation_owner_sees_confirms_or_rejects_a_proposal() {
    let app = spawn_app().await;
    let s = setup(&app).await;
    let id = proposal(&app, &s, None, "Write docs").await;
    let list = format!("/v1/conversations/{}/actions", s.conversation);

    let r = app.get(&list, &s.member.token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], id.as_str());
    assert_eq!(items[0]["status"], "pending");
    assert_eq!(items[0]["tool"], "create_task");
    assert_eq!(items[0]["arguments"]["title"], "Write docs");
    assert!(items[0]["summary"].as_str().unwrap().contains("Write docs"));
    let r = app.get(&format!("/v1/actions/{id}"), &s.member.token).await;
    assert_eq!((r.status, r.body["id"].as_str()), (200, Some(id.as_str())));

    // the org's owner (who sees every project) and another org's user: 404, like a random id
    let random = Uuid::new_v4().to_string();
    for (who, action) in [
        (&s.owner.token, id.as_str()),
        (&s.stranger.token, id.as_str()),
        (&s.member.token, random.as_str()),
    ] {
        let r = app.get(&format!("/v1/actions/{action}"), who).await;
        assert_eq!(r.status, 404, "{}", r.body);
        for verb in ["confirm", "reject"] {
            let r = app
                .post(&format!("/v1/actions/{action}/{verb}"), who, json!({}))
                .await;
            assert_eq!(r.status, 404, "{verb}: {}", r.body);
            assert_eq!(r.body["error"]["code"], "not_found");
        }
    }
    for who in [&s.owner.token, &s.stranger.token] {
        assert_eq!(app.get(&list, who).await.status, 404);
    }
    // still pending, nothing enqueued
    let r = app.get(&list, &s.member.token).await;
    assert_eq!(r.body["items"][0]["status"], "pending");
    assert!(execution_jobs(&app).await.is_empty());
    let r = app
        .post(
            &format!("/v1/actions/{id}/confirm"),
            "not-a-token",
            json!({}),
        )
        .await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn concurrent_confirms_are_accepted_once_and_enqueue_one_execution() {
    let app = spawn_app().await;
    let s = setup(&app).await;
    let id = proposal(&app, &s, None, "Ship it").await;
    let path = format!("/v1/actions/{id}/confirm");
    let attempts = (0..6).map(|_| app.post(&path, &s.member.token, json!({})));
    let results = futures::future::join_all(attempts).await;
    let accepted: Vec<&Value> = results
        .iter()
        .filter(|r| r.status == 202)
        .map(|r| &r.body)
        .collect();
    assert_eq!(
        accepted.len(),
        1,
        "{:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in results.iter().filter(|r| r.status != 202) {
        assert_eq!(r.status, 409, "{}", r.body);
        assert_eq!(r.body["error"]["code"], "conflict");
    }
    let body = accepted[0];
    assert_eq!(body["action"]["status"], "confirmed");
    assert_eq!(body["action"]["id"], id.as_str());
    let response_id = body["response_id"].as_str().unwrap();
    assert_eq!(body["action"]["continuation_response_id"], response_id);
    assert_eq!(execution_jobs(&app).await, vec![uuid(&id)]);
    // the continuation is a response of the conversation, followed like any other
    let r = app
        .events(&s.member.token, &s.conversation, response_id, None)
        .await;
    assert_eq!(r.status().as_u16(), 200);
    drop(r);
    let r = app
        .post(
            &format!("/v1/actions/{id}/reject"),
            &s.member.token,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(app.count("tasks").await, 0, "the API itself writes no task");
}

#[tokio::test]
async fn rejected_and_expired_proposals_answer_409() {
    let app = spawn_app().await;
    let s = setup(&app).await;
    let first = proposal(&app, &s, None, "One").await;
    let second = proposal(&app, &s, None, "Two").await;
    let r = app
        .post(
            &format!("/v1/actions/{first}/reject"),
            &s.member.token,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "rejected");
    for verb in ["reject", "confirm"] {
        let r = app
            .post(
                &format!("/v1/actions/{first}/{verb}"),
                &s.member.token,
                json!({}),
            )
            .await;
        assert_eq!(r.status, 409, "{verb}");
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("rejected")
        );
    }
    sqlx::query(
        "UPDATE proposed_actions SET expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(uuid(&second))
    .execute(&app.db.pool)
    .await
    .unwrap();
    let r = app
        .post(
            &format!("/v1/actions/{second}/confirm"),
            &s.member.token,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 409);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
    let r = app
        .get(
            &format!("/v1/conversations/{}/actions", s.conversation),
            &s.member.token,
        )
        .await;
    let statuses: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["rejected", "expired"]);
    assert!(execution_jobs(&app).await.is_empty());
    assert_eq!(app.count("tasks").await, 0);
}

#[tokio::test]
async fn json_mode_lists_the_proposals_of_the_turn() {
    let app = spawn_app().await;
    let s = setup(&app).await;
    let earlier = proposal(&app, &s, None, "Earlier").await;
    let mut worker = FakeWorker::new(&app).await;
    let pool = app.db.pool.clone();
    let conversation = s.conversation.clone();
    let project = s.project.clone();
    let (member_org, member_user) = (s.member.org_id.clone(), s.member.user_id.clone());
    let answering = tokio::spawn(async move {
        let job = worker.next_job().await;
        let mut tx = pool.begin().await.unwrap();
        let args = json!({"project_id": project, "title": "Now"});
        store::actions::insert_proposal(
            &mut tx,
            &store::actions::NewProposal {
                org_id: uuid(&member_org).into(),
                conversation_id: uuid(&conversation).into(),
                user_id: uuid(&member_user).into(),
                response_id: job.response_id,
                tool_call_id: "c1",
                tool: "create_task",
                arguments: &args,
                summary: "Create task \"Now\"",
                before: None,
                after: &args,
                expires_at: Utc::now() + chrono::Duration::hours(1),
            },
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        worker.answer(&job, &["Please ", "confirm."]).await;
    });
    let r = app
        .post(
            &format!("/v1/conversations/{}/messages", s.conversation),
            &s.member.token,
            json!({"content": "add Now"}),
        )
        .await;
    tokio::time::timeout(Duration::from_secs(10), answering)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let actions = r.body["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 1, "only this turn's proposals");
    assert_eq!(actions[0]["summary"], "Create task \"Now\"");
    assert_eq!(actions[0]["status"], "pending");
    assert_ne!(actions[0]["id"], earlier.as_str());
}

/// The chat and actions handlers, consuming both queues in the background until dropped.
pub(crate) struct ToolWorker {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ToolWorker {
    pub(crate) fn start(app: &TestApp) -> Self {
        let settings = &app.settings;
        let redis = std::sync::Arc::new(jobs::RedisHandle::new(&settings.redis).unwrap());
        let bus = jobs::Bus::new(redis.clone(), &settings.queues);
        let mut registry = jobs::Registry::new();
        workers::handlers::chat::ChatHandler::new(app.db.pool.clone(), redis, settings)
            .unwrap()
            .register(&mut registry);
        workers::tools::ActionsHandler::new(app.db.pool.clone(), bus.clone())
            .register(&mut registry);
        let mut opts =
            jobs::WorkerOptions::from_settings(settings, vec![Queue::Chat, Queue::Actions]);
        opts.read_block = Duration::from_millis(200);
        let worker = jobs::Worker::new(bus, registry, opts);
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let _ = worker.run(token).await;
        });
        Self { stop, task }
    }

    pub(crate) async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// HTTP in, SSE out, real worker, LiteLLM and the scripted fake: a proposal is announced and
/// writes nothing; the confirm executes it once and the continuation streams on the response
/// events endpoint.
#[tokio::test]
async fn end_to_end_a_proposal_is_confirmed_executed_once_and_the_assistant_continues() {
    let app = spawn_app().await;
    let worker = ToolWorker::start(&app);
    let (token, primary, _fallback) = crate::e2e::org_with_fake_models(&app).await;
    let r = app
        .post(
            "/v1/projects",
            &token,
            json!({"name": "Apollo", "description": "launch", "visibility": "org"}),
        )
        .await;
    let project = r.body["id"].as_str().unwrap().to_owned();
    let fake = testkit::FakeClient::shared();
    fake.script(
        &primary,
        vec![
            testkit::Behaviour::ToolCalls {
                calls: vec![testkit::fake_upstream::ToolCall {
                    id: "call-1".into(),
                    name: "create_task".into(),
                    arguments: json!({"project_id": project, "title": "E2E task"}).to_string(),
                }],
            },
            testkit::Behaviour::reply_tokens(&["Created ", "it."]),
        ],
    )
    .await
    .unwrap();
    let conversation = app.conversation(&token).await;
    let mut sse = app
        .post_stream(&token, &conversation, "add a task E2E task")
        .await;
    let frames = sse.rest().await;
    let names: Vec<&str> = frames.iter().map(|f| f.name()).collect();
    assert_eq!(
        names,
        [
            "message.created",
            "action.proposed",
            "token",
            "message.completed"
        ],
        "{frames:?}"
    );
    let action = frames[1].data()["action"].clone();
    assert_eq!(action["tool"], "create_task");
    assert_eq!(action["arguments"]["title"], "E2E task");
    assert!(action["summary"].as_str().unwrap().contains("E2E task"));
    let id = action["id"].as_str().unwrap().to_owned();
    let asked = frames[3].data()["message"]["content"].as_str().unwrap();
    assert_eq!(
        frames[2].data()["text"],
        asked,
        "the answer is streamed too"
    );
    assert!(asked.contains("confirm"));
    let tasks = format!("/v1/projects/{project}/tasks");
    assert_eq!(app.get(&tasks, &token).await.body["items"], json!([]));

    let r = app
        .post(&format!("/v1/actions/{id}/confirm"), &token, json!({}))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let response_id = r.body["response_id"].as_str().unwrap().to_owned();
    let events = app.events(&token, &conversation, &response_id, None).await;
    let mut sse = crate::chat_helpers::SseReader::new(events);
    let frames = sse.rest().await;
    let last = frames.last().unwrap();
    assert_eq!(last.name(), "message.completed", "{frames:?}");
    assert_eq!(last.data()["message"]["content"], "Created it.");

    let items = app.get(&tasks, &token).await.body["items"].clone();
    assert_eq!(items.as_array().unwrap().len(), 1);
    assert_eq!(items[0]["title"], "E2E task");
    let r = app
        .get(&format!("/v1/conversations/{conversation}/actions"), &token)
        .await;
    assert_eq!(r.body["items"][0]["status"], "executed");
    assert_eq!(r.body["items"][0]["result"]["title"], "E2E task");
    let r = app
        .post(&format!("/v1/actions/{id}/confirm"), &token, json!({}))
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(fake.requests(&primary).await.unwrap().len(), 2);
    worker.stop().await;
}

#[tokio::test]
async fn a_confirm_the_org_budget_has_no_room_for_is_refused_and_stays_pending() {
    let app = spawn_app().await;
    let s = setup(&app).await;
    let action = proposal(&app, &s, None, "Budgeted").await;
    let budget = format!("/v1/orgs/{}/settings/budget", s.owner.org_id);
    let set = |limit: Value| {
        app.call(
            reqwest::Method::PUT,
            &budget,
            Some(&s.owner.token),
            Some(json!({ "daily_tokens": limit })),
        )
    };
    // a limit of 0 tokens: the continuation (a model call) cannot start
    assert_eq!(set(json!(0)).await.status, 200);
    let path = format!("/v1/actions/{action}/confirm");
    let r = app.post(&path, &s.member.token, json!({})).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "budget_exceeded");
    assert!(r.headers.contains_key("retry-after"));
    // nothing happened: still pending, nothing to execute
    let r = app
        .get(&format!("/v1/actions/{action}"), &s.member.token)
        .await;
    assert_eq!(r.body["status"], "pending", "{}", r.body);
    assert!(execution_jobs(&app).await.is_empty());

    // a limit with room: confirmed, and the continuation holds its reservation
    assert_eq!(set(json!(1_000_000)).await.status, 200);
    let r = app.post(&path, &s.member.token, json!({})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let response = uuid(r.body["response_id"].as_str().unwrap());
    let held: i32 = sqlx::query_scalar("SELECT budget_reserved FROM responses WHERE id = $1")
        .bind(response)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(
        i64::from(held),
        app.settings.budget.turn_reserve_tokens as i64
    );
    assert_eq!(execution_jobs(&app).await.len(), 1);
}
