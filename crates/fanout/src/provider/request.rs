//! What a task asks of a provider, and what comes back.

use serde::{Deserialize, Serialize};

use super::headers::RateLimit;
use super::image::Image;
use super::tool::{ToolCall, ToolChoice, ToolSpec};

/// Who said a message in a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the whole conversation.
    System,
    /// The person asking: the prompt.
    User,
    /// The model, for earlier answers replayed as context.
    Assistant,
    /// The result of a tool call the model made (`tool_call_id` names it).
    Tool,
}

/// One message of a chat conversation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// Who said it.
    pub role: Role,
    /// What was said, as plain text.
    pub content: String,
    /// The tools the model called in this (assistant) turn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a [`Role::Tool`] message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Images shown with a user message, after its text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<Image>,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            images: Vec::new(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message: an earlier answer, given back as context.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// An assistant turn that called tools (with any text it said beside them).
    pub fn assistant_tool_calls(content: impl Into<String>, calls: Vec<ToolCall>) -> Self {
        Self { tool_calls: calls, ..Self::assistant(content) }
    }

    /// The result of the tool call `call_id`, given back to the model.
    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self { tool_call_id: Some(call_id.into()), ..Self::new(Role::Tool, content) }
    }
}

/// A provider-neutral chat completion request.
///
/// Fields left as `None` take the provider's defaults. `extra` is passed through
/// to providers that speak JSON, so parameters fanout does not model still reach
/// the server.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// The model to ask; `None` uses the provider's configured model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The conversation so far, oldest first; the last user message is the prompt.
    pub messages: Vec<Message>,
    /// Sampling temperature; higher gives more varied answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling: draw only from the likeliest tokens whose probabilities add up to this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// The most tokens the answer may have; Anthropic, which requires one, gets 1024 when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sequences that end generation where they appear; empty for none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Seed for sampling, for providers that support it (OpenAI-compatible ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// How many choices to generate in one call (providers that support it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Ask for JSON output (providers that support it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    /// Tools the model may call; empty for none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolSpec>,
    /// Whether and which tool the model must call; `None` leaves it to the provider (auto).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// Which of several samples of the same prompt this is. Voting sends one
    /// prompt N times; the index keeps those N requests distinct (for caches and
    /// for providers that derive a seed from it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sample_index: u32,
    /// Provider-specific body fields, passed through unchanged.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// A whole JSON body in the provider's own wire format, sent byte for
    /// byte instead of one built from the fields above (`fanout proxy`
    /// forwards its clients' bodies so). The fields above are then only a
    /// reading of it, for the limits to count; `stream` in it decides whether
    /// the answer streams, and the answer's own bytes come back in
    /// [`Response::raw`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Headers sent with [`Request::body`] beside the provider's own (a proxy
    /// client's `anthropic-beta`, `OpenAI-Organization`): one named like a
    /// provider header replaces it; the key and the body's framing
    /// (`authorization`, `x-api-key`, `content-type`, `content-length`, `host`)
    /// are never taken from here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// Where a streamed answer to [`Request::body`] is passed on as it
    /// arrives, for a reader that cannot wait for the whole of it. Not part
    /// of what is asked: never serialized, and any two relays compare equal.
    #[serde(skip)]
    pub relay: Option<super::Relay>,
}

/// The shape of output a request asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ResponseFormat {
    /// Any valid JSON object.
    JsonObject,
    /// JSON that follows `schema`.
    JsonSchema {
        /// The schema's name, which OpenAI requires.
        name: String,
        /// The JSON Schema the output must follow.
        schema: serde_json::Value,
    },
}

impl ResponseFormat {
    /// JSON that follows `schema`, checked to be a valid JSON Schema first.
    pub fn json_schema(name: impl Into<String>, schema: serde_json::Value) -> Result<Self, String> {
        crate::exec::check::compile(&schema)?;
        Ok(Self::JsonSchema { name: name.into(), schema })
    }

    /// The same format with the schema's keys sorted, for hashing (see
    /// [`Request::sorted_json`]).
    pub fn sorted_json(&self) -> Self {
        let mut format = self.clone();
        if let Self::JsonSchema { schema, .. } = &mut format {
            schema.sort_all_objects();
        }
        format
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Request {
    /// Whether part of this request's answer was passed on through its
    /// relay: the call is committed to that answer.
    pub fn relay_is_held(&self) -> bool {
        self.relay.as_ref().is_some_and(super::Relay::is_held)
    }

    /// The same request with the keys of every JSON object it carries (its
    /// schema, tool parameters and extra fields) sorted: what versions of
    /// fanout before serde_json's `preserve_order` sent (and hashed), so that
    /// what they stored can still be found.
    pub fn sorted_json(&self) -> Self {
        let mut request = self.clone();
        request.response_format = request.response_format.as_ref().map(ResponseFormat::sorted_json);
        for tool in &mut request.tools {
            tool.parameters.sort_all_objects();
        }
        request.extra.sort_keys();
        request.extra.values_mut().for_each(serde_json::Value::sort_all_objects);
        request
    }

    /// A request with a single user message.
    pub fn user(prompt: impl Into<String>) -> Self {
        Self { messages: vec![Message::user(prompt)], ..Self::default() }
    }

    /// Puts a system message first.
    #[must_use]
    pub fn with_system(mut self, system: impl Into<String>) -> Self {
        self.messages.insert(0, Message::system(system));
        self
    }

    /// Asks for this model instead of the provider's configured one.
    #[must_use]
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Caps the answer at `max_tokens` tokens.
    #[must_use]
    pub fn with_max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }

    /// Sets the sampling temperature.
    #[must_use]
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = Some(temperature);
        self
    }

    /// The text of the last user message: what a task is "about", used by the
    /// mock provider to script answers per task.
    pub fn prompt(&self) -> &str {
        self.messages.iter().rev().find(|m| m.role == Role::User).map_or("", |m| m.content.as_str())
    }
}

/// Tokens a call consumed, as the provider reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens: everything sent.
    pub input_tokens: u64,
    /// Tokens of the answer generated.
    pub output_tokens: u64,
    /// The part of `input_tokens` the provider read from its prompt cache,
    /// billed at the cached-input price.
    #[serde(default)]
    pub cached_input_tokens: u64,
}

impl Usage {
    /// `input_tokens` sent and `output_tokens` generated, none of them cached.
    pub const fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Self { input_tokens, output_tokens, cached_input_tokens: 0 }
    }

    /// Input and output tokens together.
    pub fn total(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }

    /// Whether no token was used.
    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, other: Self) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cached_input_tokens += other.cached_input_tokens;
    }
}

/// A provider's answer. `non_exhaustive`: build one with [`Response::new`]
/// and set the fields it needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Response {
    /// The (first) choice's text.
    pub text: String,
    /// The other choices' texts, when the request asked for `n` > 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_choices: Vec<String>,
    /// The tools the (first) choice called, in order; several when the model
    /// asked for them in parallel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Tokens the call consumed; an estimate when `usage_estimated` is set.
    pub usage: Usage,
    /// Whether `usage` is an estimate (the provider reported none) rather than
    /// the provider's own count.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub usage_estimated: bool,
    /// Why generation stopped (`stop`, `length`, ...), as the provider said it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// The model that answered, which may differ from the one asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The provider's id for the call (its `x-request-id` or `request-id` header), for support requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Rate-limit headers sent with the answer; the executor paces itself by them.
    #[serde(skip)]
    pub rate_limit: Option<RateLimit>,
    /// The answer's body as the server sent it (its JSON, or its SSE events
    /// for a streamed answer), for a request that gave its own
    /// [`Request::body`]; `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
}

impl Response {
    /// An answer with this text and usage, everything else unset.
    pub fn new(text: impl Into<String>, usage: Usage) -> Self {
        Self { text: text.into(), usage, ..Self::default() }
    }

    /// The same answer, calling these tools.
    #[must_use]
    pub fn with_tool_calls(mut self, calls: Vec<ToolCall>) -> Self {
        self.tool_calls = calls;
        self
    }

    /// Whether the answer was cut off at `max_tokens`: OpenAI's `length`,
    /// Anthropic's `max_tokens`.
    pub fn is_truncated(&self) -> bool {
        matches!(self.finish_reason.as_deref(), Some("length" | "max_tokens"))
    }

    /// The same answer, stopped for `reason` (`stop`, `length`, ...).
    #[must_use]
    pub fn with_finish_reason(mut self, reason: impl Into<String>) -> Self {
        self.finish_reason = Some(reason.into());
        self
    }
}
