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
        Plan::Answer { choices, prompt_tokens, completion_tokens, budgets, cut } => {
            let mut headers = rate_limit_headers(&budgets);
            headers.push(request_id);
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
