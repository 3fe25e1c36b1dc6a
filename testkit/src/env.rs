//! The services a test run uses, from the environment scripts/test exports.

/// The value of `name`, or a panic that tells the developer how to get the services.
pub fn require(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests through scripts/test, or \
             `eval \"$(scripts/services env)\"` after `scripts/services up --litellm` \
             (and start `fake-upstream` for FAKE_UPSTREAM_URL)"
        )
    })
}
