//! A job's call history, folded for the timeline and the concurrency chart:
//! counts by role and end, per-second load (time in flight, calls sent, 429s),
//! the run's pauses and limit changes, and a uniform sample of at most
//! [`SAMPLED`] calls to draw one by one. Memory stays bounded at a million
//! rows: a few numbers per second of the run and the sample.

use std::collections::BTreeMap;

use fanout_store::RunEvent;

use crate::history::{Role, StoredCall, kind};

/// The most calls the timeline draws; past it, a uniform sample of them.
pub const SAMPLED: usize = 2_000;

/// How a drawn call looks: what it was and how it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Look {
    Answered,
    Retry,
    Hedge,
    RateLimited,
    Failed,
    Cancelled,
}

impl Look {
    fn of(call: &StoredCall) -> Self {
        match (call.end.as_str(), call.role) {
            ("cancelled", _) => Self::Cancelled,
            ("rate_limited", _) => Self::RateLimited,
            ("ok", Role::Hedge) => Self::Hedge,
            ("ok", Role::Retry | Role::Repair) => Self::Retry,
            ("ok", Role::First) => Self::Answered,
            _ => Self::Failed,
        }
    }

    /// The CSS class it is drawn with.
    pub fn class(self) -> &'static str {
        match self {
            Self::Answered => "ok",
            Self::Retry => "retry",
            Self::Hedge => "hedge",
            Self::RateLimited => "limited",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One call to draw.
#[derive(Clone, Debug, PartialEq)]
pub struct Drawn {
    pub index: u64,
    pub sent_ms: i64,
    pub elapsed_ms: u32,
    pub look: Look,
    /// `retry`, `rate_limited (HTTP 429)`...: for its tooltip.
    pub what: String,
}

/// Load in one second of the run (unix seconds).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Second {
    /// Milliseconds spent in flight by all calls: over 1,000, the average in flight.
    pub in_flight_ms: f64,
    pub sent: u64,
    pub rate_limited: u64,
}

#[derive(Debug)]
pub struct Calls {
    pub calls: u64,
    pub retries: u64,
    pub hedges: u64,
    pub repairs: u64,
    pub rate_limited: u64,
    pub cancelled: u64,
    pub per_second: BTreeMap<i64, Second>,
    pub sample: Vec<Drawn>,
    /// `(at ms, length ms, cause)`.
    pub pauses: Vec<(i64, f64, String)>,
    /// `(at ms, limit)`: each run's starting limit and every change.
    pub limits: Vec<(i64, f64)>,
    pub first_ms: Option<i64>,
    pub last_ms: Option<i64>,
    rng: fastrand::Rng,
}

impl Default for Calls {
    fn default() -> Self {
        Self {
            calls: 0,
            retries: 0,
            hedges: 0,
            repairs: 0,
            rate_limited: 0,
            cancelled: 0,
            per_second: BTreeMap::new(),
            sample: Vec::new(),
            pauses: Vec::new(),
            limits: Vec::new(),
            first_ms: None,
            last_ms: None,
            // Seeded: the same job gives the same report.
            rng: fastrand::Rng::with_seed(0x5EED),
        }
    }
}

impl Calls {
    pub fn add(&mut self, index: u64, call: &StoredCall) {
        self.calls += 1;
        match call.role {
            Role::First => {}
            Role::Retry => self.retries += 1,
            Role::Hedge => self.hedges += 1,
            Role::Repair => self.repairs += 1,
        }
        self.rate_limited += u64::from(call.rate_limited());
        self.cancelled += u64::from(call.end == "cancelled");
        let (start, end) = (call.sent_ms, call.sent_ms + i64::from(call.elapsed_ms));
        self.first_ms = Some(self.first_ms.map_or(start, |f| f.min(start)));
        self.last_ms = Some(self.last_ms.map_or(end, |l| l.max(end)));
        self.per_second.entry(start.div_euclid(1000)).or_default().sent += 1;
        if call.rate_limited() {
            self.per_second.entry(end.div_euclid(1000)).or_default().rate_limited += 1;
        }
        // Its time in flight, second by second.
        let mut at = start;
        while at < end {
            let second = at.div_euclid(1000);
            let until = ((second + 1) * 1000).min(end);
            self.per_second.entry(second).or_default().in_flight_ms += (until - at) as f64;
            at = until;
        }
        // Reservoir sampling: every call has the same chance to be drawn.
        let drawn = || Drawn {
            index,
            sent_ms: start,
            elapsed_ms: call.elapsed_ms,
            look: Look::of(call),
            what: describe(call),
        };
        if self.sample.len() < SAMPLED {
            self.sample.push(drawn());
        } else {
            let slot = self.rng.u64(..self.calls) as usize;
            if slot < SAMPLED {
                self.sample[slot] = drawn();
            }
        }
    }

    pub fn add_event(&mut self, event: &RunEvent) {
        match event.kind.as_str() {
            kind::PAUSE => self.pauses.push((
                event.at_ms,
                event.value,
                event.detail.clone().unwrap_or_default(),
            )),
            kind::START | kind::LIMIT => self.limits.push((event.at_ms, event.value)),
            _ => {}
        }
    }

    /// Whether every call is drawn (else a sample is).
    pub fn complete(&self) -> bool {
        self.calls as usize == self.sample.len()
    }

    /// The sampled calls by start, each given the first lane free at its
    /// start: lanes stand for the concurrency slots the calls used.
    pub fn lanes(&self) -> (Vec<(usize, &Drawn)>, usize) {
        let mut order: Vec<&Drawn> = self.sample.iter().collect();
        order.sort_by_key(|d| (d.sent_ms, d.index));
        // When each lane is next free.
        let mut free_at: Vec<i64> = Vec::new();
        let placed = order
            .into_iter()
            .map(|drawn| {
                let end = drawn.sent_ms + i64::from(drawn.elapsed_ms.max(1));
                let lane = match free_at.iter().position(|&free| free <= drawn.sent_ms) {
                    Some(lane) => lane,
                    None => {
                        free_at.push(0);
                        free_at.len() - 1
                    }
                };
                free_at[lane] = end;
                (lane, drawn)
            })
            .collect();
        (placed, free_at.len())
    }

    /// Load over time in at most `buckets` buckets of whole seconds:
    /// `(start, seconds, average in flight, calls sent, 429s)`.
    pub fn load(&self, buckets: usize) -> Vec<(i64, i64, f64, u64, u64)> {
        let (Some((&first, _)), Some((&last, _))) =
            (self.per_second.first_key_value(), self.per_second.last_key_value())
        else {
            return Vec::new();
        };
        let width = (last - first + buckets as i64) / buckets as i64;
        let mut out: Vec<_> =
            (first..=last).step_by(width as usize).map(|start| (start, width, 0.0, 0, 0)).collect();
        for (second, load) in &self.per_second {
            let bucket = &mut out[((second - first) / width) as usize];
            bucket.2 += load.in_flight_ms / (width as f64 * 1000.0);
            bucket.3 += load.sent;
            bucket.4 += load.rate_limited;
        }
        out
    }
}

fn describe(call: &StoredCall) -> String {
    let role = match call.role {
        Role::First => "first attempt",
        Role::Retry => "retry",
        Role::Repair => "repair",
        Role::Hedge => "hedge",
    };
    let status = call.status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
    let end = match call.end.as_str() {
        "ok" => "answered".to_owned(),
        "cancelled" => "cancelled".to_owned(),
        // Only a kind's letters: the timeline draws it as it is.
        error => {
            let kind: String =
                error.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            format!("{kind}{status}")
        }
    };
    format!("{role}, {end}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(sent_ms: i64, elapsed_ms: u32, role: Role, end: &str) -> StoredCall {
        StoredCall {
            sent_ms,
            elapsed_ms,
            role,
            end: end.into(),
            status: (end == "rate_limited").then_some(429),
            first_token_ms: None,
            input_tokens: 0,
            output_tokens: 0,
        }
    }

    #[test]
    fn lanes_reuse_slots_that_have_freed_and_load_is_spread_over_seconds() {
        let mut calls = Calls::default();
        calls.add(0, &call(0, 1_500, Role::First, "rate_limited"));
        calls.add(1, &call(100, 400, Role::First, "ok"));
        calls.add(2, &call(600, 300, Role::Hedge, "ok"));
        calls.add(0, &call(2_000, 500, Role::Retry, "ok"));
        let (placed, lanes) = calls.lanes();
        assert_eq!(lanes, 2, "row 2 took row 1's freed lane");
        let lane_of = |i: u64| placed.iter().find(|(_, d)| d.index == i).unwrap().0;
        assert_eq!((lane_of(1), lane_of(2)), (1, 1));
        assert_eq!((calls.retries, calls.hedges, calls.rate_limited), (1, 1, 1));
        assert_eq!(calls.per_second[&0].in_flight_ms, 1_000.0 + 400.0 + 300.0);
        assert_eq!(calls.per_second[&1].in_flight_ms, 500.0);
        assert_eq!(calls.per_second[&1].rate_limited, 1, "counted when it came back");
        let load = calls.load(10);
        assert_eq!(load.len(), 3);
        assert_eq!((load[0].2, load[0].3), (1.7, 3));
        assert!(calls.complete());
        assert_eq!(
            placed.iter().find(|(_, d)| d.look == Look::RateLimited).unwrap().1.what,
            "first attempt, rate_limited (HTTP 429)"
        );
    }

    #[test]
    fn a_large_history_is_sampled_uniformly() {
        let mut calls = Calls::default();
        for i in 0..100_000 {
            calls.add(i, &call(i as i64, 10, Role::First, "ok"));
        }
        assert_eq!((calls.sample.len(), calls.calls), (SAMPLED, 100_000));
        assert!(!calls.complete());
        let late = calls.sample.iter().filter(|d| d.index >= 50_000).count();
        assert!((800..1_200).contains(&late), "half the sample from the second half: {late}");
    }
}
