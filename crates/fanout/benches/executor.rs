//! Executor overhead and wall time against the ideal, on the MockProvider.
//!
//! - `overhead/*`: 10,000 tasks with zero latency. On the current-thread runtime
//!   wall time is CPU time, so time per element is the executor's CPU per task
//!   (the mock's own answer formatting included).
//! - `latency_100ms_c500/*`: 10,000 tasks of 100 ms at concurrency 500, real
//!   time. The ideal is N / C x latency = 2.0 s. The probe (on by default) adds
//!   one latency, once per executor, while it waits for the first answer.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fanout::{Executor, MockProvider, Request};

const TASKS: usize = 10_000;

fn requests() -> Vec<Request> {
    (0..TASKS).map(|i| Request::user(format!("task {i}"))).collect()
}

fn overhead(c: &mut Criterion) {
    let mut group = c.benchmark_group("overhead");
    group.throughput(Throughput::Elements(TASKS as u64));
    group.sample_size(20);
    let current_thread =
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let multi_thread = tokio::runtime::Builder::new_multi_thread().enable_time().build().unwrap();
    for (name, runtime) in [("current_thread", &current_thread), ("multi_thread", &multi_thread)] {
        let executor = Executor::builder(MockProvider::new()).concurrency(500).build();
        group.bench_function(name, |b| {
            b.to_async(runtime).iter_batched(
                requests,
                |tasks| {
                    let executor = executor.clone();
                    async move {
                        let report = executor.run(tasks).await;
                        assert_eq!(report.totals.succeeded, TASKS);
                        black_box(report)
                    }
                },
                criterion::BatchSize::PerIteration,
            );
        });
    }
    group.finish();
}

fn latency(c: &mut Criterion) {
    let mut group = c.benchmark_group("latency_100ms_c500");
    group.sample_size(10).measurement_time(Duration::from_secs(25));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_time().build().unwrap();
    let executor = |probe: bool| {
        let provider = MockProvider::new().with_latency(Duration::from_millis(100));
        Executor::builder(provider).concurrency(500).probe(probe).build()
    };
    let run = |tasks: Vec<Request>, executor: Executor| async move {
        let report = executor.run(tasks).await;
        assert_eq!(report.totals.succeeded, TASKS);
        black_box(report)
    };
    // A new executor each run, so each run pays the probe: one latency spent
    // waiting for the first answer before the window opens to 500.
    group.bench_function("new_executor_probe_on", |b| {
        b.to_async(&runtime).iter_batched(
            || (requests(), executor(true)),
            |(tasks, executor)| run(tasks, executor),
            criterion::BatchSize::PerIteration,
        );
    });
    group.bench_function("new_executor_probe_off", |b| {
        b.to_async(&runtime).iter_batched(
            || (requests(), executor(false)),
            |(tasks, executor)| run(tasks, executor),
            criterion::BatchSize::PerIteration,
        );
    });
    group.finish();
}

criterion_group!(benches, overhead, latency);
criterion_main!(benches);
