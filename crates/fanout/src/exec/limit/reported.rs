//! Pacing by the budget the provider reports (x-ratelimit-remaining-*).
//!
//! Each answer may say how many requests and tokens remain and when the window
//! resets. Launches spend from that reported remainder; when it is used up the
//! next launches wait for the reset instead of drawing a 429. At the reset the
//! window is assumed full again (at the reported limit) until the next answer
//! says otherwise.
//!
//! A remainder is stale by the time it arrives: the provider counted it when
//! *that* request arrived, before the ones launched after it. Every launch is
//! therefore numbered, and an observed remainder is reduced by what was launched
//! after the request that reported it.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::provider::headers::{Budget, RateLimit};

/// Requests and tokens launched up to and including one launch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Launch {
    requests: f64,
    tokens: f64,
}

#[derive(Debug, Default)]
pub(crate) struct ReportedBudget {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    launched: Launch,
    requests: Option<Window>,
    tokens: Option<Window>,
}

#[derive(Clone, Copy, Debug)]
struct Window {
    remaining: f64,
    limit: Option<f64>,
    reset_at: Instant,
    period: Duration,
}

impl Window {
    fn observed(budget: &Budget, launched_since: f64, now: Instant) -> Option<Self> {
        let (remaining, reset) = (budget.remaining?, budget.reset?);
        Some(Self {
            remaining: (remaining as f64 - launched_since).max(0.0),
            limit: budget.limit.map(|l| l as f64),
            reset_at: now + reset,
            period: reset,
        })
    }

    /// Refills the window if its reset has passed; `None` once nothing is known.
    fn current(slot: &mut Option<Self>, now: Instant) -> Option<&mut Self> {
        let window = slot.as_mut()?;
        if now >= window.reset_at {
            let Some(limit) = window.limit else {
                *slot = None;
                return None;
            };
            window.remaining = limit;
            window.reset_at = now + window.period.max(Duration::from_millis(1));
        }
        slot.as_mut()
    }

    /// When `cost` can be spent: `None` if now.
    fn wait_for(slot: &mut Option<Self>, cost: f64, now: Instant) -> Option<Instant> {
        let window = Self::current(slot, now)?;
        (window.remaining < cost).then_some(window.reset_at)
    }
}

impl ReportedBudget {
    /// Learns from the answer to `launch`.
    pub(crate) fn observe(&self, rate_limit: &RateLimit, launch: Launch, now: Instant) {
        let mut state = self.state.lock().unwrap();
        let since = Launch {
            requests: state.launched.requests - launch.requests,
            tokens: state.launched.tokens - launch.tokens,
        };
        if let Some(window) = Window::observed(&rate_limit.requests, since.requests, now) {
            state.requests = Some(window);
        }
        if let Some(window) = Window::observed(&rate_limit.tokens, since.tokens, now) {
            state.tokens = Some(window);
        }
    }

    /// Spends one request and `tokens` from the reported budget, or says until
    /// when to wait. Spends nothing unless both fit.
    pub(crate) fn try_spend(&self, tokens: u64, now: Instant) -> Result<Launch, Instant> {
        let mut state = self.state.lock().unwrap();
        let tokens = tokens as f64;
        let request_wait = Window::wait_for(&mut state.requests, 1.0, now);
        let token_wait = Window::wait_for(&mut state.tokens, tokens, now);
        if let Some(until) = request_wait.max(token_wait) {
            return Err(until);
        }
        if let Some(window) = &mut state.requests {
            window.remaining -= 1.0;
        }
        if let Some(window) = &mut state.tokens {
            window.remaining -= tokens;
        }
        state.launched.requests += 1.0;
        state.launched.tokens += tokens;
        Ok(state.launched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests_left(remaining: u64) -> RateLimit {
        RateLimit {
            requests: Budget {
                limit: Some(10),
                remaining: Some(remaining),
                reset: Some(Duration::from_secs(5)),
            },
            ..RateLimit::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_reset_when_reported_budget_is_spent() {
        let budget = ReportedBudget::default();
        let now = Instant::now();
        let first = budget.try_spend(100, now).expect("nothing reported yet");
        budget.observe(&requests_left(2), first, now);
        assert!(budget.try_spend(100, now).is_ok());
        assert!(budget.try_spend(100, now).is_ok());
        let reset = now + Duration::from_secs(5);
        assert_eq!(budget.try_spend(100, now), Err(reset));
        // At the reset the window is full again, at the reported limit.
        for _ in 0..10 {
            assert!(budget.try_spend(100, reset).is_ok());
        }
        assert_eq!(budget.try_spend(100, reset), Err(reset + Duration::from_secs(5)));
    }

    #[tokio::test(start_paused = true)]
    async fn stale_remainders_discount_later_launches() {
        let budget = ReportedBudget::default();
        let now = Instant::now();
        let first = budget.try_spend(1, now).unwrap();
        let _second = budget.try_spend(1, now).unwrap();
        let _third = budget.try_spend(1, now).unwrap();
        // The first request saw 3 left; the two launched after it used two of them.
        budget.observe(&requests_left(3), first, now);
        assert!(budget.try_spend(1, now).is_ok());
        assert!(budget.try_spend(1, now).is_err());
    }
}
