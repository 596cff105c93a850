//! A token bucket that hands out start times in arrival order.
//!
//! Each reservation takes its tokens at once and is told when it may start; the
//! level may go negative, so later callers queue behind earlier ones (first come,
//! first served, and a large request is never starved by small ones). Tokens can
//! be given back (a cancelled wait, a call that used less than reserved) or
//! charged late (a call that used more), which is how the TPM budget is
//! corrected with the usage the provider reports.
//!
//! Why not `governor`: it cannot refund or charge after the fact, and it cannot
//! be told by the server how much budget is really left.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct TokenBucket {
    per_minute: u64,
    per_second: f64,
    capacity: f64,
    state: Mutex<Level>,
}

#[derive(Debug)]
struct Level {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// `per_minute` tokens refill continuously; at most `burst` may be spent at once.
    pub(crate) fn new(per_minute: u64, burst: u64) -> Self {
        let capacity = burst.max(1) as f64;
        Self {
            per_minute,
            per_second: per_minute.max(1) as f64 / 60.0,
            capacity,
            state: Mutex::new(Level { tokens: capacity, updated: Instant::now() }),
        }
    }

    pub(crate) fn per_minute(&self) -> u64 {
        self.per_minute
    }

    fn refill(&self, level: &mut Level, now: Instant) {
        let elapsed = now.saturating_duration_since(level.updated).as_secs_f64();
        level.tokens = (level.tokens + elapsed * self.per_second).min(self.capacity);
        level.updated = now;
    }

    /// Takes `n` tokens and says when the caller may start.
    pub(crate) fn reserve(&self, n: u64, now: Instant) -> Instant {
        let mut level = self.state.lock().unwrap();
        self.refill(&mut level, now);
        level.tokens -= n as f64;
        if level.tokens >= 0.0 {
            now
        } else {
            now + Duration::from_secs_f64(-level.tokens / self.per_second)
        }
    }

    /// Returns tokens that were reserved but not used.
    pub(crate) fn give_back(&self, n: u64) {
        let mut level = self.state.lock().unwrap();
        level.tokens = (level.tokens + n as f64).min(self.capacity);
    }

    /// Charges tokens used beyond the reservation.
    pub(crate) fn charge(&self, n: u64) {
        self.state.lock().unwrap().tokens -= n as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn queues_in_order_at_the_refill_rate() {
        let bucket = TokenBucket::new(60, 2); // one a second, burst of two
        let t0 = Instant::now();
        assert_eq!(bucket.reserve(1, t0), t0);
        assert_eq!(bucket.reserve(1, t0), t0);
        assert_eq!(bucket.reserve(1, t0), t0 + Duration::from_secs(1));
        assert_eq!(bucket.reserve(1, t0), t0 + Duration::from_secs(2));
        // A refund moves the queue forward.
        bucket.give_back(2);
        assert_eq!(bucket.reserve(1, t0), t0 + Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn late_charges_and_refunds_move_the_queue() {
        let bucket = TokenBucket::new(600, 600); // ten a second
        let t0 = Instant::now();
        assert_eq!(bucket.reserve(600, t0), t0);
        bucket.charge(100);
        assert_eq!(bucket.reserve(10, t0), t0 + Duration::from_secs(11));
        bucket.give_back(110);
        assert_eq!(bucket.reserve(0, t0), t0);
    }
}
