//! A scratch PostgreSQL database for one bench run: created and migrated at the start,
//! dropped (`WITH (FORCE)`) at the end.

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use sqlx::{Connection, Executor, PgConnection};

pub struct ScratchDb {
    pub name: String,
    /// URL of the scratch database.
    pub url: String,
    admin_url: String,
}

fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let mut u = url::Url::parse(url).context("DATABASE_URL is not a URL")?;
    u.set_path(&format!("/{db}"));
    Ok(u.to_string())
}

impl ScratchDb {
    /// Create `bench_<random>` next to the configured database and apply every migration.
    pub async fn create(base: &SecretString) -> anyhow::Result<Self> {
        let admin_url = with_database(base.expose_secret(), "postgres")?;
        let name = format!("bench_{:08x}", rand::random::<u32>());
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .context("cannot connect to PostgreSQL (DATABASE_URL)")?;
        admin
            .execute(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
            .await
            .context("create the scratch database")?;
        admin.close().await.ok();
        let url = with_database(base.expose_secret(), &name)?;
        let db = Self {
            name,
            url,
            admin_url,
        };
        let migrated = async {
            let pool = sqlx::PgPool::connect(&db.url).await?;
            store::migrate(&pool).await?;
            pool.close().await;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = migrated {
            db.drop_db().await;
            return Err(e.context("migrate the scratch database"));
        }
        Ok(db)
    }

    /// A database kept by an earlier run (`bench_<hex>` only: nothing else is touched).
    pub fn existing(base: &SecretString, name: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            name.strip_prefix("bench_")
                .is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit())),
            "{name:?} is not a bench database (bench_<hex>)"
        );
        Ok(Self {
            name: name.to_owned(),
            url: with_database(base.expose_secret(), name)?,
            admin_url: with_database(base.expose_secret(), "postgres")?,
        })
    }

    /// Drop the database (its connections are closed by force).
    pub async fn drop_db(&self) {
        if let Ok(mut admin) = PgConnection::connect(&self.admin_url).await {
            let r = admin
                .execute(sqlx::AssertSqlSafe(format!(
                    r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#,
                    self.name
                )))
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, db = %self.name, "could not drop the scratch database");
            }
        }
    }
}
