//! The Batch API clients: the wire as the services document it (against
//! wiremock, for the shapes of their answers and errors) and whole flows
//! against fanout-mock.

use fanout::batches::{AnthropicBatches, BatchAnswer, BatchApi, BatchOutcome, OpenAiBatches};
use fanout::{ErrorKind, Request, ResponseFormat};
use serde_json::json;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const KEY: &str = "sk-batch-0123456789abcdef";

async fn answers_of(
    api: &dyn BatchApi,
    batch: &fanout::batches::Batch,
    shape: &Request,
) -> Vec<BatchAnswer> {
    let mut answers = Vec::new();
    api.answers(batch, shape, &mut |answer| answers.push(answer)).await.unwrap();
    answers
}

/// Upload (multipart, purpose `batch`), create (24 h, tagged), and the output
/// and error files' lines read into answers, errors classified as online.
#[tokio::test]
async fn openai_lines_and_errors_are_read_as_the_api_writes_them() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/files"))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"id": "file-in", "object": "file",
            "purpose": "batch", "filename": "t.jsonl", "bytes": 10, "created_at": 1})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let batch = json!({"id": "batch_1", "object": "batch", "endpoint": "/v1/chat/completions",
        "status": "completed", "input_file_id": "file-in", "output_file_id": "file-out",
        "error_file_id": "file-err", "created_at": 1, "metadata": {"fanout_tag": "t"},
        "request_counts": {"total": 4, "completed": 1, "failed": 3}});
    Mock::given(method("POST"))
        .and(path("/v1/batches"))
        .respond_with(ResponseTemplate::new(200).set_body_json(batch.clone()))
        .expect(1)
        .mount(&server)
        .await;
    let output = json!({"id": "r1", "custom_id": "row-0", "error": null, "response": {
        "status_code": 200, "request_id": "req_1", "body": {"model": "gpt-x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1}}}});
    Mock::given(method("GET"))
        .and(path("/v1/files/file-out/content"))
        .respond_with(ResponseTemplate::new(200).set_body_string(format!("{output}\n")))
        .mount(&server)
        .await;
    let errors = [
        json!({"id": "r2", "custom_id": "row-1", "error": null, "response": {"status_code": 400,
            "request_id": "req_2", "body": {"error": {"message": "max_tokens is too large",
            "type": "invalid_request_error", "param": "max_tokens", "code": null}}}}),
        json!({"id": "r3", "custom_id": "row-2", "error": null, "response": {"status_code": 429,
            "request_id": "req_3", "body": {"error": {"message": "slow down",
            "type": "requests", "code": "rate_limit_exceeded"}}}}),
        json!({"id": "r4", "custom_id": "row-3", "response": null, "error": {"code": "batch_expired",
            "message": "This request could not be executed before the completion window expired."}}),
    ];
    let body: String = errors.iter().map(|e| format!("{e}\n")).collect();
    Mock::given(method("GET"))
        .and(path("/v1/files/file-err/content"))
        .respond_with(ResponseTemplate::new(200).set_body_string(body))
        .mount(&server)
        .await;
    let api = OpenAiBatches::builder("gpt-x")
        .base_url(format!("{}/v1", server.uri()))
        .api_key(KEY)
        .build()
        .unwrap();
    let line = api.line("row-0", &Request::user("q"));
    let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(parsed["url"], "/v1/chat/completions");
    assert_eq!(
        (parsed["method"].as_str(), parsed["custom_id"].as_str()),
        (Some("POST"), Some("row-0"))
    );
    assert_eq!(parsed["body"]["model"], "gpt-x");
    assert!(parsed["body"].get("stream").is_none(), "a batch's answers come whole");
    let file = api.upload("t", &line).await.unwrap();
    assert_eq!(file.as_deref(), Some("file-in"));
    let made = api.create("t", file.as_deref(), &line).await.unwrap();
    assert!(made.ended);
    assert_eq!(made.results, ["file-out", "file-err"]);
    let create = &server.received_requests().await.unwrap()[1];
    let sent: serde_json::Value = serde_json::from_slice(&create.body).unwrap();
    assert_eq!(
        sent,
        json!({"input_file_id": "file-in", "endpoint": "/v1/chat/completions",
        "completion_window": "24h", "metadata": {"fanout_tag": "t"}})
    );
    let answers = answers_of(&api, &made, &Request::user("q")).await;
    let ids: Vec<&str> = answers.iter().map(|a| a.custom_id.as_str()).collect();
    assert_eq!(ids, ["row-0", "row-1", "row-2", "row-3"]);
    let BatchOutcome::Answered(answer) = &answers[0].outcome else { panic!("{:?}", answers[0]) };
    assert_eq!((answer.text.as_str(), answer.request_id.as_deref()), ("hi", Some("req_1")));
    let BatchOutcome::Failed(refused) = &answers[1].outcome else { panic!() };
    assert_eq!(refused.kind(), ErrorKind::BadRequest);
    assert!(refused.message().contains("max_tokens is too large"));
    let BatchOutcome::Failed(limited) = &answers[2].outcome else { panic!() };
    assert!(limited.kind().is_retryable(), "a 429 line goes again");
    assert!(matches!(answers[3].outcome, BatchOutcome::Expired));
}

/// A batch refused at validation names its lines; a refused creation is the
/// API's error, its key scrubbed.
#[tokio::test]
async fn openai_validation_errors_name_the_lines_and_keys_never_show() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/batches/batch_bad"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "batch_bad",
            "status": "failed", "created_at": 1, "errors": {"object": "list", "data": [
                {"code": "invalid_request", "message": "model is required", "param": "body.model", "line": 2}]}})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/batches"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"error": {
            "message": format!("Incorrect API key provided: {KEY}"), "type": "invalid_request_error",
            "code": "invalid_api_key"}})))
        .mount(&server)
        .await;
    let api = OpenAiBatches::builder("gpt-x")
        .base_url(format!("{}/v1", server.uri()))
        .api_key(KEY)
        .build()
        .unwrap();
    let failed = api.get("batch_bad").await.unwrap();
    assert!(failed.ended);
    assert_eq!(failed.errors[0].line, Some(2));
    assert_eq!(failed.errors[0].message, "invalid_request: model is required");
    let error = api.create("t", Some("file-in"), b"").await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Auth);
    assert!(!error.to_string().contains(KEY), "{error}");
    assert!(!format!("{error:?}").contains(KEY));
}

/// Anthropic's results: succeeded, errored (classified by its type),
/// canceled and expired; a structured answer's tool input is its text.
#[tokio::test]
async fn anthropic_results_are_read_by_their_types() {
    let server = MockServer::start().await;
    let results_url = format!("{}/v1/messages/batches/msgbatch_1/results", server.uri());
    let batch = json!({"id": "msgbatch_1", "type": "message_batch", "processing_status": "ended",
        "request_counts": {"processing": 0, "succeeded": 1, "errored": 2, "canceled": 1, "expired": 1},
        "created_at": "2026-12-03T08:00:00.123456Z", "results_url": results_url});
    Mock::given(method("POST"))
        .and(path("/v1/messages/batches"))
        .and(header("x-api-key", KEY))
        .and(header("anthropic-version", "2023-06-01"))
        .respond_with(ResponseTemplate::new(200).set_body_json(batch))
        .expect(1)
        .mount(&server)
        .await;
    let lines = [
        json!({"custom_id": "row-0", "result": {"type": "succeeded", "message": {"id": "msg_1",
            "type": "message", "role": "assistant", "model": "claude-x", "stop_reason": "tool_use",
            "content": [{"type": "tool_use", "id": "t1", "name": "grade", "input": {"grade": 7}}],
            "usage": {"input_tokens": 9, "output_tokens": 4}}}}),
        json!({"custom_id": "row-1", "result": {"type": "errored", "error": {"type": "error",
            "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}}}),
        json!({"custom_id": "row-2", "result": {"type": "errored", "error": {"type": "error",
            "error": {"type": "overloaded_error", "message": "Overloaded"}}}}),
        json!({"custom_id": "row-3", "result": {"type": "canceled"}}),
        json!({"custom_id": "row-4", "result": {"type": "expired"}}),
    ];
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    Mock::given(method("GET"))
        .and(path("/v1/messages/batches/msgbatch_1/results"))
        .respond_with(ResponseTemplate::new(200).set_body_string(body))
        .mount(&server)
        .await;
    let api =
        AnthropicBatches::builder("claude-x").base_url(server.uri()).api_key(KEY).build().unwrap();
    let mut shape = Request::user("q");
    shape.response_format = Some(ResponseFormat::JsonSchema {
        name: "grade".into(),
        schema: json!({"type": "object", "properties": {"grade": {"type": "integer"}}}),
    });
    let lines: Vec<u8> = [api.line("row-0", &shape), api.line("row-1", &shape)].concat();
    let made = api.create("t", None, &lines).await.unwrap();
    assert_eq!((made.counts.total, made.counts.failed), (5, 4));
    assert_eq!(made.created_at, 1_796_284_800, "RFC 3339 read to the second");
    let sent: serde_json::Value =
        serde_json::from_slice(&server.received_requests().await.unwrap()[0].body).unwrap();
    assert_eq!(sent["requests"][1]["custom_id"], "row-1");
    assert_eq!(sent["requests"][0]["params"]["max_tokens"], 1024);
    assert_eq!(sent["requests"][0]["params"]["tool_choice"]["name"], "grade");
    let answers = answers_of(&api, &made, &shape).await;
    let BatchOutcome::Answered(answer) = &answers[0].outcome else { panic!("{:?}", answers[0]) };
    assert_eq!(answer.text, r#"{"grade":7}"#);
    let BatchOutcome::Failed(refused) = &answers[1].outcome else { panic!() };
    assert_eq!((refused.kind(), refused.status()), (ErrorKind::BadRequest, Some(400)));
    let BatchOutcome::Failed(overloaded) = &answers[2].outcome else { panic!() };
    assert_eq!(overloaded.kind(), ErrorKind::Overloaded);
    assert!(matches!(answers[3].outcome, BatchOutcome::Cancelled));
    assert!(matches!(answers[4].outcome, BatchOutcome::Expired));
}

/// The whole flow against fanout-mock: a batch made, found by its tag,
/// polled to its end, its answers read; and a cancelled one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_apis_end_to_end_against_the_mock() {
    let config = fanout_mock::Config {
        batch_time: std::time::Duration::from_millis(200),
        ..fanout_mock::Config::default()
    };
    let server = fanout_mock::MockServer::start(config).await.unwrap();
    let openai: Box<dyn BatchApi> = Box::new(
        OpenAiBatches::builder("gpt-x").base_url(server.openai_base_url()).build().unwrap(),
    );
    let anthropic: Box<dyn BatchApi> = Box::new(
        AnthropicBatches::builder("claude-x")
            .base_url(server.anthropic_base_url())
            .build()
            .unwrap(),
    );
    for api in [openai, anthropic] {
        let lines: Vec<u8> = (0..5)
            .flat_map(|i| api.line(&format!("row-{i}"), &Request::user(format!("q{i}"))))
            .collect();
        let since = fanout_store_now() - 5;
        let tag = format!("tag-{}", api.name());
        let file = api.upload(&tag, &lines).await.unwrap();
        let made = api.create(&tag, file.as_deref(), &lines).await.unwrap();
        assert!(!made.ended, "{made:?}");
        let found = api.find(&tag, since, 5).await.unwrap();
        assert_eq!(found.len(), 1, "found by its tag (or its size)");
        assert_eq!(found[0].id, made.id);
        let mut now = made;
        while !now.ended {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            now = api.get(&now.id).await.unwrap();
        }
        assert_eq!((now.counts.total, now.counts.succeeded), (5, 5));
        let mut answers = answers_of(&*api, &now, &Request::user("")).await;
        answers.sort_by(|a, b| a.custom_id.cmp(&b.custom_id));
        for (i, answer) in answers.iter().enumerate() {
            let BatchOutcome::Answered(response) = &answer.outcome else { panic!("{answer:?}") };
            assert!(response.text.ends_with(&format!("to: q{i}")), "{}", response.text);
            assert!(response.usage.output_tokens > 0);
        }
        let long = api.create(&tag, file.as_deref(), &lines).await.unwrap();
        let cancelled = api.cancel(&long.id).await.unwrap();
        assert!(cancelled.ended, "{cancelled:?}");
    }
    assert_eq!(server.stats().batches.created, 4);
}

fn fanout_store_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}
