//! Structured outputs: answers checked against the request's JSON Schema,
//! repaired with the validation errors, and truncated answers asked again.

use std::sync::{Arc, Mutex};

use fanout::{
    Behavior, ErrorKind, Event, Executor, MockProvider, Outcome, Request, Response, ResponseFormat,
    Usage,
};
use serde_json::json;

use crate::Recorder;

fn grade_request() -> Request {
    let mut request = Request::user("Grade the essay.");
    request.response_format = Some(ResponseFormat::JsonSchema {
        name: "grade".into(),
        schema: json!({"type": "object", "properties": {"grade": {"type": "integer"}},
                       "required": ["grade"]}),
    });
    request
}

fn answer(text: &str) -> Option<Behavior> {
    Some(Behavior::respond(Response::new(text, Usage::new(10, 5)).with_finish_reason("stop")))
}

#[tokio::test(start_paused = true)]
async fn an_invalid_answer_is_repaired_with_its_errors() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    // Invalid first; after the repair message, valid.
    let mock = MockProvider::new().with_rule(move |call| {
        let request = call.request;
        log.lock().unwrap().push(request.messages.clone());
        match request.messages.len() {
            1 => answer(r#"{"grade": "seven"}"#),
            _ => answer(r#"{"grade": 7}"#),
        }
    });
    let recorder = Recorder::default();
    let report = recorder.attach(Executor::builder(mock)).build().run([grade_request()]).await;
    let Outcome::Succeeded(success) = &report.results[0].outcome else {
        panic!("{:?}", report.results[0].outcome)
    };
    assert_eq!(success.response.text, r#"{"grade": 7}"#);
    // Said as a repair, not a retry: progress counts them apart.
    let events = recorder.events();
    assert!(events.iter().any(|(_, e)| matches!(e, Event::Repairing { attempt: 1, .. })));
    assert!(!events.iter().any(|(_, e)| matches!(e, Event::Retrying { .. })));
    assert_eq!(report.totals.retries, 0);
    assert_eq!(success.attempts, 2);
    assert_eq!(success.response.usage, Usage::new(20, 10), "the repaired answer was paid for too");
    assert_eq!((report.totals.repairs, report.totals.calls), (1, 2));
    let seen = seen.lock().unwrap();
    let repair = &seen[1];
    assert_eq!(repair[1].content, r#"{"grade": "seven"}"#, "the invalid answer is replayed");
    assert!(repair[2].content.contains("at /grade"), "{}", repair[2].content);
}

#[tokio::test(start_paused = true)]
async fn repairs_run_out_and_the_task_fails_naming_the_schema() {
    let mock = MockProvider::new().with_rule(|_| answer("I think a seven."));
    let executor = Executor::builder(mock).schema_repairs(1).build();
    let report = executor.run([grade_request()]).await;
    let Outcome::Failed { error, attempts, .. } = &report.results[0].outcome else {
        panic!("{:?}", report.results[0].outcome)
    };
    assert_eq!((error.kind(), *attempts), (ErrorKind::InvalidOutput, 2));
    assert!(error.message().contains("does not match the JSON Schema: the answer is not JSON"));
    assert_eq!(report.totals.repairs, 1);
    let paid = Usage::new(20, 10);
    assert_eq!(report.results[0].outcome.usage(), paid, "both refused answers were paid for");
    assert_eq!(report.totals.usage, paid);
}

#[tokio::test(start_paused = true)]
async fn truncated_answers_are_asked_again_with_more_room_when_asked() {
    let limits = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&limits);
    let mock = move || {
        let log = Arc::clone(&log);
        MockProvider::new().with_rule(move |call| {
            let request = call.request;
            log.lock().unwrap().push(request.max_tokens);
            let finish = if request.max_tokens < Some(300) { "length" } else { "stop" };
            Some(Behavior::respond(
                Response::new("text", Usage::new(5, 5)).with_finish_reason(finish),
            ))
        })
    };
    let request = || Request::user("Write at length.").with_max_tokens(100);
    let report = Executor::builder(mock()).retry_truncated(2.0).build().run([request()]).await;
    assert!(report.results[0].outcome.is_success(), "{:?}", report.results[0].outcome);
    assert_eq!(*limits.lock().unwrap(), [Some(100), Some(200), Some(400)]);
    assert_eq!(report.totals.retries, 2);

    // Without the setting, a truncated answer is an answer.
    limits.lock().unwrap().clear();
    let report = Executor::builder(mock()).build().run([request()]).await;
    assert!(report.results[0].outcome.is_success());
    assert_eq!(*limits.lock().unwrap(), [Some(100)]);
    // With it and too few attempts, the last answer stands, saying it was cut.
    let report = Executor::builder(mock())
        .retry_truncated(1.0)
        .max_attempts(2)
        .build()
        .run([request()])
        .await;
    let Outcome::Succeeded(success) = &report.results[0].outcome else { panic!() };
    assert!(success.response.is_truncated());
    assert_eq!((success.attempts, success.response.usage), (2, Usage::new(10, 10)));
}
