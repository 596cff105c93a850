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
//!
//! Money is counted call by call at the call's own price, so that calls of
//! several models (a proxy's clients name theirs) share one limit; and one
//! limit may be shared by several executors ([`SharedSpending`]).

use std::fmt;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::prices::Price;
use crate::provider::{Provider, Request, Usage};

/// A model's price by its name; `None` for a model without one.
pub type PriceOf = Arc<dyn Fn(&str) -> Option<Price> + Send + Sync>;

/// How a money limit prices a call.
#[derive(Clone)]
pub enum Pricing {
    /// Every call at one price.
    One(Price),
    /// Each call at the price of the model it names (the request's, else the
    /// provider's default); a call of a model without a price is not sent,
    /// as though the limit were spent, since it could not be counted.
    PerModel(PriceOf),
}

impl Pricing {
    fn price_of(&self, model: &str) -> Option<Price> {
        match self {
            Self::One(price) => Some(*price),
            Self::PerModel(price_of) => price_of(model),
        }
    }
}

impl fmt::Debug for Pricing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::One(price) => f.debug_tuple("One").field(price).finish(),
            Self::PerModel(_) => f.write_str("PerModel"),
        }
    }
}

/// The most an executor may spend: money (at a price), tokens, or both,
/// counting what earlier runs of the same job spent.
#[derive(Clone, Debug, Default)]
pub struct SpendLimit {
    max_cost: Option<(f64, Pricing)>,
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

    /// Adds a money limit, every call priced at `price`.
    #[must_use]
    pub fn with_max_cost(mut self, max: f64, price: Price) -> Self {
        self.max_cost = Some((max, Pricing::One(price)));
        self
    }

    /// Adds a money limit, each call priced at its model's price
    /// ([`Pricing::PerModel`]).
    #[must_use]
    pub fn with_max_cost_per_model(mut self, max: f64, price_of: PriceOf) -> Self {
        self.max_cost = Some((max, Pricing::PerModel(price_of)));
        self
    }

    /// Adds a token limit.
    #[must_use]
    pub fn with_max_tokens(mut self, max: u64) -> Self {
        self.max_tokens = Some(max);
        self
    }

    /// Counts `usage`, spent before this executor (a resumed job's finished
    /// calls), against the limit: its tokens, and its money at the limit's one
    /// price (a limit priced per model cannot tell what earlier calls cost, and
    /// counts their tokens only).
    #[must_use]
    pub fn already_spent(mut self, usage: Usage) -> Self {
        self.spent += usage;
        self
    }

    /// Whether a call of `model` spending `usage` would fit, with nothing else spent.
    pub fn allows(&self, model: &str, usage: Usage) -> bool {
        self.price_of(model).is_ok_and(|price| self.fits(usage, cost(price, usage)))
    }

    /// What `usage` would cost at the limit's price for `model`, if it has one.
    pub fn cost_of(&self, model: &str, usage: Usage) -> Option<f64> {
        self.price_of(model).ok().flatten().map(|price| price.cost(usage))
    }

    /// Makes the limit one that several executors draw on together. A
    /// shared limit judges each call alone: one that cannot fit with nothing
    /// in flight is refused, and the calls after it that fit still go (an
    /// executor's own limit is spent for good at that point, since a job's
    /// calls are alike), so that one client's dear call does not close the
    /// limit to every other.
    pub fn shared(self) -> SharedSpending {
        SharedSpending(Arc::new(Spending::new(self, Latch::CallByCall)))
    }

    /// The most one call of `request` can spend with `reserved` tokens held
    /// for it (prompt and output together): its prompt as `provider`
    /// estimates it, and the rest as output — priced apart, since output
    /// costs more. What a call reserves against the limit before it starts.
    pub fn most_spent(provider: &dyn Provider, request: &Request, reserved: u64) -> Usage {
        let prompt = provider.estimate_prompt_tokens(request).min(reserved);
        Usage::new(prompt, reserved - prompt)
    }

    /// The price a call of `model` is counted at: `Ok(None)` without a money
    /// limit, `Err` when the model has no price.
    fn price_of(&self, model: &str) -> Result<Option<Price>, Unpriced> {
        match &self.max_cost {
            None => Ok(None),
            Some((_, pricing)) => pricing.price_of(model).map(Some).ok_or(Unpriced),
        }
    }

    /// Whether `usage` tokens costing `cost` are within the limit.
    fn fits(&self, usage: Usage, cost: f64) -> bool {
        let tokens_fit = self.max_tokens.is_none_or(|max| usage.total() <= max);
        // A small tolerance, so a price's rounding never refuses the last call.
        let cost_fits = self.max_cost.as_ref().is_none_or(|(max, _)| cost <= max * (1.0 + 1e-12));
        tokens_fit && cost_fits
    }
}

/// A model without a price, under a money limit.
struct Unpriced;

/// What `usage` costs at `price`; nothing without one.
fn cost(price: Option<Price>, usage: Usage) -> f64 {
    price.map_or(0.0, |price| price.cost(usage))
}

/// Whether a call that cannot fit with nothing in flight spends the limit for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Latch {
    /// An executor's own limit: a job's calls are alike, so the next would not fit either.
    ForGood,
    /// A shared limit: calls of other clients and models may still fit.
    CallByCall,
}

/// One [`SpendLimit`] that several executors draw on
/// ([`ExecutorBuilder::shared_spend_limit`](crate::ExecutorBuilder::shared_spend_limit)):
/// their calls are counted together. Clones share it.
#[derive(Clone, Debug)]
pub struct SharedSpending(pub(crate) Arc<Spending>);

impl SharedSpending {
    /// One executor's own limit, spent for good once a call cannot fit.
    pub(crate) fn own(limit: SpendLimit) -> Self {
        Self(Arc::new(Spending::new(limit, Latch::ForGood)))
    }

    /// What the calls have spent so far: tokens, and money where priced.
    pub fn spent(&self) -> (Usage, f64) {
        let ledger = self.0.ledger.lock().expect("the ledger lock is never poisoned");
        (ledger.spent, ledger.spent_cost)
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
    spent_cost: f64,
    reserved: Usage,
    reserved_cost: f64,
    /// Reservations not yet settled: calls in flight.
    holds: usize,
    /// Set once a call could not fit with nothing in flight.
    exhausted: bool,
}

/// Spending against a [`SpendLimit`]: one executor's, or several's.
#[derive(Debug)]
pub(crate) struct Spending {
    limit: SpendLimit,
    latch: Latch,
    ledger: Mutex<Ledger>,
    settled: Notify,
}

/// A call's reservation; dropping it unsettled (a failed or cancelled call)
/// charges nothing.
#[derive(Debug)]
pub(crate) struct Hold<'a> {
    spending: &'a Spending,
    /// The price the call is counted at; `None` without a money limit.
    price: Option<Price>,
    reserved: Usage,
    used: Usage,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut ledger = self.spending.ledger.lock().expect("the ledger lock is never poisoned");
        ledger.reserved = minus(ledger.reserved, self.reserved);
        ledger.reserved_cost = (ledger.reserved_cost - cost(self.price, self.reserved)).max(0.0);
        ledger.spent += self.used;
        ledger.spent_cost += cost(self.price, self.used);
        ledger.holds -= 1;
        if ledger.holds == 0 {
            // No float residue outlives the calls that reserved it.
            ledger.reserved = Usage::default();
            ledger.reserved_cost = 0.0;
        }
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
    pub(crate) fn new(limit: SpendLimit, latch: Latch) -> Self {
        let spent_cost = match &limit.max_cost {
            Some((_, Pricing::One(price))) => price.cost(limit.spent),
            _ => 0.0,
        };
        let ledger = Ledger { spent: limit.spent, spent_cost, ..Ledger::default() };
        Self { limit, latch, ledger: Mutex::new(ledger), settled: Notify::new() }
    }

    /// Reserves `most` for a call of `model`, waiting while calls in flight
    /// may leave room; `None` once the limit is spent (or the model has no
    /// price to count it at).
    pub(crate) async fn reserve(&self, model: &str, most: Usage) -> Option<Hold<'_>> {
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            // Registered before the ledger is read, so no settlement is missed.
            settled.as_mut().enable();
            match self.try_reserve(model, most) {
                Ok(hold) => return Some(hold),
                Err(Exhausted::ForGood | Exhausted::ThisCall | Exhausted::Unpriced) => return None,
                Err(Exhausted::WhileInFlight) => settled.await,
            }
        }
    }

    /// Reserves `most` if it fits now (a hedge, which is never worth waiting for).
    pub(crate) fn reserve_now(&self, model: &str, most: Usage) -> Option<Hold<'_>> {
        self.try_reserve(model, most).ok()
    }

    fn try_reserve(&self, model: &str, most: Usage) -> Result<Hold<'_>, Exhausted> {
        let price = self.limit.price_of(model).map_err(|Unpriced| Exhausted::Unpriced)?;
        let most_cost = cost(price, most);
        let mut ledger = self.ledger.lock().expect("the ledger lock is never poisoned");
        if ledger.exhausted {
            return Err(Exhausted::ForGood);
        }
        let tokens = plus(plus(ledger.spent, ledger.reserved), most);
        if self.limit.fits(tokens, ledger.spent_cost + ledger.reserved_cost + most_cost) {
            ledger.reserved += most;
            ledger.reserved_cost += most_cost;
            ledger.holds += 1;
            return Ok(Hold { spending: self, price, reserved: most, used: Usage::default() });
        }
        if ledger.holds > 0 {
            return Err(Exhausted::WhileInFlight);
        }
        if self.latch == Latch::CallByCall {
            return Err(Exhausted::ThisCall);
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
    /// This call does not fit, and nothing in flight may free room; smaller
    /// ones may still fit (a shared limit).
    ThisCall,
    /// The call's model has no price: this call cannot be counted, others may.
    Unpriced,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_and_tokens_are_both_limits() {
        let price = Price::new(1.0, 2.0);
        let limit = SpendLimit::cost(0.003, price).with_max_tokens(2_500);
        assert!(limit.allows("m", Usage::new(1_000, 1_000)), "$0.003 and 2,000 tokens");
        assert!(!limit.allows("m", Usage::new(1_001, 1_000)), "a token's worth over the money");
        assert!(!SpendLimit::tokens(100).allows("m", Usage::new(60, 41)));
        assert!(SpendLimit::default().allows("m", Usage::new(u64::MAX / 4, 0)));
    }

    #[tokio::test]
    async fn a_reservation_waits_for_calls_in_flight_then_the_limit_is_spent() {
        let spending = Spending::new(SpendLimit::tokens(100), Latch::ForGood);
        let first = spending.reserve("m", Usage::new(10, 50)).await.unwrap();
        // 60 reserved: another 60 does not fit while the first is in flight.
        assert!(spending.reserve_now("m", Usage::new(10, 50)).is_none());
        let waiting = spending.reserve("m", Usage::new(10, 50));
        tokio::pin!(waiting);
        assert!(futures_util::poll!(waiting.as_mut()).is_pending());
        // The first used 30 of its 60: the second fits now.
        first.settle(Usage::new(10, 20));
        let second = waiting.await.expect("room after the first settled");
        // 30 spent + 60 reserved: a third does not fit, and once the second has
        // settled with nothing in flight, the limit is spent for good.
        drop(second);
        assert!(spending.reserve("m", Usage::new(10, 70)).await.is_none());
        assert!(spending.reserve("m", Usage::new(1, 1)).await.is_none(), "spent stays spent");
    }

    #[test]
    fn earlier_spending_counts() {
        let spending =
            Spending::new(SpendLimit::tokens(100).already_spent(Usage::new(90, 0)), Latch::ForGood);
        let hold = spending.reserve_now("m", Usage::new(5, 5)).expect("95 of 100");
        assert!(spending.reserve_now("m", Usage::new(5, 1)).is_none(), "101 of 100");
        drop(hold);
        assert!(spending.reserve_now("m", Usage::new(5, 6)).is_none(), "nothing in flight: spent");
    }

    /// Calls of several models share one money limit, each counted at its
    /// own model's price; a model without a price is refused alone, and
    /// executors sharing the limit see each other's spending.
    #[tokio::test]
    async fn each_call_is_counted_at_its_models_price() {
        let price_of = |model: &str| match model {
            "cheap" => Some(Price::new(1.0, 1.0)),
            "dear" => Some(Price::new(10.0, 10.0)),
            _ => None,
        };
        let limit = SpendLimit::default().with_max_cost_per_model(0.001, Arc::new(price_of));
        assert!(limit.allows("cheap", Usage::new(500, 500)), "$0.001");
        assert!(!limit.allows("dear", Usage::new(500, 500)), "$0.01");
        assert!(!limit.allows("unknown", Usage::new(1, 0)), "no price, no call");
        let shared = limit.shared();
        let (one, other) = (shared.clone(), shared.clone());
        assert!(one.0.reserve("unknown", Usage::new(1, 0)).await.is_none());
        let dear = one.0.reserve("dear", Usage::new(40, 10)).await.unwrap();
        dear.settle(Usage::new(40, 10));
        // $0.0005 spent at the dear price: 499 cheap tokens fit, two more would not.
        let cheap = other.0.reserve_now("cheap", Usage::new(250, 249)).expect("$0.000999");
        assert!(one.0.reserve_now("cheap", Usage::new(1, 1)).is_none(), "$0.001001");
        cheap.settle(Usage::new(100, 100));
        let (tokens, money) = shared.spent();
        assert_eq!(tokens, Usage::new(140, 110));
        assert!((money - 0.0007).abs() < 1e-12, "{money}");
        // A dear call that cannot fit is refused alone: the limit stays open to cheap ones.
        assert!(one.0.reserve("dear", Usage::new(31, 0)).await.is_none(), "$0.00031, $0.0003 left");
        assert!(other.0.reserve("cheap", Usage::new(100, 100)).await.is_some(), "$0.0002 fits");
    }

    /// Earlier runs' spending counts in money at the one price, whichever
    /// order the limit was made in.
    #[test]
    fn earlier_money_counts_whatever_the_order() {
        let price = Price::new(1.0, 1.0);
        let before = SpendLimit::tokens(10_000)
            .already_spent(Usage::new(500, 0))
            .with_max_cost(0.001, price);
        let after = SpendLimit::cost(0.001, price).already_spent(Usage::new(500, 0));
        for limit in [before, after] {
            let spending = Spending::new(limit, Latch::ForGood);
            assert!(spending.reserve_now("m", Usage::new(501, 0)).is_none(), "$0.001001");
        }
    }
}
