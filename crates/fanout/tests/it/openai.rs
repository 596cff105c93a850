//! The OpenAI-compatible provider against wiremock: bodies, headers, errors.

use std::time::Duration;

use fanout::OpenAi;
use fanout::{ErrorKind, Message, Provider, Request, ResponseFormat};
use serde_json::json;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const KEY: &str = "sk-test-0123456789abcdef";

fn full_request() -> Request {
    let mut request = Request {
        messages: vec![
            Message::system("You grade essays."),
            Message::user("Grade: The sea."),
            Message::assistant("7/10"),
            Message::user("Why?"),
        ],
        temperature: Some(0.5),
        top_p: Some(0.9),
        max_tokens: Some(64),
        stop: vec!["\n\n".into()],
        seed: Some(42),
        n: Some(3),
        response_format: Some(ResponseFormat::JsonObject),
        ..Request::default()
    };
    request.extra.insert("logprobs".into(), json!(true));
    request.extra.insert("user".into(), json!("grader-1"));
    request
}

fn answer() -> serde_json::Value {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-test",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Because."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32},
    })
}

async fn server() -> MockServer {
    MockServer::start().await
}

fn provider(server: &MockServer) -> OpenAi {
    OpenAi::builder("gpt-test")
        .base_url(format!("{}/v1", server.uri()))
        .api_key(KEY)
        .build()
        .unwrap()
}

#[test]
fn request_bodies() {
    let plain = OpenAi::builder("gpt-test").build().unwrap();
    insta::assert_json_snapshot!("openai_body_full", plain.body(&full_request()));
    let streaming = OpenAi::builder("gpt-test").stream(true).build().unwrap();
    let schema =
        ResponseFormat::JsonSchema { name: "grade".into(), schema: json!({"type": "object"}) };
    let request =
        Request { response_format: Some(schema), ..Request::user("hi").with_model("other") };
    insta::assert_json_snapshot!("openai_body_streaming", streaming.body(&request));
}

#[tokio::test]
async fn sends_the_body_and_bearer_key_and_reads_the_answer() {
    let server = server().await;
    let provider = provider(&server);
    let request = full_request();
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .and(header("content-type", "application/json"))
        .and(wiremock::matchers::body_json(provider.body(&request)))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(answer())
                .insert_header("x-request-id", "req_123")
                .insert_header("x-ratelimit-remaining-requests", "59")
                .insert_header("x-ratelimit-reset-requests", "1s"),
        )
        .expect(1)
        .mount(&server)
        .await;
    let response = provider.complete(&request).await.unwrap();
    assert_eq!(response.text, "Because.");
    assert_eq!((response.usage.input_tokens, response.usage.output_tokens), (30, 2));
    assert_eq!(response.request_id.as_deref(), Some("req_123"));
    let budget = response.rate_limit.unwrap().requests;
    assert_eq!((budget.remaining, budget.reset), (Some(59), Some(Duration::from_secs(1))));
}

#[tokio::test]
async fn local_servers_get_no_authorization_header() {
    let server = server().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(answer()))
        .mount(&server)
        .await;
    let provider =
        OpenAi::builder("local").base_url(format!("{}/v1/", server.uri())).build().unwrap();
    provider.complete(&Request::user("hi")).await.unwrap();
    let received = server.received_requests().await.unwrap();
    assert_eq!(received[0].url.path(), "/v1/chat/completions");
    assert!(!received[0].headers.contains_key("authorization"));
}

/// Status and body decide the kind: a 429 can be a rate limit (retry) or an
/// empty account (stop the job).
#[tokio::test]
async fn error_classification_table() {
    let error_body = |message: &str, kind: &str, code: serde_json::Value| json!({"error": {"message": message, "type": kind, "code": code, "param": null}});
    let table = [
        (
            429,
            error_body("Rate limit reached", "requests", json!("rate_limit_exceeded")),
            ErrorKind::RateLimited,
        ),
        (
            429,
            error_body(
                "You exceeded your current quota",
                "insufficient_quota",
                json!("insufficient_quota"),
            ),
            ErrorKind::Quota,
        ),
        (
            400,
            error_body(
                "maximum context length is 8192 tokens",
                "invalid_request_error",
                json!("context_length_exceeded"),
            ),
            ErrorKind::BadRequest,
        ),
        (
            401,
            error_body(
                &format!("Incorrect API key provided: {KEY}."),
                "invalid_request_error",
                json!("invalid_api_key"),
            ),
            ErrorKind::Auth,
        ),
        (403, error_body("not allowed", "invalid_request_error", json!(null)), ErrorKind::Auth),
        (
            404,
            error_body(
                "The model `gpt-9` does not exist",
                "invalid_request_error",
                json!("model_not_found"),
            ),
            ErrorKind::NotFound,
        ),
        (
            500,
            error_body("The server had an error", "server_error", json!(null)),
            ErrorKind::Server,
        ),
        (503, error_body("overloaded", "server_error", json!(503)), ErrorKind::Overloaded),
        (529, json!({"message": "busy"}), ErrorKind::Overloaded),
        (502, json!("<html>Bad Gateway</html>"), ErrorKind::Server),
    ];
    for (status, body, kind) in table {
        let server = server().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(status)
                    .set_body_json(body.clone())
                    .insert_header("x-request-id", "req_err")
                    .insert_header("retry-after-ms", "1500"),
            )
            .mount(&server)
            .await;
        let error = provider(&server).complete(&Request::user("hi")).await.unwrap_err();
        assert_eq!(error.kind(), kind, "HTTP {status} {body}");
        assert_eq!(error.status(), Some(status));
        assert_eq!(error.request_id(), Some("req_err"));
        assert_eq!(error.retry_after(), Some(Duration::from_millis(1500)));
        assert!(!error.to_string().contains(KEY), "the key leaked: {error}");
        assert!(!format!("{error:?}").contains(KEY), "the key leaked: {error:?}");
    }
}

#[tokio::test]
async fn malformed_answers_and_dead_servers_are_retryable() {
    let server = server().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_string("{\"choices\": ["))
        .mount(&server)
        .await;
    let error = provider(&server).complete(&Request::user("hi")).await.unwrap_err();
    assert_eq!((error.kind(), error.is_retryable()), (ErrorKind::MalformedResponse, true));

    let closed = OpenAi::builder("m").base_url("http://127.0.0.1:9/v1").build().unwrap();
    let error = closed.complete(&Request::user("hi")).await.unwrap_err();
    assert_eq!((error.kind(), error.is_retryable()), (ErrorKind::Connection, true));
    // The cause is kept, not only "error sending request".
    assert!(error.message().contains("Connection refused"), "{error}");
}

/// A 404 says which URL was tried, and hints at a missing `/v1`.
#[tokio::test]
async fn a_404_names_the_url_and_a_missing_v1() {
    let server = server().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(404).set_body_string("Not Found"))
        .mount(&server)
        .await;
    let without_v1 = OpenAi::builder("m").base_url(server.uri()).build().unwrap();
    let error = without_v1.complete(&Request::user("hi")).await.unwrap_err();
    let tried = format!("{}/chat/completions", server.uri());
    assert!(error.message().contains(&format!("404 at {tried}")), "{error}");
    assert!(error.message().contains("does the base URL lack it?"), "{error}");
    let error = provider(&server).complete(&Request::user("hi")).await.unwrap_err();
    assert!(error.message().contains("/v1/chat/completions)"), "{error}");
    assert!(!error.message().contains("lack"), "{error}");
}

/// A redirect is not followed: it says where the endpoint went, and is not
/// retried (every call would be redirected alike).
#[tokio::test]
async fn a_redirect_names_where_the_endpoint_went() {
    let server = server().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(301).insert_header("location", "https://api.example.test/v1"),
        )
        .mount(&server)
        .await;
    let error = provider(&server).complete(&Request::user("hi")).await.unwrap_err();
    assert!(!error.is_retryable(), "{error}");
    assert!(
        error.message().contains("redirects (HTTP 301) to https://api.example.test/v1"),
        "{error}"
    );
}

#[tokio::test]
async fn streaming_answers_are_assembled() {
    let server = server().await;
    let body = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        ": comment\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Par\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"is\"},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n",
    );
    Mock::given(method("POST"))
        .and(wiremock::matchers::body_partial_json(
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_raw(body, "text/event-stream"))
        .mount(&server)
        .await;
    let provider = OpenAi::builder("gpt-test")
        .base_url(format!("{}/v1", server.uri()))
        .stream(true)
        .build()
        .unwrap();
    let response = provider.complete(&Request::user("Capital of France?")).await.unwrap();
    assert_eq!((response.text.as_str(), response.usage.output_tokens), ("Paris", 2));
}

#[test]
fn debug_output_never_shows_the_key() {
    let builder = OpenAi::builder("m").api_key(KEY);
    assert!(!format!("{builder:?}").contains(KEY));
    let provider = builder.build().unwrap();
    assert!(!format!("{provider:?}").contains(KEY), "{provider:?}");
}

/// A request with its own body (the proxy's) is sent exactly as given,
/// fields fanout does not know included, and the answer's bytes come back
/// whole beside the reading of it; a streamed one too, event for event.
#[tokio::test]
async fn a_given_body_is_forwarded_as_it_is_and_its_answer_comes_back_whole() {
    let server = server().await;
    let body = json!({"model": "gpt-client", "messages": [{"role": "user", "content": "Hi"}],
                      "n": 2, "future_field": {"nested": [1, 2]}, "logit_bias": {"50256": -100}});
    let answer_text = answer().to_string();
    // Byte for byte: keys in the client's order (a schema's properties
    // are generated in theirs), spacing and all.
    let text = r#"{"model": "gpt-client", "zeta": 1, "alpha": {"b": 1, "a": 2}}"#;
    Mock::given(method("POST"))
        .and(wiremock::matchers::body_string(text))
        .respond_with(ResponseTemplate::new(200).set_body_string(answer_text.clone()))
        .expect(1)
        .mount(&server)
        .await;
    let request = Request { body: Some(text.to_owned()), ..Request::user("Hi") };
    provider(&server).complete(&request).await.unwrap();
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(wiremock::matchers::body_json(&body))
        .respond_with(ResponseTemplate::new(200).set_body_string(answer_text.clone()))
        .expect(1)
        .mount(&server)
        .await;
    let request = Request { body: Some(body.to_string()), ..Request::user("Hi") };
    let response = provider(&server).complete(&request).await.unwrap();
    assert_eq!(response.raw.as_deref(), Some(answer_text.as_str()));
    assert_eq!((response.text.as_str(), response.usage.input_tokens), ("Because.", 30));

    let stream = concat!(
        "data: {\"id\":\"c1\",\"model\":\"gpt-x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\n\n",
        "data: [DONE]\n\n",
    );
    let mut streamed = body;
    streamed["stream"] = json!(true);
    Mock::given(method("POST"))
        .and(wiremock::matchers::body_json(&streamed))
        .respond_with(ResponseTemplate::new(200).set_body_raw(stream, "text/event-stream"))
        .expect(1)
        .mount(&server)
        .await;
    let request = Request { body: Some(streamed.to_string()), ..Request::user("Hi") };
    let response = provider(&server).complete(&request).await.unwrap();
    assert_eq!(response.raw.as_deref(), Some(stream));
    assert_eq!(response.text, "Hello");
}
