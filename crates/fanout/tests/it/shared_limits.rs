//! Executors that share limits with others ([`SharedLimits`]): every call and
//! hedge is admitted through them and holds its lease while it runs, a 429
//! pauses everyone sharing them, and reservations are settled with the usage.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fanout::{Behavior, Executor, MockProvider, SharedLease, SharedLimits, async_trait};
use tokio::sync::Semaphore;
use tokio::time::{Instant, sleep_until};

use crate::{ms, prompts, secs};

/// Limits shared in memory, as a Redis limiter shares them between processes:
/// a global in-flight cap, and a pause everyone waits out.
#[derive(Debug)]
struct InMemory {
    slots: Arc<Semaphore>,
    paused_until: Mutex<Option<Instant>>,
    admitted: Mutex<u64>,
    settled: Mutex<Vec<(u64, u64)>>,
    pauses: Mutex<Vec<Duration>>,
    tokens_per_minute: Option<u64>,
}

impl InMemory {
    fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(slots)),
            paused_until: Mutex::new(None),
            admitted: Mutex::new(0),
            settled: Mutex::new(Vec::new()),
            pauses: Mutex::new(Vec::new()),
            tokens_per_minute: None,
        })
    }
}

#[async_trait]
impl SharedLimits for InMemory {
    async fn admit(&self, _tokens: u64) -> SharedLease {
        loop {
            let until = *self.paused_until.lock().unwrap();
            match until {
                Some(until) if until > Instant::now() => sleep_until(until).await,
                _ => break,
            }
        }
        let slot = Arc::clone(&self.slots).acquire_owned().await.unwrap();
        *self.admitted.lock().unwrap() += 1;
        SharedLease::new(move || drop(slot))
    }

    fn settle(&self, reserved: u64, used: u64) {
        self.settled.lock().unwrap().push((reserved, used));
    }

    fn tokens_per_minute(&self) -> Option<u64> {
        self.tokens_per_minute
    }

    fn pause(&self, wait: Duration) {
        self.pauses.lock().unwrap().push(wait);
        let mut until = self.paused_until.lock().unwrap();
        let end = Instant::now() + wait;
        if until.is_none_or(|u| u < end) {
            *until = Some(end);
        }
    }
}

/// Two executors of 8 calls each, sharing a global cap of 3, never have more
/// than 3 calls in flight together; every call is admitted once and settled,
/// and no place stays taken at the end.
#[tokio::test(start_paused = true)]
async fn executors_sharing_limits_stay_within_the_global_cap() {
    let mock = MockProvider::new().with_latency(ms(100));
    let shared = InMemory::new(3);
    let executor = || {
        Executor::builder(mock.clone())
            .concurrency(8)
            .probe(false)
            .shared_limits(Arc::clone(&shared) as Arc<dyn SharedLimits>)
            .build()
    };
    let (a, b) = (executor(), executor());
    let (first, second) = tokio::join!(a.run(prompts(30)), b.run(prompts(30)));
    assert_eq!(first.totals.succeeded + second.totals.succeeded, 60);
    assert_eq!(mock.max_in_flight(), 3, "the global cap holds across executors");
    assert_eq!(*shared.admitted.lock().unwrap(), mock.calls());
    assert_eq!(shared.slots.available_permits(), 3, "every lease was given back");
    let settled = shared.settled.lock().unwrap();
    assert_eq!(settled.len(), 60);
    assert!(settled.iter().all(|(_, used)| *used > 0), "{settled:?}");
}

/// A 429 one executor gets pauses the other too: no call of either goes out
/// until the provider's retry-after has passed.
#[tokio::test(start_paused = true)]
async fn a_429_pauses_every_executor_sharing_the_limits() {
    let start = Instant::now();
    let mock = MockProvider::new().with_latency(ms(100)).with_call_log();
    mock.script("p0", [Behavior::rate_limited(Some(secs(10))).after(ms(50))]);
    let shared = InMemory::new(100);
    let builder = |provider: MockProvider| {
        Executor::builder(provider)
            .concurrency(1)
            .probe(false)
            .shared_limits(Arc::clone(&shared) as Arc<dyn SharedLimits>)
            .build()
    };
    // The second executor's prompts are other texts, so only the first's p0 is limited.
    let others: Vec<_> = (0..5).map(|i| fanout::Request::user(format!("other {i}"))).collect();
    let (a, b) = (builder(mock.clone()), builder(mock.clone()));
    let (first, second) = tokio::join!(a.run(prompts(3)), b.run(others));
    assert_eq!(first.totals.succeeded + second.totals.succeeded, 8);
    assert_eq!(*shared.pauses.lock().unwrap(), [secs(10)]);
    let pause = (start + ms(50), start + ms(50) + secs(10));
    let during: Vec<_> = mock
        .call_log()
        .into_iter()
        .filter(|call| call.at > pause.0 && call.at < pause.1)
        .map(|call| call.prompt)
        .collect();
    assert!(during.is_empty(), "calls went out during the shared pause: {during:?}");
}

/// A call that fails gives its shared place back while it waits to retry: the
/// retries (waiting for a local slot) and new calls (holding local slots,
/// waiting for a shared place) never wait for each other.
#[tokio::test(start_paused = true)]
async fn retries_waiting_hold_no_shared_place() {
    let mock = MockProvider::new()
        .with_latency(ms(100))
        .with_rule(|call| (call.number <= 2).then(Behavior::server_error));
    let shared = InMemory::new(2);
    let executor = Executor::builder(mock.clone())
        .concurrency(8)
        .probe(false)
        .shared_limits(Arc::clone(&shared) as Arc<dyn SharedLimits>)
        .build();
    let report = tokio::time::timeout(secs(3_600), executor.run(prompts(20)))
        .await
        .expect("the run finished: no wait for each other");
    assert_eq!(report.totals.succeeded, 20);
    assert_eq!(shared.slots.available_permits(), 2);
}

/// A request larger than the shared tokens-per-minute budget fails at once,
/// naming both, and is never sent; the others go on.
#[tokio::test(start_paused = true)]
async fn a_request_larger_than_the_shared_token_budget_fails_at_once() {
    let mock = MockProvider::new().with_latency(ms(100));
    let shared = Arc::new(InMemory {
        tokens_per_minute: Some(500),
        ..Arc::into_inner(InMemory::new(4)).unwrap()
    });
    let executor = Executor::builder(mock.clone())
        .probe(false)
        .shared_limits(Arc::clone(&shared) as Arc<dyn SharedLimits>)
        .build();
    let mut requests = prompts(3);
    requests[1].max_tokens = Some(1_000);
    let report = executor.run(requests).await;
    assert_eq!(report.totals.succeeded, 2);
    let failed = report.results.iter().find(|r| r.index == 1).unwrap();
    let message = failed.outcome.describe().unwrap_or_default();
    assert!(message.contains("limit is 500 tokens per minute"), "{message}");
    assert_eq!(mock.calls(), 2);
}
