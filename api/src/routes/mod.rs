//! HTTP endpoints, one module per area, all declared with poem-openapi so that
//! `/openapi.json` and `/docs` come from the code.

pub mod health;
pub mod metrics;
