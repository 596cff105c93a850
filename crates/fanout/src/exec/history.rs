//! What each call of a task did: every attempt and hedge, when it ran and how
//! it ended, kept with the task's result (see [`TaskResult::calls`](crate::TaskResult::calls)).
//!
//! A call is logged when it ends, or when its future is dropped unfinished (a
//! hedge outrun, a task cut by its timeout or the deadline): a [`CallLog`]
//! entry records itself as cancelled on drop, so the history of a cut task is
//! as complete as that of a finished one. The log lives outside the task's
//! future for the same reason.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::time::Instant;

use crate::provider::{ErrorKind, Progress, ProviderError, Usage};

/// Why a call was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallRole {
    /// The task's first attempt.
    First,
    /// An attempt after a failure (an error, a 429, an answer cut off).
    Retry,
    /// An attempt that sends an answer breaking its JSON Schema back to be mended.
    Repair,
    /// A duplicate of a straggling call; the first answer wins.
    Hedge,
}

/// How a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "end")]
pub enum CallEnd {
    /// An answer came (it may still have been refused by the schema check).
    Answered,
    /// The call failed.
    Failed {
        /// What kind of failure.
        kind: ErrorKind,
        /// The HTTP status it came with, if any.
        status: Option<u16>,
    },
    /// Dropped before it ended: a hedge outrun, or its task cut short.
    Cancelled,
}

/// One call to the provider: an attempt of a task, or a hedge of one.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct CallRecord {
    /// The task's attempt this call belongs to, 1 for the first (a hedge has
    /// the number of the attempt it duplicates).
    pub attempt: u32,
    /// Why it was sent.
    pub role: CallRole,
    /// When it was sent (the run's wall-clock start plus the executor's
    /// monotonic time since then, so the calls of a run never reorder).
    pub started_at: SystemTime,
    /// From its sending to its end.
    pub elapsed: Duration,
    /// From its sending to its first streamed bytes; `None` when it did not stream.
    pub first_token: Option<Duration>,
    /// How it ended.
    pub end: CallEnd,
    /// Tokens its answer reported; zero unless it answered.
    pub usage: Usage,
}

/// The calls of one task as they end; empty when the executor keeps no history.
#[derive(Debug, Default)]
pub(crate) struct History {
    /// `None` when history is off; then nothing is logged.
    calls: Option<Mutex<Vec<CallRecord>>>,
}

/// Where a run's times are measured from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Epoch {
    pub instant: Instant,
    pub wall: SystemTime,
}

impl Epoch {
    pub(crate) fn now() -> Self {
        Self { instant: Instant::now(), wall: SystemTime::now() }
    }

    fn wall_time(&self, at: Instant) -> SystemTime {
        self.wall + at.saturating_duration_since(self.instant)
    }
}

impl History {
    pub(crate) fn new(enabled: bool) -> Self {
        Self { calls: enabled.then(|| Mutex::new(Vec::with_capacity(1))) }
    }

    /// An entry for a call sent now; it logs the call when finished or dropped.
    pub(crate) fn start<'a>(
        &'a self,
        epoch: &'a Epoch,
        attempt: u32,
        role: CallRole,
        progress: &'a Progress,
    ) -> Option<CallLog<'a>> {
        let calls = self.calls.as_ref()?;
        Some(CallLog { calls, epoch, attempt, role, progress, ended: None })
    }

    /// The calls logged, in the order they were sent.
    pub(crate) fn take(self) -> Vec<CallRecord> {
        let Some(calls) = self.calls else { return Vec::new() };
        let mut calls = calls.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
        calls.sort_by_key(|call| call.started_at);
        calls
    }
}

/// A call being made; logged as cancelled if dropped before [`CallLog::ended`].
pub(crate) struct CallLog<'a> {
    calls: &'a Mutex<Vec<CallRecord>>,
    epoch: &'a Epoch,
    attempt: u32,
    role: CallRole,
    progress: &'a Progress,
    ended: Option<(CallEnd, Usage)>,
}

impl CallLog<'_> {
    /// Logs the call's end.
    pub(crate) fn ended(mut self, result: Result<Usage, &ProviderError>) {
        self.ended = Some(match result {
            Ok(usage) => (CallEnd::Answered, usage),
            Err(error) => {
                (CallEnd::Failed { kind: error.kind(), status: error.status() }, Usage::default())
            }
        });
    }
}

impl Drop for CallLog<'_> {
    fn drop(&mut self) {
        let (end, usage) = self.ended.take().unwrap_or((CallEnd::Cancelled, Usage::default()));
        let sent = self.progress.sent();
        let record = CallRecord {
            attempt: self.attempt,
            role: self.role,
            started_at: self.epoch.wall_time(sent),
            elapsed: sent.elapsed(),
            first_token: self.progress.first_activity(),
            end,
            usage,
        };
        self.calls.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(record);
    }
}
