//! Documents: upload (each type, limits, permissions), status through an index run, delete;
//! and the index job against the real LiteLLM proxy in front of the fake upstream (what is
//! embedded, what is skipped, retries and failures).

use std::time::Duration;

use jobs::{Queue, Worker, WorkerOptions};
use serde_json::{Value, json};
use testkit::{Behaviour, FakeClient, unique_model, via_litellm};
use workers::handlers::index::Indexer;

use crate::helpers::{Account, Resp, TestApp, email, spawn_app_with};

/// An app whose embedding model is a fresh fake model; returns the fake's name for it.
async fn app_with(extra: &[(&str, &str)]) -> (TestApp, String) {
    let model = unique_model("embed");
    let litellm_name = via_litellm(&model);
    let mut vars: Vec<(&str, &str)> = vec![("EMBEDDING_MODEL", litellm_name.as_str())];
    vars.extend_from_slice(extra);
    (spawn_app_with(&vars).await, model)
}

fn indexer(app: &TestApp) -> Indexer {
    Indexer::new(app.db.pool.clone(), &app.settings).unwrap()
}

async fn project(app: &TestApp, owner: &Account, visibility: &str) -> String {
    let r = app
        .post(
            "/v1/projects",
            &owner.token,
            json!({"name": "Apollo", "description": "the moon programme", "visibility": visibility}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

/// One part of a multipart body: name, file name, content type, bytes.
type Part<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

/// A hand-made multipart/form-data body.
fn multipart(parts: &[Part<'_>]) -> (String, Vec<u8>) {
    let boundary = format!("sb{}", uuid::Uuid::new_v4().simple());
    let mut body = Vec::new();
    for (name, file, ctype, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let mut disp = format!("Content-Disposition: form-data; name=\"{name}\"");
        if let Some(f) = file {
            disp.push_str(&format!("; filename=\"{f}\""));
        }
        body.extend_from_slice(disp.as_bytes());
        body.extend_from_slice(b"\r\n");
        if let Some(t) = ctype {
            body.extend_from_slice(format!("Content-Type: {t}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn upload(app: &TestApp, token: &str, project_id: &str, parts: &[Part<'_>]) -> Resp {
    let (ctype, body) = multipart(parts);
    let r = app
        .http
        .post(app.url(&format!("/v1/projects/{project_id}/documents")))
        .bearer_auth(token)
        .header("content-type", ctype)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    Resp {
        status,
        body,
        headers,
    }
}

/// A one-page PDF whose page shows `text` (built with lopdf).
fn pdf_with_text(text: &str) -> Vec<u8> {
    use lopdf::content::{Content, Operation};
    use lopdf::{Document, Object, Stream, dictionary};
    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let font_id = doc.add_object(dictionary! {
        "Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Courier",
    });
    let resources_id = doc.add_object(dictionary! {
        "Font" => dictionary! { "F1" => font_id },
    });
    let content = Content {
        operations: vec![
            Operation::new("BT", vec![]),
            Operation::new("Tf", vec!["F1".into(), 24.into()]),
            Operation::new("Td", vec![50.into(), 700.into()]),
            Operation::new("Tj", vec![Object::string_literal(text)]),
            Operation::new("ET", vec![]),
        ],
    };
    let content_id = doc.add_object(Stream::new(dictionary! {}, content.encode().unwrap()));
    let page_id = doc.add_object(dictionary! {
        "Type" => "Page", "Parent" => pages_id, "Contents" => content_id,
    });
    doc.objects.insert(
        pages_id,
        Object::Dictionary(dictionary! {
            "Type" => "Pages", "Kids" => vec![page_id.into()], "Count" => 1,
            "Resources" => resources_id,
            "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
        }),
    );
    let catalog_id = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages_id });
    doc.trailer.set("Root", catalog_id);
    let mut out = Vec::new();
    doc.save_to(&mut out).unwrap();
    out
}

/// Chunks of a source: (title, content) in chunk order.
async fn chunks_of(app: &TestApp, source_id: &str) -> Vec<(String, String)> {
    sqlx::query_as::<_, (String, String)>(
        "SELECT title, content FROM embeddings WHERE source_id = $1::uuid ORDER BY chunk_index",
    )
    .bind(source_id)
    .fetch_all(&app.db.pool)
    .await
    .unwrap()
}

/// Inputs the fake embedded for `model`, in order.
async fn embedded_inputs(model: &str) -> Vec<String> {
    FakeClient::shared()
        .requests(model)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.path == "/v1/embeddings")
        .flat_map(|r| match &r.body["input"] {
            Value::Array(a) => a
                .iter()
                .map(|v| v.as_str().unwrap_or("").to_owned())
                .collect(),
            Value::String(s) => vec![s.clone()],
            _ => vec![],
        })
        .collect()
}

#[tokio::test]
async fn each_type_is_extracted_queued_then_indexed() {
    let (app, model) = app_with(&[]).await;
    let owner = app.register(&email("docs-owner"), "Docs Org").await;
    let pid = project(&app, &owner, "org").await;

    let md = "Intro line\n# Guide\nSome guide text\n## Install\nrun the installer\n";
    let html = "<html><head><style>.x{color:red}</style><script>var leaked = 1;</script></head>\
                <body><h1>Launch &amp; land</h1><p>Mission notes</p></body></html>";
    let pdf = pdf_with_text("Lunar module checklist");
    let r_txt = upload(
        &app,
        &owner.token,
        &pid,
        &[(
            "file",
            Some("notes.txt"),
            Some("text/plain"),
            b"plain words here",
        )],
    )
    .await;
    let r_md = upload(
        &app,
        &owner.token,
        &pid,
        &[
            (
                "file",
                Some("guide.md"),
                Some("text/markdown"),
                md.as_bytes(),
            ),
            (
                "meta",
                None,
                Some("application/json"),
                br#"{"title": "The Guide"}"#,
            ),
        ],
    )
    .await;
    // no part type: the extension decides
    let r_html = upload(
        &app,
        &owner.token,
        &pid,
        &[("file", Some("page.html"), None, html.as_bytes())],
    )
    .await;
    let r_pdf = upload(
        &app,
        &owner.token,
        &pid,
        &[("file", Some("c.pdf"), Some("application/pdf"), &pdf)],
    )
    .await;
    let r_json = app
        .post(
            &format!("/v1/projects/{pid}/documents"),
            &owner.token,
            json!({"title": "Json doc", "content": "json body text", "content_type": "text/plain"}),
        )
        .await;
    let mut ids = Vec::new();
    for r in [&r_txt, &r_md, &r_html, &r_pdf, &r_json] {
        assert_eq!(r.status, 202, "{}", r.body);
        assert_eq!(r.body["status"], "queued");
        ids.push(r.body["id"].as_str().unwrap().to_owned());
    }
    let g = app
        .get(&format!("/v1/documents/{}", ids[1]), &owner.token)
        .await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body["status"], "queued");
    assert_eq!(g.body["title"], "The Guide");
    assert_eq!(g.body["content_type"], "text/markdown");
    let g = app
        .get(&format!("/v1/documents/{}", ids[2]), &owner.token)
        .await;
    assert_eq!(g.body["content_type"], "text/html");
    assert_eq!(g.body["title"], "page.html");

    let report = indexer(&app).run_pass(false).await.unwrap();
    assert!(report.chunks_embedded >= 6, "{report:?}");
    assert_eq!(app.count("index_outbox").await, 0);

    for id in &ids {
        let g = app.get(&format!("/v1/documents/{id}"), &owner.token).await;
        assert_eq!(g.body["status"], "indexed", "{}", g.body);
        assert!(g.body["indexed_at"].is_string());
        assert!(g.body["failure_reason"].is_null());
    }
    // Markdown: one chunk per section, titled with the heading path
    let md_chunks = chunks_of(&app, &ids[1]).await;
    let titles: Vec<&str> = md_chunks.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(titles, ["The Guide", "Guide", "Guide > Install"]);
    assert_eq!(md_chunks[2].1, "run the installer");
    // HTML: text kept, scripts and styles gone
    let html_text: String = chunks_of(&app, &ids[2])
        .await
        .into_iter()
        .map(|(_, c)| c)
        .collect();
    assert!(
        html_text.contains("Launch & land") && html_text.contains("Mission notes"),
        "{html_text}"
    );
    assert!(
        !html_text.contains("leaked") && !html_text.contains("color"),
        "{html_text}"
    );
    // PDF: the page's text
    let pdf_text: String = chunks_of(&app, &ids[3])
        .await
        .into_iter()
        .map(|(_, c)| c)
        .collect();
    assert!(pdf_text.contains("Lunar module checklist"), "{pdf_text}");
    assert!(
        chunks_of(&app, &ids[4]).await[0]
            .1
            .contains("json body text")
    );
    // the project itself is indexed too (its creation wrote an outbox row)
    assert!(
        chunks_of(&app, &pid).await[0]
            .1
            .contains("the moon programme")
    );
    // every embedded input reached the fake through LiteLLM
    assert!(
        embedded_inputs(&model)
            .await
            .iter()
            .any(|i| i.contains("run the installer"))
    );
}

#[tokio::test]
async fn bad_uploads_are_refused_with_the_contract_status() {
    let (app, _) = app_with(&[("MAX_UPLOAD_BYTES", "2000")]).await;
    let owner = app.register(&email("docs-bad"), "Bad Org").await;
    let pid = project(&app, &owner, "org").await;
    let path = format!("/v1/projects/{pid}/documents");

    // oversize: multipart and JSON
    let big = vec![b'a'; 5000];
    let r = upload(
        &app,
        &owner.token,
        &pid,
        &[("file", Some("big.txt"), Some("text/plain"), &big)],
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "payload_too_large");
    let r = app
        .post(
            &path,
            &owner.token,
            json!({"title": "t", "content": "a".repeat(5000), "content_type": "text/plain"}),
        )
        .await;
    assert_eq!(r.status, 413);
    // a chunked body without a length is cut off at the limit too
    let stream = futures::stream::iter(
        (0..10).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 1000]))),
    );
    let r = app
        .http
        .post(app.url(&path))
        .bearer_auth(&owner.token)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);

    // unsupported types
    let r = upload(
        &app,
        &owner.token,
        &pid,
        &[("file", Some("x.png"), Some("image/png"), b"\x89PNG")],
    )
    .await;
    assert_eq!(r.status, 415, "{}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("file")
    );
    let r = upload(
        &app,
        &owner.token,
        &pid,
        &[(
            "file",
            Some("x.bin"),
            Some("application/octet-stream"),
            b"zz",
        )],
    )
    .await;
    assert_eq!(r.status, 415);
    let r = app
        .post(
            &path,
            &owner.token,
            json!({"title": "t", "content": "x", "content_type": "image/png"}),
        )
        .await;
    assert_eq!(r.status, 415);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("content_type")
    );

    // empty or unreadable
    let r = upload(
        &app,
        &owner.token,
        &pid,
        &[("file", Some("e.txt"), Some("text/plain"), b"  \n ")],
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    let r = upload(
        &app,
        &owner.token,
        &pid,
        &[(
            "file",
            Some("e.html"),
            Some("text/html"),
            b"<script>only()</script>",
        )],
    )
    .await;
    assert_eq!(r.status, 422);
    let r = upload(
        &app,
        &owner.token,
        &pid,
        &[(
            "file",
            Some("bad.pdf"),
            Some("application/pdf"),
            b"%PDF-1.4 garbage",
        )],
    )
    .await;
    assert_eq!(r.status, 422);
    let r = upload(
        &app,
        &owner.token,
        &pid,
        &[("file", Some("b.txt"), Some("text/plain"), b"\xff\xfe\xfa")],
    )
    .await;
    assert_eq!(r.status, 422);
    // no file part
    let r = upload(
        &app,
        &owner.token,
        &pid,
        &[("meta", None, None, br#"{"title": "x"}"#)],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("file"),
        "{}",
        r.body
    );
    // a bad meta part names its field
    let r = upload(
        &app,
        &owner.token,
        &pid,
        &[
            ("file", Some("a.txt"), Some("text/plain"), b"ok"),
            ("meta", None, None, br#"{"colour": 1}"#),
        ],
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("meta"),
        "{}",
        r.body
    );
    assert_eq!(app.count("documents").await, 0);
}

#[tokio::test]
async fn uploads_and_reads_follow_visibility_and_restrictions() {
    let (app, _) = app_with(&[]).await;
    let owner = app.register(&email("docs-vis"), "Vis Org").await;
    let member = app
        .add_member(&owner, &email("docs-member"), "member")
        .await;
    let listed = app
        .add_member(&owner, &email("docs-listed"), "member")
        .await;
    let teammate = app
        .add_member(&owner, &email("docs-teammate"), "member")
        .await;
    let stranger = app.register(&email("docs-stranger"), "Other Org").await;
    let private = project(&app, &owner, "private").await;
    let open = project(&app, &owner, "org").await;
    let body = json!({"title": "t", "content": "secret plan", "content_type": "text/plain"});

    // a project the caller cannot see: 404, for an org member and another org alike
    let r = app
        .post(
            &format!("/v1/projects/{private}/documents"),
            &member.token,
            body.clone(),
        )
        .await;
    assert_eq!(r.status, 404);
    let r = app
        .post(
            &format!("/v1/projects/{open}/documents"),
            &stranger.token,
            body.clone(),
        )
        .await;
    assert_eq!(r.status, 404);
    let r = upload(
        &app,
        &stranger.token,
        &open,
        &[("file", Some("a.txt"), Some("text/plain"), b"x")],
    )
    .await;
    assert_eq!(r.status, 404);

    // restrictions must name users/teams of the project's org
    let r = app
        .post(
            &format!("/v1/projects/{open}/documents"),
            &owner.token,
            json!({"title": "t", "content": "x", "content_type": "text/plain",
                   "visible_to_user_ids": [stranger.user_id]}),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("visible_to_user_ids")
    );
    let r = app
        .post(
            &format!("/v1/projects/{open}/documents"),
            &owner.token,
            json!({"title": "t", "content": "x", "content_type": "text/plain",
                   "visible_to_team_ids": [uuid::Uuid::new_v4()]}),
        )
        .await;
    assert_eq!(r.status, 422);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("visible_to_team_ids")
    );

    // a document restricted to one user and one team
    let team = app
        .post(
            &format!("/v1/orgs/{}/teams", owner.org_id),
            &owner.token,
            json!({"name": "Crew"}),
        )
        .await;
    assert_eq!(team.status, 201, "{}", team.body);
    let team_id = team.body["id"].as_str().unwrap().to_owned();
    let r = app
        .post(
            &format!("/v1/teams/{team_id}/members"),
            &owner.token,
            json!({"user_id": teammate.user_id}),
        )
        .await;
    assert!(r.status < 300, "{}", r.body);
    let meta = json!({"title": "Restricted", "visible_to_user_ids": [listed.user_id], "visible_to_team_ids": [team_id]});
    let r = upload(
        &app,
        &member.token,
        &open,
        &[
            (
                "file",
                Some("r.md"),
                Some("text/markdown"),
                b"# Plan\nsecret",
            ),
            ("meta", None, None, meta.to_string().as_bytes()),
        ],
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let doc = r.body["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/documents/{doc}");
    assert_eq!(app.get(&path, &listed.token).await.status, 200);
    assert_eq!(app.get(&path, &teammate.token).await.status, 200);
    // the uploader keeps access as if listed; the org's owner may read the metadata
    assert_eq!(app.get(&path, &member.token).await.status, 200);
    assert_eq!(app.get(&path, &stranger.token).await.status, 404);
    let r = app.get(&path, &owner.token).await;
    assert_eq!(
        r.status, 200,
        "an org owner manages every document: {}",
        r.body
    );
    let other = app
        .add_member(&owner, &email("docs-unlisted"), "member")
        .await;
    assert_eq!(app.get(&path, &other.token).await.status, 404);
    assert_eq!(
        app.get(
            &format!("/v1/documents/{}", uuid::Uuid::new_v4()),
            &owner.token
        )
        .await
        .status,
        404
    );
}

#[tokio::test]
async fn delete_hides_at_once_removes_chunks_and_writes_the_outbox() {
    let (app, _) = app_with(&[]).await;
    let owner = app.register(&email("docs-del"), "Del Org").await;
    let uploader = app.add_member(&owner, &email("docs-up"), "member").await;
    let other = app.add_member(&owner, &email("docs-other"), "member").await;
    let stranger = app.register(&email("docs-del-x"), "X Org").await;
    let pid = project(&app, &owner, "org").await;
    let r = upload(
        &app,
        &uploader.token,
        &pid,
        &[("file", Some("a.txt"), Some("text/plain"), b"delete me soon")],
    )
    .await;
    let doc = r.body["id"].as_str().unwrap().to_owned();
    indexer(&app).run_pass(false).await.unwrap();
    assert_eq!(chunks_of(&app, &doc).await.len(), 1);
    let path = format!("/v1/documents/{doc}");

    assert_eq!(app.delete(&path, &stranger.token).await.status, 404);
    let r = app.delete(&path, &other.token).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = app.delete(&path, &uploader.token).await;
    assert_eq!(r.status, 204, "{}", r.body);
    // in the same transaction: chunks gone, outbox row written
    assert!(chunks_of(&app, &doc).await.is_empty());
    assert_eq!(app.count("index_outbox").await, 1);
    assert_eq!(app.get(&path, &uploader.token).await.status, 404);
    assert_eq!(app.delete(&path, &uploader.token).await.status, 404);
    let r = indexer(&app).run_pass(false).await.unwrap();
    assert_eq!((r.sources, r.chunks_embedded), (1, 0));
    assert_eq!(app.count("index_outbox").await, 0);

    // an org admin may delete someone else's document
    let r = upload(
        &app,
        &uploader.token,
        &pid,
        &[("file", Some("b.txt"), Some("text/plain"), b"b")],
    )
    .await;
    let doc = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.delete(&format!("/v1/documents/{doc}"), &owner.token)
            .await
            .status,
        204
    );
}

#[tokio::test]
async fn unchanged_content_is_not_embedded_again_and_a_change_re_embeds_only_its_chunks() {
    // tiny chunks so that a task's description spans several
    let (app, model) = app_with(&[
        ("INDEX_CHUNK_TOKENS", "8"),
        ("INDEX_CHUNK_OVERLAP_TOKENS", "2"),
    ])
    .await;
    let owner = app.register(&email("docs-skip"), "Skip Org").await;
    let pid = project(&app, &owner, "org").await;
    let description = (0..40)
        .map(|i| format!("word{i:02}"))
        .collect::<Vec<_>>()
        .join(" ");
    let t = app
        .post(
            &format!("/v1/projects/{pid}/tasks"),
            &owner.token,
            json!({"title": "Build", "description": description}),
        )
        .await;
    assert_eq!(t.status, 201);
    let task = t.body["id"].as_str().unwrap().to_owned();
    let r = indexer(&app).run_pass(false).await.unwrap();
    let first = embedded_inputs(&model).await.len();
    let task_chunks = chunks_of(&app, &task).await.len();
    assert!(task_chunks >= 5, "{task_chunks}");
    assert_eq!(r.chunks_embedded as usize, first);

    // the same sources again (as if re-queued): zero embedding calls
    sqlx::query("INSERT INTO index_outbox (org_id, source_kind, source_id) SELECT org_id, 'task', id FROM tasks")
        .execute(&app.db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO index_outbox (org_id, source_kind, source_id) SELECT org_id, 'project', id FROM projects")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let requests_before = FakeClient::shared().requests(&model).await.unwrap().len();
    let r = indexer(&app).run_pass(false).await.unwrap();
    assert_eq!(r.chunks_embedded, 0, "{r:?}");
    assert_eq!(r.embed_requests, 0);
    assert!(r.chunks_skipped as usize >= task_chunks);
    assert_eq!(
        FakeClient::shared().requests(&model).await.unwrap().len(),
        requests_before
    );

    // a status change touches the first chunk only (it carries the status line)
    let p = app
        .patch(
            &format!("/v1/tasks/{task}"),
            &owner.token,
            json!({"status": "done"}),
        )
        .await;
    assert_eq!(p.status, 200);
    let r = indexer(&app).run_pass(false).await.unwrap();
    assert_eq!(r.chunks_embedded, 1, "{r:?}");
    let inputs = embedded_inputs(&model).await;
    assert_eq!(inputs.len(), first + 1);
    assert!(inputs.last().unwrap().contains("status: done"));
    assert_eq!(chunks_of(&app, &task).await.len(), task_chunks);

    // a shorter description: stale chunks beyond the new count are removed
    let p = app
        .patch(
            &format!("/v1/tasks/{task}"),
            &owner.token,
            json!({"description": "short"}),
        )
        .await;
    assert_eq!(p.status, 200);
    let r = indexer(&app).run_pass(false).await.unwrap();
    assert!(r.chunks_deleted as usize >= task_chunks - 2, "{r:?}");
    let now = chunks_of(&app, &task).await;
    assert!(
        now.len() <= 2 && now.iter().any(|(_, c)| c.contains("short")),
        "{now:?}"
    );
}

#[tokio::test]
async fn two_concurrent_index_runs_never_process_a_source_twice() {
    let (app, model) = app_with(&[("INDEX_BATCH_SOURCES", "3"), ("INDEX_EMBED_BATCH", "2")]).await;
    let owner = app.register(&email("docs-conc"), "Conc Org").await;
    let pid = project(&app, &owner, "org").await;
    for i in 0..24 {
        let r = app
            .post(
                &format!("/v1/projects/{pid}/tasks"),
                &owner.token,
                json!({"title": format!("task number {i}")}),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    let (a, b) = (indexer(&app), indexer(&app));
    let (ra, rb) = tokio::join!(a.run_pass(false), b.run_pass(false));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.sources + rb.sources, 25, "{ra:?} {rb:?}");
    assert_eq!(ra.chunks_embedded + rb.chunks_embedded, 25);
    let inputs = embedded_inputs(&model).await;
    assert_eq!(inputs.len(), 25, "each source embedded exactly once");
    let mut distinct = inputs.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 25);
    assert_eq!(app.count("index_outbox").await, 0);
    assert_eq!(app.count("embeddings").await, 25);
}

#[tokio::test]
async fn a_failing_embedder_is_retried_through_the_bus_then_the_document_fails() {
    let (mut app, model) = app_with(&[]).await;
    app.settings.queues.index.max_attempts = 3;
    app.settings.queues.index.backoff_base_ms = 10;
    app.settings.queues.index.backoff_cap_ms = 20;
    FakeClient::shared()
        .set_default(&model, Behaviour::status(500))
        .await
        .unwrap();
    let owner = app.register(&email("docs-fail"), "Fail Org").await;
    let pid = project(&app, &owner, "org").await;
    let r = upload(
        &app,
        &owner.token,
        &pid,
        &[("file", Some("a.txt"), Some("text/plain"), b"never embedded")],
    )
    .await;
    let doc = r.body["id"].as_str().unwrap().to_owned();

    // the upload requested the index job (no other job is enqueued here)
    let redis = std::sync::Arc::new(jobs::RedisHandle::new(&app.settings.redis).unwrap());
    let bus = jobs::Bus::new(redis, &app.settings.queues);
    assert_eq!(bus.stats(Queue::Index).await.unwrap().length, 1);
    let mut registry = jobs::Registry::new();
    indexer(&app).register(&mut registry);
    let mut opts = WorkerOptions::from_settings(&app.settings, vec![Queue::Index]);
    opts.read_block = Duration::from_millis(100);
    let report = Worker::new(bus.clone(), registry, opts)
        .drain_until_empty(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        (report.completed, report.retried, report.dead),
        (1, 2, 0),
        "{report:?}"
    );

    // three runs of the job (two retries), the last one gave up on the document. (The proxy's
    // OpenAI client retries an embedding 500 by itself, so the fake sees a multiple of 3.)
    let upstream = FakeClient::shared().requests(&model).await.unwrap().len();
    assert!(upstream >= 3 && upstream % 3 == 0, "{upstream}");
    let g = app.get(&format!("/v1/documents/{doc}"), &owner.token).await;
    assert_eq!(g.body["status"], "failed", "{}", g.body);
    let reason = g.body["failure_reason"].as_str().unwrap();
    assert!(reason.contains("unavailable"), "{reason}");
    // the project's row is kept for the next run; the document's is consumed
    let kinds: Vec<String> = sqlx::query_scalar("SELECT source_kind FROM index_outbox")
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(kinds, ["project"]);
    assert_eq!(bus.stats(Queue::Index).await.unwrap().dead, 0);

    // once the embedder is back, the next run indexes what was kept
    FakeClient::shared()
        .set_default(&model, Behaviour::reply("ok"))
        .await
        .unwrap();
    let r = indexer(&app).run_pass(false).await.unwrap();
    assert_eq!(r.sources, 1);
}

#[tokio::test]
async fn content_the_embedder_rejects_fails_its_document_without_failing_the_run() {
    let (app, model) = app_with(&[]).await;
    let owner = app.register(&email("docs-reject"), "Reject Org").await;
    let pid = project(&app, &owner, "org").await;
    let r = upload(
        &app,
        &owner.token,
        &pid,
        &[("file", Some("a.txt"), Some("text/plain"), b"rejected words")],
    )
    .await;
    let doc = r.body["id"].as_str().unwrap().to_owned();
    // the batch request (document + project) is rejected, then each source on its own (in
    // kind order: the document first): the document is rejected again, the project passes
    FakeClient::shared()
        .script(
            &model,
            vec![
                Behaviour::status(400),
                Behaviour::status(400),
                Behaviour::reply("ok"),
            ],
        )
        .await
        .unwrap();
    let r = indexer(&app).run_pass(true).await.unwrap();
    assert_eq!(r.documents_failed, 1, "{r:?}");
    assert_eq!(r.chunks_embedded, 1, "{r:?}");
    assert_eq!(
        FakeClient::shared().requests(&model).await.unwrap().len(),
        3
    );
    let g = app.get(&format!("/v1/documents/{doc}"), &owner.token).await;
    assert_eq!(g.body["status"], "failed", "{}", g.body);
    assert!(
        g.body["failure_reason"]
            .as_str()
            .unwrap()
            .contains("rejected")
    );
    assert!(chunks_of(&app, &doc).await.is_empty());
    assert_eq!(chunks_of(&app, &pid).await.len(), 1);
    // the document's row is dead-lettered (kept for operators), nothing else is left
    let left: Vec<(String, bool)> =
        sqlx::query_as("SELECT source_kind, dead_at IS NOT NULL FROM index_outbox")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(left, [("document".to_owned(), true)]);
}

#[tokio::test]
async fn the_openapi_document_describes_the_document_endpoints() {
    let (app, _) = app_with(&[]).await;
    let doc: Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let upload = &doc["paths"]["/v1/projects/{id}/documents"]["post"];
    let content = upload["requestBody"]["content"].as_object().unwrap();
    assert!(content.contains_key("application/json"), "{content:?}");
    assert!(content.contains_key("multipart/form-data"), "{content:?}");
    assert!(upload["responses"]["202"].is_object());
    let item = &doc["paths"]["/v1/documents/{id}"];
    assert!(item["get"]["responses"]["200"].is_object());
    assert!(item["delete"]["responses"]["204"].is_object());
}
