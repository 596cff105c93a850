//! `GET /fanout/stats`: the proxy's live counters, all clients together.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use fanout::{Event, Outcome, Usage};
use serde_json::{Value, json};

#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    in_flight: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    /// Calls whose client went away, or that the proxy's stop cut.
    cancelled: AtomicU64,
    // Refused by the proxy itself, without a call: a malformed body, a
    // missing client token, a queue too long to wait in.
    bad_requests: AtomicU64,
    unauthorized: AtomicU64,
    queue_full: AtomicU64,
    /// Upstream calls, retries and hedges included.
    upstream_calls: AtomicU64,
    /// The upstream's 429s, absorbed and retried (a client sees a 429 only
    /// from the proxy's own queue).
    upstream_rate_limited: AtomicU64,
    retries: AtomicU64,
    hedges: AtomicU64,
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
    cached_input_tokens: AtomicU64,
    /// The priced calls' costs, summed, and how many calls used tokens at
    /// a price nobody knows.
    cost: Mutex<Option<f64>>,
    unpriced: AtomicU64,
}

/// What the proxy refused without a call.
#[derive(Clone, Copy, Debug)]
pub enum Refused {
    BadRequest,
    Unauthorized,
    QueueFull,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    pub fn arrived(&self) {
        add(&self.requests, 1);
    }

    pub fn refused(&self, why: Refused) {
        add(
            match why {
                Refused::BadRequest => &self.bad_requests,
                Refused::Unauthorized => &self.unauthorized,
                Refused::QueueFull => &self.queue_full,
            },
            1,
        );
    }

    /// A call taken in: counted in flight until [`InFlight`] is dropped,
    /// which also counts a client that went away.
    pub fn started(&self) -> InFlight<'_> {
        add(&self.in_flight, 1);
        InFlight(self)
    }

    /// A call ended, having cost `cost` (`None`: its model's price is unknown).
    pub fn ended(&self, outcome: &Outcome, cost: Option<f64>) {
        let counter = match outcome {
            Outcome::Succeeded(_) => &self.succeeded,
            Outcome::Cancelled { .. } => &self.cancelled,
            _ => &self.failed,
        };
        add(counter, 1);
        let usage = outcome.usage();
        match cost {
            Some(cost) => *self.cost.lock().expect("never poisoned").get_or_insert(0.0) += cost,
            None if usage.total() > 0 => add(&self.unpriced, 1),
            None => {}
        }
        add(&self.input_tokens, usage.input_tokens);
        add(&self.output_tokens, usage.output_tokens);
        add(&self.cached_input_tokens, usage.cached_input_tokens);
    }

    /// Counts what the executors report: calls, retries, 429s, hedges.
    pub fn observe(&self, event: &Event) {
        match event {
            Event::Started { .. } => add(&self.upstream_calls, 1),
            Event::Retrying { error, .. } => {
                add(&self.retries, 1);
                if error.is_rate_limited() {
                    add(&self.upstream_rate_limited, 1);
                }
            }
            Event::Hedged { .. } => add(&self.hedges, 1),
            _ => {}
        }
    }

    /// The counters as JSON.
    pub fn json(&self, lanes: usize) -> Value {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let usage = Usage {
            cached_input_tokens: get(&self.cached_input_tokens),
            ..Usage::new(get(&self.input_tokens), get(&self.output_tokens))
        };
        json!({
            "requests": get(&self.requests),
            "in_flight": get(&self.in_flight),
            "succeeded": get(&self.succeeded),
            "failed": get(&self.failed),
            "cancelled": get(&self.cancelled),
            "refused": {
                "bad_request": get(&self.bad_requests),
                "unauthorized": get(&self.unauthorized),
                "queue_full": get(&self.queue_full),
            },
            "upstream": {
                "calls": get(&self.upstream_calls),
                "rate_limited": get(&self.upstream_rate_limited),
                "retries": get(&self.retries),
                "hedges": get(&self.hedges),
            },
            "usage": usage,
            "cost": *self.cost.lock().expect("never poisoned"),
            "unpriced_calls": get(&self.unpriced),
            "keys": lanes,
        })
    }
}

/// A call in flight; counted out when dropped.
pub struct InFlight<'a>(&'a Stats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
