//! Everything that decides when a call may start: the adaptive concurrency cap,
//! RPM and TPM buckets, the shared 429 pause, the provider's reported budget,
//! and the spending limit.
//!
//! One `Limits` exists per executor, shared by all its runs and tasks, so two
//! runs on one executor together stay within the provider's limits; with
//! [`SharedLimits`], so do many executors in many processes.

mod bucket;
mod concurrency;
mod output;
mod pause;
mod reported;
mod shared;
mod spend;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};

use crate::provider::{ErrorKind, Provider, ProviderError, RateLimit, Request, Response};
pub(crate) use concurrency::{AdaptiveConcurrency, Permit};
pub use shared::{SharedLease, SharedLimits, StatedLimits};
pub(crate) use spend::Spending;
pub use spend::{PriceOf, Pricing, SharedSpending, SpendLimit};

use bucket::TokenBucket;
use output::OutputAllowance;
use pause::SharedPause;
use reported::{Launch, ReportedBudget};

/// A per-minute limit and how much of it may be spent at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Requests or tokens allowed per minute, refilled continuously.
    pub per_minute: u64,
    /// The most that may be spent at once: the bucket's size.
    pub burst: u64,
}

impl Rate {
    /// `per_minute`, spent at most one second's worth at once: a client that
    /// bursts a whole minute's budget draws 429s from servers that meter by the
    /// second.
    pub fn per_minute(per_minute: u64) -> Self {
        Self { per_minute, burst: per_minute.div_ceil(60).max(1) }
    }

    /// Lets up to `burst` (at least 1) be spent at once.
    #[must_use]
    pub fn with_burst(mut self, burst: u64) -> Self {
        self.burst = burst.max(1);
        self
    }
}

/// What the limiter decided about an error, for the executor to report.
#[derive(Debug, Default)]
pub(crate) struct Reaction {
    pub paused_for: Option<Duration>,
    pub new_limit: Option<usize>,
}

#[derive(Debug)]
pub(crate) struct Limits {
    pub concurrency: AdaptiveConcurrency,
    requests: Option<TokenBucket>,
    tokens: Option<TokenBucket>,
    pause: SharedPause,
    reported: ReportedBudget,
    output: OutputAllowance,
    shared: Option<Arc<dyn SharedLimits>>,
}

/// A call let through: where it stands in the reported budget, and its place
/// in the shared limits, held until this is dropped.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub launch: Launch,
    pub lease: Option<SharedLease>,
}

/// Gives reserved bucket tokens back if the wait for them is abandoned.
struct Refund<'a> {
    bucket: Option<&'a TokenBucket>,
    amount: u64,
}

impl Drop for Refund<'_> {
    fn drop(&mut self) {
        if let Some(bucket) = self.bucket {
            bucket.give_back(self.amount);
        }
    }
}

impl Refund<'_> {
    fn keep(mut self) {
        self.bucket = None;
    }
}

impl Limits {
    pub(crate) fn new(
        concurrency: usize,
        probe: Option<usize>,
        rpm: Option<Rate>,
        tpm: Option<Rate>,
        shared: Option<Arc<dyn SharedLimits>>,
    ) -> Self {
        Self {
            shared,
            concurrency: AdaptiveConcurrency::new(concurrency, probe),
            requests: rpm.map(|r| TokenBucket::new(r.per_minute, r.burst)),
            tokens: tpm.map(|r| TokenBucket::new(r.per_minute, r.burst)),
            pause: SharedPause::default(),
            reported: ReportedBudget::default(),
            output: OutputAllowance::default(),
        }
    }

    /// The tokens to reserve for `request`: the provider's estimate of the
    /// most it may consume, or, for a request without `max_tokens` once
    /// answers have been seen, its prompt and the longest recent answer when
    /// that is less.
    pub(crate) fn reservation(&self, provider: &dyn Provider, request: &Request) -> u64 {
        let most = provider.estimate_tokens(request);
        match (request.max_tokens, self.output.tokens()) {
            // Never more than the provider's own estimate: the learned figure
            // only lowers a reservation, so `check_fits` on the first stays true.
            (None, Some(learned)) => (provider.estimate_prompt_tokens(request) + learned).min(most),
            _ => most,
        }
    }

    /// Fails at once for a request that could never fit in the TPM budget,
    /// this executor's or the shared one.
    pub(crate) fn check_fits(&self, tokens: u64) -> Result<(), ProviderError> {
        let own = self.tokens.as_ref().map(TokenBucket::per_minute);
        let shared = self.shared.as_ref().and_then(|shared| shared.tokens_per_minute());
        match own.into_iter().chain(shared).min() {
            Some(limit) if tokens > limit => Err(ProviderError::new(
                ErrorKind::BadRequest,
                format!(
                    "the request needs up to {tokens} tokens but the limit is {limit} tokens per minute; \
                     lower max_tokens or raise the TPM limit"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Waits until one call of up to `tokens` tokens may start, and takes its
    /// share of every budget, the shared ones last. Cancel-safe: an abandoned
    /// wait gives its tokens back.
    pub(crate) async fn admit(&self, tokens: u64) -> Admitted {
        self.pause.wait().await;
        let now = Instant::now();
        let request_refund = Refund { bucket: self.requests.as_ref(), amount: 1 };
        let token_refund = Refund { bucket: self.tokens.as_ref(), amount: tokens };
        let ready = [
            self.requests.as_ref().map(|b| b.reserve(1, now)),
            self.tokens.as_ref().map(|b| b.reserve(tokens, now)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(now);
        // The timer wheel has millisecond ticks and may wake a little early: wait
        // until the reservation is really due, so a limit is never exceeded.
        while Instant::now() < ready {
            sleep_until(ready).await;
        }
        let launch = loop {
            self.pause.wait().await;
            match self.reported.try_spend(tokens, Instant::now()) {
                Ok(launch) => break launch,
                Err(reset) => sleep_until(reset).await,
            }
        };
        let lease = match &self.shared {
            Some(shared) => Some(shared.admit(tokens).await),
            None => None,
        };
        request_refund.keep();
        token_refund.keep();
        Admitted { launch, lease }
    }

    /// A slot and every budget for an extra call (a hedge), waiting in line
    /// with everyone else, so extra calls never exceed any limit.
    pub(crate) async fn admit_extra(&self, tokens: u64) -> (Permit, Option<SharedLease>) {
        let permit = self.concurrency.acquire().await;
        let admitted = self.admit(tokens).await;
        (permit, admitted.lease)
    }

    /// Learns from a successful answer that first showed life after `latency`:
    /// its usage corrects the TPM reservation (and, without `max_tokens`, the
    /// output allowance of later reservations), its headers the reported budget,
    /// and it may widen (or, when latency says a queue grew, narrow) the
    /// concurrency limit.
    pub(crate) fn on_success(
        &self,
        request: &Request,
        reserved: u64,
        launch: Launch,
        sent: Instant,
        response: &Response,
        latency: Duration,
    ) -> Option<usize> {
        if request.max_tokens.is_none() {
            self.output.record(response.usage.output_tokens);
        }
        let used = response.usage.total();
        if let Some(bucket) = &self.tokens {
            if used > reserved {
                bucket.charge(used - reserved);
            } else {
                bucket.give_back(reserved - used);
            }
        }
        // The limits an answer states are learned before it settles: a
        // shared limiter then meters what the settlement lets go.
        self.observe(response.rate_limit.as_ref(), launch);
        if let Some(shared) = &self.shared {
            shared.settle(reserved, used);
        }
        self.concurrency.on_success(sent, latency)
    }

    /// Learns from a failed attempt, launched as `launch` while the concurrency
    /// limit was at `generation`. A 429 pauses every
    /// task until the provider's time (or `fallback`, the retry delay, when it
    /// gave none); any push-back narrows the concurrency limit, and so do
    /// attempt timeouts when they are common.
    pub(crate) fn on_error(
        &self,
        error: &ProviderError,
        launch: Launch,
        generation: u64,
        fallback: Option<Duration>,
    ) -> Reaction {
        self.observe(error.rate_limit(), launch);
        let mut reaction = Reaction::default();
        if error.is_timeout() {
            reaction.new_limit = self.concurrency.on_timeout(generation);
            return reaction;
        }
        if !error.kind().is_backpressure() {
            return reaction;
        }
        let wait =
            error.retry_after().or_else(|| error.is_rate_limited().then_some(fallback).flatten());
        if let Some(wait) = wait.filter(|w| !w.is_zero()) {
            // Every process sharing the limits hears of it, even when this
            // one's pause already reaches past it.
            if error.is_rate_limited()
                && let Some(shared) = &self.shared
            {
                shared.pause(wait);
            }
            if self.pause.extend(Instant::now() + wait) {
                reaction.paused_for = Some(wait);
            }
        }
        reaction.new_limit = self.concurrency.on_backpressure(generation);
        reaction
    }

    fn observe(&self, rate_limit: Option<&RateLimit>, launch: Launch) {
        let Some(rate_limit) = rate_limit else { return };
        self.reported.observe(rate_limit, launch, Instant::now());
        if let Some(shared) = &self.shared
            && let Some(stated) = StatedLimits::of(rate_limit)
        {
            shared.learn(stated);
        }
    }
}
