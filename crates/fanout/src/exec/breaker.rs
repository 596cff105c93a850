//! Stops a job that cannot succeed.
//!
//! Answers such as a bad key, an unknown model or an exhausted quota mean every
//! other task will fail the same way. After `threshold` such answers in a row
//! (a success in between resets the count) the breaker opens: no more tasks are
//! launched, and each remaining task is reported as not run, with that cause.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::provider::ProviderError;

#[derive(Debug)]
pub(crate) struct CircuitBreaker {
    threshold: u32,
    consecutive: AtomicU32,
    cause: OnceLock<ProviderError>,
}

impl CircuitBreaker {
    /// A threshold of 0 never opens.
    pub(crate) fn new(threshold: u32) -> Self {
        Self { threshold, consecutive: AtomicU32::new(0), cause: OnceLock::new() }
    }

    pub(crate) fn record_success(&self) {
        self.consecutive.store(0, Ordering::Release);
    }

    pub(crate) fn record_failure(&self, error: &ProviderError) {
        if !error.kind().is_fatal_for_job() || self.threshold == 0 {
            return;
        }
        let seen = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
        if seen >= self.threshold {
            let _first_cause_wins = self.cause.set(error.clone());
        }
    }

    /// The answer that opened the breaker, once it is open.
    pub(crate) fn cause(&self) -> Option<&ProviderError> {
        self.cause.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_fatal_answers_only() {
        let breaker = CircuitBreaker::new(3);
        let auth = ProviderError::from_status(401, "bad key");
        let server = ProviderError::from_status(500, "");
        breaker.record_failure(&auth);
        breaker.record_failure(&auth);
        breaker.record_success();
        breaker.record_failure(&auth);
        breaker.record_failure(&server);
        breaker.record_failure(&auth);
        assert!(breaker.cause().is_none(), "a success resets; retryable errors do not count");
        breaker.record_failure(&auth);
        assert_eq!(breaker.cause(), Some(&auth));
        assert!(CircuitBreaker::new(0).cause().is_none());
    }
}
