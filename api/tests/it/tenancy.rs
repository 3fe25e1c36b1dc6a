//! Orgs, teams, projects, tasks: roles, 404-not-403 for what a caller cannot see, pagination.

use serde_json::{Value, json};

use crate::helpers::{Account, TestApp, email, spawn_app};

async fn project(app: &TestApp, who: &Account, body: Value) -> String {
    let r = app.post("/v1/projects", &who.token, body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

async fn task(app: &TestApp, who: &Account, project: &str, title: &str) -> String {
    let r = app
        .post(
            &format!("/v1/projects/{project}/tasks"),
            &who.token,
            json!({"title": title}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

async fn team(app: &TestApp, admin: &Account, name: &str) -> String {
    let r = app
        .post(
            &format!("/v1/orgs/{}/teams", admin.org_id),
            &admin.token,
            json!({"name": name}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

/// Every endpoint that takes an id, called by `who`, must answer 404 with the error shape.
async fn assert_all_404(app: &TestApp, who: &Account, ids: &Ids, label: &str) {
    let stranger = &ids.some_user;
    let calls: Vec<(reqwest::Method, String, Option<Value>)> = vec![
        (
            reqwest::Method::GET,
            format!("/v1/projects/{}", ids.project),
            None,
        ),
        (
            reqwest::Method::GET,
            format!("/v1/projects/{}/tasks", ids.project),
            None,
        ),
        (
            reqwest::Method::POST,
            format!("/v1/projects/{}/tasks", ids.project),
            Some(json!({"title": "sneaky"})),
        ),
        (
            reqwest::Method::POST,
            format!("/v1/projects/{}/members", ids.project),
            Some(json!({"user_id": who.user_id})),
        ),
        (
            reqwest::Method::DELETE,
            format!("/v1/projects/{}/members/{stranger}", ids.project),
            None,
        ),
        (
            reqwest::Method::GET,
            format!("/v1/tasks/{}", ids.task),
            None,
        ),
        (
            reqwest::Method::PATCH,
            format!("/v1/tasks/{}", ids.task),
            Some(json!({"title": "changed"})),
        ),
    ];
    let mut calls = calls;
    if ids.cross_org {
        calls.extend([
            (reqwest::Method::GET, format!("/v1/orgs/{}/members", ids.org), None),
            (reqwest::Method::GET, format!("/v1/orgs/{}/teams", ids.org), None),
            (
                reqwest::Method::POST,
                format!("/v1/orgs/{}/members", ids.org),
                Some(json!({"email": email("x"), "password": "long enough", "name": "X", "role": "member"})),
            ),
            (
                reqwest::Method::POST,
                format!("/v1/orgs/{}/teams", ids.org),
                Some(json!({"name": "intruders"})),
            ),
            (
                reqwest::Method::DELETE,
                format!("/v1/orgs/{}/members/{stranger}", ids.org),
                None,
            ),
            (
                reqwest::Method::PATCH,
                format!("/v1/orgs/{}/members/{stranger}", ids.org),
                Some(json!({"role": "member"})),
            ),
            (
                reqwest::Method::POST,
                format!("/v1/teams/{}/members", ids.team),
                Some(json!({"user_id": who.user_id})),
            ),
            (
                reqwest::Method::DELETE,
                format!("/v1/teams/{}/members/{stranger}", ids.team),
                None,
            ),
        ]);
    }
    for (method, path, body) in calls {
        let r = app
            .call(method.clone(), &path, Some(&who.token), body)
            .await;
        assert_eq!(r.status, 404, "{label}: {method} {path}: {}", r.body);
        assert_eq!(
            r.body["error"]["code"], "not_found",
            "{label}: {method} {path}"
        );
    }
    // and the same answers as for ids that do not exist at all
    let missing = uuid::Uuid::now_v7();
    let r = app
        .get(&format!("/v1/projects/{missing}"), &who.token)
        .await;
    assert_eq!(r.status, 404);
}

struct Ids {
    org: String,
    team: String,
    project: String,
    task: String,
    some_user: String,
    cross_org: bool,
}

#[tokio::test]
async fn another_orgs_ids_answer_404_everywhere() {
    let app = spawn_app().await;
    let a = app.register(&email("a-owner"), "A").await;
    let a_member = app.add_member(&a, &email("a-member"), "member").await;
    let b = app.register(&email("b-owner"), "B").await;
    let t = team(&app, &a, "core").await;
    let r = app
        .post(
            &format!("/v1/teams/{t}/members"),
            &a.token,
            json!({"user_id": a_member.user_id}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let p = project(&app, &a, json!({"name": "Org-wide", "visibility": "org"})).await;
    let tk = task(&app, &a, &p, "secret work").await;
    let ids = Ids {
        org: a.org_id.clone(),
        team: t,
        project: p.clone(),
        task: tk.clone(),
        some_user: a_member.user_id.clone(),
        cross_org: true,
    };
    // B's owner (an owner! of another org) sees nothing of A
    assert_all_404(&app, &b, &ids, "other org's owner").await;
    let list = app.get("/v1/projects", &b.token).await;
    assert_eq!(list.body["items"], json!([]));
    // B cannot pull A's users into B's teams or projects either: like a nonexistent user
    let bt = team(&app, &b, "bteam").await;
    let r1 = app
        .post(
            &format!("/v1/teams/{bt}/members"),
            &b.token,
            json!({"user_id": a_member.user_id}),
        )
        .await;
    let r2 = app
        .post(
            &format!("/v1/teams/{bt}/members"),
            &b.token,
            json!({"user_id": uuid::Uuid::now_v7()}),
        )
        .await;
    assert_eq!(r1.status, 422, "{}", r1.body);
    assert_eq!((r1.status, &r1.body), (r2.status, &r2.body));
    // a team project of B cannot name A's team
    let r = app
        .post(
            "/v1/projects",
            &b.token,
            json!({"name": "x", "visibility": "team", "team_id": ids.team}),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    // nothing was changed in A
    let r = app.get(&format!("/v1/tasks/{tk}"), &a.token).await;
    assert_eq!(r.body["title"], "secret work");
}

#[tokio::test]
async fn same_org_users_get_404_for_what_they_cannot_see() {
    let app = spawn_app().await;
    let owner = app.register(&email("owner"), "Org").await;
    let alice = app.add_member(&owner, &email("alice"), "member").await;
    let bob = app.add_member(&owner, &email("bob"), "member").await;
    // alice's private project
    let p = project(
        &app,
        &alice,
        json!({"name": "Diary", "visibility": "private"}),
    )
    .await;
    let tk = task(&app, &alice, &p, "private note").await;
    let ids = Ids {
        org: owner.org_id.clone(),
        team: String::new(),
        project: p.clone(),
        task: tk.clone(),
        some_user: alice.user_id.clone(),
        cross_org: false,
    };
    assert_all_404(&app, &bob, &ids, "same-org non-member").await;
    // the owner sees it (admins see every project of their org)
    assert_eq!(
        app.get(&format!("/v1/projects/{p}"), &owner.token)
            .await
            .status,
        200
    );
    assert_eq!(
        app.get(&format!("/v1/tasks/{tk}"), &owner.token)
            .await
            .status,
        200
    );
    // alice shares it with bob; bob sees it and can work on its tasks
    let r = app
        .post(
            &format!("/v1/projects/{p}/members"),
            &alice.token,
            json!({"user_id": bob.user_id}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = app
        .patch(
            &format!("/v1/tasks/{tk}"),
            &bob.token,
            json!({"status": "in_progress"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "in_progress");
    assert_eq!(r.body["title"], "private note");
    // alice removes bob again: the next request is 404
    let r = app
        .delete(
            &format!("/v1/projects/{p}/members/{}", bob.user_id),
            &alice.token,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_all_404(&app, &bob, &ids, "removed project member").await;

    // team projects: only the team (and admins)
    let t = team(&app, &owner, "core").await;
    let r = app
        .post(
            &format!("/v1/teams/{t}/members"),
            &owner.token,
            json!({"user_id": alice.user_id}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // bob is not in the team: cannot create its projects (he can see the team exists: 403)
    let r = app
        .post(
            "/v1/projects",
            &bob.token,
            json!({"name": "T", "visibility": "team", "team_id": t}),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let tp = project(
        &app,
        &alice,
        json!({"name": "T", "visibility": "team", "team_id": t}),
    )
    .await;
    let ttk = task(&app, &alice, &tp, "team work").await;
    let ids = Ids {
        project: tp.clone(),
        task: ttk,
        ..ids
    };
    assert_all_404(&app, &bob, &ids, "not in the team").await;
    // project members of a team project are refused (only private projects have members)
    let r = app
        .post(
            &format!("/v1/projects/{tp}/members"),
            &alice.token,
            json!({"user_id": bob.user_id}),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    // alice leaves the team: she loses it at once, though she created it
    let r = app
        .delete(
            &format!("/v1/teams/{t}/members/{}", alice.user_id),
            &owner.token,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        app.get(&format!("/v1/projects/{tp}"), &alice.token)
            .await
            .status,
        404
    );
    // an org project is seen by everyone in the org
    let op = project(&app, &bob, json!({"name": "All", "visibility": "org"})).await;
    assert_eq!(
        app.get(&format!("/v1/projects/{op}"), &alice.token)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn members_cannot_administer_the_org() {
    let app = spawn_app().await;
    let owner = app.register(&email("owner"), "Org").await;
    let member = app.add_member(&owner, &email("member"), "member").await;
    let admin = app.add_member(&owner, &email("admin"), "admin").await;
    let org = &owner.org_id;
    let t = team(&app, &owner, "core").await;
    let forbidden = [
        app.post(
            &format!("/v1/orgs/{org}/members"),
            &member.token,
            json!({"email": email("n"), "password": "long enough", "name": "N", "role": "member"}),
        )
        .await,
        app.post(
            &format!("/v1/orgs/{org}/teams"),
            &member.token,
            json!({"name": "mine"}),
        )
        .await,
        app.post(
            &format!("/v1/teams/{t}/members"),
            &member.token,
            json!({"user_id": member.user_id}),
        )
        .await,
        app.delete(
            &format!("/v1/teams/{t}/members/{}", member.user_id),
            &member.token,
        )
        .await,
        app.patch(
            &format!("/v1/orgs/{org}/members/{}", member.user_id),
            &member.token,
            json!({"role": "admin"}),
        )
        .await,
        // an admin cannot create owners
        app.post(
            &format!("/v1/orgs/{org}/members"),
            &admin.token,
            json!({"email": email("o"), "password": "long enough", "name": "O", "role": "owner"}),
        )
        .await,
    ];
    for r in &forbidden {
        assert_eq!(r.status, 403, "{}", r.body);
        assert_eq!(r.body["error"]["code"], "forbidden");
    }
    assert_eq!(app.count("teams").await, 1);
    assert_eq!(app.count("team_members").await, 0);
    assert_eq!(app.count("users").await, 3);
    // an admin may add members and teams; duplicates conflict
    let r = app
        .post(
            &format!("/v1/orgs/{org}/teams"),
            &admin.token,
            json!({"name": "CORE"}),
        )
        .await;
    assert_eq!(r.status, 409, "team names are unique per org: {}", r.body);
    let r = app
        .post(
            &format!("/v1/teams/{t}/members"),
            &admin.token,
            json!({"user_id": member.user_id}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["team_id"], t.as_str());
    assert_eq!(r.body["user_id"], member.user_id.as_str());
    let r = app
        .post(
            &format!("/v1/teams/{t}/members"),
            &admin.token,
            json!({"user_id": member.user_id}),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    let r = app
        .post(
            &format!("/v1/orgs/{org}/members"),
            &admin.token,
            json!({"email": member.email, "password": "long enough", "name": "N", "role": "member"}),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    // the owner demotes the admin, who then gets 403
    let r = app
        .patch(
            &format!("/v1/orgs/{org}/members/{}", admin.user_id),
            &owner.token,
            json!({"role": "member"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app
        .post(
            &format!("/v1/orgs/{org}/teams"),
            &admin.token,
            json!({"name": "later"}),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(app.get("/v1/me", &admin.token).await.body["role"], "member");
}

#[tokio::test]
async fn tasks_assignees_and_updates() {
    let app = spawn_app().await;
    let owner = app.register(&email("owner"), "Org").await;
    let alice = app.add_member(&owner, &email("alice"), "member").await;
    let bob = app.add_member(&owner, &email("bob"), "member").await;
    let outsider = app.register(&email("out"), "Other").await;
    let p = project(&app, &alice, json!({"name": "P", "visibility": "private"})).await;
    // bob cannot see the private project: he cannot be its assignee; nor can an outsider
    for who in [&bob.user_id, &outsider.user_id] {
        let r = app
            .post(
                &format!("/v1/projects/{p}/tasks"),
                &alice.token,
                json!({"title": "t", "assignee_id": who}),
            )
            .await;
        assert_eq!(r.status, 422, "{}", r.body);
        assert_eq!(r.body["error"]["code"], "invalid_reference");
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("assignee_id")
        );
    }
    assert_eq!(app.count("tasks").await, 0);
    let r = app
        .post(
            &format!("/v1/projects/{p}/tasks"),
            &alice.token,
            json!({"title": " Write ", "description": "d", "status": "in_progress",
                   "assignee_id": owner.user_id}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["title"], "Write");
    assert_eq!(r.body["status"], "in_progress");
    assert_eq!(r.body["assignee_id"], owner.user_id.as_str());
    assert_eq!(r.body["created_by"], alice.user_id.as_str());
    let id = r.body["id"].as_str().unwrap().to_owned();
    // partial update: status only; then unassign with null
    let r = app
        .patch(
            &format!("/v1/tasks/{id}"),
            &alice.token,
            json!({"status": "done"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "done");
    assert_eq!(r.body["assignee_id"], owner.user_id.as_str());
    let r = app
        .patch(
            &format!("/v1/tasks/{id}"),
            &alice.token,
            json!({"assignee_id": null}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body["assignee_id"].is_null());
    assert_eq!(r.body["description"], "d");
    let r = app
        .patch(
            &format!("/v1/tasks/{id}"),
            &alice.token,
            json!({"assignee_id": bob.user_id}),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    let r = app
        .patch(
            &format!("/v1/tasks/{id}"),
            &alice.token,
            json!({"status": "blocked"}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("status")
    );
    let r = app
        .patch(
            &format!("/v1/tasks/{id}"),
            &alice.token,
            json!({"title": ""}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    for field in ["title", "status", "description"] {
        let r = app
            .patch(
                &format!("/v1/tasks/{id}"),
                &alice.token,
                json!({field: null}),
            )
            .await;
        assert_eq!(r.status, 400, "{field}: {}", r.body);
        assert!(r.body["error"]["message"].as_str().unwrap().contains(field));
    }
    let r = app.get(&format!("/v1/tasks/{id}"), &alice.token).await;
    assert_eq!(r.body["status"], "done");
    assert_eq!(r.body["title"], "Write");
}

#[tokio::test]
async fn lists_are_paginated_with_cursors() {
    let app = spawn_app().await;
    let owner = app.register(&email("owner"), "Org").await;
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(
            project(
                &app,
                &owner,
                json!({"name": format!("p{i}"), "visibility": "org"}),
            )
            .await,
        );
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/projects?limit=2&cursor={c}"),
            None => "/v1/projects?limit=2".to_owned(),
        };
        let r = app.get(&path, &owner.token).await;
        assert_eq!(r.status, 200, "{}", r.body);
        pages += 1;
        for item in r.body["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, made, "every project once, oldest first");
    // tasks too
    for i in 0..3 {
        task(&app, &owner, &made[0], &format!("t{i}")).await;
    }
    let r = app
        .get(
            &format!("/v1/projects/{}/tasks?limit=2", made[0]),
            &owner.token,
        )
        .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 2);
    let c = r.body["next_cursor"].as_str().unwrap();
    let r = app
        .get(
            &format!("/v1/projects/{}/tasks?limit=2&cursor={c}", made[0]),
            &owner.token,
        )
        .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1);
    assert!(r.body["next_cursor"].is_null());
    // bad paging input
    for q in ["limit=0", "limit=201", "limit=abc", "cursor=%%%"] {
        let r = app.get(&format!("/v1/projects?{q}"), &owner.token).await;
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        assert_eq!(r.body["error"]["code"], "invalid_input");
    }
}

#[tokio::test]
async fn openapi_document_shows_the_bearer_scheme_and_the_tenancy_paths() {
    let app = spawn_app().await;
    let v: Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let scheme = &v["components"]["securitySchemes"]["BearerAuth"];
    assert_eq!(scheme["type"], "http", "{scheme}");
    assert_eq!(scheme["scheme"], "bearer", "{scheme}");
    for (path, method) in [
        ("/v1/auth/register", "post"),
        ("/v1/auth/login", "post"),
        ("/v1/me", "get"),
        ("/v1/orgs/{org_id}/members", "post"),
        ("/v1/orgs/{org_id}/teams", "post"),
        ("/v1/teams/{team_id}/members", "post"),
        ("/v1/teams/{team_id}/members/{user_id}", "delete"),
        ("/v1/projects", "post"),
        ("/v1/projects", "get"),
        ("/v1/projects/{id}", "get"),
        ("/v1/projects/{id}/members", "post"),
        ("/v1/projects/{id}/members/{user_id}", "delete"),
        ("/v1/projects/{id}/tasks", "post"),
        ("/v1/projects/{id}/tasks", "get"),
        ("/v1/tasks/{id}", "get"),
        ("/v1/tasks/{id}", "patch"),
    ] {
        let op = &v["paths"][path][method];
        assert!(op.is_object(), "{method} {path} missing from /openapi.json");
        let secured = op["security"].is_array();
        assert_eq!(
            secured,
            !path.starts_with("/v1/auth/"),
            "{method} {path}: security {}",
            op["security"]
        );
    }
}

#[tokio::test]
async fn concurrent_demotions_never_leave_an_org_without_an_owner() {
    let app = spawn_app().await;
    for round in 0..5 {
        let a = app.register(&email(&format!("a{round}")), "Org").await;
        let b = app
            .add_member(&a, &email(&format!("b{round}")), "owner")
            .await;
        let org = &a.org_id;
        let path_b = format!("/v1/orgs/{org}/members/{}", b.user_id);
        let path_a = format!("/v1/orgs/{org}/members/{}", a.user_id);
        let (ra, rb) = tokio::join!(
            app.patch(&path_b, &a.token, json!({"role": "member"})),
            app.patch(&path_a, &b.token, json!({"role": "member"})),
        );
        let statuses = [ra.status, rb.status];
        assert!(
            statuses.iter().all(|s| [200, 403, 409].contains(s)),
            "{statuses:?}"
        );
        let owners: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM org_memberships WHERE org_id = $1::uuid AND role = 'owner'",
        )
        .bind(org)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        assert_eq!(owners, 1, "round {round}: {statuses:?}");
    }
}

#[tokio::test]
async fn members_and_teams_are_listed_to_org_members() {
    let app = spawn_app().await;
    let owner = app.register(&email("owner"), "Org").await;
    let m = app.add_member(&owner, &email("m"), "member").await;
    app.add_member(&owner, &email("n"), "admin").await;
    team(&app, &owner, "one").await;
    team(&app, &owner, "two").await;
    let r = app
        .get(
            &format!("/v1/orgs/{}/members?limit=2", owner.org_id),
            &m.token,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["id"], owner.user_id.as_str());
    assert_eq!(items[0]["role"], "owner");
    assert!(items[0].get("password_hash").is_none());
    let c = r.body["next_cursor"].as_str().unwrap();
    let r = app
        .get(
            &format!("/v1/orgs/{}/members?limit=2&cursor={c}", owner.org_id),
            &m.token,
        )
        .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(r.body["items"][0]["role"], "admin");
    assert!(r.body["next_cursor"].is_null());
    let r = app
        .get(&format!("/v1/orgs/{}/teams", owner.org_id), &m.token)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let names: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["one", "two"]);
}
