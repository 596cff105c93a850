//! Tool calling, provider-neutral: the tools a request offers, the calls the
//! model makes, and the results given back.
//!
//! The shapes follow what both APIs have in common. OpenAI's `tools` /
//! `tool_calls` / `role: "tool"` messages and Anthropic's `tools` / `tool_use`
//! blocks / `tool_result` blocks are written and read by the providers; a
//! [`ToolCall`]'s arguments stay the JSON text the model wrote, so a call that
//! is not valid JSON reaches the caller as it was (and can be answered with an
//! error) instead of failing the whole answer.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A tool the model may call: its name, what it does, and the JSON Schema of
/// its arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// The name the model calls it by (`^[a-zA-Z0-9_-]{1,64}$` for both APIs).
    pub name: String,
    /// What it does and when to use it: the model reads this.
    pub description: String,
    /// JSON Schema of the arguments, an object schema.
    pub parameters: Value,
}

impl ToolSpec {
    /// A tool with this name, description and argument schema.
    pub fn new(name: impl Into<String>, description: impl Into<String>, parameters: Value) -> Self {
        Self { name: name.into(), description: description.into(), parameters }
    }
}

/// Whether and which tool the model must call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    /// The model decides (the default when tools are offered).
    Auto,
    /// No tool call: answer in text.
    None,
    /// At least one tool call.
    Required,
    /// A call of this tool.
    Tool(String),
}

/// A tool call the model made.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ToolCall {
    /// The provider's id for the call; its result is given back under it.
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments as the JSON text the model wrote (possibly not valid JSON).
    pub arguments: String,
}

impl ToolCall {
    /// The arguments parsed, or why they are not a JSON object.
    pub fn parsed_arguments(&self) -> Result<serde_json::Map<String, Value>, String> {
        let text = if self.arguments.trim().is_empty() { "{}" } else { &self.arguments };
        match serde_json::from_str(text) {
            Ok(Value::Object(fields)) => Ok(fields),
            Ok(other) => Err(format!("the arguments are not a JSON object: {other}")),
            Err(error) => Err(format!("the arguments are not valid JSON: {error}")),
        }
    }

    /// The arguments as a JSON object for APIs that take one (Anthropic's
    /// `input`). Text that is not an object (a call cut off mid-arguments)
    /// becomes `{}`: the API refuses anything else, and the call's result
    /// already says what was wrong with it.
    pub(crate) fn arguments_value(&self) -> Value {
        Value::Object(self.parsed_arguments().unwrap_or_default())
    }
}
