//! A spending limit: the most an executor may spend, in money or tokens.
//!
//! Like the TPM limit, every call reserves the most it can cost (its prompt
//! plus its maximum output) before it starts, and the answer's reported usage
//! replaces the reservation. A call whose reservation does not fit waits while
//! other calls are in flight (their answers usually cost less than they
//! reserved); once nothing is in flight and it still does not fit, the limit is
//! spent for good and no call starts again. So the spending stays within the
//! limit unless answers cost more than they reserved (a request without
//! `max_tokens` that answers at length), and then by at most the calls that
//! were in flight.

use std::sync::Mutex;

use tokio::sync::Notify;

use crate::prices::Price;
use crate::provider::{Provider, Request, Usage};

/// The most an executor may spend: money (at a price), tokens, or both,
/// counting what earlier runs of the same job spent.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SpendLimit {
    max_cost: Option<(f64, Price)>,
    max_tokens: Option<u64>,
    spent: Usage,
}

impl SpendLimit {
    /// At most `max` in the price's currency, every call priced at `price`.
    pub fn cost(max: f64, price: Price) -> Self {
        Self::default().with_max_cost(max, price)
    }

    /// At most `max` tokens, input and output together.
    pub fn tokens(max: u64) -> Self {
        Self::default().with_max_tokens(max)
    }

    /// Adds a money limit.
    #[must_use]
    pub fn with_max_cost(mut self, max: f64, price: Price) -> Self {
        self.max_cost = Some((max, price));
        self
    }

    /// Adds a token limit.
    #[must_use]
    pub fn with_max_tokens(mut self, max: u64) -> Self {
        self.max_tokens = Some(max);
        self
    }

    /// Counts `usage`, spent before this executor (a resumed job's finished
    /// calls), against the limit.
    #[must_use]
    pub fn already_spent(mut self, usage: Usage) -> Self {
        self.spent += usage;
        self
    }

    /// Whether `usage` is within the limit.
    pub fn allows(&self, usage: Usage) -> bool {
        let tokens_fit = self.max_tokens.is_none_or(|max| usage.total() <= max);
        // A small tolerance, so a price's rounding never refuses the last call.
        let cost_fits =
            self.max_cost.is_none_or(|(max, price)| price.cost(usage) <= max * (1.0 + 1e-12));
        tokens_fit && cost_fits
    }

    /// What `usage` would cost at the limit's price, if it has one.
    pub fn cost_of(&self, usage: Usage) -> Option<f64> {
        self.max_cost.map(|(_, price)| price.cost(usage))
    }

    /// The most one call of `request` can spend with `reserved` tokens held
    /// for it (prompt and output together): its prompt as `provider`
    /// estimates it, and the rest as output — priced apart, since output
    /// costs more. What a call reserves against the limit before it starts.
    pub fn most_spent(provider: &dyn Provider, request: &Request, reserved: u64) -> Usage {
        let prompt = provider.estimate_prompt_tokens(request).min(reserved);
        Usage::new(prompt, reserved - prompt)
    }
}

fn plus(a: Usage, b: Usage) -> Usage {
    let mut sum = a;
    sum += b;
    sum
}

fn minus(a: Usage, b: Usage) -> Usage {
    Usage {
        input_tokens: a.input_tokens.saturating_sub(b.input_tokens),
        output_tokens: a.output_tokens.saturating_sub(b.output_tokens),
        cached_input_tokens: a.cached_input_tokens.saturating_sub(b.cached_input_tokens),
    }
}

#[derive(Debug, Default)]
struct Ledger {
    spent: Usage,
    reserved: Usage,
    /// Reservations not yet settled: calls in flight.
    holds: usize,
    /// Set once a call could not fit with nothing in flight.
    exhausted: bool,
}

/// An executor's spending against its [`SpendLimit`].
#[derive(Debug)]
pub(crate) struct Spending {
    limit: SpendLimit,
    ledger: Mutex<Ledger>,
    settled: Notify,
}

/// A call's reservation; dropping it unsettled (a failed or cancelled call)
/// charges nothing.
#[derive(Debug)]
pub(crate) struct Hold<'a> {
    spending: &'a Spending,
    reserved: Usage,
    used: Usage,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut ledger = self.spending.ledger.lock().expect("the ledger lock is never poisoned");
        ledger.reserved = minus(ledger.reserved, self.reserved);
        ledger.spent += self.used;
        ledger.holds -= 1;
        drop(ledger);
        self.spending.settled.notify_waiters();
    }
}

impl Hold<'_> {
    /// Replaces the reservation with what the call used.
    pub(crate) fn settle(mut self, used: Usage) {
        self.used = used;
    }

    /// What a call cut short (dropped unsettled) is charged instead of nothing.
    #[must_use]
    pub(crate) fn charged_if_dropped(mut self, used: Usage) -> Self {
        self.used = used;
        self
    }
}

impl Spending {
    pub(crate) fn new(limit: SpendLimit) -> Self {
        let ledger = Ledger { spent: limit.spent, ..Ledger::default() };
        Self { limit, ledger: Mutex::new(ledger), settled: Notify::new() }
    }

    /// Reserves `most` for a call, waiting while calls in flight may leave
    /// room; `None` once the limit is spent.
    pub(crate) async fn reserve(&self, most: Usage) -> Option<Hold<'_>> {
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            // Registered before the ledger is read, so no settlement is missed.
            settled.as_mut().enable();
            match self.try_reserve(most) {
                Ok(hold) => return Some(hold),
                Err(Exhausted::ForGood) => return None,
                Err(Exhausted::WhileInFlight) => settled.await,
            }
        }
    }

    /// Reserves `most` if it fits now (a hedge, which is never worth waiting for).
    pub(crate) fn reserve_now(&self, most: Usage) -> Option<Hold<'_>> {
        self.try_reserve(most).ok()
    }

    fn try_reserve(&self, most: Usage) -> Result<Hold<'_>, Exhausted> {
        let mut ledger = self.ledger.lock().expect("the ledger lock is never poisoned");
        if ledger.exhausted {
            return Err(Exhausted::ForGood);
        }
        if self.limit.allows(plus(plus(ledger.spent, ledger.reserved), most)) {
            ledger.reserved += most;
            ledger.holds += 1;
            return Ok(Hold { spending: self, reserved: most, used: Usage::default() });
        }
        if ledger.holds > 0 {
            return Err(Exhausted::WhileInFlight);
        }
        ledger.exhausted = true;
        drop(ledger);
        self.settled.notify_waiters();
        Err(Exhausted::ForGood)
    }
}

enum Exhausted {
    WhileInFlight,
    ForGood,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_and_tokens_are_both_limits() {
        let price = Price::new(1.0, 2.0);
        let limit = SpendLimit::cost(0.003, price).with_max_tokens(2_500);
        assert!(limit.allows(Usage::new(1_000, 1_000)), "$0.003 and 2,000 tokens");
        assert!(!limit.allows(Usage::new(1_001, 1_000)), "a token's worth over the money");
        assert!(!SpendLimit::tokens(100).allows(Usage::new(60, 41)));
        assert!(SpendLimit::default().allows(Usage::new(u64::MAX / 4, 0)));
    }

    #[tokio::test]
    async fn a_reservation_waits_for_calls_in_flight_then_the_limit_is_spent() {
        let spending = Spending::new(SpendLimit::tokens(100));
        let first = spending.reserve(Usage::new(10, 50)).await.unwrap();
        // 60 reserved: another 60 does not fit while the first is in flight.
        assert!(spending.reserve_now(Usage::new(10, 50)).is_none());
        let waiting = spending.reserve(Usage::new(10, 50));
        tokio::pin!(waiting);
        assert!(futures_util::poll!(waiting.as_mut()).is_pending());
        // The first used 30 of its 60: the second fits now.
        first.settle(Usage::new(10, 20));
        let second = waiting.await.expect("room after the first settled");
        // 30 spent + 60 reserved: a third does not fit, and once the second has
        // settled with nothing in flight, the limit is spent for good.
        drop(second);
        assert!(spending.reserve(Usage::new(10, 70)).await.is_none());
        assert!(spending.reserve(Usage::new(1, 1)).await.is_none(), "spent stays spent");
    }

    #[test]
    fn earlier_spending_counts() {
        let spending = Spending::new(SpendLimit::tokens(100).already_spent(Usage::new(90, 0)));
        let hold = spending.reserve_now(Usage::new(5, 5)).expect("95 of 100");
        assert!(spending.reserve_now(Usage::new(5, 1)).is_none(), "101 of 100");
        drop(hold);
        assert!(spending.reserve_now(Usage::new(5, 6)).is_none(), "nothing in flight: spent");
    }
}
