//! The delayed-set mover is safe with many workers running it at once.

use std::collections::HashSet;

use chrono::{Duration, Utc};
use jobs::kinds::Probe;
use jobs::{Envelope, Queue};
use redis::AsyncCommands;
use testkit::TestRedis;

#[tokio::test]
async fn concurrent_movers_move_each_due_entry_exactly_once() {
    let redis = TestRedis::new();
    let bus = crate::bus(&redis, &crate::queues(|_| {}));
    let keys = bus.keys(Queue::Actions).clone();
    let mut conn = bus.redis().conn().await.unwrap();

    // 3,000 entries already due, 50 due in an hour
    let past = Utc::now() - Duration::seconds(5);
    let mut due_ids = HashSet::new();
    let mut pipe = redis::pipe();
    for i in 0..3050 {
        let future = i >= 3000;
        let at = if future {
            Utc::now() + Duration::hours(1)
        } else {
            past
        };
        let env = Envelope::new(Probe::new("mover")).with_not_before(at);
        if !future {
            due_ids.insert(env.id);
        }
        pipe.zadd(&keys.delayed, env.to_json().unwrap(), at.timestamp_millis())
            .ignore();
    }
    let () = pipe.query_async(&mut conn).await.unwrap();

    // eight movers, small batches, all racing
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let bus = bus.clone();
        set.spawn(async move {
            let mut moved = 0;
            loop {
                let (n, next) = bus.move_due(Queue::Actions, 25).await.unwrap();
                moved += n;
                if n == 0 {
                    return (moved, next);
                }
            }
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        let (moved, next) = r.unwrap();
        total += moved;
        let next = next.expect("the future entries are still there");
        assert!(next > Utc::now().timestamp_millis());
    }
    assert_eq!(total, 3000, "each due entry moved once, in all");

    let entries: redis::streams::StreamRangeReply = conn.xrange_all(&keys.stream).await.unwrap();
    assert_eq!(entries.ids.len(), 3000, "no entry moved twice");
    let moved: HashSet<uuid::Uuid> = entries
        .ids
        .iter()
        .map(|e| {
            let body: String = e.get("j").unwrap();
            Envelope::from_json(&body).unwrap().id
        })
        .collect();
    assert_eq!(moved, due_ids, "exactly the due entries moved");
    let left: u64 = conn.zcard(&keys.delayed).await.unwrap();
    assert_eq!(left, 50, "entries not due stay delayed");
}
