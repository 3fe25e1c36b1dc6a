//! `GET /healthz` (the process is up) and `GET /readyz` (PostgreSQL and Redis answer).

use std::time::Duration;

use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};

use crate::state::AppState;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Tags)]
enum Tag {
    /// Liveness and readiness probes
    Operations,
}

pub struct HealthApi {
    pub state: AppState,
}

#[derive(Object)]
pub struct Health {
    /// "ok"
    status: String,
}

#[derive(Object)]
pub struct Readiness {
    /// "ready" or "not_ready"
    status: String,
    /// "ok" or "unavailable"
    postgres: String,
    /// "ok" or "unavailable"
    redis: String,
}

#[derive(Object)]
pub struct ErrorDetail {
    code: String,
    message: String,
}

#[derive(Object)]
pub struct NotReady {
    error: ErrorDetail,
    /// Which dependency failed.
    checks: Readiness,
}

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// PostgreSQL and Redis both answered.
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// A dependency is down.
    #[oai(status = 503)]
    NotReady(Json<NotReady>),
}

#[OpenApi(tag = "Tag::Operations")]
impl HealthApi {
    /// Liveness: the process is up and serving.
    #[oai(path = "/healthz", method = "get")]
    async fn healthz(&self) -> Json<Health> {
        Json(Health {
            status: "ok".into(),
        })
    }

    /// Readiness: PostgreSQL and Redis are reachable (each checked with a 2 s bound).
    #[oai(path = "/readyz", method = "get")]
    async fn readyz(&self) -> ReadyResponse {
        let pg = tokio::time::timeout(CHECK_TIMEOUT, store::ping(&self.state.db));
        let redis = tokio::time::timeout(CHECK_TIMEOUT, self.state.redis.ping());
        let (pg, redis) = tokio::join!(pg, redis);
        let pg_ok = matches!(pg, Ok(Ok(())));
        let redis_ok = matches!(redis, Ok(Ok(())));
        if !pg_ok {
            tracing::warn!(result = ?pg.map(|r| r.map_err(|e| e.to_string())), "readiness: postgres unavailable");
        }
        if !redis_ok {
            tracing::warn!(result = ?redis.map(|r| r.map_err(|e| e.to_string())), "readiness: redis unavailable");
        }
        let word = |ok: bool| if ok { "ok" } else { "unavailable" }.to_owned();
        let checks = Readiness {
            status: if pg_ok && redis_ok {
                "ready"
            } else {
                "not_ready"
            }
            .into(),
            postgres: word(pg_ok),
            redis: word(redis_ok),
        };
        if pg_ok && redis_ok {
            ReadyResponse::Ready(Json(checks))
        } else {
            let down: Vec<&str> = [
                (!pg_ok).then_some("postgres"),
                (!redis_ok).then_some("redis"),
            ]
            .into_iter()
            .flatten()
            .collect();
            ReadyResponse::NotReady(Json(NotReady {
                error: ErrorDetail {
                    code: "not_ready".into(),
                    message: format!("unavailable: {}", down.join(", ")),
                },
                checks,
            }))
        }
    }
}
