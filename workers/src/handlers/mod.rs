//! Job handlers, one module per kind, and the registry a worker runs with: `probe`, `chat`,
//! `index` (handlers/index), the memory queue's `summarize` and `remember` (handlers/memory)
//! and the actions queue's `execute_action` (handlers/actions).

pub mod actions;
pub mod chat;
pub mod index;
pub mod memory;
pub mod probe;

use jobs::Registry;
use jobs::kinds::Probe;

/// The handlers that need only the database (`probe`).
pub fn registry(db: sqlx::PgPool) -> Registry {
    let mut r = Registry::new();
    r.register::<Probe, _, _>(move |ctx, job| probe::run(db.clone(), ctx, job));
    r
}

/// Every handler this build has: what the `worker` binary runs.
pub fn worker_registry(rt: &crate::Runtime) -> Result<Registry, llm::LlmError> {
    let mut r = registry(rt.db.clone());
    chat::ChatHandler::new(rt.db.clone(), rt.redis.clone(), &rt.settings)?.register(&mut r);
    index::Indexer::new(rt.db.clone(), &rt.settings)?.register(&mut r);
    memory::MemoryHandlers::new(rt.db.clone(), rt.redis.clone(), &rt.settings)?.register(&mut r);
    actions::ActionsHandler::new(rt.db.clone(), rt.bus.clone()).register(&mut r);
    Ok(r)
}
