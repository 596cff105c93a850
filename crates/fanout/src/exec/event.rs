//! Events the executor emits while it works: for progress displays, logs, and
//! writing results as they finish.

use std::sync::Arc;
use std::time::Duration;

use crate::provider::{ProviderError, Usage};
use crate::task::{Status, TaskId};

#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Event {
    /// An attempt was sent.
    Started { index: usize, id: TaskId, attempt: u32 },
    /// An attempt failed and will be tried again after `delay`.
    Retrying { index: usize, id: TaskId, attempt: u32, error: ProviderError, delay: Duration },
    /// A slow attempt got a duplicate.
    Hedged { index: usize, id: TaskId, attempt: u32 },
    /// A 429 paused every task of the provider for `duration`.
    Paused { duration: Duration, error: ProviderError },
    /// The adaptive concurrency limit moved.
    ConcurrencyChanged { limit: usize },
    /// A task ended; its full result comes through the report or result stream.
    Finished {
        index: usize,
        id: TaskId,
        status: Status,
        attempts: u32,
        usage: Usage,
        latency: Option<Duration>,
    },
}

/// Receives every event, on whichever thread produced it; keep it quick.
pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;
