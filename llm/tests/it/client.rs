use std::time::Duration;

use futures::StreamExt;
use llm::{
    ChatEvent, ChatRequest, GenerationParams, LlmClient, LlmError, Message, Timeouts, collect,
};
use serde_json::json;
use testkit::fake_upstream::{ToolCall, fake_embedding};
use testkit::{Behaviour, FakeClient, FakeUpstream, env, unique_model, via_litellm};

const PARAMS: GenerationParams = GenerationParams {
    temperature: 0.2,
    max_tokens: 77,
};

fn client() -> LlmClient {
    LlmClient::new(&config::LitellmSettings {
        base_url: env::require("LITELLM_BASE_URL"),
        api_key: Some(env::require("LITELLM_API_KEY").into()),
        request_timeout_secs: 60,
    })
    .unwrap()
}

fn request(model: &str) -> ChatRequest {
    ChatRequest {
        model: via_litellm(model),
        messages: vec![Message::system("be brief"), Message::user("hello")],
        tools: vec![],
        params: PARAMS,
    }
}

fn timeouts(secs: u64) -> Timeouts {
    Timeouts {
        first_event: Duration::from_secs(secs),
        idle: Duration::from_secs(secs),
    }
}

async fn scripted(behaviours: Vec<Behaviour>) -> String {
    let model = unique_model("llm");
    FakeClient::shared()
        .script(&model, behaviours)
        .await
        .unwrap();
    model
}

#[tokio::test]
async fn streams_tokens_in_order_with_usage_and_fixed_parameters() {
    let model = scripted(vec![Behaviour::reply_tokens(&[
        "The ", "plan ", "is ", "ready.",
    ])])
    .await;
    let mut stream = client()
        .chat_stream(&request(&model), timeouts(10))
        .await
        .unwrap();
    let mut tokens = Vec::new();
    let mut usage = None;
    let mut finish = None;
    while let Some(ev) = stream.next().await {
        match ev.unwrap() {
            ChatEvent::Token(t) => tokens.push(t),
            ChatEvent::Usage(u) => usage = Some(u),
            ChatEvent::Finished(r) => finish = Some(r),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(tokens.concat(), "The plan is ready.");
    assert!(tokens.len() >= 2, "streamed, not one blob: {tokens:?}");
    assert_eq!(finish.as_deref(), Some("stop"));
    assert_eq!(usage.unwrap().completion_tokens, 4);

    let seen = FakeClient::shared().requests(&model).await.unwrap();
    assert_eq!(seen.len(), 1);
    let body = &seen[0].body;
    assert_eq!(body["temperature"], json!(0.2));
    assert_eq!(body["max_tokens"], json!(77));
    assert_eq!(body["stream"], json!(true));
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(body["messages"][1]["content"], "hello");
}

#[tokio::test]
async fn rate_limit_carries_retry_after() {
    let model = scripted(vec![Behaviour::rate_limited(7)]).await;
    let err = client()
        .chat_stream(&request(&model), timeouts(10))
        .await
        .err()
        .unwrap();
    assert!(err.is_rate_limited(), "{err:?}");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
}

#[tokio::test]
async fn server_error_is_a_failure_not_a_rate_limit() {
    let model = scripted(vec![Behaviour::status(500)]).await;
    let err = client()
        .chat_stream(&request(&model), timeouts(10))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, LlmError::Upstream { status: 500, .. }),
        "{err:?}"
    );
    assert!(!err.is_rate_limited());
}

#[tokio::test]
async fn a_hanging_model_times_out() {
    let model = scripted(vec![Behaviour::Hang]).await;
    let err = match client().chat_stream(&request(&model), timeouts(1)).await {
        Err(e) => e,
        Ok(s) => collect(s).await.unwrap_err(),
    };
    assert!(matches!(err, LlmError::Timeout(_)), "{err:?}");
}

#[tokio::test]
async fn first_token_later_than_the_timeout_fails_and_earlier_succeeds() {
    let slow = Behaviour::Reply {
        text: "late".into(),
        tokens: None,
        first_token_delay_ms: 2500,
        token_delay_ms: 0,
    };
    let model = scripted(vec![slow.clone(), slow]).await;
    let err = match client().chat_stream(&request(&model), timeouts(1)).await {
        Err(e) => e,
        Ok(s) => collect(s).await.unwrap_err(),
    };
    assert!(matches!(err, LlmError::Timeout(_)), "{err:?}");
    let done = collect(
        client()
            .chat_stream(&request(&model), timeouts(10))
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(done.text, "late");
}

fn direct_client(fake: &FakeUpstream) -> LlmClient {
    LlmClient::new(&config::LitellmSettings {
        base_url: fake.url(),
        api_key: None,
        request_timeout_secs: 10,
    })
    .unwrap()
}

#[tokio::test]
async fn a_cut_stream_yields_the_tokens_then_an_error() {
    // Directly against the upstream: the connection breaks after two tokens.
    let fake = FakeUpstream::start().await.unwrap();
    let model = unique_model("cut");
    fake.client()
        .script(
            &model,
            vec![Behaviour::Cut {
                text: "alpha beta gamma delta".into(),
                after_tokens: 2,
            }],
        )
        .await
        .unwrap();
    let mut req = request(&model);
    req.model = model.clone();
    let mut stream = direct_client(&fake)
        .chat_stream(&req, timeouts(10))
        .await
        .unwrap();
    let mut text = String::new();
    let mut error = None;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(ChatEvent::Token(t)) => text.push_str(&t),
            Ok(_) => {}
            Err(e) => error = Some(e),
        }
    }
    assert_eq!(text, "alpha beta ");
    assert!(matches!(error, Some(LlmError::Cut(_))), "{error:?}");
}

/// Canary for a limitation of the LiteLLM proxy (1.106): when the upstream connection breaks
/// mid-stream, the proxy ends its own stream normally (finish_reason "stop", then [DONE]), so
/// a cut behind the proxy looks like a short answer. If this starts failing, the proxy now
/// reports cuts and the chat path gets them as errors for free.
#[tokio::test]
async fn litellm_masks_an_upstream_cut_as_a_normal_end() {
    let model = scripted(vec![Behaviour::Cut {
        text: "alpha beta gamma delta".into(),
        after_tokens: 2,
    }])
    .await;
    let done = collect(
        client()
            .chat_stream(&request(&model), timeouts(10))
            .await
            .unwrap(),
    )
    .await;
    let done = done.expect("LiteLLM ends a cut stream normally");
    assert_eq!(done.text, "alpha beta ");
    assert_eq!(done.finish_reason.as_deref(), Some("stop"));
}

#[tokio::test]
async fn malformed_and_empty_streams_are_errors() {
    let model = scripted(vec![Behaviour::Malformed, Behaviour::Empty]).await;
    let c = client();
    for _ in 0..2 {
        let err = match c.chat_stream(&request(&model), timeouts(10)).await {
            Err(e) => e,
            Ok(s) => collect(s).await.unwrap_err(),
        };
        assert!(!err.is_rate_limited(), "{err:?}");
    }
}

#[tokio::test]
async fn tool_calls_are_assembled() {
    let model = scripted(vec![Behaviour::ToolCalls {
        calls: vec![
            ToolCall {
                id: "call_a".into(),
                name: "list_tasks".into(),
                arguments: r#"{"project_id":"p1"}"#.into(),
            },
            ToolCall {
                id: "call_b".into(),
                name: "get_task".into(),
                arguments: r#"{"task_id":"t9"}"#.into(),
            },
        ],
    }])
    .await;
    let mut req = request(&model);
    req.tools = vec![
        json!({"type": "function", "function": {"name": "list_tasks", "parameters": {"type": "object"}}}),
    ];
    let done = collect(client().chat_stream(&req, timeouts(10)).await.unwrap())
        .await
        .unwrap();
    assert_eq!(done.tool_calls.len(), 2, "{done:?}");
    assert_eq!(done.tool_calls[0].name, "list_tasks");
    assert_eq!(done.tool_calls[0].id, "call_a");
    let args: serde_json::Value = serde_json::from_str(&done.tool_calls[0].arguments).unwrap();
    assert_eq!(args["project_id"], "p1");
    assert_eq!(done.tool_calls[1].name, "get_task");
    let seen = FakeClient::shared().requests(&model).await.unwrap();
    assert_eq!(seen[0].body["tools"][0]["function"]["name"], "list_tasks");
}

#[tokio::test]
async fn embeddings_come_back_in_order() {
    let model = unique_model("embed");
    let inputs: Vec<String> = (0..5).map(|i| format!("chunk number {i}")).collect();
    let embedded = client().embed(&via_litellm(&model), &inputs).await.unwrap();
    // what the upstream reported (the fake counts len / 4 + 1 per input)
    let reported: usize = inputs.iter().map(|t| t.len() / 4 + 1).sum();
    assert_eq!(embedded.tokens, reported as u64);
    let vectors = embedded.vectors;
    assert_eq!(vectors.len(), 5);
    for (text, v) in inputs.iter().zip(&vectors) {
        let want = fake_embedding(text, 384);
        let diff = v
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "{text}: differs by {diff}");
    }
}

#[tokio::test]
async fn model_list_names_the_configured_models() {
    let models = client().models().await.unwrap();
    for name in ["local-chat", "local-chat-fallback", "local-embed"] {
        assert!(
            models.iter().any(|m| m == name),
            "{name} missing from {models:?}"
        );
    }
}

#[tokio::test]
async fn an_unreachable_proxy_is_a_connection_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = LlmClient::new(&config::LitellmSettings {
        base_url: format!("http://127.0.0.1:{port}"),
        api_key: None,
        request_timeout_secs: 5,
    })
    .unwrap();
    let err = c
        .chat_stream(&request("x"), timeouts(5))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, LlmError::Connection(_)), "{err:?}");
}
