//! One task's life: admission, attempts, hedges, retries, and its outcome.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::breaker::CircuitBreaker;
use super::event::Event;
use super::hedge::Hedger;
use super::limit::Permit;
use crate::provider::{ErrorKind, ProviderError, Request, Response};
use crate::task::{NotRun, Outcome, Success, TaskId, TaskResult, Timeout};

/// Why a run stopped before its tasks were done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    Deadline,
    Cancelled,
}

impl Stop {
    pub(crate) fn not_run(self) -> NotRun {
        match self {
            Self::Deadline => NotRun::Deadline,
            Self::Cancelled => NotRun::Cancelled,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub calls: AtomicU64,
    pub retries: AtomicU64,
    pub rate_limited: AtomicU64,
}

/// State of one run, shared by its tasks.
#[derive(Debug)]
pub(crate) struct Run {
    pub exec: Arc<Shared>,
    /// Cancelled when the run must stop; a child of the executor's token.
    pub cancel: CancellationToken,
    /// Cancelled when the run must stop launching and let in-flight tasks finish.
    pub drain: CancellationToken,
    pub stop: OnceLock<Stop>,
    pub breaker: CircuitBreaker,
    pub hedger: Option<Hedger>,
    pub counters: Counters,
    pub seed: u64,
    pub started: Instant,
    pub deadline: Option<Instant>,
}

impl Run {
    /// What an in-flight task becomes when the run is stopped under it.
    fn interrupted(&self, attempts: u32) -> Outcome {
        match self.stop.get() {
            Some(Stop::Deadline) => Outcome::TimedOut { timeout: Timeout::Deadline, attempts },
            _ => Outcome::Cancelled { attempts },
        }
    }
}

pub(crate) async fn run_task(
    run: Arc<Run>,
    index: usize,
    id: TaskId,
    request: Arc<Request>,
    permit: Permit,
) -> TaskResult {
    // Read by the cancellation branch while the attempts future is dropped.
    let attempts = AtomicU32::new(0);
    let work =
        AssertUnwindSafe(attempt_until_done(&run, index, &id, &request, &attempts)).catch_unwind();
    let bounded = async {
        match run.exec.config.task_timeout {
            Some(limit) => timeout(limit, work).await.ok(),
            None => Some(work.await),
        }
    };
    let outcome = tokio::select! {
        biased;
        () = run.cancel.cancelled() => run.interrupted(attempts.load(Ordering::Acquire)),
        done = bounded => match done {
            Some(Ok(outcome)) => outcome,
            Some(Err(panic)) => Outcome::Failed {
                error: panicked(&*panic),
                attempts: attempts.load(Ordering::Acquire),
            },
            None => Outcome::TimedOut {
                timeout: Timeout::Task,
                attempts: attempts.load(Ordering::Acquire),
            },
        },
    };
    drop(permit);
    run.exec.emit(|| Event::Finished {
        index,
        id: id.clone(),
        status: outcome.status(),
        attempts: outcome.attempts(),
        usage: outcome.usage(),
        latency: outcome.success().map(|s| s.latency),
    });
    TaskResult { index, id, outcome }
}

fn panicked(panic: &(dyn std::any::Any + Send)) -> ProviderError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    ProviderError::new(ErrorKind::Server, format!("the provider panicked: {message}"))
}

async fn attempt_until_done(
    run: &Run,
    index: usize,
    id: &TaskId,
    request: &Request,
    attempts: &AtomicU32,
) -> Outcome {
    let exec = &*run.exec;
    let reserved = exec.provider.estimate_tokens(request);
    if let Err(error) = exec.limits.check_fits(reserved) {
        return Outcome::Failed { error, attempts: 0 };
    }
    // Seeded per task, so a run's jitter does not depend on scheduling.
    let mut rng =
        fastrand::Rng::with_seed(run.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut first_sent = None;
    let mut attempt = 0;
    loop {
        if let Some(cause) = run.breaker.cause() {
            let error = cause.clone();
            return match attempt {
                0 => Outcome::NotRun(NotRun::CircuitOpen(error)),
                _ => Outcome::Failed { error, attempts: attempt },
            };
        }
        let launch = exec.limits.admit(reserved).await;
        attempt += 1;
        attempts.store(attempt, Ordering::Release);
        run.counters.calls.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let first_sent = *first_sent.get_or_insert(sent);
        exec.emit(|| Event::Started { index, id: id.clone(), attempt });
        let generation = exec.limits.concurrency.generation();
        let answer = call_with_hedge(run, index, id, request, reserved, attempt);
        let result = match exec.config.attempt_timeout {
            None => answer.await,
            Some(limit) => {
                timeout(limit, answer).await.unwrap_or_else(|_| Err(attempt_timed_out(limit)))
            }
        };
        match result {
            Ok(response) => {
                if let Some(limit) = exec.limits.on_success(reserved, launch, &response) {
                    exec.emit(|| Event::ConcurrencyChanged { limit });
                }
                run.breaker.record_success();
                if let Some(hedger) = &run.hedger {
                    hedger.record(sent.elapsed());
                }
                let latency = first_sent.elapsed();
                return Outcome::Succeeded(Success { response, latency, attempts: attempt });
            }
            Err(error) => {
                if error.is_rate_limited() {
                    run.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                }
                run.breaker.record_failure(&error);
                let delay = exec.config.retry.delay_after(&error, attempt, &mut rng);
                let reaction = exec.limits.on_error(&error, launch, generation, delay);
                if let Some(duration) = reaction.paused_for {
                    exec.emit(|| Event::Paused { duration, error: error.clone() });
                }
                if let Some(limit) = reaction.new_limit {
                    exec.emit(|| Event::ConcurrencyChanged { limit });
                }
                let Some(delay) = delay else {
                    return Outcome::Failed { error, attempts: attempt };
                };
                run.counters.retries.fetch_add(1, Ordering::Relaxed);
                exec.emit(|| Event::Retrying { index, id: id.clone(), attempt, error, delay });
                sleep(delay).await;
            }
        }
    }
}

fn attempt_timed_out(limit: Duration) -> ProviderError {
    let secs = limit.as_secs_f64();
    ProviderError::new(ErrorKind::Timeout, format!("no answer within {secs:.3}s"))
}

/// One attempt, hedged if it runs past the hedging threshold.
async fn call_with_hedge(
    run: &Run,
    index: usize,
    id: &TaskId,
    request: &Request,
    reserved: u64,
    attempt: u32,
) -> Result<Response, ProviderError> {
    let provider = &run.exec.provider;
    let primary = provider.complete(request);
    let Some(hedger) = &run.hedger else { return primary.await };
    hedger.count_call();
    let Some(after) = hedger.threshold() else { return primary.await };
    tokio::pin!(primary);
    tokio::select! {
        result = &mut primary => return result,
        () = sleep(after) => {}
    }
    if !hedger.try_spend() {
        return primary.await;
    }
    // The hedge queues for a slot and budget like any call; the primary may
    // answer first, which makes the hedge unnecessary.
    let _slot = tokio::select! {
        result = &mut primary => {
            hedger.refund();
            return result;
        }
        slot = run.exec.limits.admit_extra(reserved) => slot,
    };
    run.exec.emit(|| Event::Hedged { index, id: id.clone(), attempt });
    let hedge = provider.complete(request);
    tokio::pin!(hedge);
    // The first success wins; a failure waits for the other call's answer.
    tokio::select! {
        result = &mut primary => match result {
            Ok(response) => Ok(response),
            Err(_) => hedge.await,
        },
        result = &mut hedge => match result {
            Ok(response) => Ok(response),
            Err(_) => primary.await,
        },
    }
}
