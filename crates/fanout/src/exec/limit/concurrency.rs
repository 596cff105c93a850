//! A concurrency cap that adapts to the provider (AIMD), starting with a probe.
//!
//! The limit starts at a small *probe* window until the provider has answered
//! successfully once: a job with a bad key or an unknown model then costs a
//! handful of calls, not `concurrency` of them. After that it sits at the
//! configured maximum, halves when the provider pushes back (429, overloaded)
//! and grows by one for every `limit` successes, as TCP's congestion window does.
//!
//! A burst of 429s from calls launched under the same limit halves it once, not
//! once per 429: each attempt carries the limit's *generation* at launch, and
//! only an answer from the current generation may shrink it again.
//!
//! Self-hosted servers (llama.cpp, vLLM, Ollama) queue instead of answering
//! 429, so the limit also listens for congestion they do not announce:
//! - *latency growth*, in the manner of TCP Vegas and Netflix's gradient
//!   limit: the median first-sign-of-life latency of each window of successes
//!   is compared with the lowest seen (the no-queue baseline, which drifts up
//!   slowly so a workload that is simply slower is not mistaken for a queue).
//!   When the median passes twice the baseline while the limit is in use, the
//!   limit shrinks in proportion (by half at most);
//! - *attempt timeouts*, when they are common (over a fifth of recent answers,
//!   as a moving average): a server still working on abandoned calls must not
//!   get their retries on top. A rare timeout is an isolated fault and is left
//!   to the retry alone.
//!
//! A task whose attempt timed out gives its slot back while it waits to retry,
//! and takes one again ahead of new tasks ([`AdaptiveConcurrency::acquire_for_retry`]):
//! a limit that shrank then holds its retries back too, instead of every
//! retry going out at once onto a server that is still working, and a retry
//! still never waits behind rows that have not started.
//!
//! But a timed-out call is abandoned only by the client: a queueing server
//! goes on computing it. While timeouts are congestion, the slot of a call
//! that timed out is therefore kept as a *ghost* ([`AdaptiveConcurrency::abandon`])
//! until the server has most likely finished it: a call sent after it has
//! answered (such servers answer in order of arrival), or one more attempt
//! timeout has passed (a server that has not answered by then has dropped
//! it). Without ghosts, the freed slots sent new calls straight into the
//! queue of abandoned work, where they timed out in turn.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct AdaptiveConcurrency {
    semaphore: Arc<Semaphore>,
    max: usize,
    state: Arc<Mutex<State>>,
    retries: RetryQueue,
    ghosts: Arc<Mutex<Vec<Ghost>>>,
}

/// The slot of a call that timed out while the server may still be computing it.
#[derive(Debug)]
struct Ghost {
    /// When the abandoned call was sent: a call sent later that answers frees it.
    sent: Instant,
    /// Told apart from ghosts sent at the same instant, for its own expiry.
    number: u64,
    _slot: Permit,
}

/// Retries waiting for a slot; new work waits while there are any.
#[derive(Debug, Default)]
struct RetryQueue {
    waiting: AtomicUsize,
    /// Notified whenever `waiting` changes.
    changed: Notify,
}

/// One retry counted in the queue while it waits, however the wait ends.
struct InRetryQueue<'a>(&'a RetryQueue);

impl<'a> InRetryQueue<'a> {
    fn enter(queue: &'a RetryQueue) -> Self {
        queue.waiting.fetch_add(1, Ordering::SeqCst);
        queue.changed.notify_waiters();
        Self(queue)
    }
}

impl Drop for InRetryQueue<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

#[derive(Debug)]
struct State {
    limit: usize,
    /// Permits to retire as they come back, after a decrease that found them in use.
    debt: usize,
    proven: bool,
    successes_toward_increase: usize,
    generation: u64,
    latency: LatencyWindow,
    /// Moving average of the share of answers that were attempt timeouts.
    timeout_share: f64,
    /// Ghosts made so far, for numbering them.
    ghosts_made: u64,
}

/// Successes per latency window.
const LATENCY_WINDOW: usize = 16;
/// A window's median may be this many times the baseline before it counts as a queue.
const LATENCY_TOLERANCE: f64 = 2.0;
/// How far the baseline moves toward a higher window median, per window.
const BASELINE_DRIFT: f64 = 0.05;
/// Weight of the newest answer in the timeout share.
const TIMEOUT_WEIGHT: f64 = 0.1;
/// Timeout share above which timeouts count as congestion.
const TIMEOUT_CONGESTION: f64 = 0.2;

#[derive(Debug, Default)]
struct LatencyWindow {
    samples: Vec<Duration>,
    baseline: Option<Duration>,
}

impl LatencyWindow {
    /// Adds a sample; at the end of a window, returns its median over the baseline.
    fn add(&mut self, sample: Duration) -> Option<f64> {
        self.samples.push(sample);
        if self.samples.len() < LATENCY_WINDOW {
            return None;
        }
        self.samples.sort_unstable();
        let median = self.samples[self.samples.len() / 2];
        self.samples.clear();
        let baseline = self.baseline.unwrap_or(median);
        self.baseline = Some(if median < baseline {
            median
        } else {
            baseline + (median - baseline).mul_f64(BASELINE_DRIFT)
        });
        Some(median.as_secs_f64() / baseline.as_secs_f64().max(1e-6))
    }
}

/// A slot under the limit; returning it may retire it if the limit shrank.
#[derive(Debug)]
pub(crate) struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    state: Arc<Mutex<State>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap();
        if state.debt > 0 {
            state.debt -= 1;
            if let Some(permit) = self.permit.take() {
                permit.forget();
            }
        }
    }
}

impl AdaptiveConcurrency {
    /// `probe`: the window used until the first success (`None` starts at `max`).
    pub(crate) fn new(max: usize, probe: Option<usize>) -> Self {
        let max = max.max(1);
        let initial = probe.map_or(max, |p| p.clamp(1, max));
        Self {
            semaphore: Arc::new(Semaphore::new(initial)),
            max,
            state: Arc::new(Mutex::new(State {
                limit: initial,
                debt: 0,
                proven: initial == max,
                successes_toward_increase: 0,
                generation: 0,
                latency: LatencyWindow::default(),
                timeout_share: 0.0,
                ghosts_made: 0,
            })),
            retries: RetryQueue::default(),
            ghosts: Arc::default(),
        }
    }

    /// A slot for new work (a task's first attempt, a hedge): it waits while
    /// any retry does, so retries go first.
    pub(crate) async fn acquire(&self) -> Permit {
        loop {
            let changed = self.retries.changed.notified();
            tokio::pin!(changed);
            // Registered before the count is read, so no change is missed.
            changed.as_mut().enable();
            if self.retries.waiting.load(Ordering::SeqCst) > 0 {
                changed.await;
                continue;
            }
            tokio::select! {
                biased;
                // A retry began to wait: leave the semaphore's queue to it.
                () = &mut changed => {}
                permit = self.take_slot() => {
                    if self.retries.waiting.load(Ordering::SeqCst) == 0 {
                        return permit;
                    }
                    // Dropped, the slot goes to the retry queued behind us.
                }
            }
        }
    }

    /// A slot for a task's retry, ahead of new work.
    pub(crate) async fn acquire_for_retry(&self) -> Permit {
        let _queued = InRetryQueue::enter(&self.retries);
        self.take_slot().await
    }

    async fn take_slot(&self) -> Permit {
        let permit = Arc::clone(&self.semaphore)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        Permit { permit: Some(permit), state: Arc::clone(&self.state) }
    }

    #[cfg(test)]
    fn try_acquire(&self) -> Option<Permit> {
        let permit = Arc::clone(&self.semaphore).try_acquire_owned().ok()?;
        Some(Permit { permit: Some(permit), state: Arc::clone(&self.state) })
    }

    pub(crate) fn limit(&self) -> usize {
        self.state.lock().unwrap().limit
    }

    pub(crate) fn generation(&self) -> u64 {
        self.state.lock().unwrap().generation
    }

    /// Whether the probe window has opened.
    pub(crate) fn is_proven(&self) -> bool {
        self.state.lock().unwrap().proven
    }

    /// Opens the probe window (the provider is known to work). Returns the new
    /// limit if it changed.
    pub(crate) fn prove(&self) -> Option<usize> {
        let mut state = self.state.lock().unwrap();
        if state.proven {
            return None;
        }
        state.proven = true;
        self.set_limit(&mut state, self.max)
    }

    /// A successful attempt, sent at `sent`, that first showed life after
    /// `latency`. Returns the new limit if it changed.
    pub(crate) fn on_success(&self, sent: Instant, latency: Duration) -> Option<usize> {
        // The server answers in order of arrival: calls abandoned before this
        // one was sent are computed by now.
        self.ghosts.lock().unwrap().retain(|ghost| ghost.sent >= sent);
        let mut state = self.state.lock().unwrap();
        state.timeout_share *= 1.0 - TIMEOUT_WEIGHT;
        if !state.proven {
            state.proven = true;
            return self.set_limit(&mut state, self.max);
        }
        if let Some(ratio) = state.latency.add(latency)
            && let Some(shrunk) = self.on_latency_window(&mut state, ratio)
        {
            return Some(shrunk);
        }
        if state.limit >= self.max {
            return None;
        }
        state.successes_toward_increase += 1;
        if state.successes_toward_increase < state.limit {
            return None;
        }
        state.successes_toward_increase = 0;
        let grown = state.limit + 1;
        self.set_limit(&mut state, grown)
    }

    /// The provider pushed back on an attempt launched at `generation`.
    /// Returns the new limit if it changed.
    pub(crate) fn on_backpressure(&self, generation: u64) -> Option<usize> {
        let mut state = self.state.lock().unwrap();
        self.shrink(&mut state, generation, 0.5)
    }

    /// An attempt launched at `generation` timed out; counts as congestion when
    /// timeouts are common. Returns the new limit if it changed.
    pub(crate) fn on_timeout(&self, generation: u64) -> Option<usize> {
        let mut state = self.state.lock().unwrap();
        state.timeout_share = state.timeout_share * (1.0 - TIMEOUT_WEIGHT) + TIMEOUT_WEIGHT;
        if state.timeout_share <= TIMEOUT_CONGESTION {
            return None;
        }
        self.shrink(&mut state, generation, 0.5)
    }

    /// Whether attempt timeouts are common enough to be congestion.
    pub(crate) fn timeouts_are_congestion(&self) -> bool {
        self.state.lock().unwrap().timeout_share > TIMEOUT_CONGESTION
    }

    /// The slot of a call sent at `sent` that timed out while timeouts are
    /// congestion: kept as a ghost while the server is likely still computing
    /// the call, until a call sent after it answers or `hold` has passed.
    pub(crate) fn abandon(&self, slot: Permit, sent: Instant, hold: Duration) {
        let number = {
            let mut state = self.state.lock().unwrap();
            state.ghosts_made += 1;
            state.ghosts_made
        };
        self.ghosts.lock().unwrap().push(Ghost { sent, number, _slot: slot });
        let ghosts: Weak<Mutex<Vec<Ghost>>> = Arc::downgrade(&self.ghosts);
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            if let Some(ghosts) = ghosts.upgrade() {
                ghosts.lock().unwrap().retain(|ghost| ghost.number != number);
            }
        });
    }

    /// At the end of a latency window whose median is `ratio` times the
    /// baseline: shrinks the limit if that is a queue of ours.
    fn on_latency_window(&self, state: &mut State, ratio: f64) -> Option<usize> {
        // Latency that grows while we leave slots unused is not our queue.
        let in_use = state.limit.saturating_sub(self.semaphore.available_permits());
        if ratio <= LATENCY_TOLERANCE || in_use * 10 < state.limit * 9 {
            return None;
        }
        let generation = state.generation;
        self.shrink(state, generation, (LATENCY_TOLERANCE / ratio).max(0.5))
    }

    /// Multiplies the limit by `factor`, once per generation.
    fn shrink(&self, state: &mut State, generation: u64, factor: f64) -> Option<usize> {
        if generation != state.generation {
            return None;
        }
        state.generation += 1;
        state.successes_toward_increase = 0;
        let shrunk = ((state.limit as f64 * factor) as usize).clamp(1, state.limit);
        self.set_limit(state, shrunk)
    }

    fn set_limit(&self, state: &mut State, new: usize) -> Option<usize> {
        let old = state.limit;
        if new > old {
            let repaid = state.debt.min(new - old);
            state.debt -= repaid;
            self.semaphore.add_permits(new - old - repaid);
        } else if new < old {
            state.debt += old - new;
            while state.debt > 0 {
                let Ok(idle) = self.semaphore.try_acquire() else { break };
                idle.forget();
                state.debt -= 1;
            }
        }
        state.limit = new;
        (new != old).then_some(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probe_window_opens_on_first_success() {
        let c = AdaptiveConcurrency::new(10, Some(2));
        let a = c.acquire().await;
        let _b = c.acquire().await;
        assert!(c.try_acquire().is_none(), "probe window is 2");
        assert_eq!(c.on_success(Instant::now(), Duration::ZERO), Some(10));
        let rest: Vec<_> = (0..8).map(|_| c.try_acquire().expect("opened")).collect();
        assert!(c.try_acquire().is_none());
        drop((a, rest));
    }

    #[tokio::test]
    async fn halves_once_per_generation_and_retires_busy_permits() {
        let c = AdaptiveConcurrency::new(8, None);
        let held: Vec<_> = (0..8).map(|_| c.try_acquire().unwrap()).collect();
        let generation = c.generation();
        assert_eq!(c.on_backpressure(generation), Some(4));
        // A second 429 from the same launch generation does not halve again.
        assert_eq!(c.on_backpressure(generation), None);
        drop(held);
        let now: Vec<_> = std::iter::from_fn(|| c.try_acquire()).collect();
        assert_eq!(now.len(), 4, "four permits were retired as they came back");
        assert_eq!(c.on_backpressure(c.generation()), Some(2));
    }

    #[tokio::test]
    async fn common_timeouts_shrink_the_limit_and_rare_ones_do_not() {
        let c = AdaptiveConcurrency::new(16, None);
        // One timeout in twenty answers is a fault, not congestion.
        for i in 0..100 {
            if i % 20 == 0 {
                assert_eq!(c.on_timeout(c.generation()), None, "answer {i}");
            } else {
                c.on_success(Instant::now(), Duration::ZERO);
            }
        }
        assert_eq!(c.limit(), 16);
        // Timeouts of calls launched together shrink the limit once.
        let generation = c.generation();
        let changes: Vec<_> = (0..3).map(|_| c.on_timeout(generation)).collect();
        assert_eq!(changes, [None, Some(8), None], "the second timeout in a row is congestion");
    }

    #[tokio::test]
    async fn latency_growth_under_full_use_shrinks_the_limit() {
        let c = AdaptiveConcurrency::new(10, None);
        let held: Vec<_> = (0..10).map(|_| c.try_acquire().unwrap()).collect();
        let ms = Duration::from_millis;
        for _ in 0..LATENCY_WINDOW {
            assert_eq!(
                c.on_success(Instant::now(), ms(100)),
                None,
                "the first window sets the baseline"
            );
        }
        for _ in 0..LATENCY_WINDOW - 1 {
            assert_eq!(c.on_success(Instant::now(), ms(150)), None);
        }
        assert_eq!(
            c.on_success(Instant::now(), ms(150)),
            None,
            "1.5 times the baseline is within tolerance"
        );
        let changes: Vec<_> =
            (0..LATENCY_WINDOW).filter_map(|_| c.on_success(Instant::now(), ms(300))).collect();
        // Three times the baseline (drifted to ~102.5 ms): shrink to 2/2.93 of 10.
        assert_eq!(changes, [6]);
        drop(held);
        // With slots unused, slow answers are not our queue.
        let idle = AdaptiveConcurrency::new(10, None);
        for latency in [100, 400] {
            for _ in 0..LATENCY_WINDOW {
                assert_eq!(idle.on_success(Instant::now(), ms(latency)), None);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_take_freed_slots_before_new_work() {
        let c = Arc::new(AdaptiveConcurrency::new(1, None));
        let held = c.acquire().await;
        let new_work = tokio::spawn({
            let c = Arc::clone(&c);
            async move { c.acquire().await }
        });
        tokio::task::yield_now().await;
        // The retry asks after the new work, and still goes first.
        let retry = tokio::spawn({
            let c = Arc::clone(&c);
            async move { c.acquire_for_retry().await }
        });
        tokio::task::yield_now().await;
        drop(held);
        let retried = retry.await.unwrap();
        tokio::task::yield_now().await;
        assert!(!new_work.is_finished(), "new work waits while the retry holds the slot");
        drop(retried);
        new_work.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_call_holds_its_slot_while_the_server_computes_it() {
        let c = AdaptiveConcurrency::new(2, None);
        let hold = Duration::from_secs(2);
        let early = Instant::now();
        tokio::time::advance(Duration::from_millis(10)).await;
        let abandoned_at = Instant::now();
        c.abandon(c.try_acquire().unwrap(), abandoned_at, hold);
        c.abandon(c.try_acquire().unwrap(), abandoned_at, hold);
        assert!(c.try_acquire().is_none(), "both slots are ghosts");
        // A call sent before the abandoned ones (or with them) says nothing of them.
        c.on_success(early, Duration::ZERO);
        c.on_success(abandoned_at, Duration::ZERO);
        assert!(c.try_acquire().is_none());
        // One sent after them has answered: a first-in, first-out server is done with them.
        tokio::time::advance(Duration::from_millis(10)).await;
        c.on_success(Instant::now(), Duration::ZERO);
        let freed: Vec<_> = std::iter::from_fn(|| c.try_acquire()).collect();
        assert_eq!(freed.len(), 2);
        drop(freed);
        // Without such an answer, a ghost lasts one more attempt timeout.
        c.abandon(c.try_acquire().unwrap(), Instant::now(), hold);
        tokio::time::sleep(hold - Duration::from_millis(1)).await;
        let other = c.try_acquire().expect("one slot is free");
        assert!(c.try_acquire().is_none(), "the ghost still holds the other");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(c.try_acquire().is_some(), "the ghost expired");
        drop(other);
    }

    #[tokio::test]
    async fn grows_by_one_per_window_of_successes() {
        let c = AdaptiveConcurrency::new(4, None);
        c.on_backpressure(c.generation());
        assert_eq!(c.limit(), 2);
        assert_eq!(c.on_success(Instant::now(), Duration::ZERO), None);
        assert_eq!(c.on_success(Instant::now(), Duration::ZERO), Some(3));
        let changes: Vec<_> =
            (0..3).filter_map(|_| c.on_success(Instant::now(), Duration::ZERO)).collect();
        assert_eq!(changes, [4]);
        let changes: Vec<_> =
            (0..10).filter_map(|_| c.on_success(Instant::now(), Duration::ZERO)).collect();
        assert!(changes.is_empty(), "capped at max");
        let all: Vec<_> = std::iter::from_fn(|| c.try_acquire()).collect();
        assert_eq!(all.len(), 4);
    }
}
