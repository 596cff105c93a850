//! Spans for every run, task and call, built on `tracing`, with the attributes
//! of the OpenTelemetry GenAI semantic conventions: a `fanout.run` span per
//! run, a `fanout.task` span per task or branch inside it, and one span per
//! call to the provider (`chat {model}`: every attempt, retry, repair and
//! hedge) carrying `gen_ai.operation.name`, `gen_ai.provider.name`,
//! `gen_ai.request.model`, `gen_ai.usage.input_tokens`, … An OpenTelemetry
//! layer (`tracing-opentelemetry`; the `fanout` command's `--otlp-endpoint`)
//! turns them into exported spans; without a subscriber they cost one check
//! each.
//!
//! Prompt and answer text go in only when [`ExecutorBuilder::span_content`]
//! opts in (`gen_ai.input.messages`, `gen_ai.output.messages`); request
//! headers, where keys live, never do.
//!
//! [`ExecutorBuilder::span_content`]: crate::ExecutorBuilder::span_content

use serde::Serialize;
use tracing::Span;
use tracing::field::Empty;

use super::history::CallRole;
use crate::provider::{ProviderError, Request, Response, Role};
use crate::task::{Outcome, TaskId};

/// The span of one run of the executor, a child of the caller's current span.
pub(crate) fn run_span(provider: &str) -> Span {
    tracing::info_span!(
        target: "fanout",
        "fanout.run",
        gen_ai.provider.name = provider,
    )
}

/// The span of one task (or branch) of `run`.
pub(crate) fn task_span(run: &Span, index: usize, id: &TaskId) -> Span {
    tracing::info_span!(
        target: "fanout",
        parent: run,
        "fanout.task",
        fanout.task.id = id.as_str(),
        fanout.task.index = count(index as u64),
        fanout.task.status = Empty,
        fanout.task.attempts = Empty,
        error.type = Empty,
        otel.status_code = Empty,
    )
}

/// Says how the task of `span` ended.
pub(crate) fn task_ended(span: &Span, outcome: &Outcome) {
    if span.is_disabled() {
        return;
    }
    span.record("fanout.task.status", snake(&outcome.status()).as_str());
    span.record("fanout.task.attempts", i64::from(outcome.attempts()));
    if !outcome.is_success() {
        if let Outcome::Failed { error, .. } = outcome {
            span.record("error.type", snake(&error.kind()).as_str());
        }
        span.record("otel.status_code", "ERROR");
    }
}

/// Says how the branch of `span` ended (`finished`, `panicked`, …).
pub(crate) fn branch_ended(span: &Span, status: &str, finished: bool) {
    span.record("fanout.task.status", status);
    if !finished {
        span.record("otel.status_code", "ERROR");
    }
}

/// One call to the provider, its span ended when it is dropped: marked
/// cancelled unless [`CallSpan::ended`] said how it ended first.
pub(crate) struct CallSpan {
    pub span: Span,
    ended: bool,
}

impl CallSpan {
    /// A span for a call of `request` (a child of the current span: the task's).
    pub(crate) fn start(
        provider: &str,
        default_model: Option<&str>,
        request: &Request,
        attempt: u32,
        role: CallRole,
        content: bool,
    ) -> Self {
        let model = request.model.as_deref().or(default_model);
        let span = tracing::info_span!(
            target: "fanout",
            "chat",
            otel.name = call_name(model).as_str(),
            otel.kind = "client",
            otel.status_code = Empty,
            gen_ai.operation.name = "chat",
            gen_ai.provider.name = provider,
            gen_ai.request.model = model,
            gen_ai.request.max_tokens = request.max_tokens.map(i64::from),
            gen_ai.request.temperature = request.temperature.map(f64::from),
            gen_ai.request.top_p = request.top_p.map(f64::from),
            gen_ai.request.seed = request.seed.map(count),
            gen_ai.response.model = Empty,
            gen_ai.response.finish_reasons = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            gen_ai.usage.cache_read.input_tokens = Empty,
            gen_ai.input.messages = Empty,
            gen_ai.output.messages = Empty,
            error.type = Empty,
            http.response.status_code = Empty,
            fanout.attempt = i64::from(attempt),
            fanout.call.role = snake(&role).as_str(),
            fanout.call.end = Empty,
            fanout.usage.estimated = Empty,
        );
        if content && !span.is_disabled() {
            span.record("gen_ai.input.messages", input_messages(request).as_str());
        }
        Self { span, ended: false }
    }

    /// Records how the call ended: its answer's model, finish reason and
    /// usage, or its error's kind and status.
    pub(crate) fn ended(mut self, result: Result<&Response, &ProviderError>, content: bool) {
        self.ended = true;
        let span = &self.span;
        if span.is_disabled() {
            return;
        }
        match result {
            Ok(response) => {
                span.record("fanout.call.end", "answered");
                if let Some(model) = &response.model {
                    span.record("gen_ai.response.model", model.as_str());
                }
                if let Some(reason) = &response.finish_reason {
                    span.record("gen_ai.response.finish_reasons", reason.as_str());
                }
                let usage = response.usage;
                span.record("gen_ai.usage.input_tokens", count(usage.input_tokens));
                span.record("gen_ai.usage.output_tokens", count(usage.output_tokens));
                span.record(
                    "gen_ai.usage.cache_read.input_tokens",
                    count(usage.cached_input_tokens),
                );
                span.record("fanout.usage.estimated", response.usage_estimated);
                if content {
                    span.record("gen_ai.output.messages", output_messages(response).as_str());
                }
            }
            Err(error) => {
                span.record("fanout.call.end", "failed");
                span.record("error.type", snake(&error.kind()).as_str());
                span.record("otel.status_code", "ERROR");
                if let Some(status) = error.status() {
                    span.record("http.response.status_code", i64::from(status));
                }
            }
        }
    }
}

impl Drop for CallSpan {
    fn drop(&mut self) {
        if !self.ended && !self.span.is_disabled() {
            // An outrun hedge, or a call cut by its task's timeout or the deadline.
            self.span.record("fanout.call.end", "cancelled");
        }
    }
}

/// The conventions' span name: `{gen_ai.operation.name} {gen_ai.request.model}`.
fn call_name(model: Option<&str>) -> String {
    match model {
        Some(model) => format!("chat {model}"),
        None => "chat".to_owned(),
    }
}

/// A count as the integer OpenTelemetry attributes hold (they are signed
/// 64-bit; unsigned ones arrive as strings).
fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A unit enum's serde name (`rate_limited`, `succeeded`, `hedge`).
fn snake(value: &impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => String::new(),
    }
}

/// The request's messages in the GenAI conventions' shape:
/// `[{"role": "user", "parts": [{"type": "text", "content": "…"}]}]`.
fn input_messages(request: &Request) -> String {
    let messages: Vec<_> = request
        .messages
        .iter()
        .map(|message| {
            let role = match message.role {
                Role::System => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
                Role::Tool => "tool",
            };
            serde_json::json!({
                "role": role,
                "parts": [{"type": "text", "content": message.content}],
            })
        })
        .collect();
    serde_json::Value::Array(messages).to_string()
}

/// The answer in the GenAI conventions' shape.
fn output_messages(response: &Response) -> String {
    serde_json::json!([{
        "role": "assistant",
        "parts": [{"type": "text", "content": response.text}],
        "finish_reason": response.finish_reason,
    }])
    .to_string()
}
