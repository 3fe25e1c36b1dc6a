//! Bearer tokens (JWT) and the authenticated caller.
//!
//! The algorithm is pinned by configuration (`JWT_ALGORITHM`: HS256 with `JWT_SECRET`, or RS256
//! with `JWT_PUBLIC_KEY_PATH` / `JWT_PRIVATE_KEY_PATH`); a token declaring any other algorithm
//! (`none` included) is rejected, as are tokens with a wrong `exp`, `iss` or `aud`. After the
//! signature, the caller must still be a member of the org the token names, so removing a
//! member ends their tokens at the next request.
//!
//! Every protected endpoint takes a [`BearerAuth`] argument: the extraction lives here only.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use poem::Request;
use poem_openapi::SecurityScheme;
use poem_openapi::auth::Bearer;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use store::Role;
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

/// Seconds of clock skew tolerated on `exp`.
const LEEWAY_SECS: u64 = 30;

/// The claims of a Switchboard token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: Uuid,
    /// The org id.
    pub org: Uuid,
    pub iat: u64,
    pub exp: u64,
    pub iss: String,
    pub aud: String,
}

/// Signing and verification keys, built once from the settings.
pub struct JwtKeys {
    algorithm: Algorithm,
    /// `None` when the API only verifies (RS256 without a private key).
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
    ttl_secs: u64,
}

impl JwtKeys {
    /// Load the configured keys; fails with a message naming the setting.
    pub fn from_settings(settings: &config::Settings) -> anyhow::Result<Self> {
        settings.require_jwt()?;
        let auth = &settings.auth;
        let (algorithm, encoding, decoding) = match auth.jwt_algorithm {
            config::JwtAlgorithm::HS256 => {
                let secret = auth
                    .jwt_secret
                    .as_ref()
                    .context("JWT_SECRET is required for HS256")?
                    .expose_secret()
                    .as_bytes();
                (
                    Algorithm::HS256,
                    Some(EncodingKey::from_secret(secret)),
                    DecodingKey::from_secret(secret),
                )
            }
            config::JwtAlgorithm::RS256 => {
                let path = auth
                    .jwt_public_key_path
                    .as_ref()
                    .context("JWT_PUBLIC_KEY_PATH is required for RS256")?;
                let pem = std::fs::read(path).with_context(|| {
                    format!("JWT_PUBLIC_KEY_PATH: cannot read {}", path.display())
                })?;
                let decoding = DecodingKey::from_rsa_pem(&pem)
                    .context("JWT_PUBLIC_KEY_PATH: not an RSA public key in PEM form")?;
                let encoding =
                    match &auth.jwt_private_key_path {
                        Some(path) => {
                            let pem = std::fs::read(path).with_context(|| {
                                format!("JWT_PRIVATE_KEY_PATH: cannot read {}", path.display())
                            })?;
                            Some(EncodingKey::from_rsa_pem(&pem).context(
                                "JWT_PRIVATE_KEY_PATH: not an RSA private key in PEM form",
                            )?)
                        }
                        None => None,
                    };
                (Algorithm::RS256, encoding, decoding)
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.set_issuer(&[&auth.jwt_issuer]);
        validation.set_audience(&[&auth.jwt_audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        Ok(Self {
            algorithm,
            encoding,
            decoding,
            validation,
            issuer: auth.jwt_issuer.clone(),
            audience: auth.jwt_audience.clone(),
            ttl_secs: auth.token_ttl_secs,
        })
    }

    /// A token for `user_id` in `org_id`, and when it expires.
    pub fn issue(&self, user_id: Uuid, org_id: Uuid) -> Result<(String, DateTime<Utc>), ApiError> {
        let key = self.encoding.as_ref().ok_or_else(|| {
            ApiError::Unavailable("this server does not issue tokens (no signing key)".into())
        })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(ApiError::internal)?
            .as_secs();
        let exp = now.saturating_add(self.ttl_secs);
        let claims = Claims {
            sub: user_id,
            org: org_id,
            iat: now,
            exp,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        let token = jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key)
            .map_err(ApiError::internal)?;
        let expires_at = DateTime::<Utc>::from_timestamp(i64::try_from(exp).unwrap_or(i64::MAX), 0)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        Ok((token, expires_at))
    }

    /// Verify signature, algorithm, `exp`, `iss` and `aud`.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) => Some(data.claims),
            Err(e) => {
                tracing::debug!(error = %e, "rejected bearer token");
                None
            }
        }
    }
}

/// The authenticated caller: a user, the org their token names, and their current role there.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub user_id: Uuid,
    pub org_id: Uuid,
    pub role: Role,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role.is_admin()
    }

    /// 403 unless the caller is an owner or admin of their org.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "only organization owners and admins may do this".into(),
            ))
        }
    }

    /// 404 unless `org_id` is the caller's org (another org's id reads as missing).
    pub fn require_org(&self, org_id: Uuid) -> Result<(), ApiError> {
        if self.org_id == org_id {
            Ok(())
        } else {
            Err(ApiError::NotFound)
        }
    }
}

/// `Authorization: Bearer <JWT>`; every protected endpoint takes one.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "check_bearer")]
pub struct BearerAuth(pub Caller);

async fn check_bearer(req: &Request, bearer: Bearer) -> poem::Result<Caller> {
    let state = req
        .data::<AppState>()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("AppState is not attached")))?;
    let claims = state
        .jwt
        .verify(&bearer.token)
        .ok_or(ApiError::Unauthorized)?;
    let role = store::tenancy::member_role(&state.db, claims.org.into(), claims.sub.into())
        .await
        .map_err(ApiError::from)?
        .ok_or(ApiError::Unauthorized)?;
    Ok(Caller {
        user_id: claims.sub,
        org_id: claims.org,
        role,
    })
}
