//! `--otlp-endpoint`: a real run's spans reach an OTLP/HTTP receiver on
//! 127.0.0.1 as protobuf, shaped by the GenAI semantic conventions, with no
//! key and no prompt text unless content is opted in.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use fanout_mock::{Config, MockServer};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use crate::{Home, run, stderr};

const KEY: &str = "sk-test-never-in-a-span-4711";

type Bodies = Arc<Mutex<Vec<Bytes>>>;

/// A collector's OTLP/HTTP traces endpoint that keeps what it is sent.
async fn collector() -> (String, Bodies) {
    let bodies = Bodies::default();
    let app = Router::new()
        .route(
            "/v1/traces",
            post(|State(bodies): State<Bodies>, body: Bytes| async move {
                bodies.lock().unwrap().push(body);
                // An empty ExportTraceServiceResponse: everything accepted.
                ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
            }),
        )
        .with_state(Arc::clone(&bodies));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, bodies)
}

fn spans(bodies: &Bodies) -> Vec<Span> {
    let bodies = bodies.lock().unwrap();
    let requests = bodies.iter().map(|body| ExportTraceServiceRequest::decode(&body[..]).unwrap());
    requests
        .flat_map(|request| request.resource_spans)
        .flat_map(|resource| resource.scope_spans)
        .flat_map(|scope| scope.spans)
        .collect()
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    let found = span.attributes.iter().find(|kv| kv.key == key)?;
    found.value.as_ref()?.value.clone()
}

fn text(span: &Span, key: &str) -> Option<String> {
    match attribute(span, key)? {
        Value::StringValue(text) => Some(text),
        _ => None,
    }
}

fn everything_sent(bodies: &Bodies) -> String {
    let bodies = bodies.lock().unwrap();
    bodies.iter().map(|body| String::from_utf8_lossy(body).into_owned()).collect()
}

/// A batch of five rows against the mock's OpenAI API, its spans exported.
async fn batch_with_spans(home: &Home, endpoint: &str, content: bool) -> std::process::Output {
    let server =
        MockServer::start(Config { error_rate: 0.3, seed: 5, ..Config::default() }).await.unwrap();
    let path = home.write("rows.jsonl", crate::rows(5));
    let mut command = home.fanout();
    command
        .env("OPENAI_API_KEY", KEY)
        .args(["--provider", "openai", "--model", "gpt-test", "-q"])
        .args(["--base-url", &server.openai_base_url(), "--otlp-endpoint", endpoint])
        .args(["batch", "--id", "id", "--prompt", "Grade {{ essay }}", "-o", "out.jsonl"])
        .arg(&path);
    if content {
        command.env("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true");
    }
    run(command).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_exports_its_spans_over_otlp() {
    let (endpoint, bodies) = collector().await;
    let home = Home::new();
    let output = batch_with_spans(&home, &endpoint, false).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let spans = spans(&bodies);
    let named = |name: &str| spans.iter().filter(|s| s.name == name).collect::<Vec<_>>();
    let [root] = named("fanout batch")[..] else { panic!("one root span: {spans:#?}") };
    assert!(root.parent_span_id.is_empty());
    let [run] = named("fanout.run")[..] else { panic!("one run span") };
    assert_eq!(run.parent_span_id, root.span_id);
    let tasks = named("fanout.task");
    assert_eq!(tasks.len(), 5, "a span per row");
    assert!(tasks.iter().all(|t| t.parent_span_id == run.span_id));
    let calls = named("chat gpt-test");
    assert!(calls.len() > 5, "the 500s were retried: {}", calls.len());
    for call in &calls {
        assert!(tasks.iter().any(|t| t.span_id == call.parent_span_id), "under its task");
        assert_eq!(call.trace_id, root.trace_id);
        assert_eq!(text(call, "gen_ai.operation.name").as_deref(), Some("chat"));
        assert_eq!(text(call, "gen_ai.provider.name").as_deref(), Some("openai"));
        assert_eq!(text(call, "gen_ai.request.model").as_deref(), Some("gpt-test"));
    }
    let failed: Vec<_> =
        calls.iter().filter(|c| text(c, "fanout.call.end").as_deref() == Some("failed")).collect();
    assert!(!failed.is_empty());
    assert!(failed.iter().all(|c| text(c, "error.type").as_deref() == Some("server")));
    let answered: Vec<_> = calls
        .iter()
        .filter(|c| text(c, "fanout.call.end").as_deref() == Some("answered"))
        .collect();
    assert_eq!(answered.len(), 5);
    for call in answered {
        assert!(
            matches!(attribute(call, "gen_ai.usage.input_tokens"), Some(Value::IntValue(n)) if n > 0)
        );
        assert!(
            matches!(attribute(call, "gen_ai.usage.output_tokens"), Some(Value::IntValue(n)) if n > 0)
        );
    }
    let sent = everything_sent(&bodies);
    assert!(!sent.contains(KEY), "the key is never in a span");
    assert!(!sent.contains("essay number"), "no prompt text unless asked");
    assert!(sent.contains("fanout"), "the service is named");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_goes_in_only_when_opted_in_and_never_the_key() {
    let (endpoint, bodies) = collector().await;
    let home = Home::new();
    let output = batch_with_spans(&home, &endpoint, true).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let spans = spans(&bodies);
    let prompts: Vec<_> = spans.iter().filter_map(|s| text(s, "gen_ai.input.messages")).collect();
    assert!(prompts.iter().any(|p| p.contains("Grade essay number 3")), "{prompts:?}");
    assert!(spans.iter().any(|s| text(s, "gen_ai.output.messages").is_some()));
    assert!(!everything_sent(&bodies).contains(KEY));
}

/// A collector that is down costs the run nothing (the spans lost are said);
/// a bad address is refused before any call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_does_not_fail_the_run() {
    let home = Home::new();
    let output = batch_with_spans(&home, "http://127.0.0.1:9", false).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(crate::read_lines(&home.path("out.jsonl")).len(), 5);
    let said = stderr(&output);
    assert!(said.contains("spans could not be sent to http://127.0.0.1:9/v1/traces"), "{said}");

    let mut command = home.fanout();
    command.args(["--provider", "mock", "--otlp-endpoint", "not a url", "ask", "hello"]);
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("not a url"), "{}", stderr(&output));
}
