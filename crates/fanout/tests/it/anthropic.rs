//! The Anthropic provider against wiremock: bodies, headers, errors, streaming.

use std::time::Duration;

use fanout::Anthropic;
use fanout::{ErrorKind, Message, Provider, Request};
use serde_json::json;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const KEY: &str = "sk-ant-test-abcdef0123456789";

fn provider(server: &MockServer, stream: bool) -> Anthropic {
    Anthropic::builder("claude-test")
        .base_url(server.uri())
        .api_key(KEY)
        .stream(stream)
        .build()
        .unwrap()
}

#[test]
fn request_bodies() {
    let provider = Anthropic::builder("claude-test").build().unwrap();
    let request = Request {
        messages: vec![
            Message::system("Be brief."),
            Message::system("Use French."),
            Message::user("Capital of France?"),
        ],
        temperature: Some(0.2),
        stop: vec!["END".into()],
        ..Request::default()
    };
    insta::assert_json_snapshot!("anthropic_body", provider.body(&request));
}

#[tokio::test]
async fn sends_key_and_version_and_reads_the_message() {
    let server = MockServer::start().await;
    let provider = provider(&server, false);
    let request = Request::user("Capital of France?").with_max_tokens(20);
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(header("x-api-key", KEY))
        .and(header("anthropic-version", "2023-06-01"))
        .and(wiremock::matchers::body_json(provider.body(&request)))
        .respond_with(
            ResponseTemplate::new(200).insert_header("request-id", "req_a").set_body_json(json!({
                "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
                "content": [{"type": "text", "text": "Paris"}, {"type": "tool_use", "id": "t"}],
                "stop_reason": "end_turn", "usage": {"input_tokens": 14, "output_tokens": 1},
            })),
        )
        .expect(1)
        .mount(&server)
        .await;
    let response = provider.complete(&request).await.unwrap();
    assert_eq!(response.text, "Paris");
    assert_eq!((response.usage.input_tokens, response.usage.output_tokens), (14, 1));
    assert_eq!(response.request_id.as_deref(), Some("req_a"));
}

#[tokio::test]
async fn error_classification_table() {
    let body = |kind: &str, message: &str| json!({"type": "error", "error": {"type": kind, "message": message}});
    let table = [
        (529, body("overloaded_error", "Overloaded"), ErrorKind::Overloaded),
        (
            429,
            body("rate_limit_error", "Number of requests has exceeded your rate limit"),
            ErrorKind::RateLimited,
        ),
        (401, body("authentication_error", "invalid x-api-key"), ErrorKind::Auth),
        (403, body("permission_error", "no access"), ErrorKind::Auth),
        (404, body("not_found_error", "model: claude-9"), ErrorKind::NotFound),
        (400, body("invalid_request_error", "prompt is too long"), ErrorKind::BadRequest),
        (413, body("request_too_large", "too large"), ErrorKind::BadRequest),
        (500, body("api_error", "Internal server error"), ErrorKind::Server),
    ];
    for (status, body, kind) in table {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(status)
                    .set_body_json(body.clone())
                    .insert_header("retry-after", "3")
                    .insert_header("anthropic-ratelimit-requests-remaining", "0"),
            )
            .mount(&server)
            .await;
        let error = provider(&server, false).complete(&Request::user("hi")).await.unwrap_err();
        assert_eq!(error.kind(), kind, "HTTP {status} {body}");
        assert_eq!(error.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(error.rate_limit().unwrap().requests.remaining, Some(0));
        assert!(!format!("{error} {error:?}").contains(KEY));
    }
}

#[tokio::test]
async fn streaming_answers_are_assembled() {
    let server = MockServer::start().await;
    let body = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-test\",\"content\":[],\"usage\":{\"input_tokens\":8,\"output_tokens\":1}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Paris\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    Mock::given(method("POST"))
        .and(wiremock::matchers::body_partial_json(json!({"stream": true})))
        .respond_with(ResponseTemplate::new(200).set_body_raw(body, "text/event-stream"))
        .mount(&server)
        .await;
    let response = provider(&server, true).complete(&Request::user("Capital?")).await.unwrap();
    assert_eq!(
        (response.text.as_str(), response.usage.input_tokens, response.usage.output_tokens),
        ("Paris", 8, 2)
    );
}

/// A JSON Schema answer is asked for as one forced tool, and the tool's input
/// comes back as the answer's text.
#[tokio::test]
async fn a_schema_answer_is_a_forced_tool_call() {
    let server = MockServer::start().await;
    let provider = provider(&server, false);
    let mut request = Request::user("Grade it.");
    let schema = json!({"type": "object", "properties": {"grade": {"type": "integer"}}});
    request.response_format =
        Some(fanout::ResponseFormat::JsonSchema { name: "grade".into(), schema: schema.clone() });
    let body = provider.body(&request);
    assert_eq!(body["tools"][0]["name"], "grade");
    assert_eq!(body["tools"][0]["input_schema"], schema);
    assert_eq!(body["tool_choice"], json!({"type": "tool", "name": "grade"}));
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "grade", "input": {"grade": 7}}],
            "stop_reason": "tool_use", "usage": {"input_tokens": 30, "output_tokens": 9},
        })))
        .mount(&server)
        .await;
    let response = provider.complete(&request).await.unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&response.text).unwrap(),
        json!({"grade": 7})
    );
    assert!(response.tool_calls.is_empty());
}

/// A request with its own body (the proxy's) is sent exactly as given, and
/// the answer's bytes come back whole beside the reading of it.
#[tokio::test]
async fn a_given_body_is_forwarded_as_it_is_and_its_answer_comes_back_whole() {
    let server = MockServer::start().await;
    let body = json!({"model": "claude-client", "max_tokens": 50, "stream": true,
                      "messages": [{"role": "user", "content": "Hi"}],
                      "thinking": {"type": "enabled", "budget_tokens": 1024}});
    let stream = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude-x\",\"content\":[],\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Bonjour\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":3}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(header("anthropic-beta", "output-300k-2026-03-24"))
        .and(header("anthropic-version", "2024-01-01"))
        .and(header("x-api-key", KEY))
        .and(wiremock::matchers::body_json(&body))
        .respond_with(ResponseTemplate::new(200).set_body_raw(stream, "text/event-stream"))
        .expect(1)
        .mount(&server)
        .await;
    // The provider is set not to stream: the body's own `stream` decides.
    // The client's beta and version go with its body; its key never does.
    let headers = [
        ("anthropic-beta", "output-300k-2026-03-24"),
        ("anthropic-version", "2024-01-01"),
        ("x-api-key", "sk-ant-someone-else"),
    ];
    let headers = headers.map(|(n, v)| (n.to_owned(), v.to_owned())).to_vec();
    let request = Request { body: Some(body.to_string()), headers, ..Request::user("Hi") };
    let response = provider(&server, false).complete(&request).await.unwrap();
    assert_eq!(response.raw.as_deref(), Some(stream));
    assert_eq!((response.text.as_str(), response.usage.output_tokens), ("Bonjour", 3));
}
