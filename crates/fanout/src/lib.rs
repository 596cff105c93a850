//! fanout runs LLM work in parallel and brings every result back.
//!
//! The principal types, and how they connect:
//! - a [`Task`] is an owned, immutable [`Request`] with a stable [`TaskId`];
//! - a [`Provider`] answers one request — [`OpenAi`] (any OpenAI-compatible
//!   endpoint), [`Anthropic`], or the scriptable [`MockProvider`] — and fails
//!   with a [`ProviderError`] that callers classify by [`ErrorKind`] without
//!   matching variants;
//! - an [`Executor`] runs many tasks on one provider under a concurrency cap,
//!   RPM and TPM limits, a shared pause on 429, retries with jittered backoff,
//!   per-attempt and per-task timeouts, a global deadline, cancellation, a
//!   circuit breaker and optional hedging;
//! - every task ends with exactly one [`Outcome`], collected in a [`Report`] (in
//!   task order, with [`Totals`]) or streamed as results finish.
//!
//! ```
//! use std::time::Duration;
//! use fanout::{Executor, MockProvider, Request};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let provider = MockProvider::new().with_latency(Duration::from_millis(5));
//! let executor = Executor::builder(provider).concurrency(8).rpm(6_000).build();
//! let essays = ["The sea", "My town", "Robots"];
//! let report = executor
//!     .run(essays.iter().map(|title| Request::user(format!("Grade the essay titled {title}"))))
//!     .await;
//! assert_eq!(report.totals.succeeded, 3);
//! for (id, answer) in report.texts() {
//!     println!("{id}: {answer}");
//! }
//! # }
//! ```

#![warn(missing_docs)]

// One path per item: what users need is re-exported here; the modules that
// hold the executor, the providers and the outcomes stay private. The patterns
// and token counting are namespaced on purpose.
pub mod agent;
pub mod batches;
mod exec;
pub mod pattern;
pub mod prices;
mod provider;
mod task;
pub mod tokens;

pub use agent::{Agent, AgentRun, Ending, FnTool, Tool, ToolRun, Toolbox, Transcript, Turn};
pub use async_trait::async_trait;
pub use exec::branch::{
    BRANCH_GRACE, Branch, BranchOutcome, BranchReport, BranchResult, BranchResults, Calls,
};
pub use exec::check::parse_json as answer_json;
pub use exec::event::{Event, EventSink, ResultSink};
pub use exec::hedge::{HedgeAfter, HedgePolicy};
pub use exec::history::{CallEnd, CallRecord, CallRole};
pub use exec::limit::{
    PriceOf, Pricing, Rate, SharedLease, SharedLimits, SharedSpending, SpendLimit, StatedLimits,
};
pub use exec::report::{Latency, Report, Tally, Totals};
pub use exec::retry::RetryPolicy;
pub use exec::{Executor, ExecutorBuilder, HeldResult, HeldResults, Results, Slot};
pub use prices::Price;
pub use provider::anthropic::{
    AnthropicBuilder, DEFAULT_MAX_TOKENS as ANTHROPIC_DEFAULT_MAX_TOKENS,
};
pub use provider::headers::Budget;
pub use provider::openai::OpenAiBuilder;
pub use provider::{
    Anthropic, Behavior, Check, ErrorKind, HttpApi, HttpBuilder, HttpOptions, HttpSettings, Image,
    Message, MockProvider, OpenAi, Progress, Provider, ProviderError, RateLimit, Relay, Relayed,
    Request, Response, ResponseFormat, Role, ToolCall, ToolChoice, ToolSpec, Usage,
    read_image_files,
};
pub use task::{Failure, NotRun, Outcome, Status, Success, Task, TaskId, TaskResult, Timeout};
pub use tokio_util::sync::CancellationToken;
