//! What a run brings back: one result per task, and totals.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::prices::Price;
use crate::provider::Usage;
use crate::task::{Outcome, Status, TaskId, TaskResult};

/// Latency of successful tasks, launch to answer, retries included. New
/// figures may be added, so it is `non_exhaustive`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Latency {
    /// Median; like every field, serialized in milliseconds.
    #[serde(serialize_with = "millis")]
    pub p50: Duration,
    /// 90th percentile.
    #[serde(serialize_with = "millis")]
    pub p90: Duration,
    /// 99th percentile.
    #[serde(serialize_with = "millis")]
    pub p99: Duration,
    /// The slowest, kept exactly.
    #[serde(serialize_with = "millis")]
    pub max: Duration,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

/// Counts and sums over a whole run (`non_exhaustive`: new counts may be added).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Totals {
    /// Tasks in the run, one per result, settled ones included.
    pub tasks: usize,
    /// Tasks that got an answer.
    pub succeeded: usize,
    /// Tasks that ended with an error.
    pub failed: usize,
    /// Tasks cut off by the task timeout or the deadline.
    pub timed_out: usize,
    /// Tasks cancelled while in flight.
    pub cancelled: usize,
    /// Tasks never sent (deadline, cancellation, open circuit).
    pub not_run: usize,
    /// Tokens of the successful answers.
    pub usage: Usage,
    /// The part of `usage` that the provider did not report and was estimated.
    pub estimated_usage: Usage,
    /// `usage` priced, when the executor was given a price.
    pub cost: Option<f64>,
    /// From the run's start to its end; serialized in milliseconds.
    #[serde(serialize_with = "millis")]
    pub wall: Duration,
    /// Latency of the successful tasks; `None` when none succeeded.
    pub latency: Option<Latency>,
    /// Attempts sent, hedges not included.
    pub calls: u64,
    /// Attempts that were tried again, after an error or a 429.
    pub retries: u64,
    /// Answers that were 429s.
    pub rate_limited: u64,
    /// Duplicate calls sent for stragglers, and how many of them answered first.
    pub hedges: u64,
    /// Hedges that answered before the call they duplicated.
    pub hedges_won: u64,
    /// Answers sent back to the model because they broke the request's JSON Schema.
    pub repairs: u64,
    /// Attempts sent per minute of wall time.
    pub requests_per_minute: f64,
    /// Tokens of the successful answers (input and output) per minute of wall time.
    pub tokens_per_minute: f64,
}

impl Totals {
    /// Whether every task succeeded.
    pub fn all_succeeded(&self) -> bool {
        self.succeeded == self.tasks
    }
}

/// One result per task, in task order, and the run's totals (`non_exhaustive`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Report {
    /// One result per task, in task order.
    pub results: Vec<TaskResult>,
    /// Counts and sums over the whole run.
    pub totals: Totals,
}

impl Report {
    /// The outcome of the task with this id.
    pub fn get(&self, id: &str) -> Option<&Outcome> {
        self.results.iter().find(|r| r.id.as_str() == id).map(|r| &r.outcome)
    }

    /// The successful answers' texts, with their task ids, in task order.
    pub fn texts(&self) -> impl Iterator<Item = (&TaskId, &str)> {
        self.results.iter().filter_map(|r| Some((&r.id, r.outcome.text()?)))
    }
}

/// Accumulates totals as results arrive, in memory independent of task count:
/// the executor's own, and that of anything else that makes results (the
/// Batch APIs' runs).
#[derive(Debug)]
pub struct Tally {
    totals: Totals,
    latency_micros: Histogram<u64>,
    /// Kept exactly: the histogram rounds to three significant figures.
    latency_max: Duration,
}

impl Default for Tally {
    fn default() -> Self {
        Self::new()
    }
}

impl Tally {
    /// Nothing counted yet.
    pub fn new() -> Self {
        Self {
            totals: Totals::default(),
            latency_micros: Histogram::new(3).expect("3 significant figures is valid"),
            latency_max: Duration::ZERO,
        }
    }

    /// Counts `result`: its status, usage and latency.
    pub fn add(&mut self, result: &TaskResult) {
        let totals = &mut self.totals;
        totals.tasks += 1;
        match result.outcome.status() {
            Status::Succeeded => totals.succeeded += 1,
            Status::Failed => totals.failed += 1,
            Status::TimedOut => totals.timed_out += 1,
            Status::Cancelled => totals.cancelled += 1,
            Status::NotRun => totals.not_run += 1,
        }
        // A failed task's refused answers were paid for, so they count too.
        totals.usage += result.outcome.usage();
        if let Some(success) = result.outcome.success() {
            if success.response.usage_estimated {
                totals.estimated_usage += success.response.usage;
            }
            self.latency_max = self.latency_max.max(success.latency);
            let micros = success.latency.as_micros().max(1) as u64;
            // Auto-resizing, so no value is out of range.
            let _ = self.latency_micros.record(micros);
        }
    }

    /// The totals, priced at `price`; the wall time and rates are the caller's.
    pub fn finish(self, price: Option<Price>) -> Totals {
        let mut totals = self.totals;
        totals.cost = price.map(|p| p.cost(totals.usage));
        let hist = &self.latency_micros;
        if !hist.is_empty() {
            let at = |q: f64| Duration::from_micros(hist.value_at_quantile(q));
            totals.latency =
                Some(Latency { p50: at(0.5), p90: at(0.9), p99: at(0.99), max: self.latency_max });
        }
        totals
    }
}
