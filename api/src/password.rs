//! Password hashing with argon2id. Hashing is deliberately CPU-heavy, so it runs on the
//! blocking pool, never on the async workers.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::error::ApiError;

fn hasher() -> Argon2<'static> {
    // argon2id v19 with the crate's (OWASP-recommended) default cost parameters.
    Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::default())
}

fn hash_blocking(password: &str) -> Result<String, argon2::password_hash::Error> {
    // 16 bytes from the thread-local CSPRNG (seeded from the OS).
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())?;
    Ok(hasher()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Hash a new password (PHC string).
pub async fn hash(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || hash_blocking(&password))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::internal(anyhow::anyhow!("argon2: {e}")))
}

/// A hash of a random password: verified against when the email is unknown, so that an
/// unknown email costs the same time as a wrong password.
pub async fn dummy_hash() -> Result<String, ApiError> {
    hash(uuid::Uuid::new_v4().to_string()).await
}

/// Verify `password` against `stored`; always does the full work.
pub async fn verify(password: String, stored: String) -> Result<bool, ApiError> {
    tokio::task::spawn_blocking(move || {
        let Ok(parsed) = PasswordHash::new(&stored) else {
            return false;
        };
        hasher()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
    .await
    .map_err(ApiError::internal)
}
