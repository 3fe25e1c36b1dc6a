//! `api usage`: the operator's token-usage report, run as the real binary against a test
//! database.

use chrono::{Days, NaiveDate, TimeZone, Utc};
use testkit::{TestDb, TestRedis};
use uuid::Uuid;

async fn api_usage(db: &TestDb, redis: &TestRedis, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_api"))
        .arg("usage")
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", &redis.url)
        .env("REDIS_PREFIX", &redis.prefix)
        .env("JWT_SECRET", testkit::TEST_JWT_SECRET)
        .env("LOG_FILTER", "warn")
        .env_remove("JWT_ALGORITHM")
        .env_remove("SWITCHBOARD_CONFIG")
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .unwrap()
}

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "api usage failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The cells of each line (the table's columns are separated by runs of spaces).
fn cells(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

fn days_ago(n: u64) -> NaiveDate {
    Utc::now().date_naive() - Days::new(n)
}

async fn record(db: &TestDb, org: Uuid, model: &str, day: NaiveDate, prompt: i64, completion: i64) {
    let at = Utc.from_utc_datetime(&day.and_hms_opt(12, 0, 0).unwrap());
    let mut c = db.pool.acquire().await.unwrap();
    store::usage::record(&mut c, org.into(), model, prompt, completion, at)
        .await
        .unwrap();
}

#[tokio::test]
async fn api_usage_prints_a_table_with_totals_filtered_by_org_and_day() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let mut c = db.pool.acquire().await.unwrap();
    let a = store::tenancy::insert_org(&mut c, "a").await.unwrap().id;
    let b = store::tenancy::insert_org(&mut c, "b").await.unwrap().id;
    drop(c);
    record(&db, a.into(), "local-chat", days_ago(40), 1000, 1000).await; // before any --since below
    record(&db, a.into(), "local-chat", days_ago(3), 100, 10).await;
    record(&db, a.into(), "local-chat", days_ago(3), 50, 5).await;
    record(&db, a.into(), "fake/x", days_ago(3), 7, 3).await;
    record(&db, a.into(), "local-chat", days_ago(1), 20, 2).await;
    record(&db, b.into(), "local-chat", days_ago(2), 9, 9).await;

    // org a has a daily limit (its monthly one is the operator's: unlimited)
    store::budgets::put(
        &db.pool,
        a,
        store::budgets::Change::Limit(100_000),
        store::budgets::Change::Keep,
    )
    .await
    .unwrap();
    // one org, from a day on: the org's rows by day, model, then the totals, then its budget
    let since = days_ago(5).to_string();
    let out = stdout(&api_usage(&db, &redis, &["--org", &a.to_string(), "--since", &since]).await);
    assert_eq!(out.lines().nth(5), Some(""), "{out}");
    let (a, d3, d1) = (
        a.to_string(),
        days_ago(3).to_string(),
        days_ago(1).to_string(),
    );
    assert_eq!(
        cells(&out)[..5],
        vec![
            vec!["day", "org", "model", "requests", "prompt", "completion"],
            vec![d3.as_str(), a.as_str(), "fake/x", "1", "7", "3"],
            vec![d3.as_str(), a.as_str(), "local-chat", "2", "150", "15"],
            vec![d1.as_str(), a.as_str(), "local-chat", "1", "20", "2"],
            vec!["total", "4", "177", "20"],
        ],
        "{out}"
    );
    let budget: Vec<&str> = out.lines().skip(6).collect();
    // (this month's rows of org a: those of 3 and 1 days ago, when still in this month)
    let month_start = chrono::Datelike::with_day(&Utc::now().date_naive(), 1).unwrap();
    let used_month: i64 = [(days_ago(3), 175), (days_ago(1), 22)]
        .iter()
        .filter(|(d, _)| *d >= month_start)
        .map(|(_, t)| t)
        .sum();
    let resets = |p: store::budgets::Period| {
        p.resets_at(Utc::now())
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    assert_eq!(
        budget,
        [
            format!(
                "budget daily: limit=100000 used=0 reserved=0 left=100000 resets={}",
                resets(store::budgets::Period::Day)
            ),
            format!(
                "budget monthly: limit=unlimited used={used_month} reserved=0 left=unlimited resets={}",
                resets(store::budgets::Period::Month)
            ),
        ],
        "{out}"
    );
    // a plain aligned table: the header and rows are equally wide
    let widths: Vec<usize> = out.lines().take(4).map(str::len).collect();
    assert!(widths.windows(2).all(|w| w[0] == w[1]), "{out}");

    // every org, and by default from 30 days ago (the 40-day-old row is left out)
    let out = stdout(&api_usage(&db, &redis, &[]).await);
    let rows = cells(&out);
    assert_eq!(rows.len(), 6, "{out}");
    assert_eq!(
        rows[3][..3],
        [days_ago(2).to_string(), b.to_string(), "local-chat".into()]
    );
    assert_eq!(rows[5], ["total", "5", "186", "29"], "{out}");

    // an org without usage: just the header and zero totals
    let out = stdout(
        &api_usage(
            &db,
            &redis,
            &["--org", &Uuid::now_v7().to_string(), "--since", &since],
        )
        .await,
    );
    assert_eq!(cells(&out)[1], ["total", "0", "0", "0"], "{out}");
}

#[tokio::test]
async fn api_usage_refuses_a_bad_date_or_org_with_exit_code_2_naming_the_flag() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    for (args, flag) in [
        (vec!["--since", "2026-13-01"], "--since"),
        (vec!["--since", "yesterday"], "--since"),
        (vec!["--since", "24.11.2026"], "--since"),
        (vec!["--org", "acme", "--since", "2026-11-01"], "--org"),
    ] {
        let out = api_usage(&db, &redis, &args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?} names {flag}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    let out = api_usage(&db, &redis, &["--since", "2026-13-01"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("YYYY-MM-DD"),
        "says what is expected: {stderr}"
    );
}
