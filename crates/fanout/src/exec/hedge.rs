//! Hedged requests: a duplicate attempt for calls that run unusually long.
//!
//! When an attempt has run past the threshold (a fixed time, or a quantile such
//! as p95 of recent successful attempts), one duplicate is sent and the first
//! success wins. Hedges are paid for from a budget (a fraction of all calls) and
//! queue for a concurrency slot and RPM/TPM budget like any other call, so they
//! never push the executor over its limits.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

/// When to send a hedge.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HedgeAfter {
    /// After a fixed time.
    Fixed(Duration),
    /// After this quantile (0.95 for p95) of recent successful attempts' latency.
    Quantile(f64),
}

/// Hedging settings; off unless given to the executor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HedgePolicy {
    pub after: HedgeAfter,
    /// Hedges as a fraction of calls, at most (0.05: one extra call in twenty).
    pub budget: f64,
    /// Successful attempts seen before a quantile threshold is trusted.
    pub min_samples: u64,
}

impl HedgePolicy {
    /// Hedge past the running p95, within 5% extra calls.
    pub fn p95() -> Self {
        Self { after: HedgeAfter::Quantile(0.95), budget: 0.05, min_samples: 20 }
    }

    /// Hedge after a fixed time, within 5% extra calls.
    pub fn after(delay: Duration) -> Self {
        Self { after: HedgeAfter::Fixed(delay), budget: 0.05, min_samples: 0 }
    }

    #[must_use]
    pub fn with_budget(mut self, budget: f64) -> Self {
        self.budget = budget.max(0.0);
        self
    }
}

/// How often the cached quantile is recomputed, in recorded samples.
const REFRESH_EVERY: u64 = 16;

#[derive(Debug)]
pub(crate) struct Hedger {
    policy: HedgePolicy,
    calls: AtomicU64,
    hedges: AtomicU64,
    latencies: Mutex<Latencies>,
}

#[derive(Debug)]
struct Latencies {
    micros: Histogram<u64>,
    threshold: Option<Duration>,
}

impl Hedger {
    pub(crate) fn new(policy: HedgePolicy) -> Self {
        let micros = Histogram::new(3).expect("3 significant figures is valid");
        let threshold = match policy.after {
            HedgeAfter::Fixed(delay) => Some(delay),
            HedgeAfter::Quantile(_) => None,
        };
        Self {
            policy,
            calls: AtomicU64::new(0),
            hedges: AtomicU64::new(0),
            latencies: Mutex::new(Latencies { micros, threshold }),
        }
    }

    /// Counts a primary call toward the budget.
    pub(crate) fn count_call(&self) {
        self.calls.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn hedges(&self) -> u64 {
        self.hedges.load(Ordering::Acquire)
    }

    /// How long an attempt may run before it is hedged, once that is known.
    pub(crate) fn threshold(&self) -> Option<Duration> {
        self.latencies.lock().unwrap().threshold
    }

    pub(crate) fn record(&self, latency: Duration) {
        let HedgeAfter::Quantile(quantile) = self.policy.after else { return };
        let mut latencies = self.latencies.lock().unwrap();
        // Auto-resizing, so no value is out of range.
        let _ = latencies.micros.record(latency.as_micros().max(1) as u64);
        let samples = latencies.micros.len();
        let trusted = samples >= self.policy.min_samples.max(1);
        if trusted && (latencies.threshold.is_none() || samples.is_multiple_of(REFRESH_EVERY)) {
            let micros = latencies.micros.value_at_quantile(quantile);
            latencies.threshold = Some(Duration::from_micros(micros));
        }
    }

    /// Takes one hedge from the budget if there is room.
    pub(crate) fn try_spend(&self) -> bool {
        let allowed = (self.calls.load(Ordering::Acquire) as f64 * self.policy.budget) as u64;
        self.hedges
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| (h < allowed).then_some(h + 1))
            .is_ok()
    }

    /// Returns a hedge that could not be sent after all.
    pub(crate) fn refund(&self) {
        self.hedges.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_a_fraction_of_calls() {
        let hedger = Hedger::new(HedgePolicy::after(Duration::from_secs(1)));
        assert!(!hedger.try_spend(), "no calls, no budget");
        for _ in 0..40 {
            hedger.count_call();
        }
        assert!(hedger.try_spend());
        assert!(hedger.try_spend());
        assert!(!hedger.try_spend(), "5% of 40 is 2");
        hedger.refund();
        assert!(hedger.try_spend());
    }

    #[test]
    fn quantile_threshold_waits_for_samples() {
        let hedger = Hedger::new(HedgePolicy::p95());
        for ms in 1..20 {
            hedger.record(Duration::from_millis(ms));
        }
        assert_eq!(hedger.threshold(), None);
        hedger.record(Duration::from_millis(20));
        let p95 = hedger.threshold().unwrap();
        assert!((Duration::from_millis(18)..=Duration::from_millis(20)).contains(&p95), "{p95:?}");
    }
}
