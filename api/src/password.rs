//! Password hashing with argon2id. Hashing is deliberately expensive (~19 MiB and two passes
//! per hash), so it runs on the blocking pool, never on the async workers, and under
//! [`Hasher`]'s semaphore: at most `auth.password_hash_concurrency` hashes at once (default:
//! one per CPU core), at most `auth.password_hash_queue` requests waiting for a slot; beyond
//! that the request answers 503 with `Retry-After` at once instead of queueing without bound.
//! A burst of logins or sign-ups therefore costs bounded memory and CPU.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

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

fn verify_blocking(password: &str, stored: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(stored) else {
        return false;
    };
    hasher()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

/// Seconds a client turned away for a full queue is asked to wait.
const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// The bounded password hasher of one API process.
pub struct Hasher {
    slots: Arc<Semaphore>,
    /// Requests holding or waiting for a slot.
    admitted: AtomicUsize,
    /// Most requests admitted at once: slots + queue.
    capacity: usize,
}

/// Releases a request's place in [`Hasher`] when dropped.
struct Admission<'a>(&'a AtomicUsize);

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("password_hash_admitted").decrement(1.0);
    }
}

impl Hasher {
    pub fn new(slots: usize, queue: usize) -> Self {
        let slots = slots.max(1);
        metrics::describe_counter!(
            "password_hash_total",
            "argon2 computations, by operation (hash, verify) and outcome (done, busy: refused, the queue was full)"
        );
        metrics::describe_gauge!(
            "password_hash_admitted",
            "Requests computing or waiting to compute a password hash"
        );
        Self {
            slots: Arc::new(Semaphore::new(slots)),
            admitted: AtomicUsize::new(0),
            capacity: slots + queue,
        }
    }

    pub fn from_settings(auth: &config::AuthSettings) -> Self {
        Self::new(auth.hash_slots(), auth.password_hash_queue)
    }

    /// Run `work` on the blocking pool once a slot is free; 503 + `Retry-After` when the queue
    /// is full.
    async fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        if self.admitted.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("password_hash_total", "op" => op, "outcome" => "busy").increment(1);
            return Err(ApiError::Busy {
                retry_after_secs: BUSY_RETRY_AFTER_SECS,
            });
        }
        metrics::gauge!("password_hash_admitted").increment(1.0);
        let _admission = Admission(&self.admitted);
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(ApiError::internal)?;
        metrics::counter!("password_hash_total", "op" => op, "outcome" => "done").increment(1);
        tokio::task::spawn_blocking(move || {
            let out = work();
            drop(permit);
            out
        })
        .await
        .map_err(ApiError::internal)
    }

    /// Hash a new password (PHC string).
    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        self.run("hash", move || hash_blocking(&password))
            .await?
            .map_err(|e| ApiError::internal(anyhow::anyhow!("argon2: {e}")))
    }

    /// Verify `password` against `stored`; always does the full work.
    pub async fn verify(&self, password: String, stored: String) -> Result<bool, ApiError> {
        self.run("verify", move || verify_blocking(&password, &stored))
            .await
    }
}

/// A hash of a random password: verified against when the email is unknown, so that an
/// unknown email costs the same time as a wrong password. (Computed once at start.)
pub async fn dummy_hash() -> Result<String, ApiError> {
    let password = uuid::Uuid::new_v4().to_string();
    tokio::task::spawn_blocking(move || hash_blocking(&password))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::internal(anyhow::anyhow!("argon2: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_full_queue_answers_busy_at_once_and_frees_its_place() {
        // one place in all (one slot, no queue); the test holds the slot itself, so the first
        // request admitted waits for it
        let h = Arc::new(Hasher::new(1, 0));
        let slot = h.slots.clone().acquire_owned().await.unwrap();
        let waiting = {
            let h = h.clone();
            tokio::spawn(async move { h.verify("pw".into(), "not a hash".into()).await })
        };
        while h.admitted.load(Ordering::Acquire) < 1 {
            tokio::task::yield_now().await;
        }
        // it holds the only place, so the next is refused at once
        let refused = h.verify("pw".into(), "x".into()).await;
        assert!(matches!(
            refused,
            Err(ApiError::Busy {
                retry_after_secs: 1
            })
        ));
        drop(slot);
        assert!(!waiting.await.unwrap().unwrap());
        assert_eq!(h.admitted.load(Ordering::Acquire), 0);
        assert!(!h.verify("pw".into(), "x".into()).await.unwrap());
    }
}
