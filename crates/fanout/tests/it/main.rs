//! Integration tests. The executor's are all under tokio's paused clock: they
//! are exact and never sleep. The providers' run against wiremock, and the
//! executor with a real provider against `fanout-mock`, all on 127.0.0.1.

mod agents;
mod anthropic;
mod batches;
mod breaker;
mod budget;
mod deadline;
mod hedge;
mod history;
mod images;
mod limits;
mod mcp;
mod memory;
mod mock_server;
mod openai;
mod order;
mod patterns;
mod rate_limit;
mod report;
mod retry;
mod shared_limits;
mod stragglers;
mod structured;
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

/// Whether calls started at `times` (in order) keep to `rpm`: in any window,
/// at most the burst plus what the rate refills in that window.
pub fn calls_fit_the_rate(times: &[Instant], rpm: u64) -> Result<(), String> {
    let burst = rpm.div_ceil(60) as f64;
    let per_second = rpm as f64 / 60.0;
    for i in 0..times.len() {
        for j in i..times.len() {
            let window = (times[j] - times[i]).as_secs_f64();
            // Calls wake on millisecond timer ticks, so one may be up to a
            // tick late (never early), bringing the next one that much closer.
            let allowed = burst + per_second * (window + 0.001) + 1e-9;
            if (j - i + 1) as f64 > allowed {
                return Err(format!("{} calls in {window}s with rpm {rpm}", j - i + 1));
            }
        }
    }
    Ok(())
}

/// Whether calls started at these times, each using this many tokens, keep
/// to `tpm`: in any window, at most the budget plus what refills in it.
pub fn tokens_fit_the_budget(calls: &[(Instant, f64)], tpm: u64) -> Result<(), String> {
    let per_second = tpm as f64 / 60.0;
    for i in 0..calls.len() {
        let mut tokens = 0.0;
        for j in i..calls.len() {
            tokens += calls[j].1;
            let window = (calls[j].0 - calls[i].0).as_secs_f64();
            // One millisecond of slack: timers fire on millisecond ticks.
            let allowed = tpm as f64 + per_second * (window + 0.001) + 1e-6;
            if tokens > allowed {
                return Err(format!("{tokens} tokens in {window}s at {tpm} TPM"));
            }
        }
    }
    Ok(())
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
