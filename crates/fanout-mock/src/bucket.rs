//! The server's rate limits: strict token buckets that refuse what does not fit.

use std::time::{Duration, Instant};

use crate::config::Limit;

#[derive(Debug)]
pub(crate) struct Bucket {
    limit: Limit,
    per_second: f64,
    level: f64,
    updated: Instant,
}

/// What a bucket says about a request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Verdict {
    pub admitted: bool,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// Until the refused cost would fit (zero when admitted).
    pub retry_after: Duration,
    pub limit: u64,
}

impl Bucket {
    pub(crate) fn new(limit: Limit) -> Self {
        Self {
            limit,
            per_second: limit.per_minute.max(1) as f64 / 60.0,
            level: limit.burst as f64,
            updated: Instant::now(),
        }
    }

    pub(crate) fn take(&mut self, cost: f64, now: Instant) -> Verdict {
        let capacity = self.limit.burst as f64;
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.per_second).min(capacity);
        self.updated = now;
        let admitted = self.level >= cost;
        if admitted {
            self.level -= cost;
        }
        let shortfall = if admitted { 0.0 } else { cost.min(capacity) - self.level };
        Verdict {
            admitted,
            remaining: self.level.max(0.0) as u64,
            reset: Duration::from_secs_f64((capacity - self.level) / self.per_second),
            retry_after: Duration::from_secs_f64(shortfall.max(0.0) / self.per_second),
            limit: self.limit.per_minute,
        }
    }
}
