use fanout::{Behavior, Event, Executor, HedgePolicy, MockProvider};

use crate::{Recorder, ms, prompts, secs};

/// Every 20th task's first call takes 10 s; a duplicate after 1 s answers in 100 ms.
fn straggling(n: usize) -> MockProvider {
    let mock = MockProvider::new().with_latency(ms(100));
    for i in (0..n).step_by(20) {
        mock.script(format!("p{i}"), [Behavior::reply("slow").after(secs(10))]);
    }
    mock
}

#[tokio::test(start_paused = true)]
async fn hedges_rescue_stragglers_within_budget_and_limits() {
    let mock = straggling(400);
    let recorder = Recorder::default();
    let executor = recorder
        .attach(
            Executor::builder(mock.clone())
                .concurrency(10)
                .hedge(Some(HedgePolicy::after(secs(1)))),
        )
        .build();
    let report = executor.run(prompts(400)).await;
    assert_eq!(report.totals.succeeded, 400);
    let totals = &report.totals;
    assert_eq!(totals.hedges, 20, "every straggler was hedged");
    assert!(totals.hedges as f64 <= 0.05 * totals.calls as f64, "{totals:?}");
    assert!(mock.max_in_flight() <= 10, "hedges stay within the concurrency cap");
    for i in (0..400).step_by(20) {
        let success = report.results[i].outcome.success().unwrap();
        // The hedge goes out at 1 s, as soon as a slot frees, and takes 100 ms.
        let latency = success.latency;
        assert!(latency >= ms(1100) && latency <= ms(1200), "task {i} took {latency:?}");
        assert_eq!(success.response.text, format!("mock answer: p{i}"));
    }
    let hedged =
        recorder.events().iter().filter(|(_, e)| matches!(e, Event::Hedged { .. })).count();
    assert_eq!(hedged, 20);
}

#[tokio::test(start_paused = true)]
async fn hedge_budget_caps_extra_calls() {
    let mock = straggling(400);
    let policy = HedgePolicy::after(secs(1)).with_budget(0.01);
    let executor = Executor::builder(mock).concurrency(10).hedge(Some(policy)).build();
    let report = executor.run(prompts(400)).await;
    assert_eq!(report.totals.succeeded, 400);
    let totals = &report.totals;
    assert!(totals.hedges >= 1 && totals.hedges as f64 <= 0.01 * totals.calls as f64, "{totals:?}");
}

/// With a quantile threshold, hedging starts once enough latencies are known.
#[tokio::test(start_paused = true)]
async fn p95_threshold_is_learned_from_successes() {
    let mock = straggling(400).with_jitter(ms(20), 5);
    let executor = Executor::builder(mock).concurrency(10).hedge(Some(HedgePolicy::p95())).build();
    let report = executor.run(prompts(400)).await;
    assert_eq!(report.totals.succeeded, 400);
    // p0 straggles before 20 samples exist, and is hedged as soon as the
    // threshold is learned; the later ones are hedged near p95.
    let first = report.results[0].outcome.success().unwrap().latency;
    assert!(first < secs(1), "the first-wave straggler was rescued: {first:?}");
    let rescued = (20..400)
        .step_by(20)
        .filter(|&i| report.results[i].outcome.success().unwrap().latency < secs(1))
        .count();
    assert!(rescued >= 15, "{rescued} of 19 stragglers rescued");
    assert!(report.totals.hedges as f64 <= 0.05 * report.totals.calls as f64);
}
