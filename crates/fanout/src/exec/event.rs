//! Events the executor emits while it works: for progress displays, logs, and
//! writing results as they finish.

use std::sync::Arc;
use std::time::Duration;

use crate::provider::{ProviderError, Usage};
use crate::task::{Status, TaskId};

/// Something the executor did or saw, as it happened. New events may come:
/// match with a wildcard arm.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Event {
    /// An attempt was sent.
    Started {
        /// The task's position in the input.
        index: usize,
        /// The task's id.
        id: TaskId,
        /// The attempt's number, 1 for the first.
        attempt: u32,
    },
    /// An attempt failed and will be tried again after `delay`.
    Retrying {
        /// The task's position in the input.
        index: usize,
        /// The task's id.
        id: TaskId,
        /// The number of the attempt that failed, 1 for the first.
        attempt: u32,
        /// Why it failed.
        error: ProviderError,
        /// The wait before the next attempt.
        delay: Duration,
    },
    /// An answer did not match the request's JSON Schema, and the model is
    /// asked again with the validation errors (a repair, not a retry).
    Repairing {
        /// The task's position in the input.
        index: usize,
        /// The task's id.
        id: TaskId,
        /// The number of the attempt whose answer is repaired, 1 for the first.
        attempt: u32,
        /// What the validation found.
        error: ProviderError,
    },
    /// A slow attempt got a duplicate.
    Hedged {
        /// The task's position in the input.
        index: usize,
        /// The task's id.
        id: TaskId,
        /// The number of the attempt that was duplicated.
        attempt: u32,
    },
    /// A 429 paused every task of the provider for `duration`.
    Paused {
        /// How long no call is sent.
        duration: Duration,
        /// The 429 that caused the pause.
        error: ProviderError,
    },
    /// The adaptive concurrency limit moved.
    ConcurrencyChanged {
        /// The most calls in flight from now on.
        limit: usize,
    },
    /// A task ended; its full result comes through the report or result stream.
    Finished {
        /// The task's position in the input.
        index: usize,
        /// The task's id.
        id: TaskId,
        /// How it ended.
        status: Status,
        /// Attempts sent; 0 when it was never sent.
        attempts: u32,
        /// Tokens the answer consumed; zero unless it succeeded.
        usage: Usage,
        /// From the first launch to the answer; `None` unless it succeeded.
        latency: Option<Duration>,
    },
}

/// Receives every event, on whichever thread produced it; keep it quick.
pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

/// Receives every finished result, a run's task or a branch's call, with
/// its call history; on whichever thread produced it, so keep it quick.
pub type ResultSink = Arc<dyn Fn(&crate::TaskResult) + Send + Sync>;
