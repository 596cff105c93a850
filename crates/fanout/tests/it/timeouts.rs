use fanout::{Behavior, ErrorKind, Event, Executor, MockProvider, Outcome, Timeout};
use tokio::time::Instant;

use crate::{Recorder, ms, prompts, secs};

/// An attempt that hangs is cut at the attempt timeout and retried.
#[tokio::test(start_paused = true)]
async fn hung_attempt_times_out_and_is_retried() {
    let mock = MockProvider::new().with_call_log();
    mock.script("p0", [Behavior::hang(), Behavior::reply("second try")]);
    let recorder = Recorder::default();
    let executor = recorder
        .attach(Executor::builder(mock.clone()).attempt_timeout(Some(secs(3))).seed(1))
        .build();
    let start = Instant::now();
    let report = executor.run(prompts(1)).await;
    let success = report.results[0].outcome.success().unwrap();
    assert_eq!((success.response.text.as_str(), success.attempts), ("second try", 2));
    let retry = recorder.events().into_iter().find_map(|(_, e)| match e {
        Event::Retrying { error, delay, .. } => Some((error.kind(), delay)),
        _ => None,
    });
    let (kind, delay) = retry.expect("a retry event");
    assert_eq!(kind, ErrorKind::Timeout);
    // Timers fire on millisecond ticks.
    let second_call = mock.call_log()[1].at - start;
    let expected = secs(3) + delay;
    assert!(second_call.abs_diff(expected) < ms(1), "{second_call:?} vs {expected:?}");
}

/// The task timeout bounds all attempts and waits together.
#[tokio::test(start_paused = true)]
async fn task_timeout_bounds_all_attempts() {
    let mock = MockProvider::new().with_rule(|_| Some(Behavior::hang()));
    // Sixteen slots without a probe window: the timeouts halve the limit, which
    // still leaves a slot for every retry.
    let executor = Executor::builder(mock.clone())
        .concurrency(16)
        .probe(false)
        .attempt_timeout(Some(secs(2)))
        .task_timeout(Some(secs(5)))
        .max_attempts(100)
        .build();
    let start = Instant::now();
    let report = executor.run(prompts(3)).await;
    assert_eq!(start.elapsed(), secs(5));
    for result in &report.results {
        let Outcome::TimedOut { timeout, attempts } = result.outcome else { panic!("{result:?}") };
        assert_eq!(timeout, Timeout::Task);
        assert!(attempts >= 2, "{attempts}");
    }
    assert_eq!(mock.in_flight(), 0);
}
