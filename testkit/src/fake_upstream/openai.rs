//! The OpenAI-compatible endpoints LiteLLM calls: chat completions (streamed or not, tool
//! calls, scripted failures), embeddings (deterministic vectors), models, health.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use poem::http::StatusCode;
use poem::web::{Data, Json};
use poem::{Body, IntoResponse, Response, handler};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{Behaviour, Shared, next_behaviour, now_ms, record};

#[handler]
pub(super) async fn health() -> &'static str {
    "ok"
}

#[handler]
pub(super) async fn models() -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "testkit"}]}),
    )
}

fn last_user_text(body: &Value) -> String {
    body.get("messages")
        .and_then(Value::as_array)
        .and_then(|m| {
            m.iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        })
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn error_status(code: u16, retry_after: Option<u64>, message: Option<String>) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = message.unwrap_or_else(|| format!("fake upstream error {code}"));
    let mut resp = Response::builder()
        .status(status)
        .content_type("application/json")
        .body(
            json!({"error": {"message": message, "type": "fake_error", "code": code}}).to_string(),
        );
    if let Some(secs) = retry_after
        && let Ok(v) = secs.to_string().parse()
    {
        resp.headers_mut().insert("retry-after", v);
    }
    resp
}

fn chunk(model: &str, delta: Value, finish: Option<&str>) -> Bytes {
    let v = json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": now_ms() / 1000, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
    });
    Bytes::from(format!("data: {v}\n\n"))
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn split_tokens(text: &str) -> Vec<String> {
    // words with their following whitespace, so the concatenation is the text
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        cur.push(c);
        if c.is_whitespace() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn sse_response(
    stream: impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
) -> Response {
    Response::builder()
        .content_type("text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_bytes_stream(stream))
}

#[handler]
pub(super) async fn chat(state: Data<&Shared>, Json(body): Json<Value>) -> Response {
    let model = record(state.0, "/v1/chat/completions", &body);
    let streaming = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let prompt_tokens = body.to_string().len() / 4;
    let echo = |first_token_delay_ms, token_delay_ms| Behaviour::Reply {
        text: format!("echo: {}", last_user_text(&body)),
        tokens: None,
        first_token_delay_ms,
        token_delay_ms,
    };
    let behaviour = match next_behaviour(state.0, &model) {
        None => echo(0, 0),
        Some(Behaviour::Echo {
            first_token_delay_ms,
            token_delay_ms,
        }) => echo(first_token_delay_ms, token_delay_ms),
        Some(b) => b,
    };
    match behaviour {
        Behaviour::Status {
            code,
            retry_after_secs,
            message,
        } => error_status(code, retry_after_secs, message),
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            error_status(504, None, None)
        }
        Behaviour::Reply {
            text,
            tokens,
            first_token_delay_ms,
            token_delay_ms,
        } => {
            let tokens = tokens.unwrap_or_else(|| split_tokens(&text));
            if !streaming {
                tokio::time::sleep(Duration::from_millis(first_token_delay_ms)).await;
                return Json(json!({
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": now_ms() / 1000, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": usage(prompt_tokens, tokens.len()),
                }))
                .into_response();
            }
            let n = tokens.len();
            let m = model.clone();
            let stream = async_stream_tokens(
                m,
                tokens,
                first_token_delay_ms,
                token_delay_ms,
                Some(usage(prompt_tokens, n)),
            );
            sse_response(stream)
        }
        Behaviour::ToolCalls { calls } => {
            let tool_calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, c)| json!({"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                .collect();
            if !streaming {
                let msg_calls: Vec<Value> = calls
                    .iter()
                    .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                    .collect();
                return Json(json!({
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": now_ms() / 1000, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": msg_calls}, "finish_reason": "tool_calls"}],
                    "usage": usage(prompt_tokens, 10),
                }))
                .into_response();
            }
            let mut parts = vec![chunk(
                &model,
                json!({"role": "assistant", "tool_calls": tool_calls}),
                None,
            )];
            parts.push(chunk(&model, json!({}), Some("tool_calls")));
            parts.push(usage_chunk(&model, usage(prompt_tokens, 10)));
            parts.push(Bytes::from_static(b"data: [DONE]\n\n"));
            sse_response(futures::stream::iter(parts.into_iter().map(Ok)))
        }
        Behaviour::Cut { text, after_tokens } => {
            let tokens: Vec<String> = split_tokens(&text).into_iter().take(after_tokens).collect();
            let mut parts: Vec<Result<Bytes, std::io::Error>> = tokens
                .iter()
                .map(|t| Ok(chunk(&model, json!({"content": t}), None)))
                .collect();
            parts.push(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "cut by test",
            )));
            // Give the client time to read the tokens before the connection is cut.
            let stream = futures::stream::iter(parts).then(|p| async move {
                if p.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                p
            });
            sse_response(stream)
        }
        Behaviour::Malformed => sse_response(futures::stream::iter(vec![
            Ok(Bytes::from_static(
                b"data: {\"choices\": [{\"delta\": {\"content\": \n\n",
            )),
            Ok(Bytes::from_static(b"data: this is not json\n\n")),
        ])),
        Behaviour::Empty => sse_response(futures::stream::iter(vec![Ok(Bytes::from_static(
            b"data: [DONE]\n\n",
        ))])),
        // (turned into a Reply above)
        Behaviour::Echo { .. } => error_status(500, None, None),
    }
}

fn usage_chunk(model: &str, usage: Value) -> Bytes {
    let v = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": now_ms() / 1000,
        "model": model, "choices": [], "usage": usage});
    Bytes::from(format!("data: {v}\n\n"))
}

fn async_stream_tokens(
    model: String,
    tokens: Vec<String>,
    first_delay_ms: u64,
    token_delay_ms: u64,
    usage: Option<Value>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let mut parts: Vec<(u64, Bytes)> = Vec::with_capacity(tokens.len() + 3);
    for (i, t) in tokens.iter().enumerate() {
        let delay = if i == 0 {
            first_delay_ms
        } else {
            token_delay_ms
        };
        let delta = if i == 0 {
            json!({"role": "assistant", "content": t})
        } else {
            json!({"content": t})
        };
        parts.push((delay, chunk(&model, delta, None)));
    }
    if tokens.is_empty() {
        parts.push((
            first_delay_ms,
            chunk(&model, json!({"role": "assistant", "content": ""}), None),
        ));
    }
    parts.push((0, chunk(&model, json!({}), Some("stop"))));
    if let Some(u) = usage {
        parts.push((0, usage_chunk(&model, u)));
    }
    parts.push((0, Bytes::from_static(b"data: [DONE]\n\n")));
    futures::stream::iter(parts).then(|(delay, b)| async move {
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        Ok(b)
    })
}

/// A deterministic unit vector for `text`: equal texts give equal vectors, different texts
/// (almost surely) different ones.
pub fn fake_embedding(text: &str, dim: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(dim);
    let mut counter = 0u32;
    while out.len() < dim {
        let mut h = Sha256::new();
        h.update(counter.to_le_bytes());
        h.update(text.as_bytes());
        for pair in h.finalize().chunks(2) {
            if out.len() == dim {
                break;
            }
            let v = u16::from_le_bytes([pair[0], pair[1]]) as f32 / 32768.0 - 1.0;
            out.push(v);
        }
        counter += 1;
    }
    let norm = out.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-9);
    out.iter_mut().for_each(|v| *v /= norm);
    out
}

#[handler]
pub(super) async fn embeddings(state: Data<&Shared>, Json(body): Json<Value>) -> Response {
    let model = record(state.0, "/v1/embeddings", &body);
    if let Some(b) = next_behaviour(state.0, &model) {
        match b {
            Behaviour::Status {
                code,
                retry_after_secs,
                message,
            } => return error_status(code, retry_after_secs, message),
            Behaviour::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return error_status(504, None, None);
            }
            _ => {}
        }
    }
    let inputs: Vec<String> = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect(),
        _ => return error_status(400, None, Some("input is required".into())),
    };
    let dim = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .unwrap_or(384) as usize;
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let v = fake_embedding(text, dim);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let tokens: usize = inputs.iter().map(|t| t.len() / 4 + 1).sum();
    Json(json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
        .into_response()
}
