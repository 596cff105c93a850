//! What an attempt has shown of itself while it runs.
//!
//! A provider that streams marks its [`Progress`] each time bytes of the answer
//! arrive. The executor reads it to tell a call that is working (streaming
//! steadily, however long its answer) from one that is stuck (nothing yet after
//! far longer than usual, or a stream that stopped): only the stuck one is hedged
//! or cut by the attempt timeout. A provider that does not stream never marks it,
//! and then the time since the call was sent is all there is to go on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Activity of one attempt, shared between the provider and the executor.
#[derive(Debug)]
pub struct Progress {
    /// Which call this is, among every call of the process (never 0).
    id: u64,
    sent: Instant,
    /// Microseconds from `sent` to the latest activity, plus one; 0: none yet.
    last_micros: AtomicU64,
    first_micros: AtomicU64,
}

impl Progress {
    /// A progress whose clock starts now, when the attempt is sent.
    pub fn new() -> Self {
        static CALLS: AtomicU64 = AtomicU64::new(1);
        Self {
            id: CALLS.fetch_add(1, Ordering::Relaxed),
            sent: Instant::now(),
            last_micros: AtomicU64::new(0),
            first_micros: AtomicU64::new(0),
        }
    }

    /// Records that part of the answer arrived now.
    pub fn mark(&self) {
        let micros = self.sent.elapsed().as_micros() as u64 + 1;
        let _ = self.first_micros.compare_exchange(0, micros, Ordering::AcqRel, Ordering::Acquire);
        self.last_micros.fetch_max(micros, Ordering::AcqRel);
    }

    /// Which call this is: a [`Relay`](super::Relay) knows its holder by it.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// When the attempt was sent: the start of its clock.
    pub fn sent(&self) -> Instant {
        self.sent
    }

    /// When the latest part of the answer arrived, if any has.
    pub fn last_activity(&self) -> Option<Instant> {
        Self::at(self.sent, self.last_micros.load(Ordering::Acquire))
    }

    /// How long after sending the first part of the answer arrived, if it has.
    pub fn first_activity(&self) -> Option<Duration> {
        Self::at(self.sent, self.first_micros.load(Ordering::Acquire)).map(|at| at - self.sent)
    }

    /// When the attempt last showed life: its latest activity, or its sending.
    pub fn last_sign_of_life(&self) -> Instant {
        self.last_activity().unwrap_or(self.sent)
    }

    fn at(sent: Instant, micros: u64) -> Option<Instant> {
        (micros > 0).then(|| sent + Duration::from_micros(micros - 1))
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn marks_first_and_latest_activity() {
        let progress = Progress::new();
        assert_eq!(progress.last_activity(), None);
        assert_eq!(progress.last_sign_of_life(), progress.sent());
        tokio::time::advance(Duration::from_millis(300)).await;
        progress.mark();
        tokio::time::advance(Duration::from_millis(200)).await;
        progress.mark();
        assert_eq!(progress.first_activity(), Some(Duration::from_millis(300)));
        assert_eq!(progress.last_activity(), Some(progress.sent() + Duration::from_millis(500)));
    }
}
