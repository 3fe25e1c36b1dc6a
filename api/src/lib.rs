//! Switchboard's HTTP API (poem + poem-openapi).
//!
//! It never calls a model: it authenticates, writes rows, enqueues jobs and relays events.
//! `Application::build` binds the listener (port 0 in tests) and `run_until_stopped` serves
//! until the shutdown token fires.

pub mod auth;
pub mod body;
pub mod client_ip;
pub mod console;
pub mod cors;
pub mod error;
pub mod extract;
pub mod middleware;
pub mod models;
pub mod openapi;
pub mod pagination;
pub mod password;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod sse;
pub mod startup;
pub mod state;
pub mod throttle;
pub mod usage_report;
pub mod validate;
pub mod views;

pub use startup::Application;
pub use state::AppState;
