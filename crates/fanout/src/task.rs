//! Tasks going in, outcomes coming out.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::exec::history::CallRecord;
use crate::provider::{ProviderError, Request, Response, Usage};

/// A task's stable identifier: given by the caller, or the task's index.
///
/// Cheap to clone: it travels with every event and result.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(Arc<str>);

impl TaskId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl From<&str> for TaskId {
    fn from(id: &str) -> Self {
        Self(id.into())
    }
}

impl From<String> for TaskId {
    fn from(id: String) -> Self {
        Self(id.into())
    }
}

impl From<usize> for TaskId {
    fn from(index: usize) -> Self {
        Self(index.to_string().into())
    }
}

impl Serialize for TaskId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// One unit of work: an owned, immutable request and, optionally, its id.
///
/// A task without an id is known by its index in the input.
#[derive(Clone, Debug)]
pub struct Task {
    pub(crate) id: Option<TaskId>,
    pub(crate) work: Work,
}

#[derive(Clone, Debug)]
pub(crate) enum Work {
    Call(Arc<Request>),
    /// Decided before the run: passes through to the results, in order, uncalled.
    /// Boxed: most tasks are calls, and a task should stay small in the queue.
    Settled(Box<Outcome>),
}

impl Task {
    /// A task for `request`, known by its index in the input.
    pub fn new(request: Request) -> Self {
        Self { id: None, work: Work::Call(Arc::new(request)) }
    }

    /// A task for `request` with the caller's own id.
    pub fn with_id(id: impl Into<TaskId>, request: Request) -> Self {
        Self { id: Some(id.into()), work: Work::Call(Arc::new(request)) }
    }

    /// A task whose outcome is already known — an input row that could not be
    /// turned into a request, or a result restored from an earlier run. It takes
    /// its place in the results (and the ordered stream) without a call.
    pub fn settled(id: impl Into<TaskId>, outcome: Outcome) -> Self {
        Self { id: Some(id.into()), work: Work::Settled(Box::new(outcome)) }
    }

    /// The caller's id, when it gave one.
    pub fn id(&self) -> Option<&TaskId> {
        self.id.as_ref()
    }

    /// The outcome of a settled task ([`Task::settled`]).
    pub fn settled_outcome(&self) -> Option<&Outcome> {
        match &self.work {
            Work::Settled(outcome) => Some(outcome),
            Work::Call(_) => None,
        }
    }

    /// The request, unless the task is settled.
    pub fn request(&self) -> Option<&Request> {
        match &self.work {
            Work::Call(request) => Some(request),
            Work::Settled(_) => None,
        }
    }
}

impl From<Request> for Task {
    fn from(request: Request) -> Self {
        Self::new(request)
    }
}

/// Which clock ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Timeout {
    /// The task's own time limit, all attempts together.
    Task,
    /// The run's global deadline.
    Deadline,
}

/// Why a task was never sent.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason", content = "error")]
pub enum NotRun {
    /// The global deadline passed before the task's turn.
    Deadline,
    /// The run was cancelled before the task's turn.
    Cancelled,
    /// The executor's spending limit would have been exceeded by the task's call.
    BudgetSpent,
    /// Answers showed the job cannot succeed (bad key, unknown model, no quota);
    /// this is the answer that decided it.
    CircuitOpen(ProviderError),
}

impl fmt::Display for NotRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Deadline => f.write_str("deadline passed before it started"),
            Self::Cancelled => f.write_str("cancelled before it started"),
            Self::BudgetSpent => f.write_str("not run: the spending limit is reached"),
            Self::CircuitOpen(cause) => write!(f, "not run: the job cannot succeed: {cause}"),
        }
    }
}

/// A successful task (`non_exhaustive`: build one with [`Success::new`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Success {
    /// The provider's answer.
    pub response: Response,
    /// From the task's first launch to its answer, retries included;
    /// serialized as `latency_ms`, like every command's results.
    #[serde(rename = "latency_ms", serialize_with = "serialize_millis")]
    pub latency: Duration,
    /// Attempts sent, the first included; 429s that were waited out count too.
    pub attempts: u32,
}

impl Success {
    /// A success: the answer, how long the task took, and its attempts.
    pub fn new(response: Response, latency: Duration, attempts: u32) -> Self {
        Self { response, latency, attempts }
    }
}

/// How a task ended. Every task of a run gets exactly one.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
// Successes are the common case: boxing them to shrink the rare failures
// would cost an allocation per answer.
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    /// The task got an answer.
    Succeeded(Success),
    /// The last attempt's error, after retries (if it was retryable) ran out.
    Failed {
        /// The error that ended the last attempt.
        error: ProviderError,
        /// Attempts sent; 0 when the request could never fit the TPM limit.
        attempts: u32,
        /// Tokens of answers that came but were refused (cut off, or not
        /// matching the schema after every repair): paid for all the same.
        #[serde(skip_serializing_if = "Usage::is_zero")]
        usage: Usage,
    },
    /// A time limit ran out before an answer arrived.
    TimedOut {
        /// Which clock ran out.
        timeout: Timeout,
        /// Attempts sent before time ran out.
        attempts: u32,
    },
    /// Cancelled while in flight.
    Cancelled {
        /// Attempts sent before the cancellation.
        attempts: u32,
    },
    /// The task was never sent, and why.
    NotRun(NotRun),
}

/// An outcome's kind, without its payload: for counting and progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// See [`Outcome::Succeeded`].
    Succeeded,
    /// See [`Outcome::Failed`].
    Failed,
    /// See [`Outcome::TimedOut`].
    TimedOut,
    /// See [`Outcome::Cancelled`].
    Cancelled,
    /// See [`Outcome::NotRun`].
    NotRun,
}

impl Outcome {
    /// The outcome's kind, without its payload.
    pub fn status(&self) -> Status {
        match self {
            Self::Succeeded(_) => Status::Succeeded,
            Self::Failed { .. } => Status::Failed,
            Self::TimedOut { .. } => Status::TimedOut,
            Self::Cancelled { .. } => Status::Cancelled,
            Self::NotRun(_) => Status::NotRun,
        }
    }

    /// Whether the task got an answer.
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Succeeded(_))
    }

    /// The success, unless the task ended another way.
    pub fn success(&self) -> Option<&Success> {
        match self {
            Self::Succeeded(success) => Some(success),
            _ => None,
        }
    }

    /// The answer's text, for a success.
    pub fn text(&self) -> Option<&str> {
        self.success().map(|s| s.response.text.as_str())
    }

    /// Tokens the task paid for: its answer's (repairs included), or those of
    /// the answers a failed task refused; zero for a task that got none.
    pub fn usage(&self) -> Usage {
        match self {
            Self::Succeeded(success) => success.response.usage,
            Self::Failed { usage, .. } => *usage,
            _ => Usage::default(),
        }
    }

    /// A failure after `attempts`, with nothing paid for.
    pub fn failed(error: ProviderError, attempts: u32) -> Self {
        Self::Failed { error, attempts, usage: Usage::default() }
    }

    /// What went wrong, in words, for an outcome that is not a success: the
    /// one text every command and pattern shows for it.
    pub fn describe(&self) -> Option<String> {
        match self {
            Self::Succeeded(_) => None,
            Self::Failed { error, .. } => Some(error.to_string()),
            Self::TimedOut { timeout: Timeout::Task, .. } => {
                Some("the task ran out of time".into())
            }
            Self::TimedOut { timeout: Timeout::Deadline, .. } => {
                Some("cut off by the deadline".into())
            }
            Self::Cancelled { .. } => Some("cancelled".into()),
            Self::NotRun(reason) => Some(reason.to_string()),
        }
    }

    /// The outcome as a [`Failure`], unless it is a success.
    pub fn failure(&self) -> Option<Failure> {
        (!self.is_success()).then(|| Failure::Task(Box::new(self.clone())))
    }

    /// Attempts sent for the task; 0 when it was never sent.
    pub fn attempts(&self) -> u32 {
        match self {
            Self::Succeeded(s) => s.attempts,
            Self::Failed { attempts, .. }
            | Self::TimedOut { attempts, .. }
            | Self::Cancelled { attempts } => *attempts,
            Self::NotRun(_) => 0,
        }
    }
}

/// Why a pattern's step has no answer. The task's outcome is kept whole, so
/// its kind (a bad key, a deadline) still decides what the caller does; it
/// serializes as its description.
#[derive(Clone, Debug, PartialEq)]
pub enum Failure {
    /// The task ended without an answer (boxed: an outcome is large).
    Task(Box<Outcome>),
    /// The pattern found no answer in what came back (the judge named no
    /// response, no sample succeeded).
    Pattern(String),
}

impl Failure {
    /// The task's outcome, when a task failed.
    pub fn outcome(&self) -> Option<&Outcome> {
        match self {
            Self::Task(outcome) => Some(outcome),
            Self::Pattern(_) => None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Task(outcome) => f.write_str(&outcome.describe().unwrap_or_default()),
            Self::Pattern(message) => f.write_str(message),
        }
    }
}

impl Serialize for Failure {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// An outcome with the task it belongs to (`non_exhaustive`: see [`TaskResult::new`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct TaskResult {
    /// The task's position in the input.
    pub index: usize,
    /// The caller's id, or the index as text for a task given none.
    pub id: TaskId,
    /// How the task ended; flattened into the result when serialized.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Every call the task made, in the order they were sent: its attempts
    /// and their hedges, how long each took and how it ended. Empty when the
    /// executor keeps no history, or the task made no call.
    #[serde(skip)]
    pub calls: Vec<CallRecord>,
    /// The request the task sent (its first attempt's, before any repair),
    /// when the executor keeps them ([`ExecutorBuilder::keep_requests`](crate::ExecutorBuilder::keep_requests));
    /// never for a settled task, a relayed request (a proxy's stream), or a
    /// result rebuilt from a store.
    #[serde(skip)]
    pub request: Option<Arc<Request>>,
}

impl TaskResult {
    /// The outcome of the task at `index` with this id, with no call history.
    pub fn new(index: usize, id: TaskId, outcome: Outcome) -> Self {
        Self { index, id, outcome, calls: Vec::new(), request: None }
    }
}

/// Milliseconds to the microsecond (`121.85`, not `121.85022199999999`).
fn serialize_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_micros() as f64 / 1000.0)
}
