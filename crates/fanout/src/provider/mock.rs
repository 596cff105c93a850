//! A scriptable in-process provider for tests, examples and benchmarks.
//!
//! By default every call answers `mock answer: <prompt>` after the configured
//! latency. Behaviour can be scripted per task (keyed by the task's prompt: the
//! next call with that prompt takes the next [`Behavior`] from its script) or by
//! rule (a function of the call that may return a behaviour). Scripts win over
//! rules, rules over the default answer.
//!
//! ```
//! use std::time::Duration;
//! use fanout::{Behavior, MockProvider};
//!
//! let mock = MockProvider::new().with_latency(Duration::from_millis(100));
//! // The first call for "flaky" is rate limited for 2 s, the second succeeds.
//! mock.script("flaky", [Behavior::rate_limited(Some(Duration::from_secs(2))), Behavior::reply("ok")]);
//! // Every 10th call fails with a server error.
//! let mock = mock.with_rule(|call| (call.number % 10 == 0).then(|| Behavior::server_error()));
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{
    ErrorKind, Progress, Provider, ProviderError, Request, Response, ResponseFormat, Usage,
};
use crate::tokens;

/// What one mocked call does.
#[derive(Clone, Debug)]
pub struct Behavior {
    /// Replaces the provider's latency for this call when set.
    latency: Option<Duration>,
    action: Action,
}

#[derive(Clone, Debug)]
enum Action {
    Reply(String),
    /// Boxed: a whole answer is large beside the other actions.
    Respond(Box<Response>),
    Fail(ProviderError),
    Hang,
    /// Streams `chunks` parts, one every `every`, then answers `text`; or stops
    /// streaming for good after `stall_after` parts.
    Stream {
        text: String,
        chunks: u32,
        every: Duration,
        stall_after: Option<u32>,
    },
}

impl Behavior {
    /// Answers with this text (usage estimated from the text).
    pub fn reply(text: impl Into<String>) -> Self {
        Self { latency: None, action: Action::Reply(text.into()) }
    }

    /// Answers with exactly this response (usage, rate-limit headers and all).
    pub fn respond(response: Response) -> Self {
        Self { latency: None, action: Action::Respond(Box::new(response)) }
    }

    /// Fails with this error.
    pub fn fail(error: ProviderError) -> Self {
        Self { latency: None, action: Action::Fail(error) }
    }

    /// A 429, optionally with a retry-after.
    pub fn rate_limited(retry_after: Option<Duration>) -> Self {
        let mut error = ProviderError::from_status(429, "mock rate limit");
        if let Some(after) = retry_after {
            error = error.with_retry_after(after);
        }
        Self::fail(error)
    }

    /// A 500.
    pub fn server_error() -> Self {
        Self::fail(ProviderError::from_status(500, "mock server error"))
    }

    /// A 401, as for a bad API key.
    pub fn unauthorized() -> Self {
        Self::fail(ProviderError::from_status(401, "mock: invalid API key"))
    }

    /// Never answers; only a timeout, the deadline or cancellation ends the call.
    pub fn hang() -> Self {
        Self { latency: None, action: Action::Hang }
    }

    /// Streams: after the latency, `chunks` parts of the answer arrive one every
    /// `every` (each marks the attempt's [`Progress`]), then the answer is `text`.
    pub fn stream(text: impl Into<String>, chunks: u32, every: Duration) -> Self {
        let action = Action::Stream { text: text.into(), chunks, every, stall_after: None };
        Self { latency: None, action }
    }

    /// Like [`Self::stream`], but the stream stops for good after `parts` parts.
    pub fn stall_after(parts: u32, every: Duration) -> Self {
        let action = Action::Stream {
            text: String::new(),
            chunks: u32::MAX,
            every,
            stall_after: Some(parts),
        };
        Self { latency: None, action }
    }

    /// Takes this long instead of the provider's latency.
    #[must_use]
    pub fn after(mut self, latency: Duration) -> Self {
        self.latency = Some(latency);
        self
    }
}

/// The call a rule is asked about.
#[derive(Debug)]
pub struct Call<'a> {
    pub request: &'a Request,
    /// 1 for the provider's first call, counting every call.
    pub number: u64,
}

type Rule = dyn Fn(&Call<'_>) -> Option<Behavior> + Send + Sync;
type Reply = dyn Fn(&Request) -> String + Send + Sync;

/// When a logged call started and what it asked.
#[derive(Clone, Debug)]
pub struct CallRecord {
    pub at: Instant,
    pub prompt: String,
    pub estimated_tokens: u64,
}

#[derive(Default)]
struct Stats {
    calls: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    log: Mutex<Option<Vec<CallRecord>>>,
}

/// The scriptable provider. Clones share scripts and statistics, so a test can
/// keep one clone and hand another to the executor.
#[derive(Clone)]
pub struct MockProvider {
    name: Arc<str>,
    latency: Duration,
    jitter: Duration,
    rng: Arc<Mutex<fastrand::Rng>>,
    reply: Arc<Reply>,
    rules: Vec<Arc<Rule>>,
    scripts: Arc<Mutex<HashMap<String, VecDeque<Behavior>>>>,
    stats: Arc<Stats>,
}

impl fmt::Debug for MockProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockProvider")
            .field("name", &self.name)
            .field("latency", &self.latency)
            .field("jitter", &self.jitter)
            .field("rules", &self.rules.len())
            .field("calls", &self.calls())
            .finish_non_exhaustive()
    }
}

impl Default for MockProvider {
    fn default() -> Self {
        Self::new()
    }
}

impl MockProvider {
    /// A mock that answers `mock answer: <prompt>` at once, to every call
    /// (and, to a request for JSON that follows a schema, the simplest such
    /// JSON, as a provider's structured output would).
    pub fn new() -> Self {
        Self {
            name: "mock".into(),
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            rng: Arc::new(Mutex::new(fastrand::Rng::with_seed(0))),
            reply: Arc::new(|request| match &request.response_format {
                Some(ResponseFormat::JsonSchema { schema, .. }) => example_of(schema).to_string(),
                _ => format!("mock answer: {}", request.prompt()),
            }),
            rules: Vec::new(),
            scripts: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// Every call takes this long (before jitter).
    #[must_use]
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Adds a uniformly random `[-jitter, +jitter]` to each call's latency,
    /// drawn from a generator seeded with `seed`.
    #[must_use]
    pub fn with_jitter(mut self, jitter: Duration, seed: u64) -> Self {
        self.jitter = jitter;
        self.rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(seed)));
        self
    }

    /// How the default answer is derived from the request.
    #[must_use]
    pub fn with_reply(
        mut self,
        reply: impl Fn(&Request) -> String + Send + Sync + 'static,
    ) -> Self {
        self.reply = Arc::new(reply);
        self
    }

    /// Adds a rule; rules are asked in the order they were added.
    #[must_use]
    pub fn with_rule(
        mut self,
        rule: impl Fn(&Call<'_>) -> Option<Behavior> + Send + Sync + 'static,
    ) -> Self {
        self.rules.push(Arc::new(rule));
        self
    }

    /// Records every call (time, prompt, estimated tokens) for inspection with
    /// [`Self::call_log`]. Off by default: a log grows with every call.
    #[must_use]
    pub fn with_call_log(self) -> Self {
        *self.stats.log.lock().unwrap() = Some(Vec::new());
        self
    }

    /// Appends behaviours for the calls whose prompt is `prompt`, in order.
    pub fn script(&self, prompt: impl Into<String>, behaviors: impl IntoIterator<Item = Behavior>) {
        self.scripts.lock().unwrap().entry(prompt.into()).or_default().extend(behaviors);
    }

    /// Calls started so far.
    pub fn calls(&self) -> u64 {
        self.stats.calls.load(Ordering::Relaxed)
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> u64 {
        self.stats.in_flight.load(Ordering::Relaxed)
    }

    /// The most calls that were in flight at once.
    pub fn max_in_flight(&self) -> u64 {
        self.stats.max_in_flight.load(Ordering::Relaxed)
    }

    /// Every call so far, if [`Self::with_call_log`] was set.
    pub fn call_log(&self) -> Vec<CallRecord> {
        self.stats.log.lock().unwrap().clone().unwrap_or_default()
    }

    /// Calls so far whose prompt is `prompt` (needs [`Self::with_call_log`]).
    pub fn calls_for(&self, prompt: &str) -> usize {
        self.call_log().iter().filter(|c| c.prompt == prompt).count()
    }

    fn behavior_for(&self, call: &Call<'_>) -> Option<Behavior> {
        let scripted = {
            let mut scripts = self.scripts.lock().unwrap();
            scripts.get_mut(call.request.prompt()).and_then(VecDeque::pop_front)
        };
        scripted.or_else(|| self.rules.iter().find_map(|rule| rule(call)))
    }

    fn latency(&self) -> Duration {
        if self.jitter.is_zero() {
            return self.latency;
        }
        let jitter = self.jitter.as_secs_f64();
        let offset = (self.rng.lock().unwrap().f64() * 2.0 - 1.0) * jitter;
        Duration::from_secs_f64((self.latency.as_secs_f64() + offset).max(0.0))
    }
}

/// Keeps the in-flight count right when a call is cancelled mid-way.
struct InFlight<'a>(&'a Stats);

impl<'a> InFlight<'a> {
    fn enter(stats: &'a Stats) -> Self {
        let now = stats.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        stats.max_in_flight.fetch_max(now, Ordering::AcqRel);
        Self(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[async_trait::async_trait]
impl Provider for MockProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn complete(&self, request: &Request) -> Result<Response, ProviderError> {
        self.complete_observed(request, &Progress::new()).await
    }

    async fn complete_observed(
        &self,
        request: &Request,
        progress: &Progress,
    ) -> Result<Response, ProviderError> {
        let number = self.stats.calls.fetch_add(1, Ordering::AcqRel) + 1;
        let _in_flight = InFlight::enter(&self.stats);
        if let Some(log) = self.stats.log.lock().unwrap().as_mut() {
            log.push(CallRecord {
                at: Instant::now(),
                prompt: request.prompt().to_owned(),
                estimated_tokens: self.estimate_tokens(request),
            });
        }
        let behavior = self.behavior_for(&Call { request, number });
        let latency = behavior.as_ref().and_then(|b| b.latency).unwrap_or_else(|| self.latency());
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let action = behavior.map_or_else(|| Action::Reply((self.reply)(request)), |b| b.action);
        let reply = |text: String| {
            let usage = Usage::new(tokens::estimate_prompt(request), tokens::estimate_text(&text));
            Ok(Response {
                finish_reason: Some("stop".into()),
                model: request.model.clone(),
                ..Response::new(text, usage)
            })
        };
        match action {
            Action::Stream { text, chunks, every, stall_after } => {
                for part in 0..chunks {
                    if stall_after == Some(part) {
                        std::future::pending::<()>().await;
                    }
                    progress.mark();
                    tokio::time::sleep(every).await;
                }
                reply(text)
            }
            Action::Reply(text) => reply(text),
            Action::Respond(response) => Ok(*response),
            Action::Fail(error) => Err(error),
            Action::Hang => std::future::pending().await,
        }
    }
}

impl From<ErrorKind> for Behavior {
    fn from(kind: ErrorKind) -> Self {
        Self::fail(ProviderError::new(kind, format!("mock {kind}")))
    }
}

/// The simplest JSON that `schema` allows for the common keywords (`type`,
/// `properties` and `required`, `enum`, `const`, `minimum`, `items` with
/// `minItems`, the first of `anyOf`/`oneOf`); a string is `"mock"`, which
/// breaks a `pattern` or `format` it does not happen to match.
pub(crate) fn example_of(schema: &serde_json::Value) -> serde_json::Value {
    use serde_json::{Value, json};
    if let Some(value) = schema.get("const") {
        return value.clone();
    }
    if let Some(first) = schema.get("enum").and_then(|e| e.get(0)) {
        return first.clone();
    }
    if let Some(first) = ["anyOf", "oneOf"].iter().find_map(|k| schema.get(*k)?.get(0)) {
        return example_of(first);
    }
    let kind = match schema.get("type") {
        Some(Value::Array(kinds)) => kinds.first().and_then(Value::as_str),
        Some(kind) => kind.as_str(),
        None if schema.get("properties").is_some() => Some("object"),
        None => None,
    };
    match kind {
        Some("object") => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let object = properties
                .into_iter()
                .flatten()
                .map(|(name, property)| (name.clone(), example_of(property)))
                .collect();
            Value::Object(object)
        }
        Some("array") => {
            let count = schema.get("minItems").and_then(Value::as_u64).unwrap_or(0);
            let item = schema.get("items").map_or(Value::Null, example_of);
            Value::Array(vec![item; count as usize])
        }
        Some("integer") => json!(schema.get("minimum").and_then(Value::as_i64).unwrap_or(7)),
        Some("number") => json!(schema.get("minimum").and_then(Value::as_f64).unwrap_or(0.5)),
        Some("boolean") => json!(true),
        Some("null") => Value::Null,
        _ => json!("mock"),
    }
}
