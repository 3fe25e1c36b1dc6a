//! Store integration tests against a fresh PostgreSQL database per test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod conversations;
mod embeddings;
mod memory;
mod migration;
mod outbox;
mod retrieval;
mod tenancy;
mod types;
mod usage;
