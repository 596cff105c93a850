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

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub(crate) struct AdaptiveConcurrency {
    semaphore: Arc<Semaphore>,
    max: usize,
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    limit: usize,
    /// Permits to retire as they come back, after a decrease that found them in use.
    debt: usize,
    proven: bool,
    successes_toward_increase: usize,
    generation: u64,
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
            })),
        }
    }

    pub(crate) async fn acquire(&self) -> Permit {
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

    /// Returns the new limit if it changed.
    pub(crate) fn on_success(&self) -> Option<usize> {
        let mut state = self.state.lock().unwrap();
        if !state.proven {
            state.proven = true;
            return self.set_limit(&mut state, self.max);
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
        if generation != state.generation {
            return None;
        }
        state.generation += 1;
        state.successes_toward_increase = 0;
        let halved = (state.limit / 2).max(1);
        self.set_limit(&mut state, halved)
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
        assert_eq!(c.on_success(), Some(10));
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
    async fn grows_by_one_per_window_of_successes() {
        let c = AdaptiveConcurrency::new(4, None);
        c.on_backpressure(c.generation());
        assert_eq!(c.limit(), 2);
        assert_eq!(c.on_success(), None);
        assert_eq!(c.on_success(), Some(3));
        let changes: Vec<_> = (0..3).filter_map(|_| c.on_success()).collect();
        assert_eq!(changes, [4]);
        let changes: Vec<_> = (0..10).filter_map(|_| c.on_success()).collect();
        assert!(changes.is_empty(), "capped at max");
        let all: Vec<_> = std::iter::from_fn(|| c.try_acquire()).collect();
        assert_eq!(all.len(), 4);
    }
}
