//! `POST /v1/auth/register`, `POST /v1/auth/login`, `GET /v1/me`.

use chrono::{DateTime, Utc};
use poem::Request;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use serde::Deserialize;

use super::Tag;
use crate::auth::BearerAuth;
use crate::body::JsonBody;
use crate::client_ip::client_ip;
use crate::error::ApiError;
use crate::state::AppState;
use crate::throttle::{self, LoginThrottle};
use crate::validate;
use crate::views::{OrgView, RoleName, UserView};

pub struct AuthApi {
    pub state: AppState,
}

#[derive(Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    email: String,
    /// 8 to 256 characters.
    password: String,
    name: String,
    /// The new organization; the caller becomes its owner.
    org_name: String,
}

#[derive(Object)]
pub struct Registered {
    user: UserView,
    org: OrgView,
    token: String,
    expires_at: DateTime<Utc>,
}

#[derive(ApiResponse)]
pub enum RegisterResponse {
    /// The user, their new org (they own it) and a bearer token.
    #[oai(status = 201)]
    Created(Json<Registered>),
}

#[derive(Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    email: String,
    password: String,
}

#[derive(Object)]
pub struct TokenView {
    token: String,
    expires_at: DateTime<Utc>,
}

#[derive(Object)]
pub struct Me {
    user: UserView,
    org: OrgView,
    role: RoleName,
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Auth")]
impl AuthApi {
    /// Register: creates a user and a new organization owned by them.
    #[oai(path = "/auth/register", method = "post")]
    async fn register(
        &self,
        req: &Request,
        body: JsonBody<RegisterRequest>,
    ) -> Result<RegisterResponse, ApiError> {
        let ip = client_ip(req, &self.state.trusted_proxies);
        let req = body.0;
        let email = validate::email("email", &req.email)?;
        validate::password("password", &req.password)?;
        let name = validate::text("name", &req.name, 200)?;
        let org_name = validate::text("org_name", &req.org_name, 200)?;
        throttle::registration(&self.state, ip).await?;
        let hash = self.state.hasher.hash(req.password).await?;
        let mut tx = self.state.db.begin().await?;
        let org = store::tenancy::insert_org(&mut tx, &org_name).await?;
        let user = store::tenancy::insert_user(&mut tx, &email, &name, &hash).await?;
        store::tenancy::insert_membership(&mut tx, org.id, user.id, store::Role::Owner).await?;
        tx.commit().await?;
        let (token, expires_at) = self.state.jwt.issue(user.id.into(), org.id.into())?;
        Ok(RegisterResponse::Created(Json(Registered {
            user: user.into(),
            org: org.into(),
            token,
            expires_at,
        })))
    }

    /// Log in with email and password. Unknown email and wrong password answer the same 401;
    /// repeated failures (per email, per client IP) answer 429 with `Retry-After`.
    #[oai(path = "/auth/login", method = "post")]
    async fn login(
        &self,
        req: &Request,
        body: JsonBody<LoginRequest>,
    ) -> Result<Json<TokenView>, ApiError> {
        let body = body.0;
        if body.email.trim().is_empty() {
            return Err(ApiError::invalid("email must not be empty"));
        }
        if body.email.len() > 254 {
            return Err(ApiError::invalid("email must be at most 254 characters"));
        }
        // no registered email has one (`validate::email`), and PostgreSQL text cannot hold NUL
        if body.email.chars().any(char::is_control) {
            return Err(ApiError::invalid("email must be an email address"));
        }
        if body.password.is_empty() {
            return Err(ApiError::invalid("password must not be empty"));
        }
        if body.password.chars().count() > validate::PASSWORD_MAX_CHARS {
            return Err(ApiError::invalid(format!(
                "password must be at most {} characters",
                validate::PASSWORD_MAX_CHARS
            )));
        }
        let ip = client_ip(req, &self.state.trusted_proxies);
        let throttle = LoginThrottle::new(&self.state, &body.email, ip);
        // counted before the check: concurrent guesses cannot all slip under the limit
        throttle.attempt().await?;
        let record = store::tenancy::find_login(&self.state.db, body.email.trim()).await?;
        let stored = match &record {
            Some(r) => r.password_hash.clone(),
            None => self.state.dummy_hash.as_ref().clone(),
        };
        let ok = self.state.hasher.verify(body.password, stored).await?;
        match record {
            Some(r) if ok => {
                throttle.succeeded().await?;
                let (token, expires_at) =
                    self.state.jwt.issue(r.user_id.into(), r.org_id.into())?;
                Ok(Json(TokenView { token, expires_at }))
            }
            _ => Err(ApiError::InvalidCredentials),
        }
    }

    /// The caller: user, org and role.
    #[oai(path = "/me", method = "get")]
    async fn me(&self, auth: BearerAuth) -> Result<Json<Me>, ApiError> {
        let caller = auth.0;
        let user = store::tenancy::get_user(&self.state.db, caller.user_id.into())
            .await?
            .ok_or(ApiError::Unauthorized)?;
        let org = store::tenancy::get_org(&self.state.db, caller.org_id.into())
            .await?
            .ok_or(ApiError::Unauthorized)?;
        Ok(Json(Me {
            user: user.into(),
            org: org.into(),
            role: caller.role.into(),
        }))
    }
}
