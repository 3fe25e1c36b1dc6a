//! The fake upstream itself, called directly: each scripted behaviour does what it says.

use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use testkit::fake_upstream::{Behaviour, ToolCall};
use testkit::{FakeUpstream, unique_model};

fn chat_body(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "ping"}]})
}

async fn stream_text(resp: reqwest::Response) -> Result<String, String> {
    let mut events = resp.bytes_stream().eventsource();
    let mut text = String::new();
    while let Some(ev) = events.next().await {
        let ev = ev.map_err(|e| format!("stream error: {e}"))?;
        if ev.data == "[DONE]" {
            return Ok(text);
        }
        let v: Value = serde_json::from_str(&ev.data).map_err(|e| format!("bad chunk: {e}"))?;
        if let Some(t) = v
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            text.push_str(t);
        }
    }
    Err(format!("stream ended without [DONE] after {text:?}"))
}

#[tokio::test]
async fn scripted_behaviours_in_order_then_echo() {
    let fake = FakeUpstream::start().await.unwrap();
    let model = unique_model("direct");
    fake.client()
        .script(
            &model,
            vec![
                Behaviour::rate_limited(3),
                Behaviour::status(500),
                Behaviour::reply_tokens(&["Hel", "lo"]),
            ],
        )
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", fake.url());

    let r = http
        .post(&url)
        .json(&chat_body(&model, true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "3");
    let r = http
        .post(&url)
        .json(&chat_body(&model, true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let r = http
        .post(&url)
        .json(&chat_body(&model, true))
        .send()
        .await
        .unwrap();
    assert_eq!(stream_text(r).await.unwrap(), "Hello");
    let r = http
        .post(&url)
        .json(&chat_body(&model, false))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: ping");

    let log = fake.client().requests(&model).await.unwrap();
    assert_eq!(log.len(), 4);
    assert!(log.iter().all(|r| r.path == "/v1/chat/completions"));
}

#[tokio::test]
async fn cut_hang_delay_malformed_and_tool_calls() {
    let fake = FakeUpstream::start().await.unwrap();
    let model = unique_model("faults");
    fake.client()
        .script(
            &model,
            vec![
                Behaviour::Cut {
                    text: "one two three four".into(),
                    after_tokens: 2,
                },
                Behaviour::Hang,
                Behaviour::Reply {
                    text: "late".into(),
                    tokens: None,
                    first_token_delay_ms: 300,
                    token_delay_ms: 0,
                },
                Behaviour::Malformed,
                Behaviour::ToolCalls {
                    calls: vec![ToolCall {
                        id: "call_1".into(),
                        name: "list_projects".into(),
                        arguments: "{}".into(),
                    }],
                },
                Behaviour::Empty,
            ],
        )
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", fake.url());

    // cut: some tokens, then the connection breaks without [DONE]
    let r = http
        .post(&url)
        .json(&chat_body(&model, true))
        .send()
        .await
        .unwrap();
    let err = stream_text(r).await.unwrap_err();
    assert!(
        err.contains("one two") || err.contains("stream error"),
        "{err}"
    );

    // hang: nothing comes back
    let hung = tokio::time::timeout(
        Duration::from_millis(500),
        http.post(&url).json(&chat_body(&model, true)).send(),
    )
    .await;
    assert!(hung.is_err(), "hang answered");

    // delayed first token
    let t = Instant::now();
    let r = http
        .post(&url)
        .json(&chat_body(&model, true))
        .send()
        .await
        .unwrap();
    assert_eq!(stream_text(r).await.unwrap(), "late");
    assert!(t.elapsed() >= Duration::from_millis(300));

    // malformed
    let r = http
        .post(&url)
        .json(&chat_body(&model, true))
        .send()
        .await
        .unwrap();
    assert!(stream_text(r).await.unwrap_err().contains("bad chunk"));

    // tool calls
    let r = http
        .post(&url)
        .json(&chat_body(&model, false))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "list_projects"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");

    // empty stream
    let r = http
        .post(&url)
        .json(&chat_body(&model, true))
        .send()
        .await
        .unwrap();
    assert_eq!(stream_text(r).await.unwrap(), "");
}
