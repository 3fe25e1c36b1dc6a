//! Provenance (issue 17): HTTP in, the real chat and memory workers, LiteLLM in front of the
//! fake upstream, the real indexer. Each test fails on the code before provenance:
//!
//! - a user's message is indexed like an answer (the API's turn writes its outbox row);
//! - restricted text never reaches another member's prompt through memory, even when the
//!   extractor files it as a project fact, and the fact goes with its document;
//! - a removed member's old answers (and a narrowed conversation's) no longer come back;
//! - a restricted document's uploader and the org's admins can manage it.

use std::time::Duration;

use serde_json::{Value, json};
use testkit::{Behaviour, FakeClient, unique_model, via_litellm};
use uuid::Uuid;
use workers::handlers::index::Indexer;

use crate::helpers::{Account, TestApp, email, spawn_app_with};
use crate::memory::spawn_worker;

/// An app with fresh fake models for chat (the org's primary and fallback, also the memory
/// extractor's) and embeddings; returns `(app, owner, chat model, embedding model)` with the
/// unprefixed fake names.
async fn setup(label: &str) -> (TestApp, Account, String, String) {
    let embed = unique_model("embed");
    let app = spawn_app_with(&[("EMBEDDING_MODEL", via_litellm(&embed).as_str())]).await;
    let owner = app.register(&email(label), "Prov Org").await;
    let chat = unique_model("chat");
    store::conversations::set_org_models(
        &app.db.pool,
        owner.org_id.parse().unwrap(),
        &via_litellm(&chat),
        &via_litellm(&chat),
    )
    .await
    .unwrap();
    (app, owner, chat, embed)
}

async fn project(app: &TestApp, owner: &Account, name: &str, visibility: &str) -> String {
    let r = app
        .post(
            "/v1/projects",
            &owner.token,
            json!({"name": name, "description": "", "visibility": visibility}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

async fn conversation(app: &TestApp, token: &str, projects: Option<&[&str]>) -> String {
    let body = match projects {
        Some(p) => json!({"title": "c", "project_ids": p}),
        None => json!({"title": "c"}),
    };
    let r = app.post("/v1/conversations", token, body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

/// One turn in JSON mode; the stored answer.
async fn ask(app: &TestApp, token: &str, conversation: &str, content: &str) -> Value {
    let r = app
        .post(
            &format!("/v1/conversations/{conversation}/messages"),
            token,
            json!({"content": content}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["message"].clone()
}

async fn upload(app: &TestApp, token: &str, project: &str, body: Value) -> String {
    let r = app
        .post(&format!("/v1/projects/{project}/documents"), token, body)
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

async fn index(app: &TestApp) {
    Indexer::new(app.db.pool.clone(), &app.settings)
        .unwrap()
        .run_pass(false)
        .await
        .unwrap();
}

/// The chat prompts the fake got for `model` that contain `needle` (a turn's question).
async fn prompts_with(model: &str, needle: &str) -> Vec<String> {
    FakeClient::shared()
        .requests(model)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .map(|r| r.body.to_string())
        .filter(|b| b.contains(needle))
        .collect()
}

fn marker(label: &str) -> String {
    format!("{label}{}", &Uuid::new_v4().simple().to_string()[..10])
}

async fn wait_for(app: &TestApp, sql: &str, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let done: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
        if done {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_users_message_is_indexed_like_an_answer() {
    let (app, owner, chat, embed) = setup("prov-index").await;
    FakeClient::shared()
        .set_default(&chat, Behaviour::reply("Noted."))
        .await
        .unwrap();
    let (stop, worker) = spawn_worker(&app);
    let conv = conversation(&app, &owner.token, None).await;
    let said = marker("USERSAID");
    ask(
        &app,
        &owner.token,
        &conv,
        &format!("Our launch word is {said}"),
    )
    .await;
    let listed = app
        .get(&format!("/v1/conversations/{conv}/messages"), &owner.token)
        .await;
    let user_message = listed.body["items"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(listed.body["items"][0]["role"], "user");
    stop.cancel();
    worker.await.unwrap();

    // the turn's statement wrote the user message's outbox row
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM index_outbox WHERE source_kind = 'message' AND source_id = $1::uuid",
    )
    .bind(&user_message)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(rows, 1, "the user message's indexing outbox row");
    // and the index job embeds what the user said
    index(&app).await;
    let embedded: Vec<String> = FakeClient::shared()
        .requests(&embed)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.path == "/v1/embeddings")
        .map(|r| r.body["input"].to_string())
        .collect();
    assert!(
        embedded.iter().any(|i| i.contains(&said)),
        "no embeddings request carried the user's words: {embedded:?}"
    );
    let chunks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM embeddings WHERE source_kind = 'message' AND source_id = $1::uuid",
    )
    .bind(&user_message)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(chunks, 1);
}

#[tokio::test]
async fn restricted_text_never_reaches_another_members_prompt_through_memory() {
    let (app, owner, chat, _) = setup("prov-mem").await;
    let uploader = app.add_member(&owner, &email("prov-up"), "member").await;
    let listed = app
        .add_member(&owner, &email("prov-listed"), "member")
        .await;
    let colleague = app.add_member(&owner, &email("prov-col"), "member").await;
    let p = project(&app, &owner, "Apollo", "org").await;
    let secret = marker("LAUNCHCODE");
    // restricted to the uploader and one other member
    let doc = upload(
        &app,
        &uploader.token,
        &p,
        json!({"title": "Launch codes", "content_type": "text/plain",
               "content": format!("The launch code of Apollo is {secret}."),
               "visible_to_user_ids": [uploader.user_id, listed.user_id]}),
    )
    .await;
    index(&app).await;

    // the answer quotes the document; the extractor tries to make it project knowledge
    FakeClient::shared()
        .script(
            &chat,
            vec![
                Behaviour::reply(format!("The launch code is {secret}.")),
                Behaviour::reply(format!(
                    r#"{{"facts":[{{"tier":"project","project_id":"{p}","content":"The Apollo launch code is {secret}"}}]}}"#
                )),
            ],
        )
        .await
        .unwrap();
    FakeClient::shared()
        .set_default(&chat, Behaviour::reply(r#"{"facts": []}"#))
        .await
        .unwrap();
    let (stop, worker) = spawn_worker(&app);
    let mine = conversation(&app, &uploader.token, None).await;
    let answer = ask(
        &app,
        &uploader.token,
        &mine,
        "What is the launch code of Apollo?",
    )
    .await;
    assert!(
        answer["citations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["source_id"] == doc.as_str()),
        "the uploader's turn retrieved the restricted document: {answer}"
    );
    wait_for(
        &app,
        &format!(
            "SELECT EXISTS (SELECT 1 FROM memory_extractions WHERE message_id = '{}')",
            answer["id"].as_str().unwrap()
        ),
        "the remember job did not run",
    )
    .await;
    // a colleague of the same project asks about it: nothing of it in their prompt
    let theirs = conversation(&app, &colleague.token, None).await;
    let question = marker("COLLEAGUEASKS");
    ask(
        &app,
        &colleague.token,
        &theirs,
        &format!("{question}: what is the Apollo launch code?"),
    )
    .await;
    let prompts = prompts_with(&chat, &question).await;
    assert!(!prompts.is_empty());
    for prompt in &prompts {
        assert!(!prompt.contains(&secret), "leaked: {prompt}");
    }
    // code, not the model, decided: the uploader's own fact, carrying its document
    let (tier, owner_id): (String, Option<Uuid>) = sqlx::query_as(
        "SELECT tier, user_id FROM conversation_memories WHERE content LIKE '%' || $1 || '%'",
    )
    .bind(&secret)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(tier, "user");
    assert_eq!(owner_id, Some(uploader.user_id.parse().unwrap()));
    let docs: Vec<Uuid> = sqlx::query_scalar(
        "SELECT source_document_ids FROM conversation_memories
         WHERE content LIKE '%' || $1 || '%'",
    )
    .bind(&secret)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(docs, vec![doc.parse::<Uuid>().unwrap()]);
    stop.cancel();
    worker.await.unwrap();

    // deleting the document deletes what was derived from it
    let r = app
        .delete(&format!("/v1/documents/{doc}"), &uploader.token)
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversation_memories WHERE content LIKE '%' || $1 || '%'",
    )
    .bind(&secret)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(left, 0, "the fact went with its source");
}

#[tokio::test]
async fn a_removed_members_old_answers_no_longer_come_back() {
    let (app, owner, chat, _) = setup("prov-rm").await;
    let member = app.add_member(&owner, &email("prov-rm-m"), "member").await;
    let private = project(&app, &owner, "Hermes", "private").await;
    let other = project(&app, &owner, "Gemini", "org").await;
    let r = app
        .post(
            &format!("/v1/projects/{private}/members"),
            &owner.token,
            json!({"user_id": member.user_id}),
        )
        .await;
    assert!(r.status < 300, "{}", r.body);
    let secret = marker("HERMESBUDGET");
    upload(
        &app,
        &owner.token,
        &private,
        json!({"title": "Budget", "content_type": "text/plain",
               "content": format!("The Hermes budget is {secret}.")}),
    )
    .await;
    index(&app).await;
    FakeClient::shared()
        .set_default(
            &chat,
            Behaviour::reply(format!("The Hermes budget is {secret}.")),
        )
        .await
        .unwrap();
    let worker = crate::e2e::RunningWorker::start(&app);
    let first = conversation(&app, &member.token, None).await;
    let answer = ask(&app, &member.token, &first, "What is the Hermes budget?").await;
    assert!(answer["content"].as_str().unwrap().contains(&secret));
    // the answer is indexed (with what it drew on, checked at the end)
    index(&app).await;
    FakeClient::shared()
        .set_default(&chat, Behaviour::reply("I cannot help with that."))
        .await
        .unwrap();

    // a conversation narrowed to another project: the old answer does not come back
    let narrowed = conversation(&app, &member.token, Some(&[other.as_str()])).await;
    let q1 = marker("NARROWED");
    ask(
        &app,
        &member.token,
        &narrowed,
        &format!("{q1} what is the Hermes budget?"),
    )
    .await;
    let prompts = prompts_with(&chat, &q1).await;
    assert!(!prompts.is_empty());
    assert!(prompts.iter().all(|p| !p.contains(&secret)), "{prompts:?}");

    // removed from the project: neither the document nor the old answer comes back
    let r = app
        .delete(
            &format!("/v1/projects/{private}/members/{}", member.user_id),
            &owner.token,
        )
        .await;
    assert!(r.status < 300, "{}", r.body);
    let again = conversation(&app, &member.token, None).await;
    let q2 = marker("REMOVED");
    ask(
        &app,
        &member.token,
        &again,
        &format!("{q2} what is the Hermes budget?"),
    )
    .await;
    let prompts = prompts_with(&chat, &q2).await;
    assert!(!prompts.is_empty());
    assert!(prompts.iter().all(|p| !p.contains(&secret)), "{prompts:?}");
    worker.stop().await;
    // the old answer's chunk is still there, carrying the project it drew on: filtered, not gone
    let drew_on: Vec<Uuid> =
        sqlx::query_scalar("SELECT source_project_ids FROM embeddings WHERE source_id = $1::uuid")
            .bind(answer["id"].as_str().unwrap())
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert!(
        drew_on.contains(&private.parse::<Uuid>().unwrap()),
        "{drew_on:?}"
    );
}

#[tokio::test]
async fn the_uploader_and_an_admin_can_manage_a_restricted_document() {
    let (app, owner, _, _) = setup("prov-docs").await;
    let uploader = app.add_member(&owner, &email("prov-d-up"), "member").await;
    let listed = app.add_member(&owner, &email("prov-d-ls"), "member").await;
    let unlisted = app.add_member(&owner, &email("prov-d-un"), "member").await;
    let admin = app.add_member(&owner, &email("prov-d-ad"), "admin").await;
    let stranger = app.register(&email("prov-d-x"), "Elsewhere").await;
    let p = project(&app, &owner, "Vault", "org").await;
    let restricted = json!({"title": "Salaries", "content_type": "text/plain",
                            "content": "salary table", "visible_to_user_ids": [listed.user_id]});
    let doc = upload(&app, &uploader.token, &p, restricted.clone()).await;
    let open = upload(
        &app,
        &unlisted.token,
        &p,
        json!({"title": "Handbook", "content_type": "text/plain", "content": "welcome"}),
    )
    .await;
    let path = format!("/v1/documents/{doc}");
    let list = format!("/v1/projects/{p}/documents");
    let ids = |r: &crate::helpers::Resp| -> Vec<String> {
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .collect()
    };

    // metadata: the uploader, the listed user and the org's owner/admins; nobody else
    for who in [&uploader, &listed, &owner, &admin] {
        let r = app.get(&path, &who.token).await;
        assert_eq!(r.status, 200, "{}: {}", who.email, r.body);
        assert_eq!(r.body["title"], "Salaries");
        let r = app.get(&list, &who.token).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(ids(&r), vec![doc.clone(), open.clone()], "{}", who.email);
        assert!(r.body["next_cursor"].is_null());
    }
    assert_eq!(app.get(&path, &unlisted.token).await.status, 404);
    let r = app.get(&list, &unlisted.token).await;
    assert_eq!(ids(&r), vec![open.clone()]);
    assert_eq!(app.get(&path, &stranger.token).await.status, 404);
    assert_eq!(app.get(&list, &stranger.token).await.status, 404);
    // paginated
    let r = app.get(&format!("{list}?limit=1"), &owner.token).await;
    assert_eq!(ids(&r), vec![doc.clone()]);
    let cursor = r.body["next_cursor"].as_str().unwrap().to_owned();
    let r = app
        .get(&format!("{list}?limit=1&cursor={cursor}"), &owner.token)
        .await;
    assert_eq!(ids(&r), vec![open.clone()]);

    // the content reaches the uploader's and the listed user's prompts, not the admins'
    index(&app).await;
    let allowed: Vec<Uuid> =
        sqlx::query_scalar("SELECT allowed_user_ids FROM embeddings WHERE source_id = $1::uuid")
            .bind(&doc)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    let mut expected: Vec<Uuid> = vec![
        listed.user_id.parse().unwrap(),
        uploader.user_id.parse().unwrap(),
    ];
    expected.sort();
    assert_eq!(allowed, expected);

    // delete: someone who cannot see it 404, a listed reader 403, the uploader 204
    assert_eq!(app.delete(&path, &stranger.token).await.status, 404);
    assert_eq!(app.delete(&path, &unlisted.token).await.status, 404);
    assert_eq!(app.delete(&path, &listed.token).await.status, 403);
    assert_eq!(app.delete(&path, &uploader.token).await.status, 204);
    assert_eq!(app.get(&path, &owner.token).await.status, 404);
    // an admin deletes another member's restricted document
    let doc = upload(&app, &uploader.token, &p, restricted).await;
    let r = app
        .delete(&format!("/v1/documents/{doc}"), &admin.token)
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
}
