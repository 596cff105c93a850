use fanout::{Behavior, ErrorKind, Executor, MockProvider, Outcome, Request, Response, Usage};
use proptest::prelude::*;
use tokio::time::Instant;

use crate::{calls_fit_the_rate, ms, paused_runtime, prompts, secs, tokens_fit_the_budget};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random latencies and failures never push the calls in flight over the cap,
    /// and every task is accounted for.
    #[test]
    fn concurrency_cap_is_never_exceeded(
        concurrency in 1usize..12,
        latencies in proptest::collection::vec(0u64..400, 1..60),
        fail_every in 2u64..9,
    ) {
        paused_runtime().block_on(async {
            let n = latencies.len();
            let mock = MockProvider::new();
            for (i, latency) in latencies.iter().enumerate() {
                mock.script(format!("p{i}"), [Behavior::reply("ok").after(ms(*latency))]);
            }
            let mock = mock.with_rule(move |call| {
                (call.number % fail_every == 0).then(|| Behavior::server_error().after(ms(30)))
            });
            let executor = Executor::builder(mock.clone()).concurrency(concurrency).build();
            let report = executor.run(prompts(n)).await;
            prop_assert!(mock.max_in_flight() <= concurrency as u64);
            prop_assert_eq!(report.results.len(), n);
            prop_assert_eq!(report.totals.succeeded + report.totals.failed, n);
            Ok(())
        })?;
    }

    /// In any window of time, calls never exceed the burst plus what the rate
    /// refills in that window.
    #[test]
    fn rpm_is_never_exceeded(
        rpm in 30u64..1200,
        n in 10usize..80,
        latency in 0u64..200,
        concurrency in 1usize..40,
    ) {
        paused_runtime().block_on(async {
            let mock = MockProvider::new().with_latency(ms(latency)).with_call_log();
            let executor = Executor::builder(mock.clone()).concurrency(concurrency).rpm(rpm).build();
            let report = executor.run(prompts(n)).await;
            prop_assert_eq!(report.totals.succeeded, n);
            let times: Vec<Instant> = mock.call_log().iter().map(|c| c.at).collect();
            if let Err(excess) = calls_fit_the_rate(&times, rpm) {
                prop_assert!(false, "{}", excess);
            }
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Reservations are the most a call can use and are corrected with what it
    /// did use, so the tokens actually used by the calls started in any window
    /// never exceed the budget plus what refills in that window.
    #[test]
    fn tpm_is_never_exceeded(
        tpm in 2_000u64..20_000,
        max_tokens in proptest::collection::vec(1u32..800, 5..60),
        latency in 0u64..300,
        concurrency in 1usize..20,
    ) {
        paused_runtime().block_on(async {
            let n = max_tokens.len();
            let mock = MockProvider::new().with_latency(ms(latency)).with_call_log();
            let executor = Executor::builder(mock.clone()).concurrency(concurrency).tpm(tpm).build();
            let requests = prompts(n).into_iter().zip(&max_tokens).map(|(r, m)| r.with_max_tokens(*m));
            let report = executor.run(requests).await;
            prop_assert_eq!(report.totals.succeeded, n);
            // What each call used, by prompt (the mock reports estimated usage).
            let used = |prompt: &str| report.get(&prompt[1..]).unwrap().usage().total() as f64;
            let calls: Vec<(Instant, f64)> =
                mock.call_log().iter().map(|c| (c.at, used(&c.prompt))).collect();
            if let Err(excess) = tokens_fit_the_budget(&calls, tpm) {
                prop_assert!(false, "{}", excess);
            }
            Ok(())
        })?;
    }
}

/// The TPM budget reserves prompt + max output before each call and is
/// corrected with the usage the provider reports.
#[tokio::test(start_paused = true)]
async fn tpm_reservations_are_corrected_by_reported_usage() {
    let requests = || prompts(20).into_iter().map(|r| r.with_max_tokens(1000));
    // p0.. are one token of text plus four of framing: 1005 reserved each.
    let frugal = MockProvider::new();
    let start = Instant::now();
    let report = Executor::builder(frugal).concurrency(20).tpm(6000).build().run(requests()).await;
    assert_eq!(report.totals.succeeded, 20);
    assert!(start.elapsed() < ms(10), "refunds let all 20 through at once: {:?}", start.elapsed());

    let hungry = MockProvider::new().with_rule(|_| {
        let usage = Usage::new(5, 1000);
        Some(Behavior::respond(Response::new("long answer", usage)))
    });
    let start = Instant::now();
    let report = Executor::builder(hungry).concurrency(20).tpm(6000).build().run(requests()).await;
    assert_eq!(report.totals.succeeded, 20);
    // 20 x 1005 tokens, 6000 at once, then 100 a second: the last starts at 141 s.
    let elapsed = start.elapsed().as_secs_f64();
    assert!((140.9..141.1).contains(&elapsed), "{elapsed}");
}

/// Without `max_tokens`, a call reserves a long answer until answers have been
/// seen; then the prompt and the longest recent answer, so short answers are
/// not paced as if they were long.
#[tokio::test(start_paused = true)]
async fn tpm_reservations_without_max_tokens_learn_the_answers_length() {
    let short_answers = || {
        MockProvider::new().with_latency(secs(1)).with_rule(|_| {
            let usage = Usage::new(5, 5);
            Some(Behavior::respond(Response::new("short", usage)))
        })
    };
    // 600 tokens at once, then 10 a second.
    let executor = |mock| Executor::builder(mock).concurrency(5).tpm(600).hedge(None).build();
    let cold = executor(short_answers());
    let start = Instant::now();
    let report = cold.run(prompts(20)).await;
    assert_eq!(report.totals.succeeded, 20);
    let cold_wall = start.elapsed();
    // 5 + 256 tokens reserved for each of the first wave: two fit, the third
    // waits for the refill (and has reserved its place in line).
    assert!(cold_wall > secs(15), "{cold_wall:?}");

    let warm = executor(short_answers());
    assert!(warm.run(prompts(1)).await.totals.succeeded == 1);
    let start = Instant::now();
    let report = warm.run(prompts(20)).await;
    assert_eq!(report.totals.succeeded, 20);
    // 10 tokens reserved each: five at a time, four waves of a second.
    assert_eq!(start.elapsed(), secs(4));
}

#[tokio::test(start_paused = true)]
async fn request_larger_than_the_tpm_budget_fails_at_once() {
    let mock = MockProvider::new();
    let executor = Executor::builder(mock.clone()).tpm(1000).build();
    let start = Instant::now();
    let report = executor
        .run([
            Request::user("small").with_max_tokens(100),
            Request::user("huge").with_max_tokens(5000),
        ])
        .await;
    assert_eq!(start.elapsed(), ms(0));
    assert!(report.results[0].outcome.is_success());
    let Outcome::Failed { error, attempts, .. } = &report.results[1].outcome else {
        panic!("{:?}", report.results[1])
    };
    assert_eq!((error.kind(), *attempts), (ErrorKind::BadRequest, 0));
    assert!(error.message().contains("1000 tokens per minute"), "{error}");
    assert_eq!(mock.calls(), 1, "the huge request was never sent");
}
