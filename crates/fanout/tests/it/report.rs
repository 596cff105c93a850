use std::sync::{Arc, Mutex};

use fanout::{
    Behavior, ErrorKind, Event, Executor, MockProvider, Outcome, Price, Provider, ProviderError,
    Request, Response, Status, Usage,
};

use crate::{ms, prompts};

#[tokio::test(start_paused = true)]
async fn totals_count_tokens_cost_and_latency_percentiles() {
    // Task i answers after (i + 1) ms with 10 input and i output tokens.
    let mock = MockProvider::new();
    for i in 0..100u64 {
        let usage = Usage::new(10, i);
        mock.script(
            format!("p{i}"),
            [Behavior::respond(Response::new("x", usage)).after(ms(i + 1))],
        );
    }
    mock.script("p100", [Behavior::fail(ProviderError::from_status(400, "bad"))]);
    let price = Price::new(2.0, 10.0);
    let executor =
        Executor::builder(mock).concurrency(101).probe(false).hedge(None).price(price).build();
    let report = executor.run(prompts(101)).await;
    let totals = &report.totals;
    assert_eq!((totals.tasks, totals.succeeded, totals.failed), (101, 100, 1));
    assert_eq!(totals.usage, Usage::new(1000, 4950));
    let cost = totals.cost.unwrap();
    assert!((cost - (1000.0 * 2.0 + 4950.0 * 10.0) / 1e6).abs() < 1e-12, "{cost}");
    let latency = totals.latency.unwrap();
    // Percentiles carry the histogram's three significant figures; the max is exact.
    let close =
        |d: std::time::Duration, to: u64| (d.as_secs_f64() * 1e3 / to as f64 - 1.0).abs() < 1e-3;
    assert!(close(latency.p50, 50) && close(latency.p90, 90), "{latency:?}");
    assert_eq!(latency.max, ms(100));
    assert_eq!(totals.wall, ms(100));
    assert_eq!(totals.calls, 101);
    assert!(!totals.all_succeeded());
    let json = serde_json::to_value(&report.results[100]).unwrap();
    assert_eq!(json["status"], "failed");
    assert_eq!(json["error"]["kind"], "bad_request");
    assert_eq!(json["id"], "100");
}

#[tokio::test(start_paused = true)]
async fn caller_ids_and_finished_events_cover_every_task() {
    let finished = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&finished);
    let executor = Executor::builder(MockProvider::new())
        .on_event(move |e| {
            if let Event::Finished { id, status, .. } = e {
                sink.lock().unwrap().push((id.to_string(), *status));
            }
        })
        .build();
    let tasks = ["essay-a", "essay-b"].map(|id| fanout::Task::with_id(id, Request::user(id)));
    let report = executor.run(tasks).await;
    assert_eq!(report.get("essay-b").and_then(Outcome::text), Some("mock answer: essay-b"));
    let mut finished = finished.lock().unwrap().clone();
    finished.sort();
    assert_eq!(
        finished,
        [("essay-a".to_string(), Status::Succeeded), ("essay-b".to_string(), Status::Succeeded)]
    );
}

struct Panicky;

#[async_trait::async_trait]
impl Provider for Panicky {
    fn name(&self) -> &str {
        "panicky"
    }

    async fn complete(&self, request: &Request) -> Result<Response, ProviderError> {
        if request.prompt() == "p3" {
            panic!("bug in provider");
        }
        Ok(Response::new("fine", Usage::default()))
    }
}

/// A provider bug fails its own task, with the panic message; nothing else is lost.
#[tokio::test(start_paused = true)]
async fn a_panicking_provider_fails_only_its_task() {
    let report = Executor::new(Panicky).run(prompts(10)).await;
    assert_eq!(report.totals.succeeded, 9);
    let Outcome::Failed { error, attempts, .. } = &report.results[3].outcome else { panic!() };
    assert_eq!((error.kind(), *attempts), (ErrorKind::Server, 1));
    assert!(error.message().contains("bug in provider"), "{error}");
}
