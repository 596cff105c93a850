//! Hedged requests: a duplicate attempt for calls that straggle.
//!
//! A call straggles when it has shown no sign of life (no byte yet, or a stream
//! that stopped) for longer than the threshold: a fixed time, or learned from
//! the run — the p95 of how soon successful attempts first showed life, and at
//! least twice the median, so the ordinary spread of latencies just above p95
//! is not duplicated. Until enough attempts have succeeded nothing is hedged;
//! calls already in flight are judged as soon as the threshold is learned, so a
//! straggler among the first wave is rescued too. Then one duplicate is sent and
//! the first success wins (the other call is cancelled). Hedges are paid for
//! from a budget (a fraction of all calls) and queue for a concurrency slot and
//! RPM/TPM budget like any other call, so they never push the executor over its
//! limits.
//!
//! On by default ([`HedgePolicy::default`]): one slow call must not hold a run
//! back, and 5% more calls at most is the price.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::Notify;

/// When a call counts as straggling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HedgeAfter {
    /// After a fixed time without a sign of life.
    Fixed(Duration),
    /// After this quantile (0.95 for p95) of how soon successful attempts first
    /// showed life, and at least twice their median and [`MIN_LEARNED_THRESHOLD`].
    Quantile(f64),
}

/// A learned threshold is never below this: duplicating calls that take less
/// costs more than it saves for any model behind a network.
pub const MIN_LEARNED_THRESHOLD: Duration = Duration::from_millis(50);

/// Hedging settings; the threshold is learned per executor (across its runs),
/// the budget spent per executor. The default hedges past the learned p95 within 5% extra calls.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HedgePolicy {
    /// When a call counts as straggling.
    pub after: HedgeAfter,
    /// Hedges as a fraction of calls, at most (0.05: one extra call in twenty).
    pub budget: f64,
    /// Successful attempts seen before a quantile threshold is trusted.
    pub min_samples: u64,
}

impl Default for HedgePolicy {
    fn default() -> Self {
        Self::p95()
    }
}

impl HedgePolicy {
    /// Hedge past the running p95 (and twice the median), within 5% extra calls.
    pub fn p95() -> Self {
        Self { after: HedgeAfter::Quantile(0.95), budget: 0.05, min_samples: 20 }
    }

    /// Hedge after a fixed time, within 5% extra calls.
    pub fn after(delay: Duration) -> Self {
        Self { after: HedgeAfter::Fixed(delay), budget: 0.05, min_samples: 0 }
    }

    /// Spends at most this fraction of calls on hedges (negative counts as 0).
    #[must_use]
    pub fn with_budget(mut self, budget: f64) -> Self {
        self.budget = budget.max(0.0);
        self
    }

    /// With a quantile threshold: how many successes to see before trusting it.
    #[must_use]
    pub fn with_min_samples(mut self, samples: u64) -> Self {
        self.min_samples = samples;
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
    /// Woken once, when a quantile threshold is first known.
    learned: Notify,
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
            learned: Notify::new(),
        }
    }

    /// Counts a primary call toward the budget.
    pub(crate) fn count_call(&self) {
        self.calls.fetch_add(1, Ordering::AcqRel);
    }

    /// Completes once a threshold is known (at once if it already is, when
    /// created after that).
    pub(crate) fn learned(&self) -> tokio::sync::futures::Notified<'_> {
        self.learned.notified()
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
        let first = latencies.threshold.is_none();
        if trusted && (first || samples.is_multiple_of(REFRESH_EVERY)) {
            let quantile = latencies.micros.value_at_quantile(quantile);
            let twice_median = 2 * latencies.micros.value_at_quantile(0.5);
            let micros = quantile.max(twice_median);
            latencies.threshold = Some(Duration::from_micros(micros).max(MIN_LEARNED_THRESHOLD));
            if first {
                self.learned.notify_waiters();
            }
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
            hedger.record(Duration::from_millis(ms * 10));
        }
        assert_eq!(hedger.threshold(), None);
        hedger.record(Duration::from_millis(200));
        // p95 is 190 ms; twice the median (100 ms) is 200 ms, and wins.
        let threshold = hedger.threshold().unwrap();
        assert!(
            threshold.abs_diff(Duration::from_millis(200)) < Duration::from_millis(1),
            "{threshold:?}"
        );
    }

    #[test]
    fn learned_threshold_is_at_least_twice_the_median_and_the_floor() {
        let hedger = Hedger::new(HedgePolicy::p95());
        // 95% answer in 100 ms, the rest in 101 ms: p95 alone would hedge at 101 ms.
        for i in 0..40 {
            hedger.record(Duration::from_millis(if i % 20 == 0 { 101 } else { 100 }));
        }
        let threshold = hedger.threshold().unwrap();
        assert!(
            threshold.abs_diff(Duration::from_millis(200)) < Duration::from_millis(1),
            "{threshold:?}"
        );
        let fast = Hedger::new(HedgePolicy::p95());
        for _ in 0..20 {
            fast.record(Duration::from_micros(300));
        }
        assert_eq!(fast.threshold(), Some(MIN_LEARNED_THRESHOLD));
    }
}
