//! Tools an agent may call: Rust async functions with a JSON Schema, and the
//! toolbox that runs the model's calls of them, each bounded in time and size.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::provider::{ToolCall, ToolSpec};

/// A tool: what the model is told about it, and the work it does.
///
/// The result is text for the model; an `Err` is also given back to the model
/// (marked as an error), which can then try again or answer without it.
#[async_trait::async_trait]
pub trait Tool: Send + Sync + 'static {
    /// Its name, description and argument schema, as offered to the model.
    fn spec(&self) -> ToolSpec;

    /// Runs it with the model's arguments (already parsed as a JSON object).
    async fn call(&self, arguments: Map<String, Value>) -> Result<String, String>;
}

type ToolFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// A [`Tool`] made of a spec and an async closure.
pub struct FnTool {
    spec: ToolSpec,
    run: Box<dyn Fn(Map<String, Value>) -> ToolFuture + Send + Sync>,
}

impl FnTool {
    /// A tool that runs `run` on the model's arguments.
    pub fn new<F, Fut>(spec: ToolSpec, run: F) -> Self
    where
        F: Fn(Map<String, Value>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        Self { spec, run: Box::new(move |arguments| Box::pin(run(arguments))) }
    }
}

impl FnTool {
    /// A tool whose arguments are the Rust type `A`: its JSON Schema is derived
    /// (`#[derive(Deserialize, JsonSchema)]`), and arguments that do not fit
    /// it are told to the model without calling `run`.
    pub fn typed<A, F, Fut>(name: impl Into<String>, description: impl Into<String>, run: F) -> Self
    where
        A: serde::de::DeserializeOwned + schemars::JsonSchema + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        let mut schema = schemars::schema_for!(A).to_value();
        // The APIs take the schema itself, not a JSON Schema document.
        if let Some(fields) = schema.as_object_mut() {
            fields.shift_remove("$schema");
            fields.shift_remove("title");
        }
        let spec = ToolSpec::new(name, description, schema);
        let run = Arc::new(run);
        Self::new(spec, move |arguments| {
            let run = Arc::clone(&run);
            async move {
                let arguments: A = serde_json::from_value(Value::Object(arguments))
                    .map_err(|error| format!("the arguments do not fit the schema: {error}"))?;
                run(arguments).await
            }
        })
    }
}

impl std::fmt::Debug for FnTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnTool").field("spec", &self.spec).finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl Tool for FnTool {
    fn spec(&self) -> ToolSpec {
        self.spec.clone()
    }

    async fn call(&self, arguments: Map<String, Value>) -> Result<String, String> {
        (self.run)(arguments).await
    }
}

/// Default bound on one tool call's time.
pub const DEFAULT_TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on one tool result's size, in bytes: past it the result is
/// cut (at a character boundary) and says so, so one huge file cannot fill
/// the context window.
pub const DEFAULT_MAX_TOOL_OUTPUT: usize = 32 * 1024;

/// The tools of an agent, by name; cheap to clone and shared by every branch.
#[derive(Clone)]
pub struct Toolbox {
    tools: Arc<BTreeMap<String, Arc<dyn Tool>>>,
    timeout: Duration,
    max_output: usize,
}

impl Default for Toolbox {
    fn default() -> Self {
        Self {
            tools: Arc::default(),
            timeout: DEFAULT_TOOL_TIMEOUT,
            max_output: DEFAULT_MAX_TOOL_OUTPUT,
        }
    }
}

impl std::fmt::Debug for Toolbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Toolbox")
            .field("tools", &self.tools.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("max_output", &self.max_output)
            .finish()
    }
}

/// What one tool call did, for the transcript.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ToolRun {
    /// The call as the model made it.
    pub call: ToolCall,
    /// The text given back to the model: the result, or what went wrong.
    pub output: String,
    /// Whether `output` reports a failure (unknown tool, bad arguments, the
    /// tool's own error, a timeout).
    pub is_error: bool,
    /// Whether the output was cut to the size limit.
    pub truncated: bool,
    /// How long the tool ran; serialized in milliseconds.
    #[serde(serialize_with = "millis")]
    pub duration: Duration,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

impl Toolbox {
    /// An empty toolbox with the default time and size bounds.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tool; a later tool of the same name replaces the earlier one.
    #[must_use]
    pub fn with(mut self, tool: impl Tool) -> Self {
        self.add(Arc::new(tool));
        self
    }

    /// Adds a shared tool (an MCP server's, say); a tool of the same name is replaced.
    pub fn add(&mut self, tool: Arc<dyn Tool>) {
        Arc::make_mut(&mut self.tools).insert(tool.spec().name, tool);
    }

    /// Adds every tool of a set named `set`, refusing a name already taken:
    /// two sets offering `read_file` must not silently swap one for the other
    /// (the built-in one is confined to its folders, a server's may not be).
    pub fn add_set(&mut self, set: &str, tools: &[Arc<dyn Tool>]) -> Result<(), String> {
        for tool in tools {
            let name = tool.spec().name;
            if self.tools.contains_key(&name) {
                return Err(format!(
                    "the tool `{name}` of `{set}` has the name of a tool already offered; \
                     use one of the two sets"
                ));
            }
            self.add(Arc::clone(tool));
        }
        Ok(())
    }

    /// Bounds each tool call's time (default 30 s).
    #[must_use]
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }

    /// Bounds each tool result's size in bytes (default 32 KiB).
    #[must_use]
    pub fn max_output(mut self, bytes: usize) -> Self {
        self.max_output = bytes;
        self
    }

    /// The tools' specs, to offer to the model, in name order.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools.values().map(|tool| tool.spec()).collect()
    }

    /// Whether there are no tools.
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    /// Runs one call of the model's: never fails, every fault is said in the
    /// output for the model to read.
    pub async fn run(&self, call: &ToolCall) -> ToolRun {
        let started = Instant::now();
        let result = match (self.tools.get(&call.name), call.parsed_arguments()) {
            (None, _) => Err(format!(
                "there is no tool `{}`; the tools are: {}",
                call.name,
                self.tools.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
            )),
            (Some(_), Err(error)) => Err(format!("bad arguments for `{}`: {error}", call.name)),
            (Some(tool), Ok(arguments)) => {
                // A panicking tool fails its call, not the agent.
                let work = std::panic::AssertUnwindSafe(tool.call(arguments));
                match tokio::time::timeout(
                    self.timeout,
                    futures_util::FutureExt::catch_unwind(work),
                )
                .await
                {
                    Ok(Ok(result)) => result,
                    Ok(Err(panic)) => Err(format!(
                        "the tool `{}` panicked: {}",
                        call.name,
                        crate::exec::panic_message(&*panic)
                    )),
                    Err(_) => Err(format!(
                        "the tool `{}` did not answer within {:.1}s",
                        call.name,
                        self.timeout.as_secs_f64()
                    )),
                }
            }
        };
        let is_error = result.is_err();
        let text = result.unwrap_or_else(|error| error);
        let (output, truncated) = cap(text, self.max_output);
        ToolRun { call: call.clone(), output, is_error, truncated, duration: started.elapsed() }
    }
}

/// Cuts `text` to at most `max` bytes at a character boundary, saying so.
fn cap(mut text: String, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let total = text.len();
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!("\n[cut: {total} bytes in all, the first {end} shown]"));
    (text, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_cut_at_a_character_boundary() {
        let (text, cut) = cap("ééé".into(), 3);
        assert!(cut);
        assert!(text.starts_with("é\n[cut: 6 bytes in all, the first 2 shown]"), "{text}");
        assert_eq!(cap("short".into(), 10), ("short".into(), false));
    }
}
