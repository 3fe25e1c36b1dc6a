//! A streamed chat completion as typed events.

use std::collections::VecDeque;
use std::pin::Pin;

use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use crate::{LlmError, Timeouts};

/// One thing the model said.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatEvent {
    /// Visible text.
    Token(String),
    /// A fragment of a tool call; fragments with the same `index` concatenate.
    ToolCallDelta {
        index: usize,
        id: Option<String>,
        name: Option<String>,
        arguments: String,
    },
    /// Token usage (LiteLLM sends it in a last chunk when asked with `include_usage`).
    Usage(Usage),
    /// The model's finish reason (`stop`, `length`, `tool_calls`, ...).
    Finished(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The JSON text the model wrote (not yet validated).
    pub arguments: String,
}

/// Everything a stream said, folded: what a caller stores when the stream ends.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub usage: Option<Usage>,
    pub finish_reason: Option<String>,
}

impl Completion {
    /// Fold one event in.
    pub fn apply(&mut self, event: &ChatEvent) {
        match event {
            ChatEvent::Token(t) => self.text.push_str(t),
            ChatEvent::ToolCallDelta {
                index,
                id,
                name,
                arguments,
            } => {
                while self.tool_calls.len() <= *index {
                    self.tool_calls.push(ToolCall {
                        id: String::new(),
                        name: String::new(),
                        arguments: String::new(),
                    });
                }
                let call = &mut self.tool_calls[*index];
                if let Some(id) = id {
                    call.id.clone_from(id);
                }
                if let Some(name) = name {
                    call.name.push_str(name);
                }
                call.arguments.push_str(arguments);
            }
            ChatEvent::Usage(u) => self.usage = Some(*u),
            ChatEvent::Finished(r) => self.finish_reason = Some(r.clone()),
        }
    }
}

pub type ChatStream = Pin<Box<dyn Stream<Item = Result<ChatEvent, LlmError>> + Send>>;

/// Drain a stream into a [`Completion`].
pub async fn collect(mut stream: ChatStream) -> Result<Completion, LlmError> {
    let mut c = Completion::default();
    while let Some(ev) = stream.next().await {
        c.apply(&ev?);
    }
    Ok(c)
}

struct State {
    events: Pin<Box<dyn Stream<Item = Result<eventsource_stream::Event, String>> + Send>>,
    pending: VecDeque<Result<ChatEvent, LlmError>>,
    first_deadline: Instant,
    timeouts: Timeouts,
    got_content: bool,
    finished: bool,
    done: bool,
}

pub(crate) fn stream(resp: reqwest::Response, timeouts: Timeouts) -> ChatStream {
    let events = resp
        .bytes_stream()
        .eventsource()
        .map(|r| r.map_err(|e| e.to_string()));
    let state = State {
        events: Box::pin(events),
        pending: VecDeque::new(),
        first_deadline: Instant::now() + timeouts.first_event,
        timeouts,
        got_content: false,
        finished: false,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(item) = st.pending.pop_front() {
                if item.is_err() {
                    st.done = true;
                    st.pending.clear();
                }
                return Some((item, st));
            }
            if st.done {
                return None;
            }
            let wait = if st.got_content {
                st.timeouts.idle
            } else {
                st.first_deadline.saturating_duration_since(Instant::now())
            };
            match tokio::time::timeout(wait, st.events.next()).await {
                Err(_) => {
                    let what = if st.got_content {
                        "no data between chunks"
                    } else {
                        "no token"
                    };
                    st.pending
                        .push_back(Err(LlmError::Timeout(format!("{what} within {wait:?}"))));
                }
                Ok(None) => {
                    // The body ended without [DONE].
                    st.done = true;
                    if !st.got_content {
                        return Some((Err(LlmError::Empty), st));
                    }
                    if !st.finished {
                        return Some((
                            Err(LlmError::Cut(
                                "stream closed before the answer finished".into(),
                            )),
                            st,
                        ));
                    }
                    return None;
                }
                Ok(Some(Err(e))) => st.pending.push_back(Err(LlmError::Cut(e))),
                Ok(Some(Ok(ev))) => parse_event(&mut st, &ev.data),
            }
        }
    }))
}

fn parse_event(st: &mut State, data: &str) {
    let data = data.trim();
    if data.is_empty() {
        return; // keep-alive
    }
    if data == "[DONE]" {
        if !st.got_content {
            st.pending.push_back(Err(LlmError::Empty));
        }
        st.done = true;
        return;
    }
    let v: Value = match serde_json::from_str(data) {
        Ok(v) => v,
        Err(e) => {
            st.pending
                .push_back(Err(LlmError::Malformed(format!("chunk is not JSON ({e})"))));
            return;
        }
    };
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        let message = err
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("error in stream")
            .to_owned();
        let code = err
            .get("code")
            .and_then(|c| {
                c.as_u64()
                    .or_else(|| c.as_str().and_then(|s| s.parse().ok()))
            })
            .unwrap_or(500) as u16;
        st.pending.push_back(Err(if code == 429 {
            LlmError::RateLimited { retry_after: None }
        } else {
            LlmError::Upstream {
                status: code,
                message,
            }
        }));
        return;
    }
    if let Some(choice) = v
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
    {
        let delta = choice.get("delta").unwrap_or(&Value::Null);
        if let Some(text) = delta.get("content").and_then(Value::as_str)
            && !text.is_empty()
        {
            st.got_content = true;
            st.pending.push_back(Ok(ChatEvent::Token(text.to_owned())));
        }
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            for (pos, call) in calls.iter().enumerate() {
                st.got_content = true;
                let f = call.get("function").unwrap_or(&Value::Null);
                st.pending.push_back(Ok(ChatEvent::ToolCallDelta {
                    index: call
                        .get("index")
                        .and_then(Value::as_u64)
                        .map(|i| i as usize)
                        .unwrap_or(pos),
                    id: call.get("id").and_then(Value::as_str).map(str::to_owned),
                    name: f.get("name").and_then(Value::as_str).map(str::to_owned),
                    arguments: f
                        .get("arguments")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                }));
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            st.finished = true;
            st.pending
                .push_back(Ok(ChatEvent::Finished(reason.to_owned())));
        }
    }
    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
        let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
        st.pending.push_back(Ok(ChatEvent::Usage(Usage {
            prompt_tokens: n("prompt_tokens"),
            completion_tokens: n("completion_tokens"),
        })));
    }
}
