//! `POST /v1/chat/completions`, as OpenAI's Chat Completions API answers it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State as Shared};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;

use crate::answer;
use crate::server::{Budgets, Call, Cut, Plan, State, go_duration};
use crate::tools::{self, OfferedTool, ToolTurn};
use crate::wire::{self, Frame, WireMessage};

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: String,
    messages: Vec<WireMessage>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    tools: Vec<OfferedTool>,
    #[serde(default)]
    tool_choice: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

fn error(
    status: StatusCode,
    kind: &str,
    code: &str,
    message: &str,
    headers: Vec<(&'static str, String)>,
) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "code": code, "param": null}});
    wire::json(status, headers, body.to_string())
}

fn rate_limit_headers(budgets: &Budgets) -> Vec<(&'static str, String)> {
    let mut headers = Vec::new();
    if !budgets.told {
        return headers;
    }
    if let Some(v) = budgets.requests {
        headers.push(("x-ratelimit-limit-requests", v.limit.to_string()));
        headers.push(("x-ratelimit-remaining-requests", v.remaining.to_string()));
        headers.push(("x-ratelimit-reset-requests", go_duration(v.reset)));
    }
    if let Some(v) = budgets.tokens {
        headers.push(("x-ratelimit-limit-tokens", v.limit.to_string()));
        headers.push(("x-ratelimit-remaining-tokens", v.remaining.to_string()));
        headers.push(("x-ratelimit-reset-tokens", go_duration(v.reset)));
    }
    headers
}

pub(crate) async fn chat_completions(
    Shared(state): Shared<Arc<State>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    let request: ChatRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            let message = format!("We could not parse the JSON body of your request: {e}");
            return wire::counted(&state, peer, false, async {
                error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "invalid_json",
                    &message,
                    vec![],
                )
            })
            .await;
        }
    };
    wire::counted(&state, peer, request.stream, answer_chat(&state, request)).await
}

async fn answer_chat(state: &State, request: ChatRequest) -> Response {
    let (messages, prompt) = wire::texts(&request.messages);
    let tool_turn = tools::turn(
        &request.tools,
        request.tool_choice.as_ref(),
        &request.messages,
        &prompt,
        state.config.tool_turns,
    );
    let call =
        Call { messages, prompt, n: request.n.unwrap_or(1).clamp(1, 128), seed: request.seed };
    let (plan, wait) = state.decide(&call);
    state.work(wait).await;
    let id = state.next_id();
    let request_id = ("x-request-id", format!("req_mock_{id}"));
    let model = if request.model.is_empty() { state.config.model.clone() } else { request.model };
    match plan {
        Plan::RateLimited { budgets, dimension } => {
            let retry_after = budgets.retry_after();
            let mut headers = rate_limit_headers(&budgets);
            headers.push(("retry-after", retry_after.as_secs_f64().ceil().max(1.0).to_string()));
            headers.push(("retry-after-ms", retry_after.as_millis().max(1).to_string()));
            headers.push(request_id);
            let message = format!(
                "Rate limit reached for {dimension} on the mock server. Please try again later."
            );
            error(
                StatusCode::TOO_MANY_REQUESTS,
                dimension,
                "rate_limit_exceeded",
                &message,
                headers,
            )
        }
        Plan::ServerError => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            "The mock server had an injected error while processing your request.",
            vec![request_id],
        ),
        Plan::Malformed => wire::json(
            StatusCode::OK,
            vec![request_id],
            format!(
                r#"{{"id":"chatcmpl-mock-{id}","object":"chat.completion","choices":[{{"index":0,"message":{{"content":"trunc"#
            ),
        ),
        Plan::Answer { mut choices, prompt_tokens, mut completion_tokens, budgets, cut } => {
            let mut headers = rate_limit_headers(&budgets);
            headers.push(request_id);
            match tool_turn {
                Some(ToolTurn::Call { name, arguments }) => {
                    let call = ToolCallAnswer { id, name, arguments: arguments.to_string() };
                    let tokens = (prompt_tokens, answer::tokens(&call.arguments));
                    return tool_call(state, &model, call, tokens, request.stream, headers);
                }
                Some(ToolTurn::Answer { results }) => {
                    choices = choices.iter().map(|c| tools::quoting(c, &results)).collect();
                    completion_tokens = choices.iter().map(|c| answer::tokens(c)).sum();
                }
                None => {}
            }
            let usage = json!({
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            });
            if request.stream {
                let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
                let usage = include_usage.then_some(usage);
                return stream(state, id, &model, &choices, usage, headers, cut);
            }
            tokio::time::sleep(state.generation_time(completion_tokens)).await;
            let choices: Vec<_> = choices
                .iter()
                .enumerate()
                .map(|(i, text)| {
                    json!({
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    })
                })
                .collect();
            let body = json!({
                "id": format!("chatcmpl-mock-{id}"),
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": choices,
                "usage": usage,
            });
            wire::cut_json(headers, body.to_string(), cut, state.config.hang)
        }
    }
}

/// A tool call the mock makes.
struct ToolCallAnswer {
    id: u64,
    name: String,
    arguments: String,
}

/// An answer that calls a tool: whole, or streamed as OpenAI does (the call's
/// id and name first, then its arguments in pieces).
fn tool_call(
    state: &State,
    model: &str,
    call: ToolCallAnswer,
    (prompt_tokens, completion_tokens): (u64, u64),
    streamed: bool,
    headers: Vec<(&'static str, String)>,
) -> Response {
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens});
    let call_id = format!("call_mock_{}", call.id);
    let body = |choices: serde_json::Value| {
        json!({"id": format!("chatcmpl-mock-{}", call.id), "object": "chat.completion.chunk",
               "created": 0, "model": model, "choices": choices})
    };
    if !streamed {
        let mut whole = body(json!([{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": null, "tool_calls": [{"id": call_id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}]}}]));
        whole["object"] = json!("chat.completion");
        whole["usage"] = usage;
        return wire::json(StatusCode::OK, headers, whole.to_string());
    }
    let now = std::time::Duration::ZERO;
    let delta = |delta: serde_json::Value, finish: Option<&str>| {
        let chunk = body(json!([{"index": 0, "delta": delta, "finish_reason": finish}]));
        Frame::data(now, None, &chunk.to_string())
    };
    let half = call.arguments.len() / 2;
    let half = (0..=half).rev().find(|&i| call.arguments.is_char_boundary(i)).unwrap_or(0);
    let piece = |text: &str| {
        delta(json!({"tool_calls": [{"index": 0, "function": {"arguments": text}}]}), None)
    };
    let mut frames = vec![
        delta(
            json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": call_id,
            "type": "function", "function": {"name": call.name, "arguments": ""}}]}),
            None,
        ),
        piece(&call.arguments[..half]),
        piece(&call.arguments[half..]),
        delta(json!({}), Some("tool_calls")),
    ];
    let mut with_usage = body(json!([]));
    with_usage["usage"] = usage;
    frames.push(Frame::data(
        state.generation_time(completion_tokens),
        None,
        &with_usage.to_string(),
    ));
    frames.push(Frame::data(now, None, "[DONE]"));
    wire::event_stream(headers, frames)
}

fn stream(
    state: &State,
    id: u64,
    model: &str,
    choices: &[String],
    usage: Option<serde_json::Value>,
    headers: Vec<(&'static str, String)>,
    cut: Option<Cut>,
) -> Response {
    let chunk = |choices: serde_json::Value, extra: Option<(&str, serde_json::Value)>| {
        let mut body = json!({
            "id": format!("chatcmpl-mock-{id}"),
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": choices,
        });
        if let Some((key, value)) = extra {
            body[key] = value;
        }
        body.to_string()
    };
    let now = std::time::Duration::ZERO;
    let mut frames = Vec::new();
    for (index, text) in choices.iter().enumerate() {
        let role = json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]);
        frames.push(Frame::data(now, None, &chunk(role, None)));
        for piece in wire::pieces(text) {
            let delta =
                json!([{"index": index, "delta": {"content": piece}, "finish_reason": null}]);
            frames.push(Frame::data(
                state.generation_time(answer::tokens(piece)),
                None,
                &chunk(delta, None),
            ));
        }
        let stop = json!([{"index": index, "delta": {}, "finish_reason": "stop"}]);
        frames.push(Frame::data(now, None, &chunk(stop, None)));
    }
    if let Some(usage) = usage {
        frames.push(Frame::data(now, None, &chunk(json!([]), Some(("usage", usage)))));
    }
    frames.push(Frame::data(now, None, "[DONE]"));
    wire::cut_frames(&mut frames, cut, state.config.hang);
    wire::event_stream(headers, frames)
}
