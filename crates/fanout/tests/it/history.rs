//! Every result carries the history of its calls: each attempt and hedge, when
//! it was sent, how long it took and how it ended, cut calls included.

use std::time::Duration;

use fanout::{
    Behavior, CallEnd, CallRecord, CallRole, ErrorKind, Executor, HedgePolicy, MockProvider,
    Request, Task, TaskResult,
};

use crate::{ms, secs};

async fn run_one(executor: &Executor, prompt: &str) -> TaskResult {
    let mut report = executor.run([Task::new(Request::user(prompt))]).await;
    report.results.remove(0)
}

fn shape(calls: &[CallRecord]) -> Vec<(u32, CallRole, CallEnd, Duration)> {
    calls.iter().map(|c| (c.attempt, c.role, c.end, c.elapsed)).collect()
}

/// Sent after `earlier` by `gap`.
fn gap(earlier: &CallRecord, later: &CallRecord) -> Duration {
    later.started_at.duration_since(earlier.started_at).unwrap()
}

/// A 500, then a retry that straggles and is hedged: the hedge wins and the
/// outrun retry is logged as cancelled at the moment it lost.
#[tokio::test(start_paused = true)]
async fn retries_and_hedges_are_logged_with_their_ends() {
    let mock = MockProvider::new().with_latency(ms(100));
    mock.script("p", [Behavior::server_error(), Behavior::reply("slow").after(secs(10))]);
    let executor = Executor::builder(mock)
        .probe(false)
        .hedge(Some(HedgePolicy::after(secs(1)).with_budget(1.0)))
        .build();
    let result = run_one(&executor, "p").await;
    assert!(result.outcome.is_success(), "{:?}", result.outcome);
    let failed = CallEnd::Failed { kind: ErrorKind::Server, status: Some(500) };
    assert_eq!(
        shape(&result.calls),
        [
            (1, CallRole::First, failed, ms(100)),
            (2, CallRole::Retry, CallEnd::Cancelled, ms(1100)),
            (2, CallRole::Hedge, CallEnd::Answered, ms(100)),
        ]
    );
    let [first, retry, hedge] = &result.calls[..] else { unreachable!() };
    assert!(gap(first, retry) > ms(100), "the retry waited its backoff after the failure");
    assert_eq!(gap(retry, hedge), secs(1), "the hedge went out at its threshold");
    assert!(hedge.usage.output_tokens > 0 && retry.usage.output_tokens == 0);
    assert_eq!(result.outcome.usage(), hedge.usage, "the task paid for the winner only");
}

/// A 429 with a retry-after: the retry goes out when the pause ends.
#[tokio::test(start_paused = true)]
async fn a_rate_limited_call_and_its_retry() {
    let mock = MockProvider::new().with_latency(ms(50));
    mock.script("p", [Behavior::rate_limited(Some(secs(2)))]);
    let executor = Executor::builder(mock).probe(false).build();
    let result = run_one(&executor, "p").await;
    let limited = CallEnd::Failed { kind: ErrorKind::RateLimited, status: Some(429) };
    assert_eq!(
        shape(&result.calls),
        [(1, CallRole::First, limited, ms(50)), (2, CallRole::Retry, CallEnd::Answered, ms(50))]
    );
    let waited = gap(&result.calls[0], &result.calls[1]) - ms(50);
    assert!(waited >= secs(2) && waited < ms(2600), "{waited:?}");
}

/// A task cut by its timeout still says what its call did; only streamed
/// calls have a time to first token.
#[tokio::test(start_paused = true)]
async fn cut_calls_and_first_tokens() {
    let mock = MockProvider::new().with_latency(ms(100));
    mock.script("hung", [Behavior::hang()]);
    mock.script("streamed", [Behavior::stream("a b c", 3, ms(20))]);
    let executor = Executor::builder(mock).probe(false).hedge(None).task_timeout(secs(5)).build();
    let hung = run_one(&executor, "hung").await;
    assert_eq!(shape(&hung.calls), [(1, CallRole::First, CallEnd::Cancelled, secs(5))]);
    let streamed = run_one(&executor, "streamed").await;
    let call = &streamed.calls[0];
    assert_eq!(call.end, CallEnd::Answered);
    let first = call.first_token.expect("a streamed call has a first token");
    assert!(first >= ms(100) && first < call.elapsed, "{first:?} of {:?}", call.elapsed);
    let plain = run_one(&executor, "plain").await;
    assert_eq!(plain.calls[0].first_token, None);
}

/// With history off, results carry none.
#[tokio::test(start_paused = true)]
async fn history_can_be_turned_off() {
    let executor = Executor::builder(MockProvider::new()).call_history(false).build();
    let result = run_one(&executor, "p").await;
    assert!(result.outcome.is_success() && result.calls.is_empty());
}

/// The result sink sees every task of a run and every call a branch makes,
/// each with its history: what a recorder needs, whatever the pattern.
#[tokio::test(start_paused = true)]
async fn the_result_sink_sees_every_task_and_branch_call() {
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let executor = Executor::builder(MockProvider::new().with_latency(ms(10)))
        .probe(false)
        .on_result(move |result| {
            sink.lock().unwrap().push((result.id.to_string(), result.calls.len()));
        })
        .build();
    executor.run([Task::with_id("task", Request::user("a"))]).await;
    executor
        .branches([fanout::Branch::new("branch", |calls| async move {
            calls.complete(Request::user("b")).await;
            calls.complete(Request::user("c")).await;
        })])
        .await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, [("task".into(), 1), ("branch".into(), 1), ("branch".into(), 1)]);
}
