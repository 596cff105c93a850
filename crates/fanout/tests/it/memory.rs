use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use fanout::{Executor, MockProvider, Request, Task};
use futures_util::StreamExt;

use crate::ms;

/// A long lazy stream of tasks is pulled only as fast as slots free up: at
/// most concurrency + the result channel's capacity are held at once.
#[tokio::test(start_paused = true)]
async fn long_lazy_stream_uses_memory_proportional_to_concurrency() {
    const N: usize = 100_000;
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    let tasks = futures_util::stream::iter(0..N).map(move |i| {
        counter.fetch_add(1, Ordering::Relaxed);
        Task::with_id(format!("row-{i}"), Request::user("grade this"))
    });
    let executor =
        Executor::builder(MockProvider::new().with_latency(ms(1))).concurrency(16).build();
    let mut results = executor.stream(tasks);
    let mut consumed = 0;
    let mut most_held = 0;
    while let Some(result) = results.next().await {
        assert!(result.outcome.is_success());
        consumed += 1;
        most_held = most_held.max(pulled.load(Ordering::Relaxed) - consumed);
    }
    assert_eq!(consumed, N);
    let totals = results.totals().await;
    assert_eq!(totals.succeeded, N);
    // 16 in flight + 16 waiting in the result channel + the slot being filled.
    assert!(most_held <= 16 + 16 + 1, "{most_held}");
}
