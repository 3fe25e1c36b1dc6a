//! Operations: one trace from an HTTP turn to the worker's log lines, the Prometheus series a
//! turn leaves behind, and the OpenAPI document covering every route the server answers.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use testkit::{Behaviour, FakeClient, via_litellm};
use uuid::Uuid;

use crate::e2e::{RunningWorker, org_with_fake_models};
use crate::helpers::spawn_app_with;

/// Captures this test process's log records (JSON, one per line).
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Capture {
    fn records(&self) -> Vec<Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn span<'a>(record: &'a Value, name: &str) -> Option<&'a Value> {
    record["spans"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
}

#[tokio::test]
async fn a_turns_request_id_is_in_the_workers_log_records_and_its_series_in_metrics() {
    let capture = Capture::default();
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(true)
        .with_env_filter("info,jobs=debug")
        .with_writer(capture.clone())
        .try_init()
        .expect("this test owns the process's subscriber (nextest: one process per test)");

    let app = spawn_app_with(&[]).await;
    let worker = RunningWorker::start(&app);
    let (token, primary, _) = org_with_fake_models(&app).await;
    FakeClient::shared()
        .script(&primary, vec![Behaviour::reply("Noted.")])
        .await
        .unwrap();
    let conversation = app.conversation(&token).await;
    let request_id = Uuid::new_v4().simple().to_string();
    let r = app
        .http
        .post(app.url(&format!("/v1/conversations/{conversation}/messages")))
        .bearer_auth(&token)
        .header("x-request-id", &request_id)
        .json(&json!({"content": "remember the deadline"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], request_id.as_str());

    // API side: the request's records carry its id; worker side: the job's records carry the
    // same id as their trace id.
    let records = capture.records();
    let api_side = records
        .iter()
        .filter(|r| span(r, "request").is_some_and(|s| s["request_id"] == request_id.as_str()))
        .count();
    assert!(api_side > 0, "no API record with the request id");
    let worker_side: Vec<&Value> = records
        .iter()
        .filter(|r| span(r, "job").is_some_and(|s| s["trace_id"] == request_id.as_str()))
        .collect();
    assert!(
        !worker_side.is_empty(),
        "no worker record with the request's trace id"
    );
    assert!(
        worker_side
            .iter()
            .any(|r| span(r, "job").unwrap()["kind"] == "chat")
    );

    // The series a turn leaves, with bounded labels. The client has its answer once it is
    // stored and published; the worker acknowledges the job a moment later (after enqueueing
    // the turn's follow-ups), so wait for the completion to be counted.
    let has_in = |text: &str, name: &str, labels: &[(&str, &str)]| {
        text.lines().any(|l| {
            l.starts_with(&format!("{name}{{"))
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!(r#"{k}="{v}""#)))
        })
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    let text = loop {
        let text = app
            .http
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if has_in(
            &text,
            "bus_jobs_completed_total",
            &[("queue", "chat"), ("kind", "chat")],
        ) || tokio::time::Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let has = |name: &str, labels: &[(&str, &str)]| has_in(&text, name, labels);
    assert!(
        has(
            "http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/v1/conversations/{id}/messages"),
                ("status", "200")
            ]
        ),
        "{text}"
    );
    assert!(
        has(
            "bus_jobs_enqueued_total",
            &[("queue", "chat"), ("kind", "chat")]
        ),
        "{text}"
    );
    assert!(
        has(
            "bus_jobs_completed_total",
            &[("queue", "chat"), ("kind", "chat")]
        ),
        "{text}"
    );
    assert!(has("bus_queue_length", &[("queue", "chat")]), "{text}");
    let model = via_litellm(&primary);
    assert!(
        has(
            "model_requests_total",
            &[("model", &model), ("outcome", "ok")]
        ),
        "{text}"
    );
    assert!(
        has(
            "model_time_to_first_token_seconds_bucket",
            &[("model", &model)]
        ),
        "{text}"
    );
    assert!(
        has(
            "model_tokens_total",
            &[("model", &model), ("kind", "completion")]
        ),
        "{text}"
    );
    for id in [conversation.as_str(), request_id.as_str()] {
        assert!(!text.contains(id), "an id leaked into metric labels");
    }
    worker.stop().await;
}

/// Every operation of the OpenAPI document is served (an unauthenticated call reaches the
/// endpoint: 401 for protected ones, never the router's 404/405), and every route exercised
/// here has a template in the document (requests outside it are labelled `unmatched`, and only
/// 404s may be).
#[tokio::test]
async fn the_openapi_document_covers_every_route() {
    let app = spawn_app_with(&[]).await;
    let doc: Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(
        doc["components"]["securitySchemes"]
            .as_object()
            .is_some_and(|s| !s.is_empty())
    );
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 20, "{} paths", paths.len());
    let mut operations = 0;
    for (template, item) in paths {
        let path = template
            .split('/')
            .map(|seg| {
                if seg.starts_with('{') {
                    Uuid::new_v4().to_string()
                } else {
                    seg.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let mut rb = app
                .http
                .request(m, app.url(&path))
                .timeout(std::time::Duration::from_secs(5));
            if matches!(method.as_str(), "post" | "put" | "patch") {
                rb = rb.json(&json!({}));
            }
            let status = rb.send().await.map(|r| r.status().as_u16()).unwrap_or(0);
            let protected = op["security"].as_array().is_some_and(|s| !s.is_empty());
            if protected {
                assert_eq!(status, 401, "{method} {template}");
            } else {
                assert!(
                    status != 404 && status != 405 && status != 0,
                    "{method} {template}: {status}"
                );
            }
        }
    }
    assert!(operations >= 25, "{operations} operations");
    // the routes served outside the document
    assert_eq!(
        app.http
            .get(app.url("/docs"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // nothing answered except through a documented template (or 404)
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in text
        .lines()
        .filter(|l| l.starts_with("http_requests_total{") && l.contains(r#"route="unmatched""#))
    {
        assert!(
            line.contains(r#"status="404""#),
            "served but undocumented: {line}"
        );
    }
}
