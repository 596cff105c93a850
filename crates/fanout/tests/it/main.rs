//! Integration tests. The executor's are all under tokio's paused clock: they
//! are exact and never sleep. The providers' run against wiremock, and the
//! executor with a real provider against `fanout-mock`, all on 127.0.0.1.

mod anthropic;
mod breaker;
mod deadline;
mod hedge;
mod limits;
mod memory;
mod mock_server;
mod openai;
mod order;
mod patterns;
mod rate_limit;
mod report;
mod retry;
mod stragglers;
mod timeouts;
mod tools;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fanout::{Event, ExecutorBuilder, Request};
use tokio::time::Instant;

/// Requests whose prompts are `p0`, `p1`, ...
pub fn prompts(n: usize) -> Vec<Request> {
    (0..n).map(|i| Request::user(format!("p{i}"))).collect()
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A paused current-thread runtime, for property tests that run many schedules.
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap()
}

/// Every event an executor emitted, with the (paused) time it was emitted at.
#[derive(Clone, Debug, Default)]
pub struct Recorder(Arc<Mutex<Vec<(Instant, Event)>>>);

impl Recorder {
    pub fn attach(&self, builder: ExecutorBuilder) -> ExecutorBuilder {
        let events = Arc::clone(&self.0);
        builder.on_event(move |e| events.lock().unwrap().push((Instant::now(), e.clone())))
    }

    pub fn events(&self) -> Vec<(Instant, Event)> {
        self.0.lock().unwrap().clone()
    }

    pub fn concurrency_limits(&self) -> Vec<usize> {
        self.events()
            .into_iter()
            .filter_map(|(_, e)| match e {
                Event::ConcurrencyChanged { limit } => Some(limit),
                _ => None,
            })
            .collect()
    }
}
