//! Retry delays: exponential backoff with full jitter, capped; a handler's `Retry-After` wins.

use std::time::Duration;

use config::{Jitter, QueueSettings};
use rand::Rng;

/// The upper bound of the delay before retry number `retry` (1 = the first retry):
/// `min(cap, base * 2^(retry-1))`.
pub fn ceiling(settings: &QueueSettings, retry: u32) -> Duration {
    let exp = retry.saturating_sub(1).min(32);
    let ms = settings
        .backoff_base_ms
        .saturating_mul(1u64 << exp)
        .min(settings.backoff_cap_ms);
    Duration::from_millis(ms)
}

/// The delay before retry number `retry`: `retry_after` when the handler gave one, else the
/// ceiling randomised by the queue's jitter.
pub fn delay(
    settings: &QueueSettings,
    retry: u32,
    retry_after: Option<Duration>,
    rng: &mut impl Rng,
) -> Duration {
    if let Some(d) = retry_after {
        return d;
    }
    let max = ceiling(settings, retry);
    match settings.jitter {
        Jitter::None => max,
        Jitter::Full => {
            let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
            Duration::from_millis(rng.random_range(0..=ms))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn q(jitter: Jitter) -> QueueSettings {
        QueueSettings {
            max_attempts: 5,
            backoff_base_ms: 100,
            backoff_cap_ms: 1000,
            jitter,
            visibility_timeout_secs: 10,
            run_timeout_secs: 60,
            fair: false,
            org_concurrency: 0,
        }
    }

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let s = q(Jitter::Full);
        let c: Vec<u128> = (1..=6).map(|n| ceiling(&s, n).as_millis()).collect();
        assert_eq!(c, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(ceiling(&s, 500).as_millis(), 1000);
    }

    #[test]
    fn full_jitter_stays_under_the_ceiling_and_spreads() {
        let s = q(Jitter::Full);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let samples: Vec<Duration> = (0..200).map(|_| delay(&s, 3, None, &mut rng)).collect();
        assert!(samples.iter().all(|d| *d <= Duration::from_millis(400)));
        assert!(samples.iter().any(|d| *d < Duration::from_millis(100)));
        assert!(samples.iter().any(|d| *d > Duration::from_millis(300)));
    }

    #[test]
    fn no_jitter_is_exact_and_retry_after_wins() {
        let s = q(Jitter::None);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(delay(&s, 2, None, &mut rng), Duration::from_millis(200));
        assert_eq!(
            delay(&s, 2, Some(Duration::from_secs(7)), &mut rng),
            Duration::from_secs(7)
        );
    }
}
