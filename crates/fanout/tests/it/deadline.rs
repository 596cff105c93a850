use fanout::{
    Behavior, CancellationToken, Executor, MockProvider, NotRun, Outcome, Status, Task, Timeout,
};
use futures_util::StreamExt;
use tokio::time::Instant;

use crate::{ms, prompts, secs};

/// Task i takes i seconds.
fn staircase(n: usize) -> MockProvider {
    let mock = MockProvider::new();
    for i in 0..n {
        mock.script(format!("p{i}"), [Behavior::reply(format!("a{i}")).after(secs(i as u64))]);
    }
    mock
}

/// At the deadline, in-flight calls are cancelled and the run returns at once
/// with every finished result and a status for every other task.
#[tokio::test(start_paused = true)]
async fn deadline_returns_partial_results_with_every_task_accounted_for() {
    let mock = staircase(10);
    let start = Instant::now();
    let executor = Executor::builder(mock.clone()).concurrency(4).deadline(Some(ms(5500))).build();
    let report = executor.run(prompts(10)).await;
    assert_eq!(start.elapsed(), ms(5500), "returns at the deadline");
    assert_eq!(mock.in_flight(), 0, "in-flight calls were cancelled");
    let statuses: Vec<_> = report.results.iter().map(|r| r.outcome.status()).collect();
    // p0 (0s), p1 (1s), p2 (2s), p3 (3s) start at 0; p4 at 0 -> 4s; p5 at 1 -> 6s ...
    let (ok, timed_out) = (Status::Succeeded, Status::TimedOut);
    assert_eq!(
        statuses,
        [ok, ok, ok, ok, ok, timed_out, timed_out, timed_out, timed_out, Status::NotRun]
    );
    assert_eq!(
        report.results[5].outcome,
        Outcome::TimedOut { timeout: Timeout::Deadline, attempts: 1 }
    );
    assert_eq!(report.results[9].outcome, Outcome::NotRun(NotRun::Deadline));
    assert_eq!(report.results[4].outcome.text(), Some("a4"));
    assert_eq!(report.totals.tasks, 10);
}

#[tokio::test(start_paused = true)]
async fn cancellation_stops_launching_and_returns_what_finished() {
    let mock = staircase(10);
    let token = CancellationToken::new();
    let executor =
        Executor::builder(mock.clone()).concurrency(4).cancel_token(token.clone()).build();
    let cancel_later = tokio::spawn(async move {
        tokio::time::sleep(ms(2500)).await;
        token.cancel();
    });
    let start = Instant::now();
    let report = executor.run(prompts(10)).await;
    cancel_later.await.unwrap();
    assert_eq!(start.elapsed(), ms(2500));
    assert_eq!(mock.in_flight(), 0);
    let count = |status| report.results.iter().filter(|r| r.outcome.status() == status).count();
    // p0, p1, p2 finished; p3, p4, p5, p6 were in flight (p4-p6 started at 0, 1, 2 s).
    assert_eq!(count(Status::Succeeded), 3);
    assert_eq!(count(Status::Cancelled), 4);
    assert_eq!(count(Status::NotRun), 3);
    assert_eq!(report.results[9].outcome, Outcome::NotRun(NotRun::Cancelled));
}

/// The streaming API accounts for every task at the deadline too, in order.
#[tokio::test(start_paused = true)]
async fn ordered_stream_at_deadline_yields_every_task() {
    let executor = Executor::builder(staircase(10)).concurrency(4).deadline(Some(ms(5500))).build();
    let tasks = futures_util::stream::iter(prompts(10).into_iter().map(Task::new));
    let results: Vec<_> = executor.stream_ordered(tasks).collect().await;
    let indices: Vec<_> = results.iter().map(|r| r.index).collect();
    assert_eq!(indices, (0..10).collect::<Vec<_>>());
    assert_eq!(results.iter().filter(|r| r.outcome.is_success()).count(), 5);
}

/// Draining stops launching but lets in-flight calls finish; the rest are not run.
#[tokio::test(start_paused = true)]
async fn drain_lets_in_flight_tasks_finish() {
    let mock = staircase(10);
    let drain = CancellationToken::new();
    let executor =
        Executor::builder(mock.clone()).concurrency(4).drain_token(drain.clone()).build();
    let drain_later = tokio::spawn(async move {
        tokio::time::sleep(ms(2500)).await;
        drain.cancel();
    });
    let start = Instant::now();
    let report = executor.run(prompts(10)).await;
    drain_later.await.unwrap();
    // p3..p6 were in flight at 2.5 s; p6 started at 2 s and takes 6 s.
    assert_eq!(start.elapsed(), secs(8));
    assert_eq!(report.totals.succeeded, 7);
    assert_eq!(report.totals.not_run, 3);
    assert_eq!(report.results[7].outcome, Outcome::NotRun(NotRun::Cancelled));
    assert_eq!(mock.calls(), 7);
}

/// Settled tasks (known outcomes) take their place in order without a call.
#[tokio::test(start_paused = true)]
async fn settled_tasks_pass_through_in_order() {
    let mock = staircase(6);
    let executor = Executor::builder(mock.clone()).concurrency(2).build();
    let bad_row = fanout::ProviderError::new(fanout::ErrorKind::BadRequest, "line 3: invalid JSON");
    let tasks = prompts(6).into_iter().enumerate().map(move |(i, request)| match i {
        2 => Task::settled("2", Outcome::failed(bad_row.clone(), 0)),
        4 => Task::settled("4", Outcome::NotRun(NotRun::Cancelled)),
        _ => Task::with_id(i.to_string(), request),
    });
    let results: Vec<_> =
        executor.stream_ordered(futures_util::stream::iter(tasks)).collect().await;
    let statuses: Vec<_> = results.iter().map(|r| (r.index, r.outcome.status())).collect();
    assert_eq!(
        statuses,
        [
            (0, Status::Succeeded),
            (1, Status::Succeeded),
            (2, Status::Failed),
            (3, Status::Succeeded),
            (4, Status::NotRun),
            (5, Status::Succeeded)
        ]
    );
    assert_eq!(mock.calls(), 4, "settled tasks are never sent");
}
