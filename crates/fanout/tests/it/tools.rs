//! Tool calling on the wire, both APIs: the tools offered, the model's calls
//! (parallel ones in one turn, whole and streamed) and the results given back.

use fanout::{Anthropic, Message, OpenAi, Provider, Request, ToolCall, ToolChoice, ToolSpec};
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn lookup() -> ToolSpec {
    ToolSpec::new(
        "lookup",
        "Looks a word up in the glossary.",
        json!({"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}),
    )
}

fn call(id: &str, word: &str) -> ToolCall {
    ToolCall { id: id.into(), name: "lookup".into(), arguments: json!({"word": word}).to_string() }
}

/// A turn in which the model called two tools at once, and their results.
fn conversation() -> Request {
    Request {
        messages: vec![
            Message::system("Answer from the glossary."),
            Message::user("What are fan-in and fan-out?"),
            Message::assistant_tool_calls(
                "Looking both up.",
                vec![call("c1", "fan-in"), call("c2", "fan-out")],
            ),
            Message::tool_result("c1", "fan-in: many inputs into one"),
            Message::tool_result("c2", "fan-out: one input to many"),
        ],
        tools: vec![lookup()],
        tool_choice: Some(ToolChoice::Auto),
        ..Request::default()
    }
}

#[test]
fn tool_conversations_on_both_wires() {
    let openai = OpenAi::builder("gpt-test").build().unwrap();
    insta::assert_json_snapshot!("openai_tool_conversation", openai.body(&conversation()));
    let anthropic = Anthropic::builder("claude-test").build().unwrap();
    insta::assert_json_snapshot!("anthropic_tool_conversation", anthropic.body(&conversation()));
    // Every tool choice, in each API's words.
    let choices = [ToolChoice::None, ToolChoice::Required, ToolChoice::Tool("lookup".into())];
    let said: Vec<_> = choices
        .into_iter()
        .map(|choice| {
            let request = Request { tool_choice: Some(choice), ..conversation() };
            (
                openai.body(&request)["tool_choice"].clone(),
                anthropic.body(&request)["tool_choice"].clone(),
            )
        })
        .collect();
    assert_eq!(
        said,
        [
            (json!("none"), json!({"type": "none"})),
            (json!("required"), json!({"type": "any"})),
            (
                json!({"type": "function", "function": {"name": "lookup"}}),
                json!({"type": "tool", "name": "lookup"})
            ),
        ]
    );
}

async fn answering(route: &str, body: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST")).and(path(route)).respond_with(body).mount(&server).await;
    server
}

fn openai(server: &MockServer, stream: bool) -> OpenAi {
    OpenAi::builder("gpt-test")
        .base_url(format!("{}/v1", server.uri()))
        .stream(stream)
        .build()
        .unwrap()
}

fn sse(events: &[serde_json::Value]) -> ResponseTemplate {
    let body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    ResponseTemplate::new(200)
        .insert_header("content-type", "text/event-stream")
        .set_body_string(body)
}

#[tokio::test]
async fn openai_tool_calls_are_read_whole_and_streamed() {
    let whole = json!({
        "model": "gpt-test",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"word\":\"fan-in\"}"}},
                {"id": "c2", "type": "function", "function": {"name": "lookup", "arguments": "{\"word\":\"fan-out\"}"}}]}}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 12},
    });
    let server =
        answering("/v1/chat/completions", ResponseTemplate::new(200).set_body_json(whole)).await;
    let provider = openai(&server, false);
    let response = provider.complete(&conversation()).await.unwrap();
    assert_eq!(response.tool_calls, [call("c1", "fan-in"), call("c2", "fan-out")]);
    assert_eq!(response.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!(response.usage.output_tokens, 12, "usage of the turn");

    // Streamed: each call's id and name first, then its arguments in pieces,
    // the two calls interleaved by index.
    let piece = |index: usize, head: Option<(&str, &str)>, arguments: &str| {
        let mut call = json!({"index": index, "function": {"arguments": arguments}});
        if let Some((id, name)) = head {
            call["id"] = json!(id);
            call["type"] = json!("function");
            call["function"]["name"] = json!(name);
        }
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
    };
    let events = [
        piece(0, Some(("c1", "lookup")), ""),
        piece(0, None, "{\"word\":"),
        piece(1, Some(("c2", "lookup")), "{\"word\":\"fan-out\"}"),
        piece(0, None, "\"fan-in\"}"),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        json!({"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 12}}),
    ];
    let server = answering("/v1/chat/completions", sse(&events)).await;
    let provider = openai(&server, true);
    let response = provider.complete(&conversation()).await.unwrap();
    assert_eq!(response.tool_calls, [call("c1", "fan-in"), call("c2", "fan-out")]);
    assert_eq!(response.usage.input_tokens, 40);
}

#[tokio::test]
async fn anthropic_tool_use_blocks_are_read_whole_and_streamed() {
    let whole = json!({
        "type": "message", "role": "assistant", "model": "claude-test", "stop_reason": "tool_use",
        "content": [
            {"type": "text", "text": "Looking both up."},
            {"type": "tool_use", "id": "c1", "name": "lookup", "input": {"word": "fan-in"}},
            {"type": "tool_use", "id": "c2", "name": "lookup", "input": {"word": "fan-out"}}],
        "usage": {"input_tokens": 40, "output_tokens": 12},
    });
    let server = answering("/v1/messages", ResponseTemplate::new(200).set_body_json(whole)).await;
    let provider = Anthropic::builder("claude-test").base_url(server.uri()).build().unwrap();
    let response = provider.complete(&conversation()).await.unwrap();
    assert_eq!(response.text, "Looking both up.");
    assert_eq!(response.tool_calls, [call("c1", "fan-in"), call("c2", "fan-out")]);
    assert_eq!(response.finish_reason.as_deref(), Some("tool_use"));

    let block_start = |index: usize, id: &str| {
        json!({"type": "content_block_start", "index": index,
               "content_block": {"type": "tool_use", "id": id, "name": "lookup", "input": {}}})
    };
    let json_piece = |index: usize, partial: &str| {
        json!({"type": "content_block_delta", "index": index,
               "delta": {"type": "input_json_delta", "partial_json": partial}})
    };
    let events = [
        json!({"type": "message_start", "message": {"model": "claude-test", "usage": {"input_tokens": 40, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Looking both up."}}),
        json!({"type": "content_block_stop", "index": 0}),
        block_start(1, "c1"),
        json_piece(1, "{\"word\": "),
        json_piece(1, "\"fan-in\"}"),
        json!({"type": "content_block_stop", "index": 1}),
        block_start(2, "c2"),
        json_piece(2, "{\"word\": \"fan-out\"}"),
        json!({"type": "content_block_stop", "index": 2}),
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 12}}),
        json!({"type": "message_stop"}),
    ];
    let server = answering("/v1/messages", sse(&events)).await;
    let provider =
        Anthropic::builder("claude-test").base_url(server.uri()).stream(true).build().unwrap();
    let response = provider.complete(&conversation()).await.unwrap();
    assert_eq!(response.text, "Looking both up.");
    let words: Vec<_> =
        response.tool_calls.iter().map(|c| c.parsed_arguments().unwrap()["word"].clone()).collect();
    assert_eq!(words, [json!("fan-in"), json!("fan-out")]);
    assert_eq!(response.tool_calls[1].id, "c2");
    assert_eq!(response.usage.output_tokens, 12);
}

#[test]
fn arguments_that_are_not_an_object_are_told_apart() {
    let mut bad = call("c", "x");
    bad.arguments = "{\"word\": ".into();
    assert!(bad.parsed_arguments().unwrap_err().contains("not valid JSON"));
    bad.arguments = "[1]".into();
    assert!(bad.parsed_arguments().unwrap_err().contains("not a JSON object"));
    bad.arguments = String::new();
    assert!(bad.parsed_arguments().unwrap().is_empty(), "no arguments is an empty object");
    // Replayed to Anthropic, arguments cut off mid-way are an empty object,
    // the only `input` it accepts.
    bad.arguments = "{\"word\": \"fan".into();
    let request = Request {
        messages: vec![Message::assistant_tool_calls("", vec![bad])],
        ..Request::default()
    };
    let body = Anthropic::builder("claude-test").build().unwrap().body(&request);
    assert_eq!(body["messages"][0]["content"][0]["input"], json!({}));
}

/// Servers that drift from the spec: `"tool_calls": null` in an answer and
/// in stream deltas, streamed calls without an index (each its own chunk),
/// and a call without an id (one is made up, as its result must name one).
#[tokio::test]
async fn openai_tool_calls_from_drifting_servers() {
    let plain = json!({"choices": [{"index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": "hi", "tool_calls": null}}]});
    let server =
        answering("/v1/chat/completions", ResponseTemplate::new(200).set_body_json(plain)).await;
    let provider = openai(&server, false);
    let response = provider.complete(&Request::user("q")).await.unwrap();
    assert_eq!((response.text.as_str(), response.tool_calls.len()), ("hi", 0));

    let whole_call = |id: Option<&str>, word: &str| {
        let mut call = json!({"type": "function", "function": {"name": "lookup", "arguments": json!({"word": word}).to_string()}});
        if let Some(id) = id {
            call["id"] = json!(id);
        }
        json!({"choices": [{"index": 0, "delta": {"content": null, "tool_calls": [call]}}]})
    };
    let events = [
        json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "", "tool_calls": null}}]}),
        whole_call(Some("c1"), "fan-in"),
        whole_call(Some("c2"), "fan-out"),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
    ];
    let server = answering("/v1/chat/completions", sse(&events)).await;
    let provider = openai(&server, true);
    let response = provider.complete(&conversation()).await.unwrap();
    assert_eq!(response.tool_calls, [call("c1", "fan-in"), call("c2", "fan-out")]);

    let no_id = json!({"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}}]});
    let server =
        answering("/v1/chat/completions", ResponseTemplate::new(200).set_body_json(no_id)).await;
    let provider = openai(&server, false);
    let response = provider.complete(&conversation()).await.unwrap();
    assert_eq!(response.tool_calls[0].id, "call_0");
}
