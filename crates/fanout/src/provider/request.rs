//! What a task asks of a provider, and what comes back.

use serde::{Deserialize, Serialize};

use super::headers::RateLimit;

/// Who said a message in a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One message of a chat conversation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Self {
        Self { role: Role::System, content: content.into() }
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self { role: Role::User, content: content.into() }
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self { role: Role::Assistant, content: content.into() }
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
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// How many choices to generate in one call (providers that support it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Ask for JSON output (providers that support it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    /// Which of several samples of the same prompt this is. Voting sends one
    /// prompt N times; the index keeps those N requests distinct (for caches and
    /// for providers that derive a seed from it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sample_index: u32,
    /// Provider-specific body fields, passed through unchanged.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The shape of output a request asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ResponseFormat {
    /// Any valid JSON object.
    JsonObject,
    /// JSON that follows `schema`.
    JsonSchema { name: String, schema: serde_json::Value },
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Request {
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

    #[must_use]
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    #[must_use]
    pub fn with_max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }

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
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, other: Self) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
    }
}

/// A provider's answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The (first) choice's text.
    pub text: String,
    /// The other choices' texts, when the request asked for `n` > 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_choices: Vec<String>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Rate-limit headers sent with the answer; the executor paces itself by them.
    #[serde(skip)]
    pub rate_limit: Option<RateLimit>,
}

impl Response {
    pub fn new(text: impl Into<String>, usage: Usage) -> Self {
        Self { text: text.into(), usage, ..Self::default() }
    }
}
