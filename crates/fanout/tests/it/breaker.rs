use fanout::{Behavior, ErrorKind, Executor, MockProvider, NotRun, Outcome, ProviderError};

use crate::{ms, prompts};

/// A bad key on a 10,000-task job costs a handful of calls, not 10,000.
#[tokio::test(start_paused = true)]
async fn bad_key_costs_a_handful_of_calls() {
    let mock =
        MockProvider::new().with_latency(ms(50)).with_rule(|_| Some(Behavior::unauthorized()));
    let executor = Executor::builder(mock.clone()).concurrency(500).build();
    let report = executor.run(prompts(10_000)).await;
    assert_eq!(mock.calls(), 3, "the probe window is the breaker's threshold");
    assert_eq!(report.results.len(), 10_000);
    assert_eq!((report.totals.failed, report.totals.not_run), (3, 9_997));
    for result in &report.results[3..] {
        let Outcome::NotRun(NotRun::CircuitOpen(cause)) = &result.outcome else {
            panic!("{result:?}")
        };
        assert_eq!(cause.kind(), ErrorKind::Auth);
    }
}

/// Without the probe, the breaker still stops launching after the first answers.
#[tokio::test(start_paused = true)]
async fn unknown_model_stops_the_job_without_probe() {
    let not_found = ProviderError::from_status(404, "model `gpt-9` does not exist");
    let mock = MockProvider::new()
        .with_latency(ms(50))
        .with_rule(move |_| Some(Behavior::fail(not_found.clone())));
    let executor = Executor::builder(mock.clone()).concurrency(20).probe(false).build();
    let report = executor.run(prompts(5_000)).await;
    assert_eq!(mock.calls(), 20, "only the first wave went out");
    assert_eq!(report.totals.failed + report.totals.not_run, 5_000);
    assert_eq!(report.totals.not_run, 4_980);
}

/// Fatal answers broken up by successes (one bad task among good ones) do not
/// stop the job.
#[tokio::test(start_paused = true)]
async fn isolated_fatal_answers_do_not_open_the_breaker() {
    let mock = MockProvider::new().with_rule(|call| {
        (call.request.prompt().ends_with('7')).then(|| ErrorKind::NotFound.into())
    });
    let report = Executor::builder(mock).concurrency(4).build().run(prompts(100)).await;
    assert_eq!((report.totals.succeeded, report.totals.failed, report.totals.not_run), (90, 10, 0));
}
