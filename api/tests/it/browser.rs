//! The web console in a real browser (headless Chromium through chromedriver, see
//! `webdriver.rs`) against the real stack: the API, the chat and actions workers in-process, the
//! real LiteLLM proxy and the scripted fake upstream behind it. A person's journey: sign up,
//! sign out and in, pick the model (an unknown one is refused with a message), create a project
//! and a conversation narrowed to it, watch an answer stream in, confirm a proposed task and see
//! it created; everything a user or the model wrote shows as text; and a page on another origin
//! calls the API when its origin is allowed and is refused when it is not.
//!
//! `SB_CONSOLE_SCREENSHOT=docs/console.png` saves the screenshot in the README (a streamed
//! answer and a pending action).

use std::time::Duration;

use serde_json::{Value, json};
use testkit::{Behaviour, FakeClient, unique_model, via_litellm};

use crate::actions::ToolWorker;
use crate::helpers::{email, spawn_app_with};
use crate::webdriver::Browser;

const PASSWORD: &str = "correct horse battery";

/// A page on another origin: any request gets a small HTML page (the test then runs `fetch()`
/// in it). Serves until dropped.
struct OtherOrigin {
    origin: String,
    task: tokio::task::JoinHandle<()>,
}

impl OtherOrigin {
    async fn start() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    let page = "<!doctype html><title>another origin</title><p>another origin</p>";
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                        page.len()
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                });
            }
        });
        Self { origin, task }
    }
}

impl Drop for OtherOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Wraps the page's `fetch`: records each call (`window.__fetches`: url, Last-Event-ID) and cuts
/// the body of the first message POST after two `token` events, as a dropped connection would.
const CUT_THE_FIRST_STREAM: &str = r#"
const realFetch = window.fetch.bind(window);
window.__fetches = [];
window.__cut_done = false;
window.fetch = async (url, init) => {
  const headers = (init && init.headers) || {};
  window.__fetches.push({url: String(url), last_event_id: headers['Last-Event-ID'] || null});
  const resp = await realFetch(url, init);
  const post = init && init.method === 'POST' && String(url).endsWith('/messages');
  if (!post || window.__cut_done) return resp;
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let seen = '';
  const body = new ReadableStream({
    async pull(ctrl) {
      if ((seen.match(/event: token/g) || []).length >= 2) {
        window.__cut_done = true;
        reader.cancel();
        ctrl.error(new TypeError('connection cut by the test'));
        return;
      }
      const {value, done} = await reader.read();
      if (done) { ctrl.close(); return; }
      seen += decoder.decode(value, {stream: true});
      ctrl.enqueue(value);
    },
  });
  return new Response(body, {status: resp.status, headers: resp.headers});
};
return null;
"#;

/// `fetch()` from the page now shown: the status and body text, or the error it threw.
const CROSS_ORIGIN_FETCH: &str = r#"
const [url, token, lastEventId, done] = arguments;
const headers = {};
if (token) headers['Authorization'] = 'Bearer ' + token;
if (lastEventId) headers['Last-Event-ID'] = lastEventId;
fetch(url, {headers})
  .then(async (r) => done({status: r.status, body: await r.text()}))
  .catch((e) => done({error: String(e)}));
"#;

#[tokio::test]
async fn the_console_in_a_real_browser() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let allowed = OtherOrigin::start().await;
    let refused = OtherOrigin::start().await;
    // three messages a minute: the fourth shows the API's 429 in words
    let app = spawn_app_with(&[
        ("CORS_ALLOWED_ORIGINS", &allowed.origin),
        ("MESSAGE_RATE_LIMIT", "3"),
    ])
    .await;
    let worker = ToolWorker::start(&app);
    let fake = FakeClient::shared();
    let primary = unique_model("console-primary");
    let fallback = unique_model("console-fallback");

    // ---- sign up, sign out, sign in (the token never in the URL)
    let user = email("console");
    browser.goto(&app.url("/console")).await;
    browser.fill("#signup-name", "Ada").await;
    browser.fill("#signup-email", &user).await;
    browser.fill("#signup-password", PASSWORD).await;
    browser.fill("#signup-org", "Acme <b>bold</b>").await;
    browser.click("#signup-submit").await;
    let app_shown = "!document.getElementById('app-view').hidden";
    browser.wait(app_shown, "the console after sign-up").await;
    browser.click("#signout").await;
    browser
        .wait(
            "!document.getElementById('auth-view').hidden && !sessionStorage.length",
            "the sign-in form after sign-out",
        )
        .await;
    browser.fill("#signin-email", &user).await;
    browser.fill("#signin-password", PASSWORD).await;
    browser.click("#signin-submit").await;
    browser.wait(app_shown, "the console after sign-in").await;
    let who = browser.text("#whoami-text").await;
    assert!(
        who.contains(&user) && who.contains("Acme <b>bold</b>") && who.contains("owner"),
        "{who}"
    );
    let token = browser
        .js(
            "return sessionStorage.getItem('switchboard.token')",
            json!([]),
        )
        .await
        .as_str()
        .unwrap()
        .to_owned();
    let href = browser.js("return location.href", json!([])).await;
    assert!(!href.as_str().unwrap().contains(&token), "{href}");

    // ---- the model: the proxy's list offered, an unknown name refused, a served one saved
    browser
        .wait(
            "[...document.querySelectorAll('#models-list option')].some(o => o.value === 'local-chat')",
            "the proxy's models in the list",
        )
        .await;
    browser.fill("#model", "no-such-model-xyz").await;
    browser.click("#settings-save").await;
    browser
        .wait(
            "document.getElementById('settings-msg').textContent.includes('not available')",
            "the unknown model's message",
        )
        .await;
    let msg = browser.text("#settings-msg").await;
    assert!(msg.contains("no-such-model-xyz"), "{msg}");
    browser.fill("#model", &via_litellm(&primary)).await;
    browser
        .fill("#fallback-model", &via_litellm(&fallback))
        .await;
    browser.click("#settings-save").await;
    browser
        .wait(
            "document.getElementById('settings-msg').textContent.startsWith('Saved')",
            "the saved model",
        )
        .await;
    let me = app.get("/v1/me", &token).await.body;
    let org_id = me["org"]["id"].as_str().unwrap().to_owned();
    let settings = app
        .get(&format!("/v1/orgs/{org_id}/settings/model"), &token)
        .await;
    assert_eq!(settings.body["model"], via_litellm(&primary));
    assert_eq!(settings.body["fallback_model"], via_litellm(&fallback));

    // ---- a project and a conversation narrowed to it
    browser.fill("#project-name", "Apollo").await;
    browser.fill("#project-desc", "the launch").await;
    browser.click("#project-create").await;
    browser
        .wait(
            "document.querySelectorAll('#conv-projects input').length === 1",
            "the new project",
        )
        .await;
    let projects = app.get("/v1/projects", &token).await.body;
    assert_eq!(projects["items"][0]["name"], "Apollo");
    let project_id = projects["items"][0]["id"].as_str().unwrap().to_owned();
    browser.fill("#conv-title", "Launch <i>plan</i>").await;
    browser.click("#conv-projects input").await;
    browser.click("#conv-create").await;
    browser
        .wait(
            "!document.getElementById('chat-pane').hidden",
            "the new conversation",
        )
        .await;
    assert_eq!(browser.text("#chat-title").await, "Launch <i>plan</i>");
    assert!(browser.text("#chat-scope").await.contains("Apollo"));
    let conversations = app.get("/v1/conversations", &token).await.body;
    assert_eq!(
        conversations["items"][0]["project_ids"],
        json!([project_id.clone()])
    );

    // ---- the model's scripted answers: a streamed reply carrying markup, a proposal to create
    // a task whose title is markup, and the answer after the confirmation
    let answer_tokens = [
        "Here is ",
        "the plan: ",
        "<img src=x onerror=\"window.__xss='answer'\">",
        " first the checklist, ",
        "then the launch.",
    ];
    let answer = answer_tokens.concat();
    let task_title = "<img src=x onerror=\"window.__xss='task'\"> Launch checklist";
    fake.script(
        &primary,
        vec![
            Behaviour::Reply {
                text: answer.clone(),
                tokens: Some(answer_tokens.iter().map(|t| t.to_string()).collect()),
                first_token_delay_ms: 100,
                token_delay_ms: 250,
            },
            Behaviour::ToolCalls {
                calls: vec![testkit::fake_upstream::ToolCall {
                    id: "call-console".into(),
                    name: "create_task".into(),
                    arguments: json!({"project_id": project_id, "title": task_title}).to_string(),
                }],
            },
            Behaviour::reply_tokens(&["Created ", "the task."]),
        ],
    )
    .await
    .unwrap();

    // ---- send a message and watch the answer stream in (every text the answer showed)
    browser
        .js(
            "window.__seen = [];
             new MutationObserver(() => {
               const b = document.querySelectorAll('#messages .msg-assistant .msg-body');
               const t = b.length ? b[b.length - 1].textContent : '';
               if (window.__seen[window.__seen.length - 1] !== t) window.__seen.push(t);
             }).observe(document.getElementById('messages'),
                        {subtree: true, childList: true, characterData: true});",
            json!([]),
        )
        .await;
    // the connection drops after two tokens: the console resumes with Last-Event-ID
    browser.js(CUT_THE_FIRST_STREAM, json!([])).await;
    let question = "<img src=x onerror=\"window.__xss='user'\"> what is the plan?";
    browser.fill("#composer-input", question).await;
    browser.click("#composer-send").await;
    let completed = format!(
        "(() => {{ const m = document.querySelectorAll('#messages .msg-assistant');
           const last = m[m.length - 1];
           return last && !last.classList.contains('streaming')
             && last.querySelector('.msg-body').textContent === {answer:?}; }})()"
    );
    browser
        .wait_for(&completed, "the streamed answer", Duration::from_secs(30))
        .await;
    let seen: Vec<String> =
        serde_json::from_value(browser.js("return window.__seen", json!([])).await).unwrap();
    let partial: Vec<&String> = seen
        .iter()
        .filter(|t| !t.is_empty() && t.len() < answer.len())
        .collect();
    assert!(
        partial.len() >= 2 && partial.iter().all(|t| answer.starts_with(t.as_str())),
        "the answer appeared token by token: {seen:?}"
    );
    assert_eq!(
        browser.text("#messages .msg-user .msg-body").await,
        question
    );
    let fetches = browser.js("return window.__fetches", json!([])).await;
    let resumed: Vec<&Value> = fetches
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["url"].as_str().unwrap().ends_with("/events"))
        .collect();
    assert!(
        browser.js("return window.__cut_done", json!([])).await == json!(true)
            && resumed.len() == 1
            && resumed[0]["last_event_id"].is_string(),
        "one resume, with Last-Event-ID: {fetches}"
    );

    // ---- a proposed action inline, pending, with Confirm / Reject
    browser
        .fill("#composer-input", "add the launch checklist as a task")
        .await;
    browser.click("#composer-send").await;
    browser
        .wait_for(
            "(() => { const a = document.querySelector('#messages .action');
               return a && a.querySelector('.action-status').textContent === 'pending'
                 && !a.querySelector('.action-buttons').hidden
                 && document.querySelectorAll('#messages .msg-assistant.streaming').length === 0
                 && !document.getElementById('composer-send').disabled; })()",
            "the pending proposal",
            Duration::from_secs(30),
        )
        .await;
    let summary = browser.text("#messages .action .action-summary").await;
    assert!(summary.contains(task_title), "{summary}");
    if let Ok(path) = std::env::var("SB_CONSOLE_SCREENSHOT") {
        // the first answer in view with the proposal under it
        browser
            .js(
                "document.getElementById('messages').scrollTop = 0; return null;",
                json!([]),
            )
            .await;
        let png = browser.screenshot_png().await;
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path);
        std::fs::write(&path, png).unwrap();
    }
    let tasks_path = format!("/v1/projects/{project_id}/tasks");
    assert_eq!(app.get(&tasks_path, &token).await.body["items"], json!([]));

    // ---- confirm: the status follows the continuation, the task exists
    browser.click("#messages .action .action-confirm").await;
    browser
        .wait_for(
            "(() => { const a = document.querySelector('#messages .action');
               const m = document.querySelectorAll('#messages .msg-assistant');
               return a.querySelector('.action-status').textContent === 'executed'
                 && !m[m.length - 1].classList.contains('streaming')
                 && m[m.length - 1].querySelector('.msg-body').textContent === 'Created the task.'; })()",
            "the executed action and the continuation",
            Duration::from_secs(30),
        )
        .await;
    let tasks = app.get(&tasks_path, &token).await.body;
    assert_eq!(tasks["items"].as_array().unwrap().len(), 1, "{tasks}");
    assert_eq!(tasks["items"][0]["title"], task_title);

    // ---- errors in words: both models failing (502 model_unavailable as an `error` event),
    // then the API's own 429
    fake.script(&primary, vec![Behaviour::status(500)])
        .await
        .unwrap();
    fake.script(&fallback, vec![Behaviour::status(503)])
        .await
        .unwrap();
    browser.fill("#composer-input", "and then?").await;
    browser.click("#composer-send").await;
    browser
        .wait_for(
            "(() => { const e = document.querySelector('#messages .msg.failed .error');
               return e && e.textContent.includes('unavailable right now'); })()",
            "the model_unavailable message",
            Duration::from_secs(30),
        )
        .await;
    browser
        .wait(
            "!document.getElementById('composer-send').disabled",
            "the composer",
        )
        .await;
    browser.fill("#composer-input", "a fourth message").await;
    browser.click("#composer-send").await;
    browser
        .wait(
            "document.getElementById('chat-error').textContent.includes('faster than allowed')",
            "the 429 message",
        )
        .await;
    let shown = browser.text("#chat-error").await;
    assert!(shown.contains("Try again in"), "{shown}");

    // ---- nothing anyone wrote became markup or ran
    let xss = browser
        .js(
            "return {img: document.querySelectorAll('img, b, i').length,
                     ran: window.__xss === undefined ? null : window.__xss}",
            json!([]),
        )
        .await;
    assert_eq!(xss, json!({"img": 0, "ran": null}));
    // reopened from the API, the same
    browser.goto(&app.url("/console")).await;
    browser.wait(app_shown, "the console after a reload").await;
    browser.click("#conversations button.conversation").await;
    browser
        .wait(
            "document.querySelectorAll('#messages .msg').length === 6",
            "the conversation's messages after a reload",
        )
        .await;
    let again = browser
        .js(
            "return {img: document.querySelectorAll('img').length,
                     text: document.getElementById('messages').textContent,
                     status: document.querySelector('#messages .action-status').textContent}",
            json!([]),
        )
        .await;
    assert_eq!(again["img"], 0);
    assert_eq!(again["status"], "executed");
    let text = again["text"].as_str().unwrap();
    assert!(
        text.contains(question) && text.contains(&answer) && text.contains(task_title),
        "{text}"
    );

    // ---- signing out leaves nothing of this user on the page (the next one may use this tab)
    browser.click("#signout").await;
    browser
        .wait(
            "!document.getElementById('auth-view').hidden",
            "the sign-in form after the second sign-out",
        )
        .await;
    let left = browser
        .js(
            "return ['projects', 'conversations', 'messages', 'models-list']
                 .filter((id) => document.getElementById(id).children.length).join(' ')
                 + document.getElementById('chat-title').textContent
                 + (document.getElementById('chat-pane').hidden ? '' : ' chat-pane shown')",
            json!([]),
        )
        .await;
    assert_eq!(left, "", "what the previous user left on the page");

    // ---- another origin: allowed (with the SSE resume header), refused
    let messages = app
        .get(
            &format!(
                "/v1/conversations/{}/messages",
                conversations["items"][0]["id"].as_str().unwrap()
            ),
            &token,
        )
        .await
        .body;
    let response_id = messages["items"][1]["response_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let events_url = app.url(&format!(
        "/v1/conversations/{}/responses/{response_id}/events",
        conversations["items"][0]["id"].as_str().unwrap()
    ));
    browser.goto(&format!("{}/", allowed.origin)).await;
    let r = cross_origin(&browser, &app.url("/v1/me"), Some(&token), None).await;
    assert_eq!(r["status"], 200, "{r}");
    assert!(r["body"].as_str().unwrap().contains(&user), "{r}");
    let r = cross_origin(&browser, &app.url("/v1/me"), None, None).await;
    assert_eq!(r["status"], 401, "errors are readable too: {r}");
    let r = cross_origin(&browser, &events_url, Some(&token), Some("0-0")).await;
    assert_eq!(r["status"], 200, "{r}");
    assert!(
        r["body"]
            .as_str()
            .unwrap()
            .contains("event: message.completed"),
        "{r}"
    );
    browser.goto(&format!("{}/", refused.origin)).await;
    let r = cross_origin(&browser, &app.url("/v1/me"), Some(&token), None).await;
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("Failed to fetch")),
        "a refused origin cannot read the API: {r}"
    );

    worker.stop().await;
}

async fn cross_origin(
    browser: &Browser,
    url: &str,
    token: Option<&str>,
    last_event_id: Option<&str>,
) -> Value {
    browser
        .js_async(CROSS_ORIGIN_FETCH, json!([url, token, last_event_id]))
        .await
}
