//! One slow call never holds the rest back: no head-of-line blocking in the
//! unordered and held streams, stragglers hedged by default (judged by signs of
//! life, so a long streaming answer is left alone), slots held until the
//! receiver has the result safe, and rate limits waited out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use fanout::{
    Behavior, Check, Event, Executor, MockProvider, Outcome, Progress, Provider, ProviderError,
    Request, Response, Task, Timeout,
};
use futures_util::StreamExt;
use tokio::time::Instant;

use crate::{Recorder, ms, prompts, secs};

fn task_stream(n: usize) -> impl futures_util::Stream<Item = Task> + Send + 'static {
    futures_util::stream::iter(prompts(n).into_iter().map(Task::new))
}

/// With the head task hung forever (and nothing to rescue it: no hedging, no
/// attempt timeout), every other task runs and finishes at full concurrency;
/// only the hung one waits, until the deadline.
#[tokio::test(start_paused = true)]
async fn a_hung_task_never_stops_the_others() {
    let mock = MockProvider::new().with_latency(ms(100));
    mock.script("p0", [Behavior::hang()]);
    let executor = Executor::builder(mock.clone())
        .concurrency(8)
        .probe(false)
        .hedge(None)
        .attempt_timeout(None)
        .deadline(Some(secs(60)))
        .build();
    let start = Instant::now();
    let mut results = executor.stream(task_stream(1_000));
    let mut finished_at = Vec::new();
    while let Some(result) = results.next().await {
        finished_at.push((result.index, start.elapsed(), result.outcome));
    }
    assert_eq!(finished_at.len(), 1_000);
    let (last_other, others): (Vec<_>, Vec<_>) = finished_at.iter().partition(|r| r.0 == 0);
    assert!(
        matches!(last_other[0].2, Outcome::TimedOut { timeout: Timeout::Deadline, .. }),
        "the hung task is cut at the deadline: {:?}",
        last_other[0]
    );
    assert!(others.iter().all(|r| r.2.is_success()));
    // 999 tasks of 100 ms on the 7 free slots: 143 rounds.
    let done = others.iter().map(|r| r.1).max().unwrap();
    assert_eq!(done, ms(100) * 143, "the others ran at 7 of 8 slots the whole time");
}

/// Hedging is on by default: a straggler in the very first wave is rescued as
/// soon as the threshold is learned, within the budget, and the summary counts
/// the hedges sent and won.
#[tokio::test(start_paused = true)]
async fn stragglers_are_hedged_by_default_within_the_budget() {
    let mock = MockProvider::new().with_latency(ms(100)).with_jitter(ms(10), 3);
    for i in (0..2_000).step_by(50) {
        mock.script(format!("p{i}"), [Behavior::reply("slow").after(secs(10))]);
    }
    let executor = Executor::builder(mock.clone()).concurrency(100).build();
    let report = executor.run(prompts(2_000)).await;
    let totals = &report.totals;
    assert_eq!(totals.succeeded, 2_000);
    assert!(totals.hedges as f64 <= 0.05 * totals.calls as f64, "{totals:?}");
    assert_eq!(totals.hedges_won, 40, "every straggler's hedge won: {totals:?}");
    assert!(totals.wall < secs(3), "no 10 s straggler held the run: {:?}", totals.wall);
    let slowest = totals.latency.unwrap().max;
    assert!(slowest < secs(1), "{slowest:?}");
}

/// A hedge that draws the slow tail too gets a hedge of its own: one 10 s call
/// in the race does not bound the task.
#[tokio::test(start_paused = true)]
async fn a_straggling_hedge_is_hedged_again() {
    let mock = MockProvider::new().with_latency(ms(100));
    let slow = || Behavior::reply("slow").after(secs(10));
    mock.script("p0", [slow(), slow()]);
    let executor = Executor::builder(mock.clone()).concurrency(10).build();
    let report = executor.run(prompts(100)).await;
    assert_eq!(report.totals.succeeded, 100);
    let first = report.results[0].outcome.success().unwrap();
    assert!(first.latency < secs(1), "{:?}", first.latency);
    assert_eq!(first.response.text, "mock answer: p0", "the second hedge answered");
    assert_eq!((report.totals.hedges, report.totals.hedges_won), (2, 1));
}

/// A long answer streaming steadily is never hedged nor cut by the attempt
/// timeout, however long it takes; a stream that stalls is hedged.
#[tokio::test(start_paused = true)]
async fn a_streaming_answer_is_judged_by_its_progress() {
    let mock = MockProvider::new().with_latency(ms(100));
    // After 40 quick answers, p0..p2 stream for 60 s (a part every 200 ms).
    let long = || Behavior::stream("long answer", 300, ms(200));
    let recorder = Recorder::default();
    let executor = recorder
        .attach(Executor::builder(mock.clone()).concurrency(5).attempt_timeout(Some(secs(5))))
        .build();
    let warm_up = executor.run(prompts(40).into_iter().map(|r| {
        let mut r = r;
        r.messages[0].content.push_str("-warm");
        r
    }));
    let warm = warm_up.await;
    assert_eq!(warm.totals.succeeded, 40);
    for i in 0..3 {
        mock.script(format!("p{i}"), [long()]);
    }
    mock.script("p3", [Behavior::stall_after(2, ms(200)), Behavior::reply("rescued")]);
    let report = executor.run(prompts(4)).await;
    for i in 0..3 {
        let success = report.results[i].outcome.success().unwrap();
        assert_eq!(success.response.text, "long answer");
        assert_eq!(success.attempts, 1, "never cut");
        assert!(success.latency >= secs(60));
    }
    let hedged: Vec<_> = recorder
        .events()
        .into_iter()
        .filter_map(|(_, e)| match e {
            Event::Hedged { index, .. } => Some(index),
            _ => None,
        })
        .collect();
    assert_eq!(hedged, [3], "only the stalled stream was hedged");
    assert_eq!(report.results[3].outcome.text(), Some("rescued"));
}

/// Without hedging, a stalled stream is cut by the attempt timeout, measured
/// from its last sign of life, and retried.
#[tokio::test(start_paused = true)]
async fn a_stalled_stream_is_cut_from_its_last_sign_of_life() {
    let mock = MockProvider::new().with_call_log();
    mock.script("p0", [Behavior::stall_after(5, ms(500)), Behavior::reply("second try")]);
    let executor =
        Executor::builder(mock.clone()).hedge(None).attempt_timeout(Some(secs(3))).seed(1).build();
    let start = Instant::now();
    let report = executor.run(prompts(1)).await;
    let success = report.results[0].outcome.success().unwrap();
    assert_eq!((success.response.text.as_str(), success.attempts), ("second try", 2));
    // Parts at 0, 0.5, ... 2.0 s, then silence: cut 3 s after the last part,
    // then the retry's backoff (at most 500 ms).
    let retried_at = mock.call_log()[1].at - start;
    assert!(retried_at >= ms(5_000) && retried_at < ms(5_500), "{retried_at:?}");
}

/// Held results keep their slot until dropped: while the receiver holds
/// results, no new call starts beyond the concurrency.
#[tokio::test(start_paused = true)]
async fn held_results_keep_their_slots_until_dropped() {
    let mock = MockProvider::new().with_latency(ms(10));
    let executor = Executor::builder(mock.clone()).concurrency(4).hedge(None).probe(false).build();
    let mut results = executor.stream_held(task_stream(20));
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(results.next().await.unwrap());
    }
    tokio::time::sleep(secs(10)).await;
    assert_eq!(mock.calls(), 4, "four results unsaved: no fifth call");
    held.clear();
    // Each result is safe at once here: its slot goes with it.
    let rest: Vec<_> = results.map(|held| held.result).collect().await;
    assert_eq!(rest.len(), 16);
    assert_eq!(mock.calls(), 20);
}

/// 429s never use up the attempts meant for errors: a task rate limited ten
/// times with three attempts allowed still succeeds.
#[tokio::test(start_paused = true)]
async fn rate_limits_are_waited_out_not_counted_as_failures() {
    let mock = MockProvider::new();
    let limited = (0..10).map(|_| Behavior::rate_limited(Some(ms(500))));
    mock.script("p0", limited.chain([Behavior::server_error(), Behavior::reply("done")]));
    let executor = Executor::builder(mock.clone()).max_attempts(3).hedge(None).build();
    let report = executor.run(prompts(1)).await;
    let success = report.results[0].outcome.success().unwrap();
    assert_eq!((success.response.text.as_str(), success.attempts), ("done", 12));
    assert_eq!(report.totals.rate_limited, 10);
}

/// A provider whose check says the credentials are good starts at full
/// concurrency at once, without waiting a latency for the probe's answer.
#[tokio::test(start_paused = true)]
async fn a_good_check_opens_the_probe_window_at_once() {
    struct Checked {
        mock: MockProvider,
        checked: AtomicBool,
    }

    #[async_trait::async_trait]
    impl Provider for Checked {
        fn name(&self) -> &str {
            "checked"
        }

        async fn complete(&self, request: &Request) -> Result<Response, ProviderError> {
            self.mock.complete(request).await
        }

        async fn complete_observed(
            &self,
            request: &Request,
            progress: &Progress,
        ) -> Result<Response, ProviderError> {
            self.mock.complete_observed(request, progress).await
        }

        async fn check(&self) -> Check {
            tokio::time::sleep(ms(5)).await;
            self.checked.store(true, Ordering::Release);
            Check::Ready
        }
    }

    let mock = MockProvider::new().with_latency(ms(100));
    let provider = Arc::new(Checked { mock: mock.clone(), checked: AtomicBool::new(false) });
    let executor = Executor::builder_for(provider.clone()).concurrency(50).hedge(None).build();
    let report = executor.run(prompts(500)).await;
    assert!(provider.checked.load(Ordering::Acquire));
    assert_eq!(report.totals.succeeded, 500);
    // Ten rounds of 100 ms; the probe's three calls overlap the first.
    assert!(report.totals.wall <= ms(1_110), "{:?}", report.totals.wall);
    assert_eq!(mock.max_in_flight(), 50);

    let unchecked = MockProvider::new().with_latency(ms(100));
    let executor = Executor::builder(unchecked).concurrency(50).hedge(None).build();
    let report = executor.run(prompts(500)).await;
    assert!(report.totals.wall >= ms(1_100), "the probe costs a latency without a check");
}

/// A server that queues instead of answering 429: when attempt timeouts are
/// common they shrink the limit, and the retries wait for its slots (ahead of
/// new rows) instead of all going out again onto the server at once.
#[tokio::test(start_paused = true)]
async fn timeouts_that_shrink_the_limit_hold_retries_back() {
    /// Counts how many calls after the first wave are in flight at once.
    struct Gauge {
        mock: MockProvider,
        calls: AtomicU64,
        in_flight: Arc<AtomicU64>,
        most_retries_at_once: AtomicU64,
    }

    struct Leaving(Arc<AtomicU64>);

    impl Drop for Leaving {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[async_trait::async_trait]
    impl Provider for Gauge {
        fn name(&self) -> &str {
            "gauge"
        }

        async fn complete(&self, request: &Request) -> Result<Response, ProviderError> {
            self.complete_observed(request, &Progress::new()).await
        }

        async fn complete_observed(
            &self,
            request: &Request,
            progress: &Progress,
        ) -> Result<Response, ProviderError> {
            let number = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            let _leaving = Leaving(Arc::clone(&self.in_flight));
            if number > 8 {
                self.most_retries_at_once.fetch_max(now, Ordering::SeqCst);
            }
            self.mock.complete_observed(request, progress).await
        }
    }

    // The first wave hangs (the server is busy with a queue); later calls take 1 s.
    let mock = MockProvider::new()
        .with_latency(secs(1))
        .with_rule(|call| (call.number <= 8).then(Behavior::hang));
    let provider = Arc::new(Gauge {
        mock,
        calls: AtomicU64::new(0),
        in_flight: Arc::new(AtomicU64::new(0)),
        most_retries_at_once: AtomicU64::new(0),
    });
    let recorder = Recorder::default();
    let executor = recorder
        .attach(
            Executor::builder_for(provider.clone())
                .concurrency(8)
                .probe(false)
                .hedge(None)
                .attempt_timeout(Some(secs(2))),
        )
        .build();
    let report = executor.run(prompts(8)).await;
    assert_eq!(report.totals.succeeded, 8);
    assert_eq!(report.totals.calls, 16, "one retry each");
    let limits: Vec<usize> = recorder
        .events()
        .into_iter()
        .filter_map(|(_, e)| match e {
            Event::ConcurrencyChanged { limit } => Some(limit),
            _ => None,
        })
        .collect();
    assert_eq!(limits.first(), Some(&4), "common timeouts halve the limit: {limits:?}");
    // Without giving slots back, all eight retries would go out within the
    // backoff and overlap for their whole second.
    assert!(provider.most_retries_at_once.load(Ordering::SeqCst) <= 4);
}

/// A server that computes `capacity` calls at once, `service` each, and queues
/// the rest in arrival order; a call the client abandons is still computed, as
/// llama.cpp and vLLM do.
struct QueueingServer {
    workers: std::sync::Mutex<Vec<Instant>>,
    service: std::time::Duration,
    calls: AtomicU64,
}

impl QueueingServer {
    fn new(capacity: usize, service: std::time::Duration) -> Self {
        let now = Instant::now();
        Self {
            workers: std::sync::Mutex::new(vec![now; capacity]),
            service,
            calls: AtomicU64::new(0),
        }
    }
}

#[async_trait::async_trait]
impl Provider for QueueingServer {
    fn name(&self) -> &str {
        "queueing"
    }

    async fn complete(&self, request: &Request) -> Result<Response, ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let finish = {
            let mut workers = self.workers.lock().unwrap();
            let earliest = workers.iter_mut().min().unwrap();
            *earliest = (*earliest).max(Instant::now()) + self.service;
            *earliest
        };
        tokio::time::sleep_until(finish).await;
        Ok(Response::new(format!("answer to {}", request.prompt()), fanout::Usage::default())
            .with_finish_reason("stop"))
    }
}

/// Against a server that queues instead of answering 429 (24 rows at `-c 8`
/// with a 2 s attempt timeout, on a server computing 2 calls of 1 s at once),
/// every row succeeds and the calls abandoned in its queue stay bounded: 33
/// today, the first wave's 6 abandoned calls (unavoidable once the probe
/// opens the limit to 8) and 3 more. The bound guards against retries piling
/// on again: 60 calls and 8 failed rows on the mock server before retries
/// gave their slots back, 38 calls before an abandoned call's slot stayed
/// taken while the server still computed it.
#[tokio::test(start_paused = true)]
async fn a_queueing_server_gets_few_abandoned_calls() {
    let server = Arc::new(QueueingServer::new(2, secs(1)));
    let executor =
        Executor::builder_for(server.clone()).concurrency(8).attempt_timeout(Some(secs(2))).build();
    let report = executor.run(prompts(24)).await;
    assert_eq!(report.totals.succeeded, 24);
    let calls = server.calls.load(Ordering::SeqCst);
    assert!(calls <= 34, "{calls} calls for 24 rows");
}
