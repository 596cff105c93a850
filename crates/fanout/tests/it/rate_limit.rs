use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fanout::Budget;
use fanout::{
    Behavior, Event, Executor, MockProvider, Provider, ProviderError, RateLimit, Request, Response,
    Usage,
};
use tokio::time::Instant;

use crate::{Recorder, ms, prompts, secs};

/// One task's 429 pauses every task until the provider's retry-after.
#[tokio::test(start_paused = true)]
async fn a_429_pauses_every_task() {
    let start = Instant::now();
    let mock = MockProvider::new().with_latency(ms(100)).with_call_log();
    mock.script("p0", [Behavior::rate_limited(Some(secs(10))).after(ms(50))]);
    let recorder = Recorder::default();
    let executor =
        recorder.attach(Executor::builder(mock.clone()).concurrency(4).probe(false)).build();
    let report = executor.run(prompts(20)).await;
    assert_eq!(report.totals.succeeded, 20);
    assert_eq!(report.totals.rate_limited, 1);
    let pause_start = start + ms(50);
    let pause_end = pause_start + secs(10);
    let calls = mock.call_log();
    assert!(
        calls.iter().all(|c| c.at <= pause_start || c.at >= pause_end),
        "a call went out during the pause"
    );
    // Only the first four went out before the pause; everything else after it.
    assert_eq!(calls.iter().filter(|c| c.at < pause_end).count(), 4);
    let retry = calls.iter().filter(|c| c.prompt == "p0").nth(1).unwrap();
    assert_eq!(retry.at, pause_end, "p0 is retried exactly at the retry-after");
    let paused: Vec<_> = recorder
        .events()
        .into_iter()
        .filter_map(|(_, e)| match e {
            Event::Paused { duration, .. } => Some(duration),
            _ => None,
        })
        .collect();
    assert_eq!(paused, [secs(10)]);
}

/// Without Retry-After, the reset of the exhausted x-ratelimit budget decides the pause.
#[tokio::test(start_paused = true)]
async fn a_429_without_retry_after_waits_for_the_exhausted_budget_reset() {
    let start = Instant::now();
    let headers = RateLimit {
        requests: Budget { limit: Some(100), remaining: Some(0), reset: Some(secs(7)) },
        tokens: Budget { limit: Some(10_000), remaining: Some(5_000), reset: Some(secs(60)) },
        ..RateLimit::default()
    };
    let error = ProviderError::from_status(429, "Rate limit reached").with_rate_limit(headers);
    assert_eq!(error.retry_after(), Some(secs(7)));
    let mock = MockProvider::new().with_call_log();
    mock.script("p0", [Behavior::fail(error)]);
    let report = Executor::builder(mock.clone()).concurrency(1).build().run(prompts(2)).await;
    assert_eq!(report.totals.succeeded, 2);
    let times: Vec<_> = mock.call_log().iter().map(|c| c.at - start).collect();
    assert_eq!(times, [ms(0), secs(7), secs(7)]);
}

/// Repeated 429s shrink the effective concurrency (once per launch generation,
/// not once per 429) and it grows back once they stop.
#[tokio::test(start_paused = true)]
async fn concurrency_shrinks_on_429s_and_grows_back() {
    let mock = MockProvider::new().with_latency(ms(100)).with_rule(|call| {
        (call.number <= 48).then(|| Behavior::rate_limited(Some(ms(200))).after(ms(100)))
    });
    let recorder = Recorder::default();
    let executor =
        recorder.attach(Executor::builder(mock.clone()).concurrency(16).probe(false)).build();
    let report = executor.run(prompts(600)).await;
    assert_eq!(report.totals.succeeded, 600);
    let limits = recorder.concurrency_limits();
    let lowest = *limits.iter().min().unwrap();
    // The first wave of 16 parallel 429s halves once, not sixteen times.
    assert_eq!(limits[0], 8, "{limits:?}");
    assert!((1..8).contains(&lowest), "{limits:?}");
    assert_eq!(executor.concurrency_limit(), 16, "grew back: {limits:?}");
    assert!(mock.max_in_flight() <= 16);
}

/// A provider that meters a per-minute limit as a token bucket holding only a
/// few seconds' worth, and reports it as OpenAI does: the limit per minute, what
/// remains, and the time until the bucket is full.
struct BucketServer {
    per_minute: u64,
    capacity: f64,
    level: Mutex<(f64, Instant)>,
    rejected: AtomicU64,
}

#[async_trait::async_trait]
impl Provider for BucketServer {
    fn name(&self) -> &str {
        "bucket"
    }

    async fn complete(&self, _: &Request) -> Result<Response, ProviderError> {
        // Counted on arrival, answered after the latency, as real servers do.
        let per_second = self.per_minute as f64 / 60.0;
        let (admitted, level) = {
            let mut state = self.level.lock().unwrap();
            let now = Instant::now();
            let level = (state.0 + (now - state.1).as_secs_f64() * per_second).min(self.capacity);
            let admitted = level >= 1.0;
            *state = (if admitted { level - 1.0 } else { level }, now);
            (admitted, state.0)
        };
        tokio::time::sleep(ms(100)).await;
        let rate_limit = RateLimit {
            requests: Budget {
                limit: Some(self.per_minute),
                remaining: Some(level as u64),
                reset: Some(Duration::from_secs_f64((self.capacity - level) / per_second)),
            },
            ..RateLimit::default()
        };
        if !admitted {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(ProviderError::from_status(429, "over").with_rate_limit(rate_limit));
        }
        let mut response = Response::new("ok", Usage::default());
        response.rate_limit = Some(rate_limit);
        Ok(response)
    }
}

/// With no limits configured, the reported remaining budget alone keeps the
/// executor from drawing 429s.
#[tokio::test(start_paused = true)]
async fn reported_budget_paces_the_executor_without_429s() {
    // 60 a minute, spent at most 5 at once.
    let server = std::sync::Arc::new(BucketServer {
        per_minute: 60,
        capacity: 5.0,
        level: Mutex::new((5.0, Instant::now())),
        rejected: AtomicU64::new(0),
    });
    let executor = Executor::builder(server.clone()).concurrency(3).probe(false).build();
    let report = executor.run(prompts(20)).await;
    assert_eq!(report.totals.succeeded, 20);
    assert_eq!(server.rejected.load(Ordering::Relaxed), 0, "{:?}", report.totals);
    // Five at once, then one a second: the last of the other 15 starts at 15 s.
    let wall = report.totals.wall;
    assert!(wall >= secs(15) && wall < secs(16), "{wall:?}");
}
