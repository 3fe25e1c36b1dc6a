//! A fresh database per test, cloned from a template that has every migration applied.
//!
//! The template's name carries a hash of the migrations, so a changed migration makes a new
//! template; creation is serialised across test processes by an advisory lock and made atomic
//! by migrating under a temporary name and renaming at the end.

use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, Executor, PgConnection, PgPool};

pub struct TestDb {
    pub name: String,
    /// URL of the test database itself.
    pub url: String,
    pub pool: PgPool,
    admin_url: String,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn with_database(url: &str, db: &str) -> String {
    let mut u = url::Url::parse(url).expect("DATABASE_URL is a URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

fn template_name() -> String {
    let mut h = Sha256::new();
    for m in store::MIGRATOR.iter() {
        h.update(m.version.to_le_bytes());
        h.update(&m.checksum[..]);
    }
    let hex: String = h
        .finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sbt_tpl_{hex}")
}

impl TestDb {
    /// A new, migrated, empty database for one test.
    pub async fn new() -> Self {
        Self::create(true).await
    }

    /// A new database with no migration applied (migration tests run them themselves, e.g.
    /// `store::MIGRATOR.run_to(..)`, put rows of the old shape in, then run the rest).
    pub async fn unmigrated() -> Self {
        Self::create(false).await
    }

    async fn create(migrated: bool) -> Self {
        let base = crate::env::require("DATABASE_URL");
        let admin_url = with_database(&base, "postgres");
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at DATABASE_URL: {e}"));
        let template = if migrated {
            let template = template_name();
            ensure_template(&mut admin, &admin_url, &template).await;
            template
        } else {
            "template0".to_owned()
        };
        let name = format!(
            "sbt_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                r#"CREATE DATABASE "{name}" TEMPLATE "{template}""#
            )))
            .await
            .expect("create test database");
        admin.close().await.ok();
        let url = with_database(&base, &name);
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect(&url)
            .await
            .expect("connect to test database");
        Self {
            name,
            url,
            pool,
            admin_url,
        }
    }
}

async fn template_exists(c: &mut PgConnection, template: &str) -> bool {
    sqlx::query_scalar::<_, i32>("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(template)
        .fetch_optional(c)
        .await
        .expect("query pg_database")
        .is_some()
}

async fn ensure_template(admin: &mut PgConnection, admin_url: &str, template: &str) {
    if template_exists(admin, template).await {
        return;
    }
    // Serialise template creation across the test processes of a run.
    sqlx::query("SELECT pg_advisory_lock(7422001)")
        .execute(&mut *admin)
        .await
        .expect("lock");
    if !template_exists(admin, template).await {
        let tmp = format!("{template}_build_{}", std::process::id());
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                r#"DROP DATABASE IF EXISTS "{tmp}""#
            )))
            .await
            .expect("drop tmp");
        admin
            .execute(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{tmp}""#)))
            .await
            .expect("create template");
        {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect(&with_database(admin_url, &tmp))
                .await
                .expect("connect template");
            // the test settings use the default EMBEDDING_DIM (384)
            store::migrate_with_vector_index(&pool, 384)
                .await
                .expect("migrations apply to the template");
            pool.close().await;
        }
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                r#"ALTER DATABASE "{tmp}" RENAME TO "{template}""#
            )))
            .await
            .expect("rename template");
    }
    sqlx::query("SELECT pg_advisory_unlock(7422001)")
        .execute(&mut *admin)
        .await
        .expect("unlock");
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin_url = self.admin_url.clone();
        let pool = self.pool.clone();
        // Drop runs inside the test's runtime; do the async clean-up on a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                drop(pool);
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ = admin
                        .execute(sqlx::AssertSqlSafe(format!(
                            r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#
                        )))
                        .await;
                }
            });
        })
        .join();
    }
}
