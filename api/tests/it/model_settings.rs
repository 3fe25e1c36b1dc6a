//! Per-org model settings: defaults until set, admins set served names only (checked against
//! the LiteLLM proxy), members read, other orgs see nothing.

use serde_json::json;

use crate::helpers::{email, spawn_app, spawn_app_with};

#[tokio::test]
async fn defaults_then_admin_sets_served_models() {
    let app = spawn_app().await;
    let owner = app.register(&email("owner"), "Org A").await;
    let admin = app.add_member(&owner, &email("admin"), "admin").await;
    let member = app.add_member(&owner, &email("member"), "member").await;
    let path = format!("/v1/orgs/{}/settings/model", owner.org_id);

    let r = app.get(&path, &member.token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        json!({"model": app.settings.chat.default_model, "fallback_model": app.settings.chat.default_fallback_model})
    );

    let body = json!({"model": "local-chat-fallback", "fallback_model": "local-chat"});
    let r = app
        .call(
            reqwest::Method::PUT,
            &path,
            Some(&admin.token),
            Some(body.clone()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, body);
    let r = app.get(&path, &member.token).await;
    assert_eq!(r.body, body);

    // an unknown name: 422 naming the field; nothing changes
    let r = app
        .call(
            reqwest::Method::PUT,
            &path,
            Some(&owner.token),
            Some(json!({"model": "local-chat", "fallback_model": "no-such-model-xyz"})),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "unknown_model");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fallback_model")
    );
    assert_eq!(app.get(&path, &member.token).await.body, body);

    // members may not change them
    let r = app
        .call(
            reqwest::Method::PUT,
            &path,
            Some(&member.token),
            Some(json!({"model": "local-chat", "fallback_model": "local-chat"})),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);

    // generation parameters are not model settings
    let r = app
        .call(
            reqwest::Method::PUT,
            &path,
            Some(&owner.token),
            Some(json!({"model": "local-chat", "fallback_model": "local-chat", "temperature": 1})),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
}

#[tokio::test]
async fn another_orgs_settings_are_not_found() {
    let app = spawn_app().await;
    let a = app.register(&email("a"), "Org A").await;
    let b = app.register(&email("b"), "Org B").await;
    let path = format!("/v1/orgs/{}/settings/model", a.org_id);
    assert_eq!(app.get(&path, &b.token).await.status, 404);
    let r = app
        .call(
            reqwest::Method::PUT,
            &path,
            Some(&b.token),
            Some(json!({"model": "local-chat", "fallback_model": "local-chat"})),
        )
        .await;
    assert_eq!(r.status, 404);
    let missing = format!("/v1/orgs/{}/settings/model", uuid::Uuid::now_v7());
    assert_eq!(app.get(&missing, &a.token).await.status, 404);
}

#[tokio::test]
async fn proxy_down_is_503() {
    let app = spawn_app_with(&[("LITELLM_BASE_URL", "http://127.0.0.1:9")]).await;
    let owner = app.register(&email("owner"), "Org A").await;
    let path = format!("/v1/orgs/{}/settings/model", owner.org_id);
    let r = app
        .call(
            reqwest::Method::PUT,
            &path,
            Some(&owner.token),
            Some(json!({"model": "local-chat", "fallback_model": "local-chat"})),
        )
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "unavailable");
}

/// Names under a wildcard route of the proxy (`fake/*` in config/litellm.yaml) are served,
/// though `/v1/models` does not list them one by one; unknown names still answer 422, and the
/// route itself is not a model name.
#[tokio::test]
async fn names_under_a_wildcard_route_are_accepted() {
    let app = spawn_app().await;
    let owner = app.register(&email("owner"), "Org W").await;
    let path = format!("/v1/orgs/{}/settings/model", owner.org_id);
    let model = testkit::via_litellm(&testkit::unique_model("wild"));
    assert!(model.starts_with("fake/"), "{model}");
    let body = json!({"model": model, "fallback_model": "local-chat"});
    let r = app
        .call(
            reqwest::Method::PUT,
            &path,
            Some(&owner.token),
            Some(body.clone()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(app.get(&path, &owner.token).await.body, body);

    for bad in ["nonexistent-model-x", "fake/*"] {
        let r = app
            .call(
                reqwest::Method::PUT,
                &path,
                Some(&owner.token),
                Some(json!({"model": bad, "fallback_model": "local-chat"})),
            )
            .await;
        assert_eq!(r.status, 422, "{bad}: {}", r.body);
        assert_eq!(r.body["error"]["code"], "unknown_model");
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("model")
        );
    }
    assert_eq!(app.get(&path, &owner.token).await.body, body);
}

/// `GET /v1/models`: what the proxy serves (config/litellm.yaml), sorted, wildcard routes
/// marked, the embedding model left out; authenticated; 503 when the proxy is down.
#[tokio::test]
async fn the_model_list_is_what_the_proxy_serves_for_chat() {
    let app = spawn_app().await;
    let owner = app.register(&email("owner"), "Org L").await;
    let member = app.add_member(&owner, &email("member"), "member").await;
    let r = app.get("/v1/models", &member.token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let items = r.body["items"].as_array().unwrap();
    let names: Vec<&str> = items.iter().map(|m| m["name"].as_str().unwrap()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
    for want in ["local-chat", "local-chat-fallback", "fake/*"] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    assert!(
        !names.contains(&app.settings.embedding.model.as_str()),
        "{names:?}"
    );
    for m in items {
        assert_eq!(
            m["wildcard"],
            m["name"].as_str().unwrap().contains('*'),
            "{m}"
        );
    }
    // every listed plain name is accepted by the settings
    let path = format!("/v1/orgs/{}/settings/model", owner.org_id);
    let r = app
        .call(
            reqwest::Method::PUT,
            &path,
            Some(&owner.token),
            Some(json!({"model": "local-chat-fallback", "fallback_model": "local-chat"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    let r = app
        .call(reqwest::Method::GET, "/v1/models", None, None)
        .await;
    assert_eq!(r.status, 401);

    let down = spawn_app_with(&[("LITELLM_BASE_URL", "http://127.0.0.1:9")]).await;
    let o = down.register(&email("owner"), "Org D").await;
    let r = down.get("/v1/models", &o.token).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "unavailable");
}
