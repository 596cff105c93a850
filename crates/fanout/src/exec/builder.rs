//! Settings of an executor, and their defaults.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::check::{CheckPolicy, Checker};
use super::event::{Event, EventSink};
use super::hedge::HedgePolicy;
use super::limit::{Limits, Rate, SharedLimits, SharedSpending, SpendLimit};
use super::retry::RetryPolicy;
use super::{Executor, Shared};
use crate::prices::Price;
use crate::provider::Provider;

pub(crate) struct Config {
    pub concurrency: usize,
    pub rpm: Option<Rate>,
    pub tpm: Option<Rate>,
    pub retry: RetryPolicy,
    pub attempt_timeout: Option<Duration>,
    pub task_timeout: Option<Duration>,
    pub deadline: Option<Duration>,
    pub cancel: CancellationToken,
    pub drain: CancellationToken,
    pub hedge: Option<HedgePolicy>,
    pub breaker_threshold: u32,
    pub probe: bool,
    pub price: Option<Price>,
    pub spend_limit: Option<SharedSpending>,
    pub check: CheckPolicy,
    pub events: Option<EventSink>,
    pub order_window: Option<usize>,
    pub seed: Option<u64>,
    pub history: bool,
    pub keep_requests: bool,
    pub span_content: bool,
    pub results: Option<super::event::ResultSink>,
    pub shared_limits: Option<Arc<dyn SharedLimits>>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("concurrency", &self.concurrency)
            .field("rpm", &self.rpm)
            .field("tpm", &self.tpm)
            .field("retry", &self.retry)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("task_timeout", &self.task_timeout)
            .field("deadline", &self.deadline)
            .field("hedge", &self.hedge)
            .field("breaker_threshold", &self.breaker_threshold)
            .field("probe", &self.probe)
            .field("price", &self.price)
            .field("spend_limit", &self.spend_limit)
            .field("check", &self.check)
            .field("events", &self.events.is_some())
            .field("results", &self.results.is_some())
            .field("shared_limits", &self.shared_limits)
            .finish_non_exhaustive()
    }
}

/// Builds an [`Executor`].
///
/// Defaults: concurrency 16 (adapting to 429s, timeouts and latency growth), no
/// RPM or TPM limit of its own (limits the provider reports in its headers are
/// learned and paced to), [`RetryPolicy::default`] (5 attempts for errors; 429s
/// are waited out without counting), an attempt is cut after 120 s without a
/// sign of life, no task timeout, no deadline, circuit breaker after 3 fatal
/// answers with a probe window of the same size until the provider's
/// [`check`](crate::Provider::check) or first success proves it, and hedging of
/// stragglers past the learned p95 within 5% extra calls ([`HedgePolicy::default`]).
#[must_use]
pub struct ExecutorBuilder {
    provider: Arc<dyn Provider>,
    config: Config,
}

impl fmt::Debug for ExecutorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecutorBuilder")
            .field("provider", &self.provider.name())
            .field("config", &self.config)
            .finish()
    }
}

impl ExecutorBuilder {
    pub(crate) fn new(provider: Arc<dyn Provider>) -> Self {
        Self {
            provider,
            config: Config {
                concurrency: 16,
                rpm: None,
                tpm: None,
                retry: RetryPolicy::default(),
                attempt_timeout: Some(Duration::from_secs(120)),
                task_timeout: None,
                deadline: None,
                cancel: CancellationToken::new(),
                drain: CancellationToken::new(),
                hedge: Some(HedgePolicy::default()),
                breaker_threshold: 3,
                probe: true,
                price: None,
                spend_limit: None,
                check: CheckPolicy::default(),
                events: None,
                order_window: None,
                seed: None,
                history: true,
                keep_requests: false,
                span_content: false,
                results: None,
                shared_limits: None,
            },
        }
    }

    /// The most calls in flight at once.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.config.concurrency = concurrency.max(1);
        self
    }

    /// Requests per minute, spent at most one second's worth at once.
    pub fn rpm(self, per_minute: u64) -> Self {
        self.rpm_limit(Rate::per_minute(per_minute))
    }

    /// Requests per minute, with the burst `rate` gives.
    pub fn rpm_limit(mut self, rate: Rate) -> Self {
        self.config.rpm = Some(rate);
        self
    }

    /// Tokens per minute, weighted by each request's estimated prompt plus
    /// maximum output, reserved before the call and corrected with the usage
    /// the provider reports. A request larger than the whole budget fails at once.
    pub fn tpm(mut self, per_minute: u64) -> Self {
        self.config.tpm = Some(Rate::per_minute(per_minute).with_burst(per_minute));
        self
    }

    /// Tokens per minute, with the burst `rate` gives (see [`Self::tpm`]).
    pub fn tpm_limit(mut self, rate: Rate) -> Self {
        self.config.tpm = Some(rate);
        self
    }

    /// Admits every call through limits shared with other processes as well
    /// (requests and tokens per minute, the 429 pause, a global in-flight
    /// cap): see [`SharedLimits`]. This executor's own limits still apply.
    pub fn shared_limits(mut self, shared: Arc<dyn SharedLimits>) -> Self {
        self.config.shared_limits = Some(shared);
        self
    }

    /// When and how often failed attempts are tried again.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// Attempts in all, the first included (1: never retry).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.config.retry.max_attempts = attempts.max(1);
        self
    }

    /// How long one attempt may go without a sign of life before it is cut and
    /// retried: the whole answer when the provider does not stream, the next
    /// bytes when it does (so a long answer streaming steadily is never cut).
    pub fn attempt_timeout(mut self, limit: impl Into<Option<Duration>>) -> Self {
        self.config.attempt_timeout = limit.into();
        self
    }

    /// Time limit for a task, all its attempts and waits together.
    pub fn task_timeout(mut self, limit: impl Into<Option<Duration>>) -> Self {
        self.config.task_timeout = limit.into();
        self
    }

    /// Time limit for a whole run: at the deadline in-flight calls are cancelled
    /// and the run returns every finished result and a status for every other task.
    pub fn deadline(mut self, limit: impl Into<Option<Duration>>) -> Self {
        self.config.deadline = limit.into();
        self
    }

    /// Cancelling `token` stops launching, cancels in-flight calls and returns
    /// what finished, for every run of this executor.
    pub fn cancel_token(mut self, token: CancellationToken) -> Self {
        self.config.cancel = token;
        self
    }

    /// Cancelling `token` stops launching new tasks but lets in-flight ones
    /// finish (the first Ctrl-C of a command line); tasks never launched are
    /// reported as not run.
    pub fn drain_token(mut self, token: CancellationToken) -> Self {
        self.config.drain = token;
        self
    }

    /// Hedging of stragglers; `None` turns it off.
    pub fn hedge(mut self, policy: Option<HedgePolicy>) -> Self {
        self.config.hedge = policy;
        self
    }

    /// Fatal answers in a row (bad key, unknown model, no quota) after which no
    /// more tasks are launched; 0 turns the breaker off.
    pub fn circuit_breaker(mut self, threshold: u32) -> Self {
        self.config.breaker_threshold = threshold;
        self
    }

    /// Whether to launch only the breaker's threshold of calls until the provider
    /// has answered successfully once (on by default).
    pub fn probe(mut self, probe: bool) -> Self {
        self.config.probe = probe;
        self
    }

    /// Prices tokens so reports carry a cost.
    pub fn price(mut self, price: Price) -> Self {
        self.config.price = Some(price);
        self
    }

    /// The most the executor may spend, all its runs together: each call
    /// reserves its prompt and maximum output before it starts, and once the
    /// next call could exceed the limit no call starts again; the tasks left
    /// end as [`NotRun::BudgetSpent`](crate::NotRun::BudgetSpent).
    pub fn spend_limit(mut self, limit: SpendLimit) -> Self {
        self.config.spend_limit = Some(SharedSpending::own(limit));
        self
    }

    /// A spending limit drawn on by this executor and others together
    /// ([`SpendLimit::shared`]): a proxy's executors, one per key, under one budget.
    pub fn shared_spend_limit(mut self, limit: &SharedSpending) -> Self {
        self.config.spend_limit = Some(limit.clone());
        self
    }

    /// How many times, per task, an answer that breaks the request's JSON
    /// Schema (`ResponseFormat::JsonSchema`) is sent back to the model with the
    /// validation errors before the task fails (default 2; 0 fails at once).
    pub fn schema_repairs(mut self, repairs: u32) -> Self {
        self.config.check.repairs = repairs;
        self
    }

    /// Asks again, with `max_tokens` times `factor` (1.0 keeps it), when an
    /// answer is cut off at `max_tokens`, within the retry policy's attempts;
    /// off by default (a truncated answer is an answer, `finish_reason` says so).
    pub fn retry_truncated(mut self, factor: f64) -> Self {
        self.config.check.retry_truncated = Some(factor.max(1.0));
        self
    }

    /// Calls `sink` with every [`Event`], on whichever thread produced it; keep it quick.
    pub fn on_event(mut self, sink: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.config.events = Some(Arc::new(sink));
        self
    }

    /// Calls `sink` with every result as it finishes — each task of every run
    /// and each call a branch makes, with its calls' history — before it is
    /// handed on: to record everything an executor did, whatever pattern
    /// drove it. On whichever thread produced it; keep it quick.
    pub fn on_result(mut self, sink: impl Fn(&crate::TaskResult) + Send + Sync + 'static) -> Self {
        self.config.results = Some(Arc::new(sink));
        self
    }

    /// For [`Executor::stream_ordered`]: how far tasks may run ahead of the first
    /// result not yet released, which bounds the results held back. Default: four
    /// times the concurrency.
    pub fn order_window(mut self, window: usize) -> Self {
        self.config.order_window = Some(window.max(1));
        self
    }

    /// Seeds the retry jitter, for reproducible runs.
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = Some(seed);
        self
    }

    /// Whether each result keeps the history of its calls
    /// ([`TaskResult::calls`](crate::TaskResult::calls)); on by default.
    pub fn call_history(mut self, keep: bool) -> Self {
        self.config.history = keep;
        self
    }

    /// Whether each result keeps the request it sent
    /// ([`TaskResult::request`](crate::TaskResult::request)), for a result
    /// sink that must know what was asked; off by default, since a report
    /// would keep every prompt alive.
    pub fn keep_requests(mut self, keep: bool) -> Self {
        self.config.keep_requests = keep;
        self
    }

    /// Whether each call's telemetry span carries the prompt and the answer
    /// (`gen_ai.input.messages`, `gen_ai.output.messages`); off by default,
    /// since they may hold what must not leave the process.
    pub fn span_content(mut self, include: bool) -> Self {
        self.config.span_content = include;
        self
    }

    /// The executor with these settings.
    pub fn build(self) -> Executor {
        let config = self.config;
        let probe = (config.probe && config.breaker_threshold > 0)
            .then_some(config.breaker_threshold as usize);
        let limits = Limits::new(
            config.concurrency,
            probe,
            config.rpm,
            config.tpm,
            config.shared_limits.clone(),
        );
        let hedger = config.hedge.map(super::hedge::Hedger::new);
        let spending = config.spend_limit.as_ref().map(|shared| Arc::clone(&shared.0));
        let checker = Checker::new(config.check);
        Executor {
            shared: Arc::new(Shared {
                provider: self.provider,
                config,
                limits,
                hedger,
                spending,
                checker,
                checked: std::sync::OnceLock::new(),
            }),
        }
    }
}
