//! Conversations: owner-only reads (404 for anyone else), narrowing to visible projects,
//! pagination of conversations and messages.

use serde_json::json;

use crate::helpers::{email, spawn_app};

#[tokio::test]
async fn create_list_get_and_messages() {
    let app = spawn_app().await;
    let owner = app.register(&email("owner"), "Org A").await;
    let r = app
        .post("/v1/conversations", &owner.token, json!({"title": "Plans"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(r.body["title"], "Plans");
    assert!(r.body["project_ids"].is_null());
    assert!(r.body["created_at"].is_string());

    // no body fields at all is fine too
    let r = app.post("/v1/conversations", &owner.token, json!({})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["title"], "");

    let r = app.get("/v1/conversations?limit=1", &owner.token).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(r.body["items"][0]["id"], id.as_str());
    let cursor = r.body["next_cursor"].as_str().unwrap().to_owned();
    let r = app
        .get(
            &format!("/v1/conversations?limit=1&cursor={cursor}"),
            &owner.token,
        )
        .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1);
    assert!(r.body["next_cursor"].is_null());

    let r = app
        .get(&format!("/v1/conversations/{id}"), &owner.token)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["id"], id.as_str());

    let r = app
        .get(&format!("/v1/conversations/{id}/messages"), &owner.token)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["items"], json!([]));
    assert!(r.body["next_cursor"].is_null());

    // unknown fields are refused, naming the field
    let r = app
        .post("/v1/conversations", &owner.token, json!({"colour": "red"}))
        .await;
    assert_eq!(r.status, 400);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("colour")
    );
}

#[tokio::test]
async fn conversations_are_their_owners_alone() {
    let app = spawn_app().await;
    let owner = app.register(&email("owner"), "Org A").await;
    let colleague = app.add_member(&owner, &email("colleague"), "admin").await;
    let stranger = app.register(&email("stranger"), "Org B").await;
    let id = app.conversation(&owner.token).await;
    let missing = uuid::Uuid::now_v7();

    for who in [&colleague, &stranger] {
        for path in [
            format!("/v1/conversations/{id}"),
            format!("/v1/conversations/{id}/messages"),
        ] {
            let r = app.get(&path, &who.token).await;
            assert_eq!(r.status, 404, "{path}: {}", r.body);
            assert_eq!(r.body["error"]["code"], "not_found");
        }
        let r = app
            .post(
                &format!("/v1/conversations/{id}/messages"),
                &who.token,
                json!({"content": "hello"}),
            )
            .await;
        assert_eq!(r.status, 404);
        let r = app.get("/v1/conversations", &who.token).await;
        assert_eq!(r.body["items"], json!([]));
    }
    let r = app
        .get(&format!("/v1/conversations/{missing}"), &owner.token)
        .await;
    assert_eq!(r.status, 404);
    let r = app.get("/v1/conversations/not-a-uuid", &owner.token).await;
    assert_eq!(r.status, 404);
    assert_eq!(app.count("messages").await, 0);
}

#[tokio::test]
async fn project_ids_must_be_visible() {
    let app = spawn_app().await;
    let owner = app.register(&email("owner"), "Org A").await;
    let member = app.add_member(&owner, &email("member"), "member").await;
    let stranger = app.register(&email("stranger"), "Org B").await;
    let open = app
        .post(
            "/v1/projects",
            &owner.token,
            json!({"name": "Open", "description": "", "visibility": "org"}),
        )
        .await;
    assert_eq!(open.status, 201, "{}", open.body);
    let open = open.body["id"].as_str().unwrap().to_owned();
    let hidden = app
        .post(
            "/v1/projects",
            &owner.token,
            json!({"name": "Hidden", "description": "", "visibility": "private"}),
        )
        .await;
    let hidden = hidden.body["id"].as_str().unwrap().to_owned();
    let foreign = app
        .post(
            "/v1/projects",
            &stranger.token,
            json!({"name": "Theirs", "description": "", "visibility": "org"}),
        )
        .await;
    let foreign = foreign.body["id"].as_str().unwrap().to_owned();

    for bad in [&hidden, &foreign] {
        let r = app
            .post(
                "/v1/conversations",
                &member.token,
                json!({"project_ids": [open, bad]}),
            )
            .await;
        assert_eq!(r.status, 422, "{}", r.body);
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("project_ids")
        );
    }
    assert_eq!(app.count("conversations").await, 0);
    assert_eq!(app.count("conversation_projects").await, 0);

    let r = app
        .post(
            "/v1/conversations",
            &member.token,
            json!({"title": "Narrow", "project_ids": [open]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["project_ids"], json!([open]));
    let id = r.body["id"].as_str().unwrap();
    let r = app
        .get(&format!("/v1/conversations/{id}"), &member.token)
        .await;
    assert_eq!(r.body["project_ids"], json!([open]));
    let r = app.get("/v1/conversations", &member.token).await;
    assert_eq!(r.body["items"][0]["project_ids"], json!([open]));
}

#[tokio::test]
async fn an_empty_project_ids_list_is_not_narrowed() {
    let app = spawn_app().await;
    let owner = app.register(&email("owner"), "Org E").await;
    let r = app
        .post(
            "/v1/conversations",
            &owner.token,
            json!({"title": "Everything", "project_ids": []}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(r.body["project_ids"].is_null(), "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let r = app
        .get(&format!("/v1/conversations/{id}"), &owner.token)
        .await;
    assert_eq!(r.status, 200);
    assert!(r.body["project_ids"].is_null(), "{}", r.body);
    let scoped: bool = sqlx::query_scalar("SELECT scoped FROM conversations WHERE id = $1::uuid")
        .bind(&id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(!scoped, "stored as not narrowed");
}
