//! A chat completion and an embedding through the real LiteLLM proxy to the shared fake
//! upstream (`fake/<model>` in config/litellm.yaml).

use base64::Engine as _;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use testkit::fake_upstream::fake_embedding;
use testkit::{Behaviour, FakeClient, env, unique_model, via_litellm};

fn proxy() -> (String, String) {
    (
        env::require("LITELLM_BASE_URL"),
        env::require("LITELLM_API_KEY"),
    )
}

#[tokio::test]
async fn streamed_chat_completion_through_litellm() {
    let (base, key) = proxy();
    let fake = FakeClient::shared();
    let model = unique_model("ground");
    fake.script(
        &model,
        vec![Behaviour::reply_tokens(&["Swi", "tch", "board"])],
    )
    .await
    .unwrap();

    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({
            "model": via_litellm(&model),
            "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "say the name"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    let mut events = resp.bytes_stream().eventsource();
    let mut text = String::new();
    let mut usage = None;
    while let Some(ev) = events.next().await {
        let ev = ev.unwrap();
        if ev.data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&ev.data).unwrap();
        if let Some(t) = v
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            text.push_str(t);
        }
        if v.get("usage").is_some_and(|u| !u.is_null()) {
            usage = Some(v["usage"].clone());
        }
    }
    assert_eq!(text, "Switchboard");
    assert_eq!(usage.unwrap()["completion_tokens"], 3);

    // The fake saw exactly one call (LiteLLM's own retries are off), with our messages.
    let seen = fake.requests(&model).await.unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body["messages"][0]["content"], "say the name");
}

#[tokio::test]
async fn upstream_errors_pass_through_litellm_once() {
    let (base, key) = proxy();
    let fake = FakeClient::shared();
    let model = unique_model("errors");
    fake.script(
        &model,
        vec![Behaviour::rate_limited(7), Behaviour::status(500)],
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let body = json!({"model": via_litellm(&model), "stream": true, "messages": [{"role": "user", "content": "x"}]});

    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    // LiteLLM relays the upstream's Retry-After under its own header name.
    let retry_after = r
        .headers()
        .get("retry-after")
        .or_else(|| r.headers().get("llm_provider-retry-after"))
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(retry_after.as_deref(), Some("7"));
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(
        fake.requests(&model).await.unwrap().len(),
        2,
        "no retries inside LiteLLM"
    );
}

#[tokio::test]
async fn embedding_through_litellm() {
    let (base, key) = proxy();
    let model = unique_model("embed");
    let http = reqwest::Client::new();
    for format in ["float", "base64"] {
        let resp = http
            .post(format!("{base}/v1/embeddings"))
            .bearer_auth(&key)
            .json(&json!({"model": via_litellm(&model), "input": ["alpha", "beta"], "encoding_format": format}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 2);
        for (i, text) in ["alpha", "beta"].iter().enumerate() {
            let got: Vec<f32> = match &data[i]["embedding"] {
                Value::Array(a) => a.iter().map(|x| x.as_f64().unwrap() as f32).collect(),
                Value::String(s) => base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .unwrap()
                    .chunks(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                other => panic!("unexpected embedding {other}"),
            };
            let want = fake_embedding(text, 384);
            assert_eq!(got.len(), 384);
            let diff: f32 = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff < 1e-5, "{format}: embedding differs by {diff}");
        }
    }
    assert_eq!(
        FakeClient::shared().requests(&model).await.unwrap().len(),
        2
    );
}
