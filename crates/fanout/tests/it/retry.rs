use fanout::{
    Behavior, ErrorKind, Event, Executor, MockProvider, Outcome, ProviderError, RetryPolicy,
};
use tokio::time::Instant;

use crate::{Recorder, ms, prompts, secs};

#[tokio::test(start_paused = true)]
async fn retryable_errors_are_retried_until_success() {
    let mock = MockProvider::new();
    mock.script(
        "p0",
        [
            Behavior::server_error(),
            ErrorKind::Overloaded.into(),
            ErrorKind::Connection.into(),
            ErrorKind::MalformedResponse.into(),
            Behavior::rate_limited(None),
            Behavior::reply("finally"),
        ],
    );
    let recorder = Recorder::default();
    let executor = recorder.attach(Executor::builder(mock.clone()).max_attempts(6).seed(3)).build();
    let report = executor.run(prompts(1)).await;
    let success = report.results[0].outcome.success().expect("succeeded");
    assert_eq!((success.response.text.as_str(), success.attempts), ("finally", 6));
    assert_eq!((report.totals.calls, report.totals.retries, report.totals.rate_limited), (6, 5, 1));
    let policy = RetryPolicy::default();
    let delays: Vec<_> = recorder
        .events()
        .into_iter()
        .filter_map(|(_, e)| match e {
            Event::Retrying { attempt, delay, .. } => Some((attempt, delay)),
            _ => None,
        })
        .collect();
    assert_eq!(delays.len(), 5);
    for (attempt, delay) in delays {
        let ceiling = policy.base_delay * 2u32.pow(attempt - 1);
        assert!(delay <= ceiling.min(policy.max_delay), "retry {attempt} waited {delay:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn non_retryable_errors_fail_after_one_attempt() {
    for (status, kind) in [
        (400, ErrorKind::BadRequest),
        (401, ErrorKind::Auth),
        (403, ErrorKind::Auth),
        (404, ErrorKind::NotFound),
        (402, ErrorKind::Quota),
    ] {
        let mock = MockProvider::new();
        mock.script("p0", [Behavior::fail(ProviderError::from_status(status, "no"))]);
        let executor = Executor::builder(mock.clone()).circuit_breaker(0).build();
        let report = executor.run(prompts(1)).await;
        let Outcome::Failed { error, attempts, .. } = &report.results[0].outcome else {
            panic!("HTTP {status}: {:?}", report.results[0].outcome)
        };
        assert_eq!((error.kind(), *attempts, mock.calls()), (kind, 1, 1), "HTTP {status}");
    }
}

#[tokio::test(start_paused = true)]
async fn retries_stop_at_max_attempts_with_the_last_error() {
    let mock = MockProvider::new().with_rule(|_| Some(Behavior::server_error()));
    let report = Executor::builder(mock.clone()).max_attempts(3).build().run(prompts(1)).await;
    let Outcome::Failed { error, attempts, .. } = &report.results[0].outcome else { panic!() };
    assert_eq!((error.status(), *attempts, mock.calls()), (Some(500), 3, 3));
}

/// A retry-after from the provider replaces the backoff, exactly.
#[tokio::test(start_paused = true)]
async fn retry_after_overrides_backoff() {
    let start = Instant::now();
    let mock = MockProvider::new().with_call_log();
    let overloaded = ProviderError::from_status(529, "overloaded").with_retry_after(secs(7));
    mock.script("p0", [Behavior::fail(overloaded.clone()), Behavior::fail(overloaded)]);
    let report = Executor::builder(mock.clone()).build().run(prompts(1)).await;
    assert!(report.results[0].outcome.is_success());
    let times: Vec<_> = mock.call_log().iter().map(|c| c.at - start).collect();
    assert_eq!(times, [ms(0), secs(7), secs(14)]);
}
