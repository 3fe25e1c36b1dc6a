//! API integration tests: the app spawned on port 0 against real PostgreSQL and Redis.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod helpers;
mod ops;
