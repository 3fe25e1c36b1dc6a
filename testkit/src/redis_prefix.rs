//! A Redis key prefix per test, so tests share one Redis without seeing each other's keys.
//! With `REDIS_CLUSTER=true` (`scripts/test` sets it for its cluster pass) `REDIS_URL` lists
//! the seed nodes of a Redis Cluster and every handle the test builds speaks cluster.

pub struct TestRedis {
    /// One URL, or the cluster's seeds separated by commas.
    pub url: String,
    pub prefix: String,
    pub cluster: bool,
}

impl TestRedis {
    pub fn new() -> Self {
        let url = crate::env::require("REDIS_URL");
        let cluster = std::env::var("REDIS_CLUSTER")
            .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"));
        let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        Self {
            url,
            prefix,
            cluster,
        }
    }

    /// Settings for a `RedisHandle` under this test's prefix.
    pub fn settings(&self) -> config::RedisSettings {
        config::RedisSettings {
            url: self.url.clone().into(),
            prefix: self.prefix.clone(),
            cluster: self.cluster,
        }
    }

    /// The value of `REDIS_CLUSTER` for processes the test starts.
    pub fn cluster_env(&self) -> &'static str {
        if self.cluster { "true" } else { "false" }
    }
}

impl Default for TestRedis {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        // every node in cluster mode (a replica refuses the deletes; its primary takes them)
        for url in self.url.split(',').map(str::trim) {
            let Ok(client) = redis::Client::open(url) else {
                continue;
            };
            let Ok(mut conn) = client.get_connection() else {
                continue;
            };
            let pattern = format!("{}*", self.prefix);
            let keys: Vec<String> = match conn.scan_match::<_, String>(&pattern) {
                Ok(iter) => iter.filter_map(Result::ok).collect(),
                Err(_) => continue,
            };
            if self.cluster {
                // keys of several slots: one DEL each
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.del(k).ignore();
                }
                let _: Result<(), _> = pipe.query(&mut conn);
            } else {
                for chunk in keys.chunks(500) {
                    let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query(&mut conn);
                }
            }
        }
    }
}

use redis::Commands as _;
