//! The worker and scheduler processes start against real services, log readiness, and stop
//! cleanly on SIGTERM; a bad setting stops them at once with a message naming it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod bus;
mod chat;
mod crash;
mod index;
mod memory;
mod metrics;
mod ops;
mod process;
mod retrieval;
mod scheduler;
mod tools;
