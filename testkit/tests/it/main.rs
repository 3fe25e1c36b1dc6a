//! The ground is real: pgvector with HNSW in a fresh test database, a Redis Streams round trip,
//! and a chat completion and an embedding through the real LiteLLM proxy to the fake upstream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod fake;
mod litellm;
mod services;
