use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use fanout::{Behavior, Event, Executor, MockProvider, Task};
use futures_util::StreamExt;
use proptest::prelude::*;
use tokio::time::Instant;

use crate::{Recorder, ms, paused_runtime, prompts, secs};

fn scripted(latencies: &[u64]) -> MockProvider {
    let mock = MockProvider::new();
    for (i, latency) in latencies.iter().enumerate() {
        mock.script(format!("p{i}"), [Behavior::reply(format!("a{i}")).after(ms(*latency))]);
    }
    mock
}

fn task_stream(n: usize) -> impl futures_util::Stream<Item = Task> + Send + 'static {
    futures_util::stream::iter(prompts(n).into_iter().map(Task::new))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Under random completion order, the ordered stream and the report come out
    /// in task order, and the unordered stream brings back every task once.
    #[test]
    fn results_are_ordered_under_random_completion(
        latencies in proptest::collection::vec(0u64..1000, 1..80),
        concurrency in 1usize..16,
        window in 1usize..32,
    ) {
        paused_runtime().block_on(async {
            let n = latencies.len();
            // Scripts answer once per prompt: no hedge may take a task's answer.
            let executor = Executor::builder(scripted(&latencies))
                .concurrency(concurrency)
                .order_window(window)
                .hedge(None)
                .build();
            let ordered: Vec<_> = executor.stream_ordered(task_stream(n)).collect().await;
            let indices: Vec<_> = ordered.iter().map(|r| r.index).collect();
            prop_assert_eq!(&indices, &(0..n).collect::<Vec<_>>());
            for result in &ordered {
                let expected = format!("a{}", result.index);
                prop_assert_eq!(result.outcome.text(), Some(expected.as_str()));
            }

            let executor = Executor::builder(scripted(&latencies)).concurrency(concurrency).hedge(None).build();
            let report = executor.run(prompts(n)).await;
            let indices: Vec<_> = report.results.iter().map(|r| r.index).collect();
            prop_assert_eq!(&indices, &(0..n).collect::<Vec<_>>());

            let executor = Executor::builder(scripted(&latencies)).concurrency(concurrency).hedge(None).build();
            let mut unordered: Vec<_> = executor.stream(task_stream(n)).map(|r| r.index).collect().await;
            unordered.sort_unstable();
            prop_assert_eq!(unordered, (0..n).collect::<Vec<_>>());
            Ok(())
        })?;
    }
}

/// A slow first task holds back at most the order window: later tasks wait
/// rather than pile up finished results in memory.
#[tokio::test(start_paused = true)]
async fn a_slow_head_holds_back_at_most_the_window() {
    let mock = MockProvider::new().with_latency(ms(10));
    mock.script("p0", [Behavior::reply("slow").after(secs(100))]);
    let recorder = Recorder::default();
    let executor = recorder
        .attach(Executor::builder(mock).concurrency(4).order_window(8).probe(false))
        .build();
    let released = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let results = executor.stream_ordered(task_stream(50));
    let times = Arc::clone(&released);
    results
        .for_each(|r| {
            times.lock().unwrap().push((r.index, start.elapsed()));
            async {}
        })
        .await;
    let started_before_head: usize = recorder
        .events()
        .iter()
        .filter(|(at, e)| matches!(e, Event::Started { .. }) && *at - start < secs(100))
        .count();
    assert_eq!(started_before_head, 8, "only the window's worth ran ahead of the slow head");
    let released = released.lock().unwrap();
    assert_eq!(released[0], (0, secs(100)));
    assert_eq!(released.len(), 50);
}

/// Counting tasks pulled from the input but not yet handed back: the executor
/// holds memory proportional to the concurrency, not the task count.
#[tokio::test(start_paused = true)]
async fn ordered_stream_memory_is_bounded_by_the_window() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    let tasks = futures_util::stream::iter(0..20_000).map(move |i| {
        counter.fetch_add(1, Ordering::Relaxed);
        Task::new(fanout::Request::user(format!("p{i}")))
    });
    let mock = MockProvider::new().with_latency(ms(5)).with_jitter(ms(5), 9);
    let executor = Executor::builder(mock).concurrency(8).order_window(32).build();
    let mut results = executor.stream_ordered(tasks);
    let mut consumed = 0;
    let mut most_held = 0;
    while let Some(result) = results.next().await {
        assert_eq!(result.index, consumed);
        consumed += 1;
        most_held = most_held.max(pulled.load(Ordering::Relaxed) - consumed);
    }
    assert_eq!(consumed, 20_000);
    // Window (32) + channel (16) + the slot being filled.
    assert!(most_held <= 32 + 16 + 1, "{most_held}");
}
