//! Tools and supervised writes against real PostgreSQL, Redis and the LiteLLM proxy in front of
//! the shared fake upstream, scripted to emit tool calls: read tools see only visible data,
//! write tools only propose, a confirmed proposal is executed exactly once, rejected / expired /
//! no-longer-permitted ones write nothing.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jobs::events::{EventHub, ResponseEvent};
use jobs::kinds::{Chat, ExecuteAction};
use jobs::{Envelope, Queue, RedisHandle, Worker, WorkerOptions};
use serde_json::{Value, json};
use store::actions::{self as actions, Decision};
use store::conversations as conv;
use store::{Role, TaskStatus, Visibility};
use testkit::fake_upstream::ToolCall;
use testkit::{Behaviour, FakeClient, TestDb, TestRedis, test_settings, unique_model, via_litellm};
use uuid::Uuid;

use crate::bus::bus_for;

/// An org with a member `user` (the conversation's owner) and an owner `admin`; a project
/// everyone sees and a private one only the admin sees, each with one task.
struct World {
    org: Uuid,
    user: Uuid,
    admin: Uuid,
    conversation: Uuid,
    open: Uuid,
    open_task: Uuid,
    hidden: Uuid,
    hidden_task: Uuid,
    model: String,
}

async fn user(c: &mut sqlx::PgConnection, org: Uuid, name: &str, role: Role) -> Uuid {
    let id = store::tenancy::insert_user(
        c,
        &format!("{name}-{}@x.io", Uuid::new_v4().simple()),
        name,
        "x",
    )
    .await
    .unwrap()
    .id;
    store::tenancy::insert_membership(c, org.into(), id, role)
        .await
        .unwrap();
    id.into()
}

async fn project(
    c: &mut sqlx::PgConnection,
    org: Uuid,
    by: Uuid,
    name: &str,
    visibility: Visibility,
) -> Uuid {
    store::projects::insert_project(
        c,
        &store::projects::NewProject {
            org_id: org.into(),
            created_by: by.into(),
            name,
            description: "",
            visibility,
            team_id: None,
        },
    )
    .await
    .unwrap()
    .id
    .into()
}

async fn task(c: &mut sqlx::PgConnection, org: Uuid, project: Uuid, by: Uuid, title: &str) -> Uuid {
    store::tasks::insert_task(
        c,
        &store::tasks::NewTask {
            org_id: org.into(),
            project_id: project.into(),
            created_by: by.into(),
            title,
            description: "",
            status: TaskStatus::Todo,
            assignee_id: None,
        },
    )
    .await
    .unwrap()
    .id
    .into()
}

async fn world(db: &TestDb) -> World {
    let mut c = db.pool.acquire().await.unwrap();
    let org = store::tenancy::insert_org(&mut c, "acme").await.unwrap().id;
    let user = user(&mut c, org.into(), "Uma", Role::Member).await;
    let admin = user_admin(&mut c, org.into()).await;
    let open = project(&mut c, org.into(), admin, "Apollo launch", Visibility::Org).await;
    let hidden = project(
        &mut c,
        org.into(),
        admin,
        "Zeus secret",
        Visibility::Private,
    )
    .await;
    let open_task = task(&mut c, org.into(), open, admin, "Visible alpha checklist").await;
    let hidden_task = task(&mut c, org.into(), hidden, admin, "Hidden beta checklist").await;
    let conversation = conv::create(&mut c, org.into(), user, "work", None)
        .await
        .unwrap()
        .id;
    let model = unique_model("tools");
    conv::set_org_models(
        &db.pool,
        org.into(),
        &via_litellm(&model),
        &via_litellm(&model),
    )
    .await
    .unwrap();
    World {
        org: org.into(),
        user,
        admin,
        conversation,
        open,
        open_task,
        hidden,
        hidden_task,
        model,
    }
}

async fn user_admin(c: &mut sqlx::PgConnection, org: Uuid) -> Uuid {
    user(c, org, "Ada", Role::Owner).await
}

async fn turn(db: &TestDb, w: &World, content: &str) -> Chat {
    let mut tx = db.pool.begin().await.unwrap();
    let (message, response) = testkit::turns::start(&mut tx, w.conversation, content).await;
    tx.commit().await.unwrap();
    Chat {
        conversation_id: w.conversation.into(),
        message_id: message.id.into(),
        response_id: response.id.into(),
        user_id: w.user.into(),
        org_id: w.org.into(),
    }
}

fn call(id: &str, name: &str, arguments: Value) -> ToolCall {
    ToolCall {
        id: id.into(),
        name: name.into(),
        arguments: arguments.to_string(),
    }
}

async fn script(w: &World, behaviours: Vec<Behaviour>) {
    FakeClient::shared()
        .script(&w.model, behaviours)
        .await
        .unwrap();
}

async fn requests(w: &World) -> Vec<Value> {
    FakeClient::shared()
        .requests(&w.model)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.body)
        .collect()
}

/// A worker for the chat and actions queues, with the production handlers.
fn worker(db: &TestDb, settings: &config::Settings) -> Worker {
    let redis = Arc::new(RedisHandle::new(&settings.redis).unwrap());
    let mut registry = workers::handlers::registry(db.pool.clone());
    workers::handlers::chat::ChatHandler::new(db.pool.clone(), redis, settings)
        .unwrap()
        .register(&mut registry);
    workers::tools::ActionsHandler::new(db.pool.clone(), bus_for(settings)).register(&mut registry);
    let mut opts = WorkerOptions::from_settings(settings, vec![Queue::Chat, Queue::Actions]);
    opts.read_block = Duration::from_millis(200);
    Worker::new(bus_for(settings), registry, opts)
}

async fn drain(db: &TestDb, settings: &config::Settings) -> jobs::RunReport {
    worker(db, settings)
        .drain_until_empty(Duration::from_secs(90))
        .await
        .expect("the queues empty")
}

/// Every event of a response, up to its terminal one.
async fn events(settings: &config::Settings, response_id: Uuid) -> Vec<ResponseEvent> {
    let hub = EventHub::new(Arc::new(RedisHandle::new(&settings.redis).unwrap()));
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(hub.clone().run(stop.clone()));
    assert!(hub.ready(Duration::from_secs(10)).await);
    let evs = tokio::time::timeout(
        Duration::from_secs(30),
        hub.events(response_id, None)
            .map(|e| e.unwrap().event)
            .collect::<Vec<_>>(),
    )
    .await
    .expect("a terminal event");
    stop.cancel();
    evs
}

fn answer(evs: &[ResponseEvent]) -> String {
    match evs.last() {
        Some(ResponseEvent::MessageCompleted { message, .. }) => {
            message["content"].as_str().unwrap().to_owned()
        }
        other => panic!("not completed: {other:?}"),
    }
}

/// The `tool` results a request carried, by call id.
fn tool_results(body: &Value) -> std::collections::HashMap<String, Value> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| {
            (
                m["tool_call_id"].as_str().unwrap().to_owned(),
                serde_json::from_str(m["content"].as_str().unwrap()).unwrap(),
            )
        })
        .collect()
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn status_of(db: &TestDb, action: Uuid) -> (String, Option<String>) {
    sqlx::query_as("SELECT status, failure_reason FROM proposed_actions WHERE id = $1")
        .bind(action)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn read_tool_results_reach_the_next_model_call_with_only_visible_data() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[]);
    let w = world(&db).await;
    script(
        &w,
        vec![
            Behaviour::ToolCalls {
                calls: vec![
                    call("c1", "list_projects", json!({})),
                    call("c2", "list_tasks", json!({"project_id": w.open})),
                    call("c3", "list_tasks", json!({"project_id": w.hidden})),
                    call("c4", "get_task", json!({"task_id": w.hidden_task})),
                    call("c5", "get_task", json!({"task_id": Uuid::new_v4()})),
                    call("c6", "search_knowledge", json!({"query": "checklist"})),
                    call("c7", "get_task", json!({"task_id": w.open_task})),
                ],
            },
            Behaviour::reply("You have one visible checklist."),
        ],
    )
    .await;
    let job = turn(&db, &w, "what is on my plate?").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");

    let reqs = requests(&w).await;
    assert_eq!(reqs.len(), 2, "one tool round, then the answer");
    // both calls' tokens count for the org, not only the answer's (the fake reports a quarter
    // of each request's length as its prompt tokens)
    let prompt: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(prompt_tokens), 0)::bigint FROM usage_daily WHERE org_id = $1",
    )
    .bind(w.org)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let sent: Vec<i64> = reqs
        .iter()
        .map(|r| i64::try_from(r.to_string().len() / 4).unwrap())
        .collect();
    assert_eq!(prompt, sent.iter().sum::<i64>(), "{sent:?}");
    let offered: Vec<&str> = reqs[0]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert!(offered.contains(&"create_task") && offered.contains(&"search_knowledge"));
    let results = tool_results(&reqs[1]);
    assert_eq!(results.len(), 7);
    let all = reqs[1]["messages"].to_string();
    assert!(all.contains("Apollo launch"), "{all}");
    assert!(all.contains("Visible alpha checklist"));
    assert!(
        !all.contains("Zeus secret"),
        "a hidden project leaked: {all}"
    );
    assert!(!all.contains("Hidden beta"), "a hidden task leaked: {all}");
    // invisible and nonexistent answer the same
    assert_eq!(results["c3"], json!({"error": "not found"}));
    assert_eq!(results["c4"], json!({"error": "not found"}));
    assert_eq!(results["c5"], results["c4"]);
    assert_eq!(results["c2"]["tasks"].as_array().unwrap().len(), 1);
    assert_eq!(results["c6"]["results"].as_array().unwrap().len(), 1);
    assert_eq!(results["c6"]["results"][0]["id"], json!(w.open_task));
    assert_eq!(results["c7"]["task"]["title"], "Visible alpha checklist");
    // the call precedes its results in the second request
    let roles: Vec<&str> = reqs[1]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles[..3], ["system", "user", "assistant"]);
    assert!(roles[3..].iter().all(|r| *r == "tool"));

    let evs = events(&settings, job.response_id.into()).await;
    assert_eq!(answer(&evs), "You have one visible checklist.");
    assert!(
        !evs.iter()
            .any(|e| matches!(e, ResponseEvent::ActionProposed { .. }))
    );
    // the round is stored: one assistant call message and seven results
    assert_eq!(
        count(&db, "SELECT count(*) FROM messages WHERE tool_round = 1").await,
        8
    );
}

#[tokio::test]
async fn invalid_tool_arguments_go_back_to_the_model_and_are_never_executed() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[]);
    let w = world(&db).await;
    script(
        &w,
        vec![
            Behaviour::ToolCalls {
                calls: vec![
                    call(
                        "bad1",
                        "create_task",
                        json!({"project_id": "nope", "title": "x"}),
                    ),
                    call(
                        "bad2",
                        "create_task",
                        json!({"project_id": w.open, "title": "x", "sudo": true}),
                    ),
                    call("bad3", "create_task", json!({"project_id": w.open})),
                    call(
                        "bad4",
                        "update_task",
                        json!({"task_id": w.open_task, "status": "archived"}),
                    ),
                    call("bad5", "drop_all_tables", json!({})),
                    ToolCall {
                        id: "bad6".into(),
                        name: "get_task".into(),
                        arguments: "{not json".into(),
                    },
                    call(
                        "bad7",
                        "create_task",
                        json!({"project_id": w.hidden, "title": "sneaky"}),
                    ),
                    call(
                        "bad8",
                        "update_task",
                        json!({"task_id": w.open_task, "assignee_id": w.admin, "title": "   "}),
                    ),
                ],
            },
            Behaviour::reply("Sorry, I could not do that."),
        ],
    )
    .await;
    let job = turn(&db, &w, "make tasks").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");
    let reqs = requests(&w).await;
    assert_eq!(reqs.len(), 2);
    let r = tool_results(&reqs[1]);
    let err = |id: &str| r[id]["error"].as_str().unwrap().to_owned();
    assert!(
        err("bad1").starts_with("project_id: must be a UUID"),
        "{}",
        err("bad1")
    );
    assert!(err("bad2").starts_with("sudo: unknown argument"));
    assert!(err("bad3").starts_with("title: is required"));
    assert!(err("bad4").starts_with("status: must be one of"));
    assert!(err("bad5").contains("unknown tool"));
    assert!(err("bad6").contains("not valid JSON"));
    assert_eq!(err("bad7"), "not found");
    assert!(err("bad8").starts_with("title: must not be blank"));
    assert_eq!(count(&db, "SELECT count(*) FROM proposed_actions").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM tasks").await, 2);
    let title: String = sqlx::query_scalar("SELECT title FROM tasks WHERE id = $1")
        .bind(w.open_task)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(title, "Visible alpha checklist");
    assert_eq!(
        answer(&events(&settings, job.response_id.into()).await),
        "Sorry, I could not do that."
    );
}

/// A turn that proposes `create_task` in the open project; returns the job and the proposal.
async fn propose_create(db: &TestDb, settings: &config::Settings, w: &World) -> (Chat, Uuid) {
    script(
        w,
        vec![Behaviour::ToolCalls {
            calls: vec![call(
                "w1",
                "create_task",
                json!({"project_id": w.open, "title": "Write the launch docs", "assignee_id": w.user}),
            )],
        }],
    )
    .await;
    let job = turn(db, w, "add a task to write the launch docs").await;
    bus_for(settings).enqueue(job.clone()).await.unwrap();
    let report = drain(db, settings).await;
    assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");
    let id: Uuid = sqlx::query_scalar("SELECT id FROM proposed_actions WHERE response_id = $1")
        .bind(job.response_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    (job, id)
}

async fn confirm(db: &TestDb, w: &World, action: Uuid) -> (actions::Action, conv::Response) {
    let mut tx = db.pool.begin().await.unwrap();
    let Decision::Done(done) =
        actions::confirm(&mut tx, w.user.into(), action.into(), Uuid::now_v7().into())
            .await
            .unwrap()
    else {
        panic!("not confirmed");
    };
    tx.commit().await.unwrap();
    done
}

#[tokio::test]
async fn a_write_proposal_creates_nothing_until_confirmed_then_runs_exactly_once() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[]);
    let w = world(&db).await;
    let (job, action_id) = propose_create(&db, &settings, &w).await;

    // proposed: announced, asked for, nothing written
    let evs = events(&settings, job.response_id.into()).await;
    let proposed: Vec<&Value> = evs
        .iter()
        .filter_map(|e| match e {
            ResponseEvent::ActionProposed { action } => Some(action),
            _ => None,
        })
        .collect();
    assert_eq!(proposed.len(), 1);
    assert_eq!(proposed[0]["id"], json!(action_id));
    assert_eq!(proposed[0]["tool"], "create_task");
    assert_eq!(proposed[0]["arguments"]["title"], "Write the launch docs");
    let summary = proposed[0]["summary"].as_str().unwrap();
    assert!(
        summary.contains("Write the launch docs")
            && summary.contains("Apollo launch")
            && summary.contains("Uma"),
        "{summary}"
    );
    let text = answer(&evs);
    assert!(text.contains("confirm") && text.contains(summary), "{text}");
    let streamed: String = evs
        .iter()
        .filter_map(|e| match e {
            ResponseEvent::Token { text } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        streamed, text,
        "the answer asking to confirm is streamed too"
    );
    assert_eq!(requests(&w).await.len(), 1, "a proposal ends the turn");
    assert_eq!(status_of(&db, action_id).await.0, "pending");
    assert_eq!(count(&db, "SELECT count(*) FROM tasks").await, 2);

    // confirmed; the execution job is delivered twice (a redelivery)
    let (action, continuation) = confirm(&db, &w, action_id).await;
    assert_eq!(action.status, "confirmed");
    let mut tx = db.pool.begin().await.unwrap();
    assert!(matches!(
        actions::confirm(&mut tx, w.user.into(), action_id.into(), Uuid::now_v7().into()).await.unwrap(),
        Decision::NotPending(s) if s == "confirmed"
    ));
    drop(tx);
    script(&w, vec![Behaviour::reply("Done: the task is created.")]).await;
    let env = Envelope::new(ExecuteAction {
        action_id: action_id.into(),
    });
    let bus = bus_for(&settings);
    bus.enqueue_envelope(&env).await.unwrap();
    bus.enqueue_envelope(&env).await.unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!(report.dead, 0, "{report:?}");

    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM tasks WHERE title = 'Write the launch docs'"
        )
        .await,
        1
    );
    assert_eq!(status_of(&db, action_id).await.0, "executed");
    let (audits, by, after): (i64, Option<Uuid>, Option<Value>) = sqlx::query_as(
        "SELECT count(*) OVER (), confirmed_by, after FROM action_audit WHERE action_id = $1",
    )
    .bind(action_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((audits, by), (1, Some(w.user)));
    assert_eq!(after.unwrap()["assignee_id"], json!(w.user));
    let assignee: Option<Uuid> =
        sqlx::query_scalar("SELECT assignee_id FROM tasks WHERE title = 'Write the launch docs'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(assignee, Some(w.user));

    // the assistant continued, once, with the result in its prompt
    let evs = events(&settings, continuation.id).await;
    assert_eq!(answer(&evs), "Done: the task is created.");
    let reqs = requests(&w).await;
    assert_eq!(reqs.len(), 2, "one continuation call");
    let results = tool_results(&reqs[1]);
    let decided = &results[&actions::decision_call_id(action_id.into())];
    assert_eq!(decided["status"], "executed");
    assert_eq!(decided["task"]["title"], "Write the launch docs");
    assert_eq!(results["w1"]["status"], "pending_confirmation");
    assert_eq!(
        count(&db, &format!("SELECT count(*) FROM messages WHERE response_id = '{}' AND role = 'assistant' AND tool_calls IS NULL", continuation.id)).await,
        1
    );
}

#[tokio::test]
async fn concurrent_confirms_have_one_winner_and_execute_once() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[]);
    let w = world(&db).await;
    let (_job, action_id) = propose_create(&db, &settings, &w).await;
    let attempts = (0..8).map(|_| {
        let pool = db.pool.clone();
        let user = w.user;
        async move {
            let mut tx = pool.begin().await.unwrap();
            let d = actions::confirm(
                &mut tx,
                user.into(),
                action_id.into(),
                Uuid::now_v7().into(),
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
            matches!(d, Decision::Done(_))
        }
    });
    let wins = futures::future::join_all(attempts)
        .await
        .into_iter()
        .filter(|w| *w)
        .count();
    assert_eq!(wins, 1);
    assert_eq!(
        count(&db, "SELECT count(*) FROM responses").await,
        2,
        "one continuation"
    );
    script(&w, vec![Behaviour::reply("ok")]).await;
    let bus = bus_for(&settings);
    for _ in 0..3 {
        bus.enqueue(ExecuteAction {
            action_id: action_id.into(),
        })
        .await
        .unwrap();
    }
    drain(&db, &settings).await;
    assert_eq!(count(&db, "SELECT count(*) FROM tasks").await, 3);
    assert_eq!(count(&db, "SELECT count(*) FROM action_audit").await, 1);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM messages WHERE role = 'tool' AND tool_call_id LIKE 'decided-%'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn a_proposal_confirmed_after_the_user_lost_access_fails_and_writes_nothing() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[]);
    let w = world(&db).await;
    // the user may see the private project for now
    let mut c = db.pool.acquire().await.unwrap();
    store::projects::add_member(&mut c, w.org.into(), w.hidden.into(), w.user.into())
        .await
        .unwrap();
    drop(c);
    script(
        &w,
        vec![Behaviour::ToolCalls {
            calls: vec![call(
                "u1",
                "update_task",
                json!({"task_id": w.hidden_task, "status": "done", "title": "Renamed"}),
            )],
        }],
    )
    .await;
    let job = turn(&db, &w, "close the beta checklist").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    drain(&db, &settings).await;
    let action_id: Uuid = sqlx::query_scalar("SELECT id FROM proposed_actions")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let (before, after): (Value, Value) =
        sqlx::query_as("SELECT before, after FROM proposed_actions WHERE id = $1")
            .bind(action_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        before,
        json!({"status": "todo", "title": "Hidden beta checklist"})
    );
    assert_eq!(after, json!({"status": "done", "title": "Renamed"}));

    let (_, continuation) = confirm(&db, &w, action_id).await;
    let mut c = db.pool.acquire().await.unwrap();
    store::projects::remove_member(&mut c, w.hidden.into(), w.user.into())
        .await
        .unwrap();
    drop(c);
    script(&w, vec![Behaviour::reply("That change could not be made.")]).await;
    bus_for(&settings)
        .enqueue(ExecuteAction {
            action_id: action_id.into(),
        })
        .await
        .unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!(report.dead, 0);
    let (status, reason) = status_of(&db, action_id).await;
    assert_eq!(status, "failed");
    assert!(reason.unwrap().contains("no longer"));
    let (title, st): (String, String) =
        sqlx::query_as("SELECT title, status FROM tasks WHERE id = $1")
            .bind(w.hidden_task)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (title.as_str(), st.as_str()),
        ("Hidden beta checklist", "todo")
    );
    assert_eq!(count(&db, "SELECT count(*) FROM action_audit").await, 0);
    // the model is told, without the hidden task's data
    assert_eq!(
        answer(&events(&settings, continuation.id).await),
        "That change could not be made."
    );
    let reqs = requests(&w).await;
    let decided = &tool_results(reqs.last().unwrap())[&actions::decision_call_id(action_id.into())];
    assert_eq!(decided["status"], "failed");
}

#[tokio::test]
async fn reject_and_expiry_write_nothing() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[]);
    let w = world(&db).await;
    let (_, first) = propose_create(&db, &settings, &w).await;
    let (_, second) = propose_create(&db, &settings, &w).await;

    // rejected: the model will be told, nothing else happens
    let mut tx = db.pool.begin().await.unwrap();
    let Decision::Done(rejected) = actions::reject(&mut tx, w.user.into(), first.into())
        .await
        .unwrap()
    else {
        panic!("not rejected");
    };
    tx.commit().await.unwrap();
    assert_eq!(rejected.status, "rejected");
    let mut tx = db.pool.begin().await.unwrap();
    assert!(matches!(
        actions::confirm(&mut tx, w.user.into(), first.into(), Uuid::now_v7().into()).await.unwrap(),
        Decision::NotPending(s) if s == "rejected"
    ));
    drop(tx);

    // expired: past its time it reads as expired, cannot be confirmed, and the sweep records it
    sqlx::query(
        "UPDATE proposed_actions SET expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(second)
    .execute(&db.pool)
    .await
    .unwrap();
    let mut c = db.pool.acquire().await.unwrap();
    assert_eq!(
        actions::get_own(&mut c, w.user.into(), second.into())
            .await
            .unwrap()
            .unwrap()
            .status,
        "expired"
    );
    drop(c);
    let mut tx = db.pool.begin().await.unwrap();
    assert!(matches!(
        actions::confirm(&mut tx, w.user.into(), second.into(), Uuid::now_v7().into()).await.unwrap(),
        Decision::NotPending(s) if s == "expired"
    ));
    drop(tx);
    let report = reconciler(&db, &settings).pass().await;
    assert_eq!(report.expired, 1);
    let again = reconciler(&db, &settings).pass().await;
    assert_eq!(again.expired, 0, "idempotent");
    let bus = bus_for(&settings);
    assert_eq!(status_of(&db, second).await.0, "expired");

    // an execution job for either (say, a forged or stale one) writes nothing
    for action_id in [first, second] {
        bus.enqueue(ExecuteAction {
            action_id: action_id.into(),
        })
        .await
        .unwrap();
    }
    drain(&db, &settings).await;
    assert_eq!(count(&db, "SELECT count(*) FROM tasks").await, 2);
    assert_eq!(count(&db, "SELECT count(*) FROM action_audit").await, 0);
    assert_eq!(
        count(&db, "SELECT count(*) FROM responses").await,
        2,
        "no continuation"
    );

    // the next turn's prompt tells the model about the rejection
    script(&w, vec![Behaviour::reply("Understood.")]).await;
    let job = turn(&db, &w, "ok, never mind").await;
    bus.enqueue(job).await.unwrap();
    drain(&db, &settings).await;
    let reqs = requests(&w).await;
    let results = tool_results(reqs.last().unwrap());
    assert_eq!(
        results[&actions::decision_call_id(first.into())]["status"],
        "rejected"
    );
}

#[tokio::test]
async fn a_restarted_turn_neither_repeats_a_round_nor_proposes_twice() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[]);
    let w = world(&db).await;
    let (job, action_id) = propose_create(&db, &settings, &w).await;
    // as if the worker died after storing the round but before the answer
    sqlx::query(
        "DELETE FROM messages WHERE response_id = $1 AND role = 'assistant' AND tool_calls IS NULL",
    )
    .bind(job.response_id)
    .execute(&db.pool)
    .await
    .unwrap();
    // (so no terminal event went out either) ...
    let keys = jobs::events::EventKeys::new(&settings.redis.prefix);
    let mut conn = RedisHandle::new(&settings.redis)
        .unwrap()
        .conn()
        .await
        .unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(keys.replay(job.response_id.into()))
        .arg(keys.fence(job.response_id.into()))
        .query_async(&mut conn)
        .await
        .unwrap();
    // ... and its response was handed to a new job (as the reconciler does)
    let env = Envelope::new(job.clone());
    sqlx::query(
        "UPDATE responses SET status = 'queued', completed_at = NULL, job_id = $2 WHERE id = $1",
    )
    .bind(job.response_id)
    .bind(env.id)
    .execute(&db.pool)
    .await
    .unwrap();
    bus_for(&settings).enqueue_envelope(&env).await.unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!((report.completed, report.dead), (1, 0));
    assert_eq!(requests(&w).await.len(), 1, "the model is not called again");
    assert_eq!(count(&db, "SELECT count(*) FROM proposed_actions").await, 1);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM messages WHERE tool_round IS NOT NULL"
        )
        .await,
        2
    );
    let mut c = db.pool.acquire().await.unwrap();
    let m = conv::answer_of(&mut c, job.response_id.into())
        .await
        .unwrap()
        .unwrap();
    assert!(m.content.contains("confirm"));
    assert_eq!(status_of(&db, action_id).await.0, "pending");
}

#[tokio::test]
async fn tool_rounds_are_bounded_and_the_last_call_offers_no_tools() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[("TOOL_MAX_ROUNDS", "2")]);
    let w = world(&db).await;
    let again = Behaviour::ToolCalls {
        calls: vec![call("again", "list_projects", json!({}))],
    };
    script(&w, vec![again.clone(), again.clone(), again]).await;
    let job = turn(&db, &w, "loop forever").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    drain(&db, &settings).await;
    let reqs = requests(&w).await;
    assert_eq!(reqs.len(), 3);
    assert!(reqs[1]["tools"].is_array());
    assert!(
        reqs[2].get("tools").is_none(),
        "no tools after the last round"
    );
    assert_eq!(
        answer(&events(&settings, job.response_id.into()).await),
        workers::tools::rounds::ROUND_LIMIT_MESSAGE
    );
    assert_eq!(
        count(&db, "SELECT count(DISTINCT tool_round) FROM messages").await,
        2
    );
}

/// The scheduler's reconciler over the test's database and Redis prefix.
fn reconciler(db: &TestDb, settings: &config::Settings) -> workers::reconciler::Reconciler {
    let redis = Arc::new(RedisHandle::new(&settings.redis).unwrap());
    workers::reconciler::Reconciler::new(
        db.pool.clone(),
        bus_for(settings),
        redis,
        settings,
        "test".into(),
    )
}

#[tokio::test]
async fn the_reconciler_recovers_a_lost_execution_and_a_lost_continuation() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[]);
    let w = world(&db).await;
    let (_, action_id) = propose_create(&db, &settings, &w).await;
    // confirmed, but the execution job never reached the bus
    let (_, continuation) = confirm(&db, &w, action_id).await;
    let bus = bus_for(&settings);
    let fresh = reconciler(&db, &settings).pass().await;
    assert_eq!(fresh.actions, 0, "not before the grace period");
    sqlx::query("UPDATE proposed_actions SET decided_at = now() - interval '10 minutes'")
        .execute(&db.pool)
        .await
        .unwrap();
    let passed = reconciler(&db, &settings).pass().await;
    assert_eq!((passed.actions, passed.responses), (1, 0));
    assert_eq!(
        reconciler(&db, &settings).pass().await.actions,
        0,
        "its job is on the bus now"
    );
    // the execution runs; its continuation job is lost with Redis's data (the chat queue's
    // stream and job markers wiped before a worker takes it: the actions queue alone is drained)
    let mut registry = jobs::Registry::new();
    workers::tools::ActionsHandler::new(db.pool.clone(), bus.clone()).register(&mut registry);
    let mut opts = WorkerOptions::from_settings(&settings, vec![Queue::Actions]);
    opts.read_block = Duration::from_millis(200);
    Worker::new(bus_for(&settings), registry, opts)
        .drain_until_empty(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(status_of(&db, action_id).await.0, "executed");
    let mut conn = bus.redis().conn().await.unwrap();
    for p in bus.parts(Queue::Chat) {
        let keys = bus.keys(p);
        let _: i64 = redis::AsyncCommands::del(&mut conn, &[&keys.stream, &keys.marks])
            .await
            .unwrap();
    }
    sqlx::query("UPDATE responses SET enqueued_at = now() - interval '10 minutes'")
        .execute(&db.pool)
        .await
        .unwrap();
    let passed = reconciler(&db, &settings).pass().await;
    assert_eq!((passed.actions, passed.responses), (0, 1));
    script(&w, vec![Behaviour::reply("Recovered.")]).await;
    drain(&db, &settings).await;
    assert_eq!(
        answer(&events(&settings, continuation.id).await),
        "Recovered."
    );
    assert_eq!(count(&db, "SELECT count(*) FROM tasks").await, 3);
    let after = reconciler(&db, &settings).pass().await;
    assert_eq!(after, workers::reconciler::Report::default());
}

#[tokio::test]
async fn a_confirmed_update_changes_the_task_once_and_is_audited_with_before_and_after() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[]);
    let w = world(&db).await;
    script(
        &w,
        vec![Behaviour::ToolCalls {
            calls: vec![call(
                "u1",
                "update_task",
                json!({"task_id": w.open_task, "status": "in_progress", "assignee_id": w.user}),
            )],
        }],
    )
    .await;
    let job = turn(&db, &w, "I'll take the alpha checklist").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    drain(&db, &settings).await;
    let action_id: Uuid = sqlx::query_scalar("SELECT id FROM proposed_actions")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let summary: String = sqlx::query_scalar("SELECT summary FROM proposed_actions")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        summary.contains("status todo → in_progress") && summary.contains("assignee nobody → Uma"),
        "{summary}"
    );
    let unchanged: (String, Option<Uuid>) =
        sqlx::query_as("SELECT status, assignee_id FROM tasks WHERE id = $1")
            .bind(w.open_task)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        unchanged,
        ("todo".to_owned(), None),
        "nothing before the confirm"
    );

    confirm(&db, &w, action_id).await;
    script(&w, vec![Behaviour::reply("It is yours now.")]).await;
    let env = Envelope::new(ExecuteAction {
        action_id: action_id.into(),
    });
    let bus = bus_for(&settings);
    bus.enqueue_envelope(&env).await.unwrap();
    drain(&db, &settings).await;
    bus.enqueue_envelope(&env).await.unwrap();
    drain(&db, &settings).await;
    let changed: (String, Option<Uuid>) =
        sqlx::query_as("SELECT status, assignee_id FROM tasks WHERE id = $1")
            .bind(w.open_task)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(changed, ("in_progress".to_owned(), Some(w.user)));
    let (task_id, before, after): (Uuid, Value, Value) =
        sqlx::query_as("SELECT task_id, before, after FROM action_audit WHERE action_id = $1")
            .bind(action_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(task_id, w.open_task);
    assert_eq!(
        (before["status"].as_str(), after["status"].as_str()),
        (Some("todo"), Some("in_progress"))
    );
    assert_eq!(after["assignee_id"], json!(w.user));
    assert_eq!(count(&db, "SELECT count(*) FROM action_audit").await, 1);
    assert_eq!(
        requests(&w).await.len(),
        2,
        "one proposal call, one continuation"
    );
}

#[tokio::test]
async fn a_narrowed_conversation_reads_and_proposes_only_within_its_projects() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[]);
    let mut w = world(&db).await;
    // a second project the user sees, outside the conversation's narrowing
    let mut c = db.pool.acquire().await.unwrap();
    let other = project(&mut c, w.org, w.admin, "Hermes mail", Visibility::Org).await;
    let other_task = task(&mut c, w.org, other, w.admin, "Outside gamma checklist").await;
    w.conversation = conv::create(&mut c, w.org, w.user, "narrow", Some(&[w.open]))
        .await
        .unwrap()
        .id;
    drop(c);
    script(
        &w,
        vec![
            Behaviour::ToolCalls {
                calls: vec![
                    call("n1", "list_projects", json!({})),
                    call("n2", "get_task", json!({"task_id": other_task})),
                    call("n3", "search_knowledge", json!({"query": "checklist"})),
                    call(
                        "n4",
                        "create_task",
                        json!({"project_id": other, "title": "x"}),
                    ),
                ],
            },
            Behaviour::reply("Only Apollo here."),
        ],
    )
    .await;
    let job = turn(&db, &w, "what about hermes?").await;
    bus_for(&settings).enqueue(job).await.unwrap();
    drain(&db, &settings).await;
    let reqs = requests(&w).await;
    let r = tool_results(&reqs[1]);
    let all = reqs[1]["messages"].to_string();
    assert!(
        !all.contains("Hermes mail") && !all.contains("Outside gamma"),
        "{all}"
    );
    assert_eq!(r["n1"]["projects"].as_array().unwrap().len(), 1);
    assert_eq!(r["n2"], json!({"error": "not found"}));
    assert_eq!(r["n3"]["results"].as_array().unwrap().len(), 1);
    assert_eq!(r["n4"], json!({"error": "not found"}));
    assert_eq!(count(&db, "SELECT count(*) FROM proposed_actions").await, 0);
}

#[tokio::test]
async fn a_round_is_stored_once_per_response_even_by_two_runs() {
    let db = TestDb::new().await;
    let w = world(&db).await;
    let job = turn(&db, &w, "q").await;
    let calls = json!([{"id": "c1", "type": "function", "function": {"name": "list_projects", "arguments": "{}"}}]);
    let results = vec![("c1".to_owned(), "{}".to_owned())];
    let round = actions::Round {
        conversation_id: w.conversation.into(),
        response_id: job.response_id,
        round: 1,
        content: "",
        model: "m",
        tool_calls: &calls,
        results: &results,
    };
    let mut a = db.pool.begin().await.unwrap();
    assert!(actions::insert_round(&mut a, &round).await.unwrap());
    a.commit().await.unwrap();
    let mut b = db.pool.begin().await.unwrap();
    assert!(
        !actions::insert_round(&mut b, &round).await.unwrap(),
        "the second run stores nothing"
    );
    b.commit().await.unwrap();
    let mut c = db.pool.acquire().await.unwrap();
    let (exchange, rounds) = actions::response_exchange(&mut c, job.response_id)
        .await
        .unwrap();
    assert_eq!((exchange.len(), rounds), (2, 1));
}

/// The `scheduler` process sweeps: an expired proposal is recorded as `expired`; the process
/// still stops cleanly on SIGTERM.
#[tokio::test]
async fn the_scheduler_process_expires_pending_proposals() {
    use crate::crash::{command_with, eventually};
    use crate::process::{lines, sigterm, wait_exit, wait_for};
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let w = world(&db).await;
    let job = turn(&db, &w, "q").await;
    let mut tx = db.pool.begin().await.unwrap();
    let args = json!({"project_id": w.open, "title": "t"});
    let (action, _) = actions::insert_proposal(
        &mut tx,
        &actions::NewProposal {
            org_id: w.org.into(),
            conversation_id: w.conversation.into(),
            user_id: w.user.into(),
            response_id: job.response_id,
            tool_call_id: "c1",
            tool: "create_task",
            arguments: &args,
            summary: "Create task \"t\"",
            before: None,
            after: &args,
            expires_at: chrono::Utc::now() - chrono::Duration::seconds(1),
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let mut child = command_with(env!("CARGO_BIN_EXE_scheduler"), &db, &redis, "")
        .spawn()
        .unwrap();
    let rx = lines(&mut child);
    wait_for(&rx, "scheduler ready", Duration::from_secs(20));
    let pool = db.pool.clone();
    eventually("the proposal is swept", Duration::from_secs(20), || {
        let pool = pool.clone();
        async move {
            let status: String =
                sqlx::query_scalar("SELECT status FROM proposed_actions WHERE id = $1")
                    .bind(action.id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            status == "expired"
        }
    })
    .await;
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(20)).success());
}

#[tokio::test]
async fn search_knowledge_finds_indexed_documents_the_user_may_see_and_nothing_else() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let embed = via_litellm(&unique_model("embed"));
    let settings = test_settings(&db, &redis, &[("EMBEDDING_MODEL", embed.as_str())]);
    let w = world(&db).await;
    let visible_marker = format!("orbit{}", Uuid::new_v4().simple());
    let hidden_marker = format!("vault{}", Uuid::new_v4().simple());
    {
        let mut c = db.pool.acquire().await.unwrap();
        let seen = testkit::retrieval::document(&mut c, w.org, w.open, "Flight plan").await;
        let secret = testkit::retrieval::document(&mut c, w.org, w.hidden, "Vault").await;
        testkit::retrieval::insert(
            &mut c,
            &[
                testkit::retrieval::project_chunk(
                    w.org,
                    w.open,
                    "document",
                    seen,
                    "Flight plan",
                    &format!("the {visible_marker} procedure"),
                    "flight procedure",
                    &embed,
                    384,
                ),
                testkit::retrieval::project_chunk(
                    w.org,
                    w.hidden,
                    "document",
                    secret,
                    "Vault",
                    &format!("the {hidden_marker} procedure"),
                    "flight procedure",
                    &embed,
                    384,
                ),
            ],
        )
        .await;
    }
    script(
        &w,
        vec![
            Behaviour::ToolCalls {
                calls: vec![call(
                    "s1",
                    "search_knowledge",
                    json!({"query": "flight procedure"}),
                )],
            },
            Behaviour::reply("Found it."),
        ],
    )
    .await;
    let job = turn(&db, &w, "what is the flight procedure?").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");

    let reqs = requests(&w).await;
    assert_eq!(reqs.len(), 2, "one tool round, then the answer");
    let results = tool_results(&reqs[1]);
    let hits = results["s1"]["results"].as_array().unwrap();
    assert!(
        hits.iter()
            .any(|h| h["kind"] == "document"
                && h["snippet"].as_str().unwrap().contains(&visible_marker)),
        "the visible document is found through the retrieval index: {hits:?}"
    );
    let all = reqs[1]["messages"].to_string();
    assert!(
        !all.contains(&hidden_marker),
        "a document of a hidden project leaked: {all}"
    );
    // the query was embedded (vector search), not only matched by full text
    let embedded = FakeClient::shared()
        .requests(embed.strip_prefix("fake/").unwrap())
        .await
        .unwrap();
    assert!(
        embedded
            .iter()
            .any(|r| r.body.to_string().contains("flight procedure")),
        "the search_knowledge query went to the embedder"
    );
}

#[tokio::test]
async fn a_continuation_waiting_out_a_long_cooldown_runs_once() {
    // The continuation of a confirmed action waits out a 90 s cooldown of its model (in the
    // delayed set, its job marker on the bus). However long it waits, the reconciler leaves it
    // alone: when the model is back, the continuation calls it once and answers once.
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[]);
    let w = world(&db).await;
    let (_, action_id) = propose_create(&db, &settings, &w).await;
    let calls_before = requests(&w).await.len();
    let exec = Envelope::new(ExecuteAction {
        action_id: action_id.into(),
    });
    let mut tx = db.pool.begin().await.unwrap();
    let Decision::Done((_, continuation)) =
        actions::confirm(&mut tx, w.user.into(), action_id.into(), exec.id.into())
            .await
            .unwrap()
    else {
        panic!("not confirmed");
    };
    tx.commit().await.unwrap();
    let bus = bus_for(&settings);
    bus.enqueue_envelope(&exec).await.unwrap();
    let handle = Arc::new(RedisHandle::new(&settings.redis).unwrap());
    let cooldowns = workers::model::Cooldowns::new(handle.clone(), Duration::from_secs(30));
    cooldowns
        .start(&via_litellm(&w.model), Duration::from_secs(90))
        .await
        .unwrap();
    // the action runs; its continuation waits on the cooldown (the worker gives up draining)
    let waited = worker(&db, &settings)
        .drain_until_empty(Duration::from_secs(4))
        .await;
    assert!(waited.is_err(), "the continuation is still waiting");
    assert_eq!(status_of(&db, action_id).await.0, "executed");
    assert_eq!(bus.stats(Queue::Chat).await.unwrap().delayed, 1);
    // ... for what looks like ten minutes: the reconciler re-enqueues nothing
    for sql in [
        "UPDATE proposed_actions SET decided_at = now() - interval '10 minutes',
                                     executed_at = now() - interval '10 minutes'",
        "UPDATE responses SET enqueued_at = now() - interval '10 minutes'",
    ] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    let passed = reconciler(&db, &settings).pass().await;
    assert_eq!(passed, workers::reconciler::Report::default());
    assert_eq!(bus.stats(Queue::Chat).await.unwrap().delayed, 1);
    // the cooldown ends (and the wait with it)
    let mut conn = handle.conn().await.unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(cooldowns.key(&via_litellm(&w.model)))
        .query_async(&mut conn)
        .await
        .unwrap();
    // (in whichever partition the continuation waits)
    for p in bus.parts(Queue::Chat) {
        let delayed = &bus.keys(p).delayed;
        let waiting: Vec<String> = redis::cmd("ZRANGE")
            .arg(delayed)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        for m in waiting {
            let _: i64 = redis::cmd("ZADD")
                .arg(delayed)
                .arg(0)
                .arg(m)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    script(&w, vec![Behaviour::reply("Created, once.")]).await;
    drain(&db, &settings).await;
    assert_eq!(
        answer(&events(&settings, continuation.id).await),
        "Created, once."
    );
    assert_eq!(
        requests(&w).await.len(),
        calls_before + 1,
        "the continuation called the model once"
    );
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM messages WHERE response_id = '{}'
                 AND role = 'assistant' AND tool_calls IS NULL",
                continuation.id
            )
        )
        .await,
        1
    );
}

/// A proposal's result names the project of the task it would change (its summary quotes the
/// task), so the turn's answer — which repeats that summary — records the project in its
/// provenance and drops out with it.
#[tokio::test]
async fn a_proposal_names_its_project_in_the_answers_provenance() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let settings = test_settings(&db, &redis, &[]);
    let w = world(&db).await;
    let mut c = db.pool.acquire().await.unwrap();
    store::projects::add_member(&mut c, w.org.into(), w.hidden.into(), w.user.into())
        .await
        .unwrap();
    drop(c);
    script(
        &w,
        vec![Behaviour::ToolCalls {
            calls: vec![call(
                "u1",
                "update_task",
                json!({"task_id": w.hidden_task, "status": "done"}),
            )],
        }],
    )
    .await;
    let job = turn(&db, &w, "the beta checklist is done").await;
    bus_for(&settings).enqueue(job.clone()).await.unwrap();
    let report = drain(&db, &settings).await;
    assert_eq!((report.completed, report.dead), (1, 0), "{report:?}");
    let result: String =
        sqlx::query_scalar("SELECT content FROM messages WHERE response_id = $1 AND role = 'tool'")
            .bind(job.response_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let result: Value = serde_json::from_str(&result).unwrap();
    assert_eq!(result["status"], "pending_confirmation");
    assert_eq!(result["project_id"], json!(w.hidden));
    let (content, projects): (String, Vec<Uuid>) = sqlx::query_as(
        "SELECT content, source_project_ids FROM messages
         WHERE response_id = $1 AND role = 'assistant' AND tool_calls IS NULL",
    )
    .bind(job.response_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(content.contains("Hidden beta checklist"), "{content}");
    assert_eq!(projects, vec![w.hidden]);
}
