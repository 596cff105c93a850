//! Limits shared beyond one executor: every process calling with one key —
//! the workers of a queue, separate `fanout batch` runs — admits its calls
//! through one [`SharedLimits`] (fanout-queue's Redis limiter is one), so
//! together they stay within the provider's requests and tokens per minute,
//! pause together on a 429, and hold at most a global number of calls in flight.
//!
//! The executor asks it after its own limits, for every call and hedge: its
//! local concurrency cap, RPM and TPM still apply on top.

use std::fmt;
use std::time::Duration;

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
    /// budget is corrected by the difference.
    fn settle(&self, reserved: u64, used: u64);

    /// The provider answered 429 asking to wait `wait`: every process sharing
    /// the limits waits it out before its next call.
    fn pause(&self, wait: Duration);

    /// The shared tokens-per-minute budget, if there is one: a request larger
    /// than it fails at once instead of waiting for what never comes.
    fn tokens_per_minute(&self) -> Option<u64> {
        None
    }

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
