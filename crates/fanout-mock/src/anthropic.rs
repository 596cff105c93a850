//! `POST /v1/messages`, as Anthropic's Messages API answers it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State as Shared};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;

use crate::answer;
use crate::server::{Budgets, Call, Cut, Plan, State};
use crate::tools::{self, OfferedTool, ToolTurn};
use crate::wire::{self, Content, Frame, WireMessage};

#[derive(Debug, Deserialize)]
struct MessagesRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    system: Content,
    messages: Vec<WireMessage>,
    max_tokens: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    tools: Vec<OfferedTool>,
    #[serde(default)]
    tool_choice: Option<serde_json::Value>,
}

fn error(
    status: StatusCode,
    kind: &str,
    message: &str,
    headers: Vec<(&'static str, String)>,
) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    wire::json(status, headers, body.to_string())
}

fn rfc3339(after: Duration) -> String {
    rfc3339_of(SystemTime::now() + after)
}

/// `at` as RFC 3339 in UTC, to the second, as Anthropic writes times.
pub(crate) fn rfc3339_of(at: SystemTime) -> String {
    let secs = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn rate_limit_headers(budgets: &Budgets) -> Vec<(&'static str, String)> {
    let mut headers = Vec::new();
    if !budgets.told {
        return headers;
    }
    if let Some(v) = budgets.requests {
        headers.push(("anthropic-ratelimit-requests-limit", v.limit.to_string()));
        headers.push(("anthropic-ratelimit-requests-remaining", v.remaining.to_string()));
        headers.push(("anthropic-ratelimit-requests-reset", rfc3339(v.reset)));
    }
    if let Some(v) = budgets.tokens {
        headers.push(("anthropic-ratelimit-tokens-limit", v.limit.to_string()));
        headers.push(("anthropic-ratelimit-tokens-remaining", v.remaining.to_string()));
        headers.push(("anthropic-ratelimit-tokens-reset", rfc3339(v.reset)));
    }
    headers
}

pub(crate) async fn messages(
    Shared(state): Shared<Arc<State>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    let request: MessagesRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            let message = format!("invalid request body: {e}");
            return wire::counted(&state, peer, false, async {
                error(StatusCode::BAD_REQUEST, "invalid_request_error", &message, vec![])
            })
            .await;
        }
    };
    wire::counted(&state, peer, request.stream, answer_messages(&state, request)).await
}

async fn answer_messages(state: &State, request: MessagesRequest) -> Response {
    if request.max_tokens.is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "max_tokens: Field required",
            vec![],
        );
    }
    let (mut messages, prompt) = wire::texts(&request.messages);
    let tool_turn = tools::turn(
        &request.tools,
        request.tool_choice.as_ref(),
        &request.messages,
        &prompt,
        state.config.tool_turns,
    );
    messages.push(request.system.text());
    let (plan, wait) = state.decide(&Call { messages, prompt, n: 1, seed: None });
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    let id = state.next_id();
    let request_id = ("request-id", format!("req_mock_{id}"));
    let model = if request.model.is_empty() { state.config.model.clone() } else { request.model };
    match plan {
        Plan::RateLimited { budgets, dimension } => {
            let mut headers = rate_limit_headers(&budgets);
            headers.push((
                "retry-after",
                budgets.retry_after().as_secs_f64().ceil().max(1.0).to_string(),
            ));
            headers.push(request_id);
            let message =
                format!("This request would exceed the mock server's rate limit for {dimension}.");
            error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", &message, headers)
        }
        Plan::ServerError => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "Injected internal server error",
            vec![request_id],
        ),
        Plan::Malformed => wire::json(
            StatusCode::OK,
            vec![request_id],
            format!(
                r#"{{"id":"msg_mock_{id}","type":"message","content":[{{"type":"text","text":"trunc"#
            ),
        ),
        Plan::Answer { choices, prompt_tokens, mut completion_tokens, budgets, cut } => {
            let mut headers = rate_limit_headers(&budgets);
            headers.push(request_id);
            let mut text = choices.into_iter().next().unwrap_or_default();
            match tool_turn {
                Some(ToolTurn::Call { name, arguments }) => {
                    let tokens = (prompt_tokens, answer::tokens(&arguments.to_string()));
                    return tool_use(id, &model, &name, arguments, tokens, request.stream, headers);
                }
                Some(ToolTurn::Answer { results }) => {
                    text = tools::quoting(&text, &results);
                    completion_tokens = answer::tokens(&text);
                }
                None => {}
            }
            if request.stream {
                let tokens = (prompt_tokens, completion_tokens);
                return stream(state, id, &model, &text, tokens, headers, cut);
            }
            tokio::time::sleep(state.generation_time(completion_tokens)).await;
            let body = json!({
                "id": format!("msg_mock_{id}"),
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": null,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
            });
            wire::cut_json(headers, body.to_string(), cut, state.config.hang)
        }
    }
}

/// An answer that calls a tool: a `tool_use` block, whole or streamed as
/// Anthropic does (the block's start, then its input as `input_json_delta`s).
fn tool_use(
    id: u64,
    model: &str,
    name: &str,
    input: serde_json::Value,
    (input_tokens, output_tokens): (u64, u64),
    streamed: bool,
    headers: Vec<(&'static str, String)>,
) -> Response {
    let block_id = format!("toolu_mock_{id}");
    let message_id = format!("msg_mock_{id}");
    if !streamed {
        let body = json!({"id": message_id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "tool_use", "id": block_id, "name": name, "input": input}],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}});
        return wire::json(StatusCode::OK, headers, body.to_string());
    }
    let event = |kind: &str, body: serde_json::Value| {
        Frame::data(Duration::ZERO, Some(kind), &body.to_string())
    };
    let arguments = input.to_string();
    let half =
        (0..=arguments.len() / 2).rev().find(|&i| arguments.is_char_boundary(i)).unwrap_or(0);
    let piece = |text: &str| {
        event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": text}}),
        )
    };
    let frames = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {"id": message_id,
            "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null,
            "stop_sequence": null, "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "tool_use", "id": block_id, "name": name, "input": {}}}),
        ),
        piece(&arguments[..half]),
        piece(&arguments[half..]),
        event("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        event(
            "message_delta",
            json!({"type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": null},
            "usage": {"output_tokens": output_tokens}}),
        ),
        event("message_stop", json!({"type": "message_stop"})),
    ];
    wire::event_stream(headers, frames)
}

fn stream(
    state: &State,
    id: u64,
    model: &str,
    text: &str,
    (input_tokens, output_tokens): (u64, u64),
    headers: Vec<(&'static str, String)>,
    cut: Option<Cut>,
) -> Response {
    let now = Duration::ZERO;
    let event =
        |kind: &str, body: serde_json::Value| Frame::data(now, Some(kind), &body.to_string());
    let mut frames = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": format!("msg_mock_{id}"), "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": input_tokens, "output_tokens": 1},
            }}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    for piece in wire::pieces(text) {
        let body = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}});
        let delay = state.generation_time(answer::tokens(piece));
        frames.push(Frame::data(delay, Some("content_block_delta"), &body.to_string()));
    }
    frames.push(event("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
    frames.push(event(
        "message_delta",
        json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null},
        "usage": {"output_tokens": output_tokens}}),
    ));
    frames.push(event("message_stop", json!({"type": "message_stop"})));
    wire::cut_frames(&mut frames, cut, state.config.hang);
    wire::event_stream(headers, frames)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(super::civil_from_days(20_513), (2026, 3, 1));
    }
}
