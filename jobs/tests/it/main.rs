//! The bus against a real Redis (a unique key prefix per test): the Lua steps, delayed moves
//! under concurrency, reclaims with delivery counts, retries honouring Retry-After.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod bus;
mod cluster;
mod delayed;
mod events;
mod fair;
mod partitions;
mod runtime;

use std::sync::Arc;

use jobs::{Bus, RedisHandle};
use testkit::TestRedis;

/// Default queue settings, with `edit` applied.
pub fn queues(edit: impl FnOnce(&mut config::QueuesSettings)) -> config::QueuesSettings {
    // QUEUE_PARTITIONS from the environment (scripts/test's cluster pass sets it)
    let mut s = config::Settings::load_from(None, |k| {
        (k == "QUEUE_PARTITIONS")
            .then(|| std::env::var(k).ok())
            .flatten()
    })
    .unwrap()
    .queues;
    edit(&mut s);
    s
}

pub fn bus(redis: &TestRedis, q: &config::QueuesSettings) -> Bus {
    let handle = Arc::new(RedisHandle::new(&redis.settings()).unwrap());
    Bus::new(handle, q)
}
