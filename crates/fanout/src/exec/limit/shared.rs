//! Limits shared beyond one executor: every process calling with one key —
//! the workers of a queue, separate `fanout batch` runs — admits its calls
//! through one [`SharedLimits`] (fanout-queue's Redis limiter is one), so
//! together they stay within the provider's requests and tokens per minute,
//! pause together on a 429, and hold at most a global number of calls in flight.
//!
//! The executor asks it after its own limits, for every call and hedge: its
//! local concurrency cap, RPM and TPM still apply on top.
//!
//! The limits a provider states in its rate-limit headers are handed to it as
//! they are seen ([`SharedLimits::learn`]): a limiter given no RPM or TPM of
//! its own can then hold every process to the provider's, which each process
//! alone could not — the remainder it reads counts everyone's calls, but it
//! knows only of its own since.

use std::fmt;
use std::time::Duration;

use super::Rate;
use crate::provider::headers::{Budget, RateLimit};

/// Admission shared with other processes.
#[async_trait::async_trait]
pub trait SharedLimits: Send + Sync + fmt::Debug {
    /// Waits until one call of up to `tokens` tokens may start under the
    /// shared limits, and takes its share of them; the returned lease holds
    /// its place in the global in-flight cap until it is dropped. Never
    /// fails: an unreachable backend is waited out (no call starts meanwhile).
    /// Cancel-safe: an abandoned wait takes no place.
    async fn admit(&self, tokens: u64) -> SharedLease;

    /// A call that reserved `reserved` tokens used `used`: the shared token
    /// budget is corrected by the difference. Called for every successful
    /// answer, after [`SharedLimits::learn`] when the answer stated limits.
    fn settle(&self, reserved: u64, used: u64);

    /// The provider answered 429 asking to wait `wait`: every process sharing
    /// the limits waits it out before its next call.
    fn pause(&self, wait: Duration);

    /// The shared tokens-per-minute budget, if there is one: a request larger
    /// than it fails at once instead of waiting for what never comes.
    fn tokens_per_minute(&self) -> Option<u64> {
        None
    }

    /// The provider stated its per-minute limits in an answer's headers
    /// (called for every answer that states one). A limiter given no RPM or
    /// TPM may hold every process sharing it to these.
    fn learn(&self, _stated: StatedLimits) {}

    /// Before the process exits: waits (briefly) for what it is still giving
    /// back — the places of calls that just ended, corrections on their way —
    /// so the others are not kept waiting for it.
    async fn close(&self) {}
}

/// A call's place in the shared limits, given back when dropped.
#[must_use = "dropping the lease gives the call's place back at once"]
pub struct SharedLease {
    release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl SharedLease {
    /// A lease that gives its place back by calling `release`, once.
    pub fn new(release: impl FnOnce() + Send + Sync + 'static) -> Self {
        Self { release: Some(Box::new(release)) }
    }

    /// A lease that holds no place (no global in-flight cap).
    pub fn none() -> Self {
        Self { release: None }
    }
}

impl Drop for SharedLease {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

impl fmt::Debug for SharedLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedLease").field("holds_a_place", &self.release.is_some()).finish()
    }
}

/// The per-minute limits a provider stated in an answer's rate-limit headers,
/// as rates: the limit, and the size of its bucket (how much may be spent at
/// once), which is what remains plus what refills until the stated reset —
/// for a server that meters a minute's limit by the second, a second's worth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatedLimits {
    /// Requests per minute.
    pub requests: Option<Rate>,
    /// Tokens per minute.
    pub tokens: Option<Rate>,
}

impl StatedLimits {
    /// What `rate_limit` states per minute; `None` when it states no limit.
    pub fn of(rate_limit: &RateLimit) -> Option<Self> {
        let stated = Self {
            requests: per_minute(&rate_limit.requests),
            tokens: per_minute(&rate_limit.tokens),
        };
        (stated.requests.is_some() || stated.tokens.is_some()).then_some(stated)
    }
}

/// The per-minute rate `budget` states. A limit over a longer window (a daily
/// one) refills what is missing far slower than a minute's limit would by its
/// reset, and is not a per-minute rate: `None`.
fn per_minute(budget: &Budget) -> Option<Rate> {
    let limit = budget.limit.filter(|limit| *limit > 0)?;
    let (remaining, reset) = (budget.remaining?.min(limit), budget.reset?.as_secs_f64());
    let per_second = limit as f64 / 60.0;
    let missing = (limit - remaining) as f64;
    // Half the rate: resets are rounded (to the millisecond, or the second).
    if reset > 0.0 && missing / reset < per_second / 2.0 {
        return None;
    }
    let capacity = (remaining as f64 + reset * per_second).round() as u64;
    Some(Rate::per_minute(limit).with_burst(capacity.clamp(remaining, limit)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests(limit: u64, remaining: u64, reset_ms: u64) -> RateLimit {
        RateLimit {
            requests: Budget {
                limit: Some(limit),
                remaining: Some(remaining),
                reset: Some(Duration::from_millis(reset_ms)),
            },
            ..RateLimit::default()
        }
    }

    #[test]
    fn a_minute_limit_is_stated_with_its_buckets_size() {
        // 1,200 a minute metered by the second: 19 left, full in 50 ms.
        let stated = StatedLimits::of(&requests(1_200, 19, 50)).unwrap();
        assert_eq!(stated.requests, Some(Rate::per_minute(1_200).with_burst(20)));
        assert_eq!(stated.tokens, None);
        // A whole minute's bucket, nearly empty: 100 left, full in 59.5 s.
        let stated = StatedLimits::of(&requests(12_000, 100, 59_500)).unwrap();
        assert_eq!(stated.requests, Some(Rate::per_minute(12_000).with_burst(12_000)));
        // Full: nothing missing, nothing to wait for.
        let stated = StatedLimits::of(&requests(600, 600, 0)).unwrap();
        assert_eq!(stated.requests, Some(Rate::per_minute(600).with_burst(600)));
    }

    #[test]
    fn a_daily_limit_or_no_limit_states_no_rate() {
        // 10,000 a day, 9,000 left, full in 2.4 hours: not a minute's rate.
        assert_eq!(StatedLimits::of(&requests(10_000, 9_000, 8_640_000)), None);
        let remainder_only = RateLimit {
            requests: Budget {
                limit: None,
                remaining: Some(5),
                reset: Some(Duration::from_secs(1)),
            },
            ..RateLimit::default()
        };
        assert_eq!(StatedLimits::of(&remainder_only), None);
    }
}
