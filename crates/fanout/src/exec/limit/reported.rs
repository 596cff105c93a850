//! Pacing by the budget the provider reports (x-ratelimit-* and
//! anthropic-ratelimit-* headers), for requests and for tokens.
//!
//! Both vendors document their limits as token buckets that refill
//! continuously at the stated per-minute limit. Each answer says how much
//! remains and how long until the bucket is full again, so the refill rate is
//! the limit over a minute (or slower, when the reset says what is missing takes
//! longer: a daily limit) and the bucket's real capacity is what remains plus
//! what refills until the reset — which also holds for servers that meter a
//! minute's limit by the second. Launches spend from that learned bucket and
//! wait, at its refill rate, for what they need, so the provider's limit is
//! paced to with no `--rpm`/`--tpm` given and 429s stay rare. When no limit is
//! stated, the remainder is spent and then waited out until the reset.
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

/// What is known of one of the provider's buckets.
#[derive(Clone, Copy, Debug)]
struct Window {
    /// What is left, as of `at`.
    level: f64,
    at: Instant,
    refill: Refill,
}

#[derive(Clone, Copy, Debug)]
enum Refill {
    /// Continuously, at the stated limit per minute, up to `capacity`.
    Continuous { per_second: f64, capacity: f64 },
    /// Unknown rate: all at once at the reset, after which nothing is known.
    AtReset(Instant),
}

impl Window {
    fn observed(budget: &Budget, launched_since: f64, now: Instant) -> Option<Self> {
        let (remaining, reset) = (budget.remaining? as f64, budget.reset?);
        let refill = match budget.limit.filter(|l| *l > 0) {
            Some(limit) => {
                // A minute's limit refills at most limit/60 a second; a bucket
                // that empties over a longer window (a daily limit) says so by
                // its reset: what is missing refills by then.
                let per_minute = limit as f64 / 60.0;
                let missing = (limit as f64 - remaining).max(1.0);
                let per_second = match reset.as_secs_f64() {
                    secs if secs > 0.0 => per_minute.min(missing / secs),
                    _ => per_minute,
                };
                let capacity =
                    (remaining + reset.as_secs_f64() * per_second).clamp(remaining, limit as f64);
                Refill::Continuous { per_second, capacity: capacity.max(1.0) }
            }
            None => Refill::AtReset(now + reset),
        };
        Some(Self { level: (remaining - launched_since).max(0.0), at: now, refill })
    }

    /// Brings the level up to `now`; `None` once nothing is known.
    fn current(slot: &mut Option<Self>, now: Instant) -> Option<&mut Self> {
        let window = slot.as_mut()?;
        match window.refill {
            Refill::Continuous { per_second, capacity } => {
                let elapsed = now.saturating_duration_since(window.at).as_secs_f64();
                window.level = (window.level + elapsed * per_second).min(capacity);
                window.at = now;
            }
            Refill::AtReset(reset) if now >= reset => {
                *slot = None;
                return None;
            }
            Refill::AtReset(_) => {}
        }
        slot.as_mut()
    }

    /// When `cost` can be spent: `None` if now.
    fn wait_for(slot: &mut Option<Self>, cost: f64, now: Instant) -> Option<Instant> {
        let window = Self::current(slot, now)?;
        match window.refill {
            // A cost above the whole bucket goes once the bucket is full.
            Refill::Continuous { per_second, capacity } => {
                let shortfall = cost.min(capacity) - window.level;
                (shortfall > 1e-9).then(|| now + Duration::from_secs_f64(shortfall / per_second))
            }
            Refill::AtReset(reset) => (window.level < cost).then_some(reset),
        }
    }

    fn spend(&mut self, cost: f64) {
        self.level -= cost;
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
            window.spend(1.0);
        }
        if let Some(window) = &mut state.tokens {
            window.spend(tokens);
        }
        state.launched.requests += 1.0;
        state.launched.tokens += tokens;
        Ok(state.launched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests_left(limit: Option<u64>, remaining: u64, reset: Duration) -> RateLimit {
        RateLimit {
            requests: Budget { limit, remaining: Some(remaining), reset: Some(reset) },
            ..RateLimit::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn paces_to_the_stated_limit_at_its_refill_rate() {
        let budget = ReportedBudget::default();
        let now = Instant::now();
        let first = budget.try_spend(100, now).expect("nothing reported yet");
        // 60 a minute, 2 left, full again in 8 s: a bucket of 10 refilling at 1/s.
        budget.observe(&requests_left(Some(60), 2, Duration::from_secs(8)), first, now);
        assert!(budget.try_spend(100, now).is_ok());
        assert!(budget.try_spend(100, now).is_ok());
        assert_eq!(budget.try_spend(100, now), Err(now + Duration::from_secs(1)));
        let later = now + Duration::from_secs(1);
        assert!(budget.try_spend(100, later).is_ok());
        // After a long idle time the bucket is full at its capacity, not the limit.
        let idle = later + Duration::from_secs(600);
        for _ in 0..10 {
            assert!(budget.try_spend(100, idle).is_ok());
        }
        assert_eq!(budget.try_spend(100, idle), Err(idle + Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_paced_and_an_oversized_cost_waits_for_a_full_bucket() {
        let budget = ReportedBudget::default();
        let now = Instant::now();
        let first = budget.try_spend(0, now).unwrap();
        let tokens = RateLimit {
            tokens: Budget {
                limit: Some(6_000),
                remaining: Some(0),
                reset: Some(Duration::from_secs(5)),
            },
            ..RateLimit::default()
        };
        // 100 tokens a second, capacity 500.
        budget.observe(&tokens, first, now);
        assert_eq!(budget.try_spend(200, now), Err(now + Duration::from_secs(2)));
        assert_eq!(budget.try_spend(900, now), Err(now + Duration::from_secs(5)));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_stated_limit_the_remainder_lasts_until_the_reset() {
        let budget = ReportedBudget::default();
        let now = Instant::now();
        let first = budget.try_spend(1, now).unwrap();
        budget.observe(&requests_left(None, 1, Duration::from_secs(5)), first, now);
        assert!(budget.try_spend(1, now).is_ok());
        assert_eq!(budget.try_spend(1, now), Err(now + Duration::from_secs(5)));
        assert!(budget.try_spend(1, now + Duration::from_secs(5)).is_ok(), "unknown again");
    }

    #[tokio::test(start_paused = true)]
    async fn stale_remainders_discount_later_launches() {
        let budget = ReportedBudget::default();
        let now = Instant::now();
        let first = budget.try_spend(1, now).unwrap();
        let _second = budget.try_spend(1, now).unwrap();
        let _third = budget.try_spend(1, now).unwrap();
        // The first request saw 3 left; the two launched after it used two of them.
        budget.observe(&requests_left(None, 3, Duration::from_secs(5)), first, now);
        assert!(budget.try_spend(1, now).is_ok());
        assert!(budget.try_spend(1, now).is_err());
    }
}
