//! The executor: many provider calls at once, under limits, with every result kept.
//!
//! An [`Executor`] wraps one provider and the limits that protect it. Each run
//! pulls tasks lazily, launches them under the concurrency cap and the RPM/TPM
//! buckets, retries what is retryable, honours 429 pauses across all tasks, and
//! reports one [`Outcome`](crate::Outcome) per task:
//! - [`Executor::run`] returns a [`Report`] in task order;
//! - [`Executor::stream`] yields results as they finish: nothing ever waits for
//!   a slow task but that task's own result;
//! - [`Executor::stream_held`] does the same, each result holding its call's
//!   concurrency slot until the receiver drops it (once the result is stored),
//!   so calls in flight plus results not yet safe never exceed the concurrency;
//! - [`Executor::stream_ordered`] yields them in task order as soon as the prefix
//!   is complete. To bound memory without a store it *throttles launches*: tasks
//!   run at most the order window ahead of the first unreleased result, so a
//!   slow task holds back the ones after its window. For ordered output without
//!   that, take [`Executor::stream`] and reorder through durable storage (as
//!   `fanout batch` does with its job store).
//!
//! Limits (concurrency, RPM, TPM, the 429 pause) belong to the executor and are
//! shared by all its runs; the circuit breaker, deadline and counters belong to
//! each run.

mod attempt;
pub mod branch;
mod breaker;
mod builder;
pub(crate) mod check;
mod driver;
pub mod event;
pub mod hedge;
pub mod history;
pub mod limit;
mod order;
pub mod report;
pub mod retry;
mod telemetry;

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::provider::{Check, Provider};
use crate::task::{Task, TaskResult};
pub(crate) use attempt::panic_message;
use attempt::{Counters, Run};
use breaker::CircuitBreaker;
use builder::Config;
pub use builder::ExecutorBuilder;
use driver::Release;
use event::Event;
use hedge::Hedger;
use limit::Limits;
use report::{Report, Totals};

/// What every run of an executor shares.
struct Shared {
    provider: Arc<dyn Provider>,
    config: Config,
    limits: Limits,
    /// Learns what a straggler is from every run of the executor.
    hedger: Option<Hedger>,
    /// What the calls of every run spent against the spending limit.
    spending: Option<Arc<limit::Spending>>,
    /// Checks answers against their request's schema (and for truncation).
    checker: check::Checker,
    /// Set once the provider's check has been started.
    checked: OnceLock<()>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("provider", &self.provider.name())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Builds the event only when someone listens.
    fn emit(&self, event: impl FnOnce() -> Event) {
        if let Some(sink) = &self.config.events {
            sink(&event());
        }
    }

    /// Hands a finished result to the result sink, if there is one.
    fn tell(&self, result: &TaskResult) {
        if let Some(sink) = &self.config.results {
            sink(result);
        }
    }
}

/// Runs tasks on one provider in parallel; cheap to clone.
#[derive(Clone, Debug)]
pub struct Executor {
    shared: Arc<Shared>,
}

impl Executor {
    /// An executor with default settings (see [`ExecutorBuilder`]).
    pub fn new(provider: impl Provider) -> Self {
        Self::builder(provider).build()
    }

    /// Settings for an executor on `provider`, starting from the defaults.
    pub fn builder(provider: impl Provider) -> ExecutorBuilder {
        ExecutorBuilder::new(Arc::new(provider))
    }

    /// Like [`Self::builder`], for a provider chosen at run time.
    pub fn builder_for(provider: Arc<dyn Provider>) -> ExecutorBuilder {
        ExecutorBuilder::new(provider)
    }

    /// The provider every call goes to.
    pub fn provider(&self) -> &dyn Provider {
        &*self.shared.provider
    }

    /// The concurrency limit in force now (it adapts to the provider's push-back).
    pub fn concurrency_limit(&self) -> usize {
        self.shared.limits.concurrency.limit()
    }

    fn start_run(&self, release: Release) -> Arc<Run> {
        self.check_provider_once();
        let config = &self.shared.config;
        let epoch = history::Epoch::now();
        Arc::new(Run {
            exec: Arc::clone(&self.shared),
            cancel: config.cancel.child_token(),
            drain: config.drain.child_token(),
            stop: OnceLock::new(),
            breaker: CircuitBreaker::new(config.breaker_threshold),
            counters: Counters::default(),
            seed: config.seed.unwrap_or_else(|| fastrand::u64(..)),
            epoch,
            deadline: config.deadline.map(|limit| epoch.instant + limit),
            hold_slots: matches!(release, Release::Held),
            span: telemetry::run_span(self.shared.provider.name()),
        })
    }

    /// While the probe window is closed, asks the provider (once per executor)
    /// whether its credentials and model are good: a yes opens the window at
    /// once, so a healthy run does not wait one latency for its first answer.
    /// Runs beside the probe calls, so it never delays them.
    fn check_provider_once(&self) {
        if self.shared.limits.concurrency.is_proven() || self.shared.checked.set(()).is_err() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let shared = Arc::clone(&self.shared);
        runtime.spawn(async move {
            if shared.provider.check().await == Check::Ready
                && let Some(limit) = shared.limits.concurrency.prove()
            {
                shared.emit(|| Event::ConcurrencyChanged { limit });
            }
        });
    }

    fn channel_capacity(&self) -> usize {
        self.shared.config.concurrency.clamp(16, 1024)
    }

    /// Runs every task and returns a report with one result per task, in task
    /// order. Tasks are pulled lazily: an iterator over a huge file is read only
    /// as fast as the limits allow.
    pub async fn run<I>(&self, tasks: I) -> Report
    where
        I: IntoIterator,
        I::Item: Into<Task>,
    {
        self.run_stream(futures_util::stream::iter(tasks.into_iter().map(Into::into))).await
    }

    /// [`Self::run`] over an async stream of tasks.
    pub async fn run_stream<S>(&self, tasks: S) -> Report
    where
        S: Stream<Item = Task>,
    {
        let (sender, mut receiver) = mpsc::channel(self.channel_capacity());
        let driver =
            driver::drive(self.start_run(Release::Unordered), tasks, sender, Release::Unordered);
        let collect = async {
            let mut results = Vec::new();
            while let Some(delivery) = receiver.recv().await {
                results.push(delivery.result);
            }
            results
        };
        let (totals, mut results) = tokio::join!(driver, collect);
        results.sort_unstable_by_key(|r| r.index);
        Report { results, totals }
    }

    /// Runs the tasks in the background and yields results as they finish.
    /// Must be called within a tokio runtime. Dropping the stream cancels the run.
    pub fn stream<S>(&self, tasks: S) -> Results
    where
        S: Stream<Item = Task> + Send + 'static,
    {
        Results(self.spawn_run(tasks, Release::Unordered))
    }

    /// Like [`Self::stream`], but each result keeps the concurrency slot its
    /// call used until the [`HeldResult`] is dropped. Drop it once the result is
    /// safe (committed to a store): then a crash can lose at most `concurrency`
    /// calls — those in flight and those finished but not yet stored together.
    /// Results with no call behind them (settled tasks, tasks not run) hold none.
    pub fn stream_held<S>(&self, tasks: S) -> HeldResults
    where
        S: Stream<Item = Task> + Send + 'static,
    {
        HeldResults(self.spawn_run(tasks, Release::Held))
    }

    /// Like [`Self::stream`], but yields results in task order, each as soon as
    /// every earlier one is out. This throttles launches: tasks run at most the
    /// order window ahead of the first unreleased result, so memory stays
    /// bounded when one task is slow — and while it is slow, the tasks past its
    /// window wait. Use it where the results cannot be stored and reordered
    /// (see the module documentation).
    pub fn stream_ordered<S>(&self, tasks: S) -> Results
    where
        S: Stream<Item = Task> + Send + 'static,
    {
        let config = &self.shared.config;
        let window = config.order_window.unwrap_or(config.concurrency.saturating_mul(4).max(64));
        Results(self.spawn_run(tasks, Release::Ordered { window }))
    }

    fn spawn_run<S>(&self, tasks: S, release: Release) -> Background
    where
        S: Stream<Item = Task> + Send + 'static,
    {
        let (sender, receiver) = mpsc::channel(self.channel_capacity());
        let driver = tokio::spawn(driver::drive(self.start_run(release), tasks, sender, release));
        Background { receiver, driver }
    }
}

/// A finished result on its way out, with the slot its call used when held.
#[derive(Debug)]
pub(crate) struct Delivery {
    result: TaskResult,
    slot: Option<Slot>,
}

/// The concurrency slot a finished call used; freed when dropped.
#[derive(Debug)]
pub struct Slot {
    /// Held only to be dropped.
    _permit: limit::Permit,
}

/// A result from [`Executor::stream_held`]: drop `slot` (or the whole value)
/// once the result is safe.
#[derive(Debug)]
#[must_use = "dropping it at once frees the slot before the result is safe"]
pub struct HeldResult {
    /// The task's result.
    pub result: TaskResult,
    /// `None` for results with no call behind them.
    pub slot: Option<Slot>,
}

#[derive(Debug)]
struct Background {
    receiver: mpsc::Receiver<Delivery>,
    driver: JoinHandle<Totals>,
}

impl Background {
    async fn totals(mut self) -> Totals {
        while self.receiver.recv().await.is_some() {}
        (&mut self.driver).await.unwrap_or_default()
    }
}

/// Results of a background run, as a [`Stream`]. Dropping it cancels the run.
#[derive(Debug)]
pub struct Results(Background);

impl Results {
    /// The run's totals, once it has ended; results not yet read are discarded.
    pub async fn totals(self) -> Totals {
        self.0.totals().await
    }
}

impl Stream for Results {
    type Item = TaskResult;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TaskResult>> {
        self.0.receiver.poll_recv(cx).map(|d| d.map(|d| d.result))
    }
}

/// Results of [`Executor::stream_held`], as a [`Stream`]. Dropping it cancels the run.
#[derive(Debug)]
pub struct HeldResults(Background);

impl HeldResults {
    /// The run's totals, once it has ended; results not yet read are discarded.
    pub async fn totals(self) -> Totals {
        self.0.totals().await
    }
}

impl Stream for HeldResults {
    type Item = HeldResult;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<HeldResult>> {
        self.0
            .receiver
            .poll_recv(cx)
            .map(|d| d.map(|d| HeldResult { result: d.result, slot: d.slot }))
    }
}
