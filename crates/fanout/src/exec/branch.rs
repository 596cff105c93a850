//! Branches: any async work (an agent, a chain of calls, a user's own code)
//! run side by side, with every model call inside any of them going through
//! the executor's one call path.
//!
//! The split is the executor's: *task-level orchestration* here (branch ids,
//! the per-branch timeout, the run's deadline, cancellation, results in order
//! or as they finish), *call-level policy* in [`Calls`], which is the same
//! path a batch row takes (concurrency cap, RPM, TPM, the shared 429 pause,
//! retries, the circuit breaker, hedging, accounting). Ten agents making thirty
//! calls each share one concurrency cap and one RPM budget, because their
//! calls all wait on the executor's limits, not on per-branch copies.
//!
//! A branch that is cut (its timeout, the deadline, a cancellation) first sees
//! its model calls end at once (their outcome says why), and gets
//! [`BRANCH_GRACE`] to return what it has: an agent returns its transcript so
//! far. A branch that does not return by then is dropped and reported as cut,
//! without a value.
//!
//! ```no_run
//! use fanout::agent::files::AllowedDirs;
//! use fanout::{Agent, Branch, Executor, OpenAi, Request, Toolbox};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let executor = Executor::builder(OpenAi::from_env("gpt-4o-mini").build()?).rpm(100).build();
//! let mut tools = Toolbox::new();
//! for tool in AllowedDirs::new(["docs".into()])?.tools() {
//!     tools.add(tool);
//! }
//! let agent = Agent::new(tools).max_turns(8);
//! let topics = ["history", "economy", "culture"];
//! let branches = topics.map(|topic| {
//!     let agent = agent.clone();
//!     Branch::new(topic, move |calls| async move {
//!         agent.run(&calls, Request::user(format!("Research the {topic} of Lyon from the files."))).await
//!     })
//! });
//! let report = executor.branches(branches).await; // or stream_branches, as they finish
//! for result in &report.results {
//!     println!("{}: {:?}", result.id, result.outcome.value().and_then(|run| run.answer()));
//! }
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{FutureExt, Stream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Executor;
use super::attempt::{Call, Run, Stop};
use super::driver::{Release, finish};
use super::history::History;
use super::report::{Tally, Totals};
use super::telemetry;
use crate::provider::Request;
use crate::task::{NotRun, Outcome, TaskId, TaskResult, Timeout};

/// How long a cut branch may take to return what it has before it is dropped.
pub const BRANCH_GRACE: Duration = Duration::from_millis(200);

type BranchWork<T> = Box<dyn FnOnce(Calls) -> Pin<Box<dyn Future<Output = T> + Send>> + Send>;

/// One branch: an id and the async work, given a [`Calls`] handle for its model calls.
pub struct Branch<T> {
    id: TaskId,
    work: BranchWork<T>,
}

impl<T> Branch<T> {
    /// A branch named `id` that runs `work`.
    pub fn new<F, Fut>(id: impl Into<TaskId>, work: F) -> Self
    where
        F: FnOnce(Calls) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        Self { id: id.into(), work: Box::new(move |calls| Box::pin(work(calls))) }
    }
}

impl<T> std::fmt::Debug for Branch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Branch").field("id", &self.id).finish_non_exhaustive()
    }
}

/// Model calls from inside a branch, each through the executor's call path.
/// Cheap to clone: a branch may make calls from several futures at once.
#[derive(Clone, Debug)]
pub struct Calls {
    run: Arc<Run>,
    index: usize,
    id: TaskId,
    /// Cancelled when the branch is cut: its calls and tools end with it.
    cut: CancellationToken,
    tally: Arc<Mutex<Tally>>,
    /// Calls started through this branch: each call's own retry jitter.
    calls_made: Arc<AtomicU64>,
}

impl Calls {
    /// Sends `request` through the executor's limits, retries and hedging, and
    /// returns its outcome. The call counts in the run's totals, even when it
    /// was cut before it could start. Once the run is drained (the
    /// executor's drain token), no new call starts: `NotRun(Cancelled)`.
    pub async fn complete(&self, request: Request) -> Outcome {
        self.complete_result(request).await.outcome
    }

    /// [`Self::complete`], with the branch's index and id and the history of
    /// the call's attempts ([`TaskResult::calls`]).
    pub async fn complete_result(&self, request: Request) -> TaskResult {
        let history = History::new(self.run.exec.config.history);
        let outcome = self.call(&request, &history).await;
        let mut result = TaskResult::new(self.index, self.id.clone(), outcome);
        result.calls = history.take();
        result.request = super::attempt::kept_request(&self.run.exec.config, Arc::new(request));
        self.run.exec.tell(&result);
        self.tally.lock().unwrap().add(&result);
        result
    }

    async fn call(&self, request: &Request, history: &History) -> Outcome {
        let exec = &self.run.exec;
        let interrupted = |attempts| self.interrupted(attempts);
        // A drained run starts no new call; the branch may still return.
        if self.run.drain.is_cancelled() {
            return Outcome::NotRun(NotRun::Cancelled);
        }
        let permit = tokio::select! {
            biased;
            () = self.cut.cancelled() => return interrupted(0),
            () = self.run.drain.cancelled() => return Outcome::NotRun(NotRun::Cancelled),
            permit = exec.limits.concurrency.acquire() => permit,
        };
        let mut slot = Some(permit);
        let sequence = self.calls_made.fetch_add(1, Ordering::Relaxed);
        let call = Call { run: &self.run, index: self.index, id: &self.id, request, sequence };
        call.outcome(&mut slot, history, None, &self.cut, interrupted).await
    }

    /// The branch's id.
    pub fn id(&self) -> &TaskId {
        &self.id
    }

    /// Resolves when the branch is cut (its timeout, the run's deadline, or a
    /// cancellation): long work of the branch's own, such as a tool call,
    /// should end with it.
    pub async fn cut(&self) {
        self.cut.cancelled().await;
    }

    /// What a call cut short now would become: why the branch was cut.
    pub fn cut_reason(&self) -> Outcome {
        self.interrupted(0)
    }

    /// What a call cut short by the branch's end became.
    fn interrupted(&self, attempts: u32) -> Outcome {
        match self.run.stopped() {
            Some(Stop::Deadline) => Outcome::TimedOut { timeout: Timeout::Deadline, attempts },
            Some(Stop::Cancelled) => Outcome::Cancelled { attempts },
            None => Outcome::TimedOut { timeout: Timeout::Task, attempts },
        }
    }
}

/// How a branch ended.
#[derive(Clone, Debug, PartialEq)]
pub enum BranchOutcome<T> {
    /// The branch returned this (possibly after being cut, within the grace).
    Finished(T),
    /// Cut by its own timeout or the run's deadline, and did not return in time.
    TimedOut(Timeout),
    /// Cancelled, and did not return in time.
    Cancelled,
    /// The branch panicked; the message.
    Panicked(String),
}

impl<T> BranchOutcome<T> {
    /// The value, when the branch returned one.
    pub fn value(&self) -> Option<&T> {
        match self {
            Self::Finished(value) => Some(value),
            _ => None,
        }
    }
}

/// One branch's result, with its place among the branches and its id.
#[derive(Clone, Debug, PartialEq)]
pub struct BranchResult<T> {
    /// The branch's position in the input.
    pub index: usize,
    /// The branch's id.
    pub id: TaskId,
    /// How it ended.
    pub outcome: BranchOutcome<T>,
}

/// Every branch's result in input order, and the totals of the model calls
/// they made (`calls.tasks` counts calls, not branches).
#[derive(Clone, Debug, PartialEq)]
pub struct BranchReport<T> {
    /// One result per branch, in input order.
    pub results: Vec<BranchResult<T>>,
    /// The model calls of every branch together.
    pub calls: Totals,
}

/// Branch results as they finish, as a [`Stream`]; dropping it cancels the branches.
#[derive(Debug)]
pub struct BranchResults<T> {
    receiver: mpsc::UnboundedReceiver<BranchResult<T>>,
    driver: tokio::task::JoinHandle<Totals>,
}

impl<T> BranchResults<T> {
    /// The totals of the branches' calls, once every branch has ended.
    pub async fn totals(mut self) -> Totals {
        while self.receiver.recv().await.is_some() {}
        (&mut self.driver).await.unwrap_or_default()
    }
}

impl<T> Stream for BranchResults<T> {
    type Item = BranchResult<T>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<BranchResult<T>>> {
        self.receiver.poll_recv(cx)
    }
}

impl<T> Drop for BranchResults<T> {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Executor {
    /// Runs every branch at once and returns their results in input order.
    /// The executor's task timeout bounds each branch, its deadline the whole
    /// run; every model call a branch makes through its [`Calls`] shares the
    /// executor's limits with every other branch (and every other run).
    pub async fn branches<T>(
        &self,
        branches: impl IntoIterator<Item = Branch<T>>,
    ) -> BranchReport<T>
    where
        T: Send + 'static,
    {
        let mut stream = self.stream_branches(branches);
        let mut results = Vec::new();
        while let Some(result) = stream.receiver.recv().await {
            results.push(result);
        }
        let calls = (&mut stream.driver).await.unwrap_or_default();
        results.sort_unstable_by_key(|r| r.index);
        BranchReport { results, calls }
    }

    /// Like [`Self::branches`], yielding each branch's result as it finishes.
    /// Must be called within a tokio runtime.
    pub fn stream_branches<T>(
        &self,
        branches: impl IntoIterator<Item = Branch<T>>,
    ) -> BranchResults<T>
    where
        T: Send + 'static,
    {
        let run = self.start_run(Release::Unordered);
        let (sender, receiver) = mpsc::unbounded_channel();
        let branches: Vec<Branch<T>> = branches.into_iter().collect();
        let driver = tokio::spawn(drive_branches(run, branches, sender));
        BranchResults { receiver, driver }
    }
}

async fn drive_branches<T: Send + 'static>(
    run: Arc<Run>,
    branches: Vec<Branch<T>>,
    sender: mpsc::UnboundedSender<BranchResult<T>>,
) -> Totals {
    let tally = Arc::new(Mutex::new(Tally::new()));
    let mut running = JoinSet::new();
    for (index, Branch { id, work }) in branches.into_iter().enumerate() {
        let calls = Calls {
            run: Arc::clone(&run),
            index,
            id,
            cut: run.cancel.child_token(),
            tally: Arc::clone(&tally),
            calls_made: Arc::default(),
        };
        running.spawn(run_branch(calls, work));
    }
    let deadline = run.deadline;
    let mut deadline = std::pin::pin!(async move {
        match deadline {
            Some(at) => sleep_until(at).await,
            None => std::future::pending().await,
        }
    });
    loop {
        tokio::select! {
            () = &mut deadline, if run.stop.get().is_none() => {
                let _first_stop_wins = run.stop.set(Stop::Deadline);
                run.cancel.cancel();
            }
            () = run.cancel.cancelled(), if run.stop.get().is_none() => {
                let _first_stop_wins = run.stop.set(Stop::Cancelled);
            }
            joined = running.join_next() => match joined {
                Some(Ok(result)) => {
                    // Nobody listening: the branches still end, and are counted.
                    let _ = sender.send(result);
                }
                Some(Err(error)) => tracing::error!(%error, "a branch ended without a result"),
                None => break,
            },
        }
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    finish(&run, tally)
}

async fn run_branch<T: Send + 'static>(calls: Calls, work: BranchWork<T>) -> BranchResult<T> {
    let (index, id, cut) = (calls.index, calls.id.clone(), calls.cut.clone());
    let run = Arc::clone(&calls.run);
    let limit = run.exec.config.task_timeout;
    let span = telemetry::task_span(&run.span, index, &id);
    let work = AssertUnwindSafe(work(calls)).catch_unwind().instrument(span.clone());
    let mut work = std::pin::pin!(work);
    let timed_out = async {
        match limit {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    let finished = tokio::select! {
        biased;
        done = &mut work => Some(done),
        () = cut.cancelled() => None,
        () = timed_out => None,
    };
    let finished = match finished {
        Some(done) => Some(done),
        None => {
            // Cut: its calls end now, and it gets a moment to return what it has.
            cut.cancel();
            timeout(BRANCH_GRACE, &mut work).await.ok()
        }
    };
    let outcome = match finished {
        Some(Ok(value)) => BranchOutcome::Finished(value),
        Some(Err(panic)) => BranchOutcome::Panicked(super::attempt::panic_message(&*panic)),
        None => match run.stopped() {
            Some(Stop::Deadline) => BranchOutcome::TimedOut(Timeout::Deadline),
            Some(Stop::Cancelled) => BranchOutcome::Cancelled,
            None => BranchOutcome::TimedOut(Timeout::Task),
        },
    };
    let (status, finished) = match &outcome {
        BranchOutcome::Finished(_) => ("finished", true),
        BranchOutcome::Panicked(_) => ("panicked", false),
        BranchOutcome::TimedOut(_) => ("timed_out", false),
        BranchOutcome::Cancelled => ("cancelled", false),
    };
    telemetry::branch_ended(&span, status, finished);
    BranchResult { index, id, outcome }
}
