//! The LiteLLM client against the real proxy in front of the scripted fake upstream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod client;
