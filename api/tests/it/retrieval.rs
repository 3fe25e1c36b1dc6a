//! Retrieval end to end: HTTP in (JSON mode), the real chat worker, LiteLLM in front of the fake
//! upstream (chat and embeddings), citations out — in the answer and in the message listing —
//! only for a user who may see the source.

use serde_json::{Value, json};
use testkit::retrieval as fx;
use testkit::{Behaviour, FakeClient, unique_model, via_litellm};
use uuid::Uuid;

use crate::e2e::RunningWorker;
use crate::helpers::{TestApp, email, spawn_app_with};

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

#[tokio::test]
async fn an_answer_cites_what_the_caller_may_see_and_the_listing_shows_it() {
    let embed = via_litellm(&unique_model("embed"));
    let app = spawn_app_with(&[("EMBEDDING_MODEL", embed.as_str())]).await;
    let worker = RunningWorker::start(&app);
    let owner = app.register(&email("owner"), "Org").await;
    let org = Uuid::parse_str(&owner.org_id).unwrap();
    let primary = unique_model("chat");
    store::conversations::set_org_models(
        &app.db.pool,
        org,
        &via_litellm(&primary),
        &via_litellm(&primary),
    )
    .await
    .unwrap();
    FakeClient::shared()
        .set_default(&primary, Behaviour::reply("Here is what I found."))
        .await
        .unwrap();
    let colleague = app.add_member(&owner, &email("colleague"), "member").await;
    let token = owner.token.clone();
    let p = app
        .post(
            "/v1/projects",
            &token,
            json!({"name": "Apollo", "description": "", "visibility": "private"}),
        )
        .await;
    assert_eq!(p.status, 201, "{}", p.body);
    let project = Uuid::parse_str(p.body["id"].as_str().unwrap()).unwrap();

    let question = "Which vendor supplies the heat shield?";
    let secret = format!("VENDOR{}", &Uuid::new_v4().simple().to_string()[..8]);
    let mut c = app.db.pool.acquire().await.unwrap();
    let doc = fx::document(&mut c, org, project, "Suppliers").await;
    fx::insert(
        &mut c,
        &[fx::project_chunk(
            org,
            project,
            "document",
            doc,
            "Suppliers",
            &format!("The heat shield vendor is {secret}."),
            question,
            &embed,
            384,
        )],
    )
    .await;

    let conv = app.conversation(&token).await;
    let answer = ask(&app, &token, &conv, question).await;
    let expected =
        json!([{"source_kind": "document", "source_id": doc, "title": "Suppliers", "chunk": 0}]);
    assert_eq!(answer["citations"], expected, "{answer}");
    let calls = FakeClient::shared().requests(&primary).await.unwrap();
    assert!(calls.last().unwrap().body.to_string().contains(&secret));
    let listed = app
        .get(&format!("/v1/conversations/{conv}/messages"), &token)
        .await;
    assert_eq!(listed.status, 200);
    let items = listed.body["items"].as_array().unwrap();
    assert_eq!(items.last().unwrap()["citations"], expected);
    assert_eq!(
        items[0]["citations"],
        json!([]),
        "the user message cites nothing"
    );

    // a colleague outside the private project: same question, nothing cited or sent
    let theirs = app.conversation(&colleague.token).await;
    let answer = ask(&app, &colleague.token, &theirs, question).await;
    assert_eq!(answer["citations"], json!([]));
    let calls = FakeClient::shared().requests(&primary).await.unwrap();
    assert!(!calls.last().unwrap().body.to_string().contains(&secret));
    worker.stop().await;
}
