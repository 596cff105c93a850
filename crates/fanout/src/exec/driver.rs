//! The launch loop: pulls tasks lazily, launches them under the limits, and
//! collects every outcome, until the input ends, the deadline passes, the run
//! is cancelled or drained, or the circuit breaker opens. Settled tasks pass
//! straight to the output, in their place.
//!
//! A task is pulled from the input only once a concurrency slot is free, so
//! memory stays proportional to the concurrency, not to the number of tasks.

use std::pin::pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::sleep_until;

use super::attempt::{Run, Stop, run_task};
use super::limit::Permit;
use super::order::ReorderBuffer;
use super::report::{Tally, Totals};
use super::{Delivery, Slot};
use crate::task::{NotRun, Outcome, Task, TaskId, TaskResult, Work};

/// How finished results are handed out.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Release {
    /// As they finish.
    Unordered,
    /// As they finish, each with the slot its call used, for the receiver to free.
    Held,
    /// In task order, tasks running at most `window` ahead of the first result
    /// not yet released.
    Ordered { window: usize },
}

/// Where finished results go: straight out, or through a reorder buffer.
struct Output {
    sender: mpsc::Sender<Delivery>,
    order: Option<Ordered>,
    tally: Tally,
}

struct Ordered {
    buffer: ReorderBuffer<TaskResult>,
    /// Tasks may run at most this far ahead of the first unreleased one.
    window: usize,
}

impl Output {
    fn has_room_for(&self, index: usize) -> bool {
        self.order.as_ref().is_none_or(|o| index < o.buffer.released() + o.window)
    }

    /// Takes a finished result and the slot its call used (none for a task
    /// that made no call). Returns false once nobody is listening.
    async fn accept(&mut self, result: TaskResult, slot: Option<Permit>) -> bool {
        self.tally.add(&result);
        let slot = slot.map(|permit| Slot { _permit: permit });
        let Some(ordered) = &mut self.order else {
            return self.sender.send(Delivery { result, slot }).await.is_ok();
        };
        ordered.buffer.insert(result.index, result);
        while let Some(next) = ordered.buffer.pop() {
            if self.sender.send(Delivery { result: next, slot: None }).await.is_err() {
                return false;
            }
        }
        true
    }
}

enum End {
    /// Every task was launched and collected, or the breaker stopped launching.
    Drained,
    Stopped(Stop),
    /// The result receiver was dropped.
    Abandoned,
}

/// Runs `tasks` to the end, sending each result to `sender` as `release`
/// says. Returns the totals.
pub(crate) async fn drive<S>(
    run: Arc<Run>,
    tasks: S,
    sender: mpsc::Sender<Delivery>,
    release: Release,
) -> Totals
where
    S: Stream<Item = Task>,
{
    let order = match release {
        Release::Ordered { window } => Some(Ordered { buffer: ReorderBuffer::new(), window }),
        Release::Unordered | Release::Held => None,
    };
    let mut output = Output { sender, order, tally: Tally::new() };
    let mut tasks = pin!(tasks.fuse());
    let mut in_flight = JoinSet::new();
    let mut next_index = 0;
    let mut slot = None;
    let mut input_done = false;
    let mut draining = false;
    let deadline = run.deadline;
    let mut deadline = pin!(async move {
        match deadline {
            Some(at) => sleep_until(at).await,
            None => std::future::pending().await,
        }
    });

    let end = loop {
        // Tasks waiting to retry hold no slot, so new rows may use theirs; the
        // tasks alive at once stay bounded all the same (memory proportional to
        // the concurrency, and retries never wait behind an unbounded crowd).
        let may_launch = !input_done
            && !draining
            && run.breaker.cause().is_none()
            && output.has_room_for(next_index)
            && in_flight.len() < run.exec.config.concurrency.saturating_mul(2);
        if !may_launch && in_flight.is_empty() {
            break End::Drained;
        }
        tokio::select! {
            biased;
            () = run.cancel.cancelled() => break End::Stopped(Stop::Cancelled),
            () = &mut deadline => break End::Stopped(Stop::Deadline),
            () = run.drain.cancelled(), if !draining => {
                draining = true;
                slot = None;
            }
            Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => match joined {
                Ok((result, permit)) => if !output.accept(result, permit).await { break End::Abandoned },
                // Tasks catch their own panics and are never aborted, so this is
                // only reachable while the runtime shuts down.
                Err(error) => tracing::error!(%error, "a task ended without a result"),
            },
            permit = run.exec.limits.concurrency.acquire(), if may_launch && slot.is_none() => {
                slot = Some(permit);
            }
            task = tasks.next(), if may_launch && slot.is_some() => match task {
                Some(Task { id, work }) => {
                    let permit = slot.take().expect("a slot is held whenever a task is pulled");
                    let id = id.unwrap_or_else(|| TaskId::from(next_index));
                    let index = next_index;
                    next_index += 1;
                    match work {
                        Work::Call(request) => {
                            in_flight.spawn(run_task(Arc::clone(&run), index, id, request, permit));
                        }
                        Work::Settled(outcome) => {
                            drop(permit);
                            if !output.accept(TaskResult::new(index, id, *outcome), None).await {
                                break End::Abandoned;
                            }
                        }
                    }
                }
                None => {
                    input_done = true;
                    slot = None;
                }
            },
        }
    };
    drop(slot);

    let leftover = match end {
        End::Abandoned => {
            run.cancel.cancel();
            in_flight.shutdown().await;
            return finish(&run, output.tally);
        }
        End::Drained if draining => Some(NotRun::Cancelled),
        End::Drained => run.breaker.cause().cloned().map(NotRun::CircuitOpen),
        End::Stopped(stop) => {
            let _first_stop_wins = run.stop.set(stop);
            run.cancel.cancel();
            // In-flight tasks see the cancellation and return at once.
            while let Some(joined) = in_flight.join_next().await {
                if let Ok((result, permit)) = joined
                    && !output.accept(result, permit).await
                {
                    return finish(&run, output.tally);
                }
            }
            Some(run.stop.get().copied().unwrap_or(stop).not_run())
        }
    };
    // Every task not launched is still accounted for, with the reason.
    if let Some(reason) = leftover {
        while let Some(Task { id, .. }) = tasks.next().await {
            let id = id.unwrap_or_else(|| TaskId::from(next_index));
            let outcome = Outcome::NotRun(reason.clone());
            if !output.accept(TaskResult::new(next_index, id, outcome), None).await {
                break;
            }
            next_index += 1;
        }
    }
    finish(&run, output.tally)
}

pub(crate) fn finish(run: &Run, tally: Tally) -> Totals {
    use std::sync::atomic::Ordering::Relaxed;
    let mut totals = tally.finish(run.exec.config.price);
    totals.wall = run.epoch.instant.elapsed();
    totals.calls = run.counters.calls.load(Relaxed);
    totals.retries = run.counters.retries.load(Relaxed);
    totals.rate_limited = run.counters.rate_limited.load(Relaxed);
    totals.hedges = run.counters.hedges.load(Relaxed);
    totals.hedges_won = run.counters.hedges_won.load(Relaxed);
    totals.repairs = run.counters.repairs.load(Relaxed);
    let minutes = totals.wall.as_secs_f64() / 60.0;
    if minutes > 0.0 {
        totals.requests_per_minute = totals.calls as f64 / minutes;
        totals.tokens_per_minute = totals.usage.total() as f64 / minutes;
    }
    totals
}
