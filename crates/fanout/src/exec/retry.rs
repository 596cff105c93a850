//! When to try a failed attempt again, and after how long.
//!
//! Only retryable errors are retried ([`ErrorKind::is_retryable`]): rate limits,
//! overload, server errors, timeouts, connection errors and malformed answers.
//! A rate limit is a wait, never a failure: 429s are retried however many there
//! are (the deadline or task timeout, if any, bounds the waiting), and they do
//! not use up the attempts meant for errors.
//! The delay is exponential backoff with full jitter (uniform between zero and
//! `min(max_delay, base_delay * 2^(retry - 1))`), unless the provider said how
//! long to wait, which always wins.
//!
//! Written here rather than with `backon`: the delay must yield to the
//! provider's retry-after and to the executor's shared pause, and backon's
//! jitter adds up to one extra delay (`[d, 2d)`) instead of full jitter (`[0, d]`).
//!
//! [`ErrorKind::is_retryable`]: crate::provider::ErrorKind::is_retryable

use std::time::Duration;

use crate::provider::ProviderError;

/// Defaults: 5 attempts, 500 ms base delay, 30 s cap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 disables retries.
    pub max_attempts: u32,
    /// The backoff's ceiling for the first retry, doubled for each retry after it.
    pub base_delay: Duration,
    /// The longest backoff, however many retries came before.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The jittered delay before retry number `retry` (1 for the first retry).
    pub fn backoff(&self, retry: u32, rng: &mut fastrand::Rng) -> Duration {
        let exponent = retry.saturating_sub(1).min(31);
        let ceiling = self.base_delay.saturating_mul(1 << exponent).min(self.max_delay);
        ceiling.mul_f64(rng.f64())
    }

    /// How long to wait before the next attempt, when `error` ended the
    /// `count`-th attempt that failed this way (rate limits and other errors are
    /// counted apart); `None` when the task should stop here.
    pub fn delay_after(
        &self,
        error: &ProviderError,
        count: u32,
        rng: &mut fastrand::Rng,
    ) -> Option<Duration> {
        let exhausted = count >= self.max_attempts && !error.is_rate_limited();
        if !error.is_retryable() || exhausted {
            return None;
        }
        let attempt = count;
        Some(error.retry_after().unwrap_or_else(|| self.backoff(attempt, rng)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ErrorKind;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn full_jitter_stays_under_the_capped_exponential(retry in 1u32..64, seed: u64) {
            let policy = RetryPolicy::default();
            let delay = policy.backoff(retry, &mut fastrand::Rng::with_seed(seed));
            let ceiling = policy.base_delay.saturating_mul(1 << (retry - 1).min(31)).min(policy.max_delay);
            prop_assert!(delay <= ceiling);
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let policy = RetryPolicy::default();
        let mut rng = fastrand::Rng::with_seed(7);
        let delays: Vec<_> = (0..100).map(|_| policy.backoff(3, &mut rng)).collect();
        let max = delays.iter().max().unwrap();
        let min = delays.iter().min().unwrap();
        assert!(*max > Duration::from_millis(1500), "{max:?}");
        assert!(*min < Duration::from_millis(500), "{min:?}");
    }

    #[test]
    fn retries_only_retryable_errors_and_obeys_retry_after() {
        let policy = RetryPolicy::default();
        let mut rng = fastrand::Rng::with_seed(1);
        let server = ProviderError::from_status(500, "");
        assert!(policy.delay_after(&server, 1, &mut rng).is_some());
        assert_eq!(policy.delay_after(&server, 5, &mut rng), None, "attempts exhausted");
        for status in [400, 401, 403, 404] {
            let error = ProviderError::from_status(status, "");
            assert_eq!(policy.delay_after(&error, 1, &mut rng), None, "HTTP {status}");
        }
        let quota = ProviderError::new(ErrorKind::Quota, "insufficient_quota").with_status(429);
        assert_eq!(policy.delay_after(&quota, 1, &mut rng), None);
        let limited = ProviderError::from_status(429, "").with_retry_after(Duration::from_secs(42));
        assert_eq!(policy.delay_after(&limited, 1, &mut rng), Some(Duration::from_secs(42)));
        assert_eq!(
            policy.delay_after(&limited, 1_000, &mut rng),
            Some(Duration::from_secs(42)),
            "a rate limit is a wait, however often it comes"
        );
    }
}
