//! Token signing and login/registration throttles (`[auth]`).

use std::path::PathBuf;

use secrecy::SecretString;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    #[serde(default)]
    pub jwt_secret: Option<SecretString>,
    pub jwt_algorithm: JwtAlgorithm,
    #[serde(default)]
    pub jwt_public_key_path: Option<PathBuf>,
    #[serde(default)]
    pub jwt_private_key_path: Option<PathBuf>,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    pub token_ttl_secs: u64,
    /// Failed logins allowed per email address within `login_window_secs` before 429.
    pub login_max_failures: u32,
    /// Failed logins allowed per client IP within `login_window_secs` before 429.
    pub login_ip_max_failures: u32,
    /// Length of the login-throttling window, in seconds.
    pub login_window_secs: u64,
    /// Registrations allowed per client IP within `register_window_secs` before 429.
    pub register_ip_max: u32,
    /// Length of the registration-throttling window, in seconds.
    pub register_window_secs: u64,
    /// Password hashes (argon2) computed at once; 0: one per CPU core.
    pub password_hash_concurrency: usize,
    /// Requests that may wait for a hashing slot; past that, 503 with `Retry-After`.
    pub password_hash_queue: usize,
}

impl AuthSettings {
    /// [`AuthSettings::password_hash_concurrency`], with 0 resolved to the machine's cores.
    pub fn hash_slots(&self) -> usize {
        match self.password_hash_concurrency {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}
