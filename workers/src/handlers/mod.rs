//! Job handlers, one file per kind, and the registry a worker runs with. Only `probe` exists so
//! far; chat, summarize, remember, index and execute_action arrive with their issues.

pub mod probe;

use jobs::Registry;
use jobs::kinds::Probe;

/// Every handler this build has.
pub fn registry(db: sqlx::PgPool) -> Registry {
    let mut r = Registry::new();
    r.register::<Probe, _, _>(move |ctx, job| probe::run(db.clone(), ctx, job));
    r
}
