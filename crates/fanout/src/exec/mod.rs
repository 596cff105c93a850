//! The executor: many provider calls at once, under limits, with every result kept.
//!
//! An [`Executor`] wraps one provider and the limits that protect it. Each run
//! pulls tasks lazily, launches them under the concurrency cap and the RPM/TPM
//! buckets, retries what is retryable, honours 429 pauses across all tasks, and
//! reports one [`Outcome`](crate::Outcome) per task:
//! - [`Executor::run`] returns a [`Report`] in task order;
//! - [`Executor::stream`] yields results as they finish;
//! - [`Executor::stream_ordered`] yields them in task order as soon as the prefix
//!   is complete, holding back at most the order window.
//!
//! Limits (concurrency, RPM, TPM, the 429 pause) belong to the executor and are
//! shared by all its runs; the circuit breaker, deadline and counters belong to
//! each run.

mod attempt;
mod breaker;
mod builder;
mod driver;
pub mod event;
pub mod hedge;
pub mod limit;
mod order;
pub mod report;
pub mod retry;

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::provider::Provider;
use crate::task::{Task, TaskResult};
use attempt::{Counters, Run};
use breaker::CircuitBreaker;
use builder::Config;
pub use builder::ExecutorBuilder;
use event::Event;
use hedge::Hedger;
use limit::Limits;
use report::{Report, Totals};

/// What every run of an executor shares.
struct Shared {
    provider: Arc<dyn Provider>,
    config: Config,
    limits: Limits,
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

    pub fn builder(provider: impl Provider) -> ExecutorBuilder {
        ExecutorBuilder::new(Arc::new(provider))
    }

    /// Like [`Self::builder`], for a provider chosen at run time.
    pub fn builder_for(provider: Arc<dyn Provider>) -> ExecutorBuilder {
        ExecutorBuilder::new(provider)
    }

    pub fn provider(&self) -> &dyn Provider {
        &*self.shared.provider
    }

    /// The concurrency limit in force now (it adapts to the provider's push-back).
    pub fn concurrency_limit(&self) -> usize {
        self.shared.limits.concurrency.limit()
    }

    fn start_run(&self) -> Arc<Run> {
        let config = &self.shared.config;
        let started = Instant::now();
        Arc::new(Run {
            exec: Arc::clone(&self.shared),
            cancel: config.cancel.child_token(),
            drain: config.drain.child_token(),
            stop: OnceLock::new(),
            breaker: CircuitBreaker::new(config.breaker_threshold),
            hedger: config.hedge.map(Hedger::new),
            counters: Counters::default(),
            seed: config.seed.unwrap_or_else(|| fastrand::u64(..)),
            started,
            deadline: config.deadline.map(|limit| started + limit),
        })
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
        let driver = driver::drive(self.start_run(), tasks, sender, None);
        let collect = async {
            let mut results = Vec::new();
            while let Some(result) = receiver.recv().await {
                results.push(result);
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
        self.spawn_run(tasks, None)
    }

    /// Like [`Self::stream`], but yields results in task order, each as soon as
    /// every earlier one is out. Tasks run at most the order window ahead of the
    /// first unreleased result, so memory stays bounded when one task is slow.
    pub fn stream_ordered<S>(&self, tasks: S) -> Results
    where
        S: Stream<Item = Task> + Send + 'static,
    {
        let config = &self.shared.config;
        let window = config.order_window.unwrap_or(config.concurrency.saturating_mul(4).max(64));
        self.spawn_run(tasks, Some(window))
    }

    fn spawn_run<S>(&self, tasks: S, order_window: Option<usize>) -> Results
    where
        S: Stream<Item = Task> + Send + 'static,
    {
        let (sender, receiver) = mpsc::channel(self.channel_capacity());
        let driver = tokio::spawn(driver::drive(self.start_run(), tasks, sender, order_window));
        Results { receiver, driver }
    }
}

/// Results of a background run, as a [`Stream`].
#[derive(Debug)]
pub struct Results {
    receiver: mpsc::Receiver<TaskResult>,
    driver: JoinHandle<Totals>,
}

impl Results {
    /// The run's totals, once it has ended; results not yet read are discarded.
    pub async fn totals(mut self) -> Totals {
        while self.receiver.recv().await.is_some() {}
        (&mut self.driver).await.unwrap_or_default()
    }
}

impl Stream for Results {
    type Item = TaskResult;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TaskResult>> {
        self.receiver.poll_recv(cx)
    }
}
