//! Token usage: the daily upsert adds up per (org, UTC day, model); the report filters by org
//! and first day and is ordered by day, model.

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use store::usage::{self, Row};
use testkit::TestDb;
use uuid::Uuid;

fn at(day: u32, hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, day, hour, 30, 0).unwrap()
}

fn day(d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 11, d).unwrap()
}

fn row(d: u32, org_id: Uuid, model: &str, requests: i64, prompt: i64, completion: i64) -> Row {
    Row {
        day: day(d),
        org_id: org_id.into(),
        model: model.to_owned(),
        requests,
        prompt_tokens: prompt,
        completion_tokens: completion,
    }
}

#[tokio::test]
async fn record_adds_up_per_org_day_and_model_and_report_filters() {
    let db = TestDb::new().await;
    let mut c = db.pool.acquire().await.unwrap();
    let a = store::tenancy::insert_org(&mut c, "a").await.unwrap().id;
    let b = store::tenancy::insert_org(&mut c, "b").await.unwrap().id;

    // org a, 20 Nov: two requests to m1 (early and late the same UTC day), one to m0
    usage::record(&mut c, a, "m1", 10, 2, at(20, 0))
        .await
        .unwrap();
    usage::record(&mut c, a, "m1", 5, 3, at(20, 23))
        .await
        .unwrap();
    usage::record(&mut c, a, "m0", 1, 1, at(20, 12))
        .await
        .unwrap();
    // org a, 21 Nov; org b, 20 and 22 Nov
    usage::record(&mut c, a, "m1", 7, 7, at(21, 1))
        .await
        .unwrap();
    usage::record(&mut c, b, "m1", 100, 50, at(20, 9))
        .await
        .unwrap();
    usage::record(&mut c, b, "m1", 4, 4, at(22, 9))
        .await
        .unwrap();
    // a transaction that rolls back counts nothing
    let mut tx = db.pool.begin().await.unwrap();
    usage::record(&mut tx, a, "m1", 1000, 1000, at(21, 2))
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    // everything, ordered by day, model (then org)
    let mut day20_m1 = [
        row(20, a.into(), "m1", 2, 15, 5),
        row(20, b.into(), "m1", 1, 100, 50),
    ];
    day20_m1.sort_by_key(|r| r.org_id);
    let mut all = vec![row(20, a.into(), "m0", 1, 1, 1)];
    all.extend(day20_m1);
    all.push(row(21, a.into(), "m1", 1, 7, 7));
    all.push(row(22, b.into(), "m1", 1, 4, 4));
    assert_eq!(usage::report(&db.pool, None, day(1)).await.unwrap(), all);

    // one org
    assert_eq!(
        usage::report(&db.pool, Some(a), day(1)).await.unwrap(),
        vec![
            row(20, a.into(), "m0", 1, 1, 1),
            row(20, a.into(), "m1", 2, 15, 5),
            row(21, a.into(), "m1", 1, 7, 7),
        ]
    );
    // from a day on (inclusive)
    assert_eq!(
        usage::report(&db.pool, None, day(21)).await.unwrap(),
        vec![
            row(21, a.into(), "m1", 1, 7, 7),
            row(22, b.into(), "m1", 1, 4, 4)
        ]
    );
    assert_eq!(
        usage::report(&db.pool, Some(b), day(21)).await.unwrap(),
        vec![row(22, b.into(), "m1", 1, 4, 4)]
    );
    // an org without usage, and a day after the last row
    assert!(
        usage::report(&db.pool, Some(Uuid::now_v7().into()), day(1))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        usage::report(&db.pool, None, day(23))
            .await
            .unwrap()
            .is_empty()
    );

    // deleting an org deletes its usage
    sqlx::query("DELETE FROM organizations WHERE id = $1")
        .bind(b)
        .execute(&mut *c)
        .await
        .unwrap();
    assert!(
        usage::report(&db.pool, Some(b), day(1))
            .await
            .unwrap()
            .is_empty()
    );
}
