//! A job's records, folded as they stream past into what the report shows.
//! Memory stays small at a million rows: one `f32` per answered call (for
//! exact quantiles), a count per second of the run, and bounded lists of the
//! slowest and the failed rows.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use fanout_store::Record;

/// How many of the slowest rows, and of the failed ones, the report lists.
pub const LISTED: usize = 20;

/// One row the report names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Row {
    /// Latency in microseconds: the ordering of the slowest rows.
    pub micros: u64,
    pub index: u64,
    pub task_id: String,
    /// The error, for a failed row: its kind, status and message.
    pub error: Option<String>,
}

/// The records of one job, folded.
#[derive(Debug, Default)]
pub struct Aggregate {
    pub counts: BTreeMap<String, u64>,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    /// Milliseconds, of every answered call.
    latencies: Vec<f32>,
    sorted: bool,
    /// Records finished in each second (unix time): answered, and not.
    pub per_second: BTreeMap<i64, [u64; 2]>,
    slowest: BinaryHeap<Reverse<Row>>,
    pub failed: Vec<Row>,
}

impl Aggregate {
    pub fn add(&mut self, record: &Record) {
        *self.counts.entry(record.status.clone()).or_default() += 1;
        self.input_tokens += record.input_tokens;
        self.output_tokens += record.output_tokens;
        self.cached_input_tokens += record.cached_input_tokens;
        let answered = record.succeeded();
        self.per_second.entry(record.finished_at).or_default()[usize::from(!answered)] += 1;
        let micros = record.latency_ms.map_or(0, |ms| (ms * 1000.0).max(0.0) as u64);
        let row =
            |error| Row { micros, index: record.index, task_id: record.task_id.clone(), error };
        if answered {
            if let Some(ms) = record.latency_ms {
                self.latencies.push(ms as f32);
                self.sorted = false;
            }
            // Kept only while it is among the slowest.
            if self.slowest.len() < LISTED
                || self.slowest.peek().is_some_and(|s| s.0.micros < micros)
            {
                self.slowest.push(Reverse(row(None)));
                if self.slowest.len() > LISTED {
                    self.slowest.pop();
                }
            }
            return;
        }
        let kind = record.error_kind.clone().unwrap_or_else(|| record.status.clone());
        *self.errors_by_kind.entry(kind.clone()).or_default() += 1;
        if self.failed.len() < LISTED {
            let status = record.error_status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
            let message =
                record.error_message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
            self.failed.push(row(Some(format!("{kind}{status}{message}"))));
        }
    }

    pub fn answered(&self) -> usize {
        self.latencies.len()
    }

    /// The latency below which a share `q` of answered calls came, in ms.
    pub fn quantile(&mut self, q: f64) -> Option<f64> {
        if self.latencies.is_empty() {
            return None;
        }
        if !self.sorted {
            self.latencies.sort_unstable_by(f32::total_cmp);
            self.sorted = true;
        }
        let rank =
            ((q * self.latencies.len() as f64).ceil() as usize).clamp(1, self.latencies.len());
        Some(f64::from(self.latencies[rank - 1]))
    }

    /// Answered calls by latency, in `bins` bins spaced evenly on a log scale
    /// between the fastest and the slowest: `(from ms, to ms, count)`.
    pub fn histogram(&mut self, bins: usize) -> Vec<(f64, f64, u64)> {
        let (Some(low), Some(high)) = (self.quantile(0.0), self.quantile(1.0)) else {
            return Vec::new();
        };
        let (low, high) = (low.max(0.01), high.max(low.max(0.01) * 1.01));
        let step = (high / low).ln() / bins as f64;
        let edge = |i: usize| low * (step * i as f64).exp();
        let mut counts = vec![0u64; bins];
        for &ms in &self.latencies {
            let at = ((f64::from(ms).max(low) / low).ln() / step) as usize;
            counts[at.min(bins - 1)] += 1;
        }
        counts.into_iter().enumerate().map(|(i, n)| (edge(i), edge(i + 1), n)).collect()
    }

    /// The slowest answered rows, slowest first.
    pub fn slowest(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = self.slowest.iter().map(|r| r.0.clone()).collect();
        rows.sort_unstable_by(|a, b| b.cmp(a));
        rows
    }

    /// Records finished over time, in at most `buckets` buckets of whole
    /// seconds: `(start, seconds, answered, not)`.
    pub fn over_time(&self, buckets: usize) -> Vec<(i64, i64, u64, u64)> {
        let (Some((&first, _)), Some((&last, _))) =
            (self.per_second.first_key_value(), self.per_second.last_key_value())
        else {
            return Vec::new();
        };
        let span = last - first + 1;
        let width = (span + buckets as i64 - 1) / buckets as i64;
        let mut out: Vec<(i64, i64, u64, u64)> = (0..span.div_euclid(width) + 1)
            .map(|i| (first + i * width, width, 0, 0))
            .filter(|(start, ..)| *start <= last)
            .collect();
        for (second, [answered, not]) in &self.per_second {
            let bucket = &mut out[((second - first) / width) as usize];
            bucket.2 += answered;
            bucket.3 += not;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(index: u64, status: &str, latency_ms: f64, finished_at: i64) -> Record {
        Record {
            index,
            task_id: format!("row-{index}"),
            status: status.into(),
            latency_ms: Some(latency_ms),
            finished_at,
            error_kind: (status != "succeeded").then(|| "server error".into()),
            error_message: (status != "succeeded").then(|| "boom".into()),
            error_status: (status != "succeeded").then_some(500),
            input_tokens: 10,
            output_tokens: 2,
            ..Record::default()
        }
    }

    #[test]
    fn quantiles_slowest_and_failures_come_from_the_records() {
        let mut folded = Aggregate::default();
        for i in 0..1_000 {
            let status = if i % 100 == 7 { "failed" } else { "succeeded" };
            folded.add(&record(i, status, (i + 1) as f64, 1_000 + (i / 100) as i64));
        }
        assert_eq!((folded.counts["succeeded"], folded.counts["failed"]), (990, 10));
        assert_eq!(folded.answered(), 990);
        assert_eq!(folded.quantile(0.5), Some(500.0));
        assert_eq!(folded.quantile(0.99), Some(991.0));
        let slowest = folded.slowest();
        assert_eq!((slowest.len(), slowest[0].index, slowest[19].index), (LISTED, 999, 980));
        assert_eq!(folded.failed.len(), 10);
        assert_eq!(folded.failed[0].error.as_deref(), Some("server error (HTTP 500): boom"));
        assert_eq!(folded.errors_by_kind["server error"], 10);
        assert_eq!(folded.input_tokens, 10_000);
        let histogram = folded.histogram(10);
        assert_eq!(histogram.iter().map(|b| b.2).sum::<u64>(), 990);
        let over_time = folded.over_time(4);
        assert_eq!(over_time.len(), 4, "{over_time:?}");
        assert_eq!(over_time.iter().map(|b| b.2 + b.3).sum::<u64>(), 1_000);
        assert_eq!(
            (over_time[0].0, over_time[0].1, over_time[0].2 + over_time[0].3),
            (1_000, 3, 300)
        );
    }

    #[test]
    fn an_empty_job_folds_to_nothing() {
        let mut folded = Aggregate::default();
        assert_eq!(
            (folded.quantile(0.5), folded.histogram(10), folded.over_time(10)),
            (None, vec![], vec![])
        );
    }
}
