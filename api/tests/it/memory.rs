//! Memory is hidden from users (SPEC §3): after a real turn whose prompt carried memory
//! entries and a summary, no user endpoint returns any of it. Operators manage it with
//! `api memory list|add|delete` (run here as the real binary).

use std::sync::Arc;
use std::time::Duration;

use jobs::{Bus, Queue, RedisHandle, Worker, WorkerOptions};
use serde_json::json;
use store::memory::Owner;
use testkit::{Behaviour, FakeClient, TestDb, TestRedis, unique_model, via_litellm};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::chat_helpers::SseReader;
use crate::helpers::{TestApp, email, spawn_app_with};

async fn add(app: &TestApp, owner: Owner, content: String) {
    testkit::retrieval::memory(&app.db.pool, owner, &content).await;
}

/// The real chat and memory handlers, consuming until cancelled.
pub(crate) fn spawn_worker(app: &TestApp) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let redis = Arc::new(RedisHandle::new(&app.settings.redis).unwrap());
    let mut registry = workers::handlers::registry(app.db.pool.clone());
    workers::handlers::chat::ChatHandler::new(app.db.pool.clone(), redis.clone(), &app.settings)
        .unwrap()
        .register(&mut registry);
    workers::handlers::memory::MemoryHandlers::new(
        app.db.pool.clone(),
        redis.clone(),
        &app.settings,
    )
    .unwrap()
    .register(&mut registry);
    let mut opts = WorkerOptions::from_settings(&app.settings, vec![Queue::Chat, Queue::Memory]);
    opts.read_block = Duration::from_millis(200);
    let worker = Worker::new(Bus::new(redis, &app.settings.queues), registry, opts);
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        worker.run(token).await.unwrap();
    });
    (stop, task)
}

#[tokio::test]
async fn no_user_endpoint_returns_memory_or_summary_text() {
    let embed = via_litellm(&unique_model("embed"));
    let app = spawn_app_with(&[
        ("EMBEDDING_MODEL", embed.as_str()),
        ("RECENT_MESSAGES", "2"),
    ])
    .await;
    let owner = app.register(&email("mem"), "Acme").await;
    let org: Uuid = owner.org_id.parse().unwrap();
    let user: Uuid = owner.user_id.parse().unwrap();
    let model = unique_model("chat");
    store::conversations::set_org_models(
        &app.db.pool,
        org,
        &via_litellm(&model),
        &via_litellm(&model),
    )
    .await
    .unwrap();
    let project = app
        .post(
            "/v1/projects",
            &owner.token,
            json!({"name": "Apollo", "description": "launch", "visibility": "org"}),
        )
        .await;
    assert_eq!(project.status, 201, "{}", project.body);
    let project_id = project.body["id"].as_str().unwrap().to_owned();
    let task = app
        .post(
            &format!("/v1/projects/{project_id}/tasks"),
            &owner.token,
            json!({"title": "Book the venue"}),
        )
        .await;
    assert_eq!(task.status, 201, "{}", task.body);
    let task_id = task.body["id"].as_str().unwrap().to_owned();

    let marker = format!("MEMMARK{}", Uuid::new_v4().simple());
    add(&app, Owner::org(org), format!("org {marker}")).await;
    add(
        &app,
        Owner::project(org, project_id.parse().unwrap()),
        format!("project {marker}"),
    )
    .await;
    add(&app, Owner::user(org, user), format!("user {marker}")).await;

    let c = app
        .post("/v1/conversations", &owner.token, json!({"title": "plans"}))
        .await;
    assert_eq!(c.status, 201, "{}", c.body);
    let conversation = c.body["id"].as_str().unwrap().to_owned();
    sqlx::query(
        "INSERT INTO conversation_summaries (conversation_id, summary, summarized_up_to)
         VALUES ($1, $2, 0)",
    )
    .bind(conversation.parse::<Uuid>().unwrap())
    .bind(format!("summary {marker}"))
    .execute(&app.db.pool)
    .await
    .unwrap();

    // a real turn through the worker; the fact extraction answers with a fact carrying the
    // marker too
    FakeClient::shared()
        .script(
            &model,
            vec![
                Behaviour::reply("Here is the plan."),
                Behaviour::reply(format!(
                    r#"{{"facts":[{{"tier":"user","content":"learnt {marker}"}}]}}"#
                )),
            ],
        )
        .await
        .unwrap();
    let (stop, worker) = spawn_worker(&app);
    let answer = app
        .post(
            &format!("/v1/conversations/{conversation}/messages"),
            &owner.token,
            json!({"content": "what is the plan?", "stream": false}),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["message"]["content"], "Here is the plan.");
    let mut bodies = vec![("POST messages".to_owned(), answer.body.to_string())];
    // wait for the remember job (the learnt fact is stored), then stop the worker
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let learnt: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM conversation_memories WHERE content LIKE 'learnt %'",
        )
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        if learnt == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the remember job did not run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    worker.await.unwrap();

    // the model did get the memory and the summary: the test is not vacuous
    let sent = FakeClient::shared().requests(&model).await.unwrap();
    let prompt = sent
        .iter()
        .find(|r| r.path.ends_with("/chat/completions"))
        .unwrap()
        .body
        .to_string();
    for part in ["org", "project", "user", "summary"] {
        assert!(
            prompt.contains(&format!("{part} {marker}")),
            "{part}: {prompt}"
        );
    }

    let response_id = answer.body["message"]["response_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let document = app
        .post(
            &format!("/v1/projects/{project_id}/documents"),
            &owner.token,
            json!({"title": "Doc", "content": "document text", "content_type": "text/plain"}),
        )
        .await;
    assert_eq!(document.status, 202, "{}", document.body);
    let document_id = document.body["id"].as_str().unwrap().to_owned();
    let action = {
        let mut c = app.db.pool.acquire().await.unwrap();
        let args = json!({"project_id": project_id, "title": "Proposed"});
        store::actions::insert_proposal(
            &mut c,
            &store::actions::NewProposal {
                org_id: org.into(),
                conversation_id: conversation.parse().unwrap(),
                user_id: user.into(),
                response_id: response_id.parse().unwrap(),
                tool_call_id: "call_1",
                tool: "create_task",
                arguments: &args,
                summary: "Create the task Proposed",
                before: None,
                after: &args,
                expires_at: chrono::Utc::now() + chrono::Duration::hours(1),
            },
        )
        .await
        .unwrap()
        .0
        .id
    };
    // every user GET endpoint of the OpenAPI document, with this user's ids filled in
    let covered: Vec<(&str, String)> = vec![
        ("/v1/me", "/v1/me".to_owned()),
        ("/v1/conversations", "/v1/conversations".to_owned()),
        (
            "/v1/conversations/{id}",
            format!("/v1/conversations/{conversation}"),
        ),
        (
            "/v1/conversations/{id}/messages",
            format!("/v1/conversations/{conversation}/messages"),
        ),
        ("/v1/projects", "/v1/projects".to_owned()),
        ("/v1/projects/{id}", format!("/v1/projects/{project_id}")),
        (
            "/v1/projects/{id}/tasks",
            format!("/v1/projects/{project_id}/tasks"),
        ),
        ("/v1/tasks/{id}", format!("/v1/tasks/{task_id}")),
        (
            "/v1/orgs/{org_id}/settings/model",
            format!("/v1/orgs/{org}/settings/model"),
        ),
        (
            "/v1/orgs/{org_id}/members",
            format!("/v1/orgs/{org}/members"),
        ),
        ("/v1/orgs/{org_id}/teams", format!("/v1/orgs/{org}/teams")),
        ("/v1/documents/{id}", format!("/v1/documents/{document_id}")),
        (
            "/v1/projects/{id}/documents",
            format!("/v1/projects/{project_id}/documents"),
        ),
        (
            "/v1/conversations/{id}/actions",
            format!("/v1/conversations/{conversation}/actions"),
        ),
        ("/v1/actions/{id}", format!("/v1/actions/{action}")),
    ];
    let doc: serde_json::Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    bodies.push(("/openapi.json".to_owned(), doc.to_string()));
    let events_template = "/v1/conversations/{id}/responses/{response_id}/events";
    let mut seen = Vec::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        if item.get("get").is_none()
            || ["/healthz", "/readyz", "/metrics"].contains(&template.as_str())
            || template == events_template
        {
            continue;
        }
        assert!(
            covered.iter().any(|(t, _)| t == template),
            "GET {template} is a user endpoint this test does not call yet: add it to `covered` \
             (no user endpoint may return memory text)"
        );
        seen.push(template.clone());
    }
    // (a template served by two poem-openapi APIs, like .../messages, may appear twice in the
    // document and lose its GET in parsing: the explicit list still calls it)
    assert!(seen.len() >= 10, "{seen:?}");
    for (_, path) in covered {
        let r = app
            .http
            .get(app.url(&path))
            .bearer_auth(&owner.token)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert!(status < 400, "{path}: {status} {text}");
        bodies.push((path, text));
    }
    // the response's events, replayed from the start
    let r = app
        .http
        .get(app.url(&format!(
            "/v1/conversations/{conversation}/responses/{response_id}/events"
        )))
        .bearer_auth(&owner.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let frames = SseReader::new(r).rest().await;
    assert!(
        frames.iter().any(|f| f.name() == "message.completed"),
        "{frames:?}"
    );
    bodies.push(("events".to_owned(), format!("{frames:?}")));

    for (path, body) in &bodies {
        assert!(!body.contains(&marker), "{path} leaks memory: {body}");
        assert!(!body.contains("MEMMARK"), "{path} leaks memory: {body}");
    }
}

async fn api_memory(db: &TestDb, redis: &TestRedis, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_api"))
        .arg("memory")
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", &redis.url)
        .env("REDIS_PREFIX", &redis.prefix)
        .env("JWT_SECRET", testkit::TEST_JWT_SECRET)
        .env("LOG_FILTER", "warn")
        // no proxy here: entries are stored without a vector
        .env("LITELLM_BASE_URL", "http://127.0.0.1:9")
        .env_remove("JWT_ALGORITHM")
        .env_remove("SWITCHBOARD_CONFIG")
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .unwrap()
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "api memory failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[tokio::test]
async fn operators_list_add_and_delete_memory_with_the_cli() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let mut c = db.pool.acquire().await.unwrap();
    let org = store::tenancy::insert_org(&mut c, "acme").await.unwrap().id;
    let other = store::tenancy::insert_org(&mut c, "other")
        .await
        .unwrap()
        .id;
    let user = store::tenancy::insert_user(&mut c, &email("op"), "U", "x")
        .await
        .unwrap()
        .id;
    store::tenancy::insert_membership(&mut c, org, user, store::Role::Member)
        .await
        .unwrap();
    drop(c);
    let (org_s, user_s, other_s) = (org.to_string(), user.to_string(), other.to_string());

    let id = ok(&api_memory(
        &db,
        &redis,
        &[
            "add",
            "--org",
            &org_s,
            "--tier",
            "org",
            "--content",
            "We bill in EUR",
        ],
    )
    .await)
    .trim()
    .to_owned();
    let id: Uuid = id.parse().unwrap();
    ok(&api_memory(
        &db,
        &redis,
        &[
            "add",
            "--org",
            &org_s,
            "--tier",
            "user",
            "--user",
            &user_s,
            "--content",
            "Likes tea",
        ],
    )
    .await);

    let all = ok(&api_memory(&db, &redis, &["list", "--org", &org_s]).await);
    assert_eq!(all.lines().count(), 3, "{all}");
    assert!(
        all.lines().any(|l| l.starts_with(&id.to_string())
            && l.contains("\torg\t")
            && l.ends_with("We bill in EUR")),
        "{all}"
    );
    let users = ok(&api_memory(&db, &redis, &["list", "--org", &org_s, "--tier", "user"]).await);
    assert_eq!(users.lines().count(), 2, "{users}");
    assert!(
        users.contains(&user_s) && users.contains("Likes tea"),
        "{users}"
    );

    // errors name the flag; nothing is stored
    for (args, flag) in [
        (
            vec![
                "add",
                "--org",
                &org_s,
                "--tier",
                "project",
                "--content",
                "x",
            ],
            "--project",
        ),
        (
            vec![
                "add",
                "--org",
                &org_s,
                "--tier",
                "user",
                "--user",
                &other_s,
                "--content",
                "x",
            ],
            "--user",
        ),
        (
            vec![
                "add",
                "--org",
                &org_s,
                "--tier",
                "project",
                "--project",
                &other_s,
                "--content",
                "x",
            ],
            "--project",
        ),
        (
            vec!["add", "--org", &org_s, "--tier", "org", "--content", " "],
            "--content",
        ),
        (
            vec!["delete", "--org", &other_s, "--id", &id.to_string()],
            "--id",
        ),
    ] {
        let out = api_memory(&db, &redis, &args).await;
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{args:?}: {err}");
    }
    assert_eq!(
        ok(&api_memory(&db, &redis, &["list", "--org", &org_s]).await)
            .lines()
            .count(),
        3
    );

    ok(&api_memory(
        &db,
        &redis,
        &["delete", "--org", &org_s, "--id", &id.to_string()],
    )
    .await);
    let left = ok(&api_memory(&db, &redis, &["list", "--org", &org_s]).await);
    assert_eq!(left.lines().count(), 2, "{left}");
    assert!(!left.contains("We bill in EUR"));
}
