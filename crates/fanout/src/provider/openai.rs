//! Any OpenAI-compatible Chat Completions endpoint: OpenAI, vLLM, llama.cpp's
//! server, Ollama, OpenRouter, Groq, Together, `fanout-mock`...
//!
//! Defaults: base URL from `OPENAI_BASE_URL` or `https://api.openai.com/v1`, key
//! from `OPENAI_API_KEY` (none is sent when there is none: local servers need
//! none), non-streaming. Answers are parsed tolerantly: missing optional fields
//! are fine, unknown ones ignored, and what is required but missing (the
//! choices) is a clear [`ErrorKind::MalformedResponse`], which is retried.

use std::time::SystemTime;

use futures_util::StreamExt;
use http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::builder::{HttpApi, HttpBuilder, HttpSettings};
use super::http::{Endpoint, decimal, forward, header, request_id};
use super::{
    Check, ErrorKind, Image, Message, Progress, Provider, ProviderError, RateLimit, Request,
    Response, ResponseFormat, Role, ToolCall, ToolChoice, Usage, sse,
};
use crate::tokens;

pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// Settings for an [`OpenAi`] provider.
pub type OpenAiBuilder = HttpBuilder<OpenAi>;

impl HttpApi for OpenAi {
    const DEFAULT_BASE_URL: &'static str = DEFAULT_BASE_URL;
    const ENV: (&'static str, &'static str) = ("OPENAI_BASE_URL", "OPENAI_API_KEY");

    fn connect(settings: HttpSettings) -> Result<Self, ProviderError> {
        let base = settings.base_url.trim_end_matches('/');
        let url = format!("{base}/chat/completions");
        let model_url = format!("{base}/models/{}", settings.model);
        let mut headers = HeaderMap::new();
        if let Some(key) = &settings.api_key {
            headers.insert(http::header::AUTHORIZATION, key.header("Bearer ")?);
        }
        let (name, value) = header("accept", "application/json, text/event-stream");
        headers.insert(name, value);
        let endpoint = Endpoint::new(url, headers, settings.api_key, &settings.http)?;
        Ok(Self { endpoint, model_url, model: settings.model, stream: settings.stream })
    }
}

/// The OpenAI Chat Completions provider.
#[derive(Clone, Debug)]
pub struct OpenAi {
    endpoint: Endpoint,
    /// Describes the configured model: the cheap [`Provider::check`].
    model_url: String,
    model: String,
    stream: bool,
}

impl OpenAi {
    /// Settings with the defaults, ignoring the environment.
    pub fn builder(model: impl Into<String>) -> OpenAiBuilder {
        HttpBuilder::new(model)
    }

    /// Settings from `OPENAI_BASE_URL` and `OPENAI_API_KEY`.
    pub fn from_env(model: impl Into<String>) -> OpenAiBuilder {
        HttpBuilder::from_env(model)
    }

    /// The model asked when a request names none.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The client and key, for the same API's other paths (its Batch API).
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The JSON body sent for `request`.
    pub fn body(&self, request: &Request) -> Value {
        let messages: Vec<Value> = request.messages.iter().map(wire_message).collect();
        let mut body = json!({
            "model": request.model.as_deref().unwrap_or(&self.model),
            "messages": messages,
        });
        let fields = body.as_object_mut().expect("an object");
        let mut set = |key: &str, value: Option<Value>| {
            if let Some(value) = value {
                fields.insert(key.into(), value);
            }
        };
        set("temperature", request.temperature.map(decimal));
        set("top_p", request.top_p.map(decimal));
        set("max_tokens", request.max_tokens.map(Value::from));
        set("stop", (!request.stop.is_empty()).then(|| json!(request.stop)));
        set("seed", request.seed.map(Value::from));
        set("n", request.n.map(Value::from));
        set(
            "response_format",
            request.response_format.as_ref().map(|format| match format {
                ResponseFormat::JsonObject => json!({"type": "json_object"}),
                ResponseFormat::JsonSchema { name, schema } => {
                    json!({"type": "json_schema", "json_schema": {"name": name,
                        "schema": schema, "strict": strict_compatible(schema)}})
                }
            }),
        );
        set("tools", (!request.tools.is_empty()).then(|| wire_tools(request)));
        set("tool_choice", request.tool_choice.as_ref().map(wire_tool_choice));
        if self.stream {
            set("stream", Some(Value::Bool(true)));
            set("stream_options", Some(json!({"include_usage": true})));
        }
        for (key, value) in &request.extra {
            fields.insert(key.clone(), value.clone());
        }
        body
    }
}

/// Whether OpenAI's strict structured output takes `schema`: every object
/// allows no other properties and requires all of its own. Strict is asked
/// for only then, since a strict request with another schema is refused (400);
/// fanout validates every answer either way.
fn strict_compatible(schema: &Value) -> bool {
    match schema {
        Value::Object(map) => {
            if map.get("type").and_then(Value::as_str) == Some("object") {
                let required: Vec<&str> = map
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|names| names.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let all_required =
                    map.get("properties").and_then(Value::as_object).is_none_or(|properties| {
                        properties.keys().all(|k| required.contains(&k.as_str()))
                    });
                if map.get("additionalProperties") != Some(&Value::Bool(false)) || !all_required {
                    return false;
                }
            }
            map.values().all(strict_compatible)
        }
        Value::Array(items) => items.iter().all(strict_compatible),
        _ => true,
    }
}

/// An image as a content part: its URL, or its data as a data URI.
fn image_part(image: &Image) -> Value {
    match image.as_url() {
        Ok(url) => json!({"type": "image_url", "image_url": {"url": url}}),
        // Only when the files were not read first (`body` called directly):
        // sending says why, and `complete` fails the call before that.
        Err(error) => json!({"type": "text", "text": error.to_string()}),
    }
}

/// A message as Chat Completions takes it: tool calls on the assistant's
/// turn, and tool results as `tool` messages naming their call.
fn wire_message(message: &Message) -> Value {
    let mut wire = json!({"role": message.role, "content": message.content});
    if !message.images.is_empty() {
        let text = json!({"type": "text", "text": message.content});
        let images = message.images.iter().map(image_part);
        wire["content"] = Value::Array(std::iter::once(text).chain(images).collect());
    }
    if message.role == Role::Tool {
        wire["tool_call_id"] = json!(message.tool_call_id.as_deref().unwrap_or_default());
    }
    if !message.tool_calls.is_empty() {
        if message.content.is_empty() {
            wire["content"] = Value::Null;
        }
        let calls: Vec<Value> = message
            .tool_calls
            .iter()
            .map(|call| {
                json!({"id": call.id, "type": "function",
                       "function": {"name": call.name, "arguments": call.arguments}})
            })
            .collect();
        wire["tool_calls"] = Value::Array(calls);
    }
    wire
}

fn wire_tools(request: &Request) -> Value {
    let tools: Vec<Value> = request
        .tools
        .iter()
        .map(|tool| {
            json!({"type": "function", "function": {
                "name": tool.name, "description": tool.description, "parameters": tool.parameters}})
        })
        .collect();
    Value::Array(tools)
}

fn wire_tool_choice(choice: &ToolChoice) -> Value {
    match choice {
        ToolChoice::Auto => json!("auto"),
        ToolChoice::None => json!("none"),
        ToolChoice::Required => json!("required"),
        ToolChoice::Tool(name) => json!({"type": "function", "function": {"name": name}}),
    }
}

#[derive(Debug, Deserialize)]
struct Completion {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    #[serde(default)]
    index: usize,
    #[serde(default)]
    message: Option<ChoiceMessage>,
    /// Legacy completions put the text here.
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
    /// Some servers write `null` for none.
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
}

/// A tool call, whole or (streaming) a piece of one: `index` says which call
/// a piece belongs to, and the first piece carries the id and name.
#[derive(Debug, Deserialize)]
struct WireToolCall {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<WireFunction>,
}

#[derive(Debug, Deserialize)]
struct WireFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    /// `cached_tokens`: the part of the prompt read from OpenAI's prompt cache.
    #[serde(default)]
    prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Default, Deserialize)]
struct PromptTokensDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: usize,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
}

/// Choices as they are assembled, by index.
#[derive(Debug, Default)]
struct Assembly {
    texts: Vec<String>,
    /// The first choice's tool calls, by their index.
    tool_calls: Vec<ToolCall>,
    finish_reasons: Vec<Option<String>>,
    model: Option<String>,
    usage: Option<WireUsage>,
}

impl Assembly {
    /// Adds a whole tool call or a streamed piece of one to the first choice.
    /// A piece names its call by `index`; servers that send none start a new
    /// call with each new id, and continue the last one otherwise.
    fn add_tool_call(&mut self, piece: WireToolCall) {
        let id = piece.id.filter(|id| !id.is_empty());
        let index = match piece.index {
            Some(index) => index.min(1024),
            None if id.is_some() || self.tool_calls.is_empty() => self.tool_calls.len(),
            None => self.tool_calls.len() - 1,
        };
        if index >= self.tool_calls.len() {
            let blank =
                ToolCall { id: String::new(), name: String::new(), arguments: String::new() };
            self.tool_calls.resize(index + 1, blank);
        }
        let call = &mut self.tool_calls[index];
        if let Some(id) = id {
            call.id = id;
        }
        if let Some(function) = piece.function {
            if let Some(name) = function.name.filter(|n| !n.is_empty()) {
                call.name = name;
            }
            call.arguments.push_str(function.arguments.as_deref().unwrap_or_default());
        }
    }

    /// The tool calls as the answer has them: gaps dropped, and an id made up
    /// for a call the server gave none (its result must name one).
    fn finished_tool_calls(&mut self) -> Vec<ToolCall> {
        std::mem::take(&mut self.tool_calls)
            .into_iter()
            .filter(|call| !call.name.is_empty())
            .enumerate()
            .map(|(i, mut call)| {
                if call.id.is_empty() {
                    call.id = format!("call_{i}");
                }
                call
            })
            .collect()
    }

    fn slot(&mut self, index: usize) -> usize {
        let index = index.min(1024);
        if index >= self.texts.len() {
            self.texts.resize(index + 1, String::new());
            self.finish_reasons.resize(index + 1, None);
        }
        index
    }

    /// Every choice has a finish reason: the answer is whole. A stream cut off
    /// early (some servers end a stream with `[DONE]` when a second request
    /// arrives) has none, and its text must not pass for the answer.
    fn finished(&self) -> bool {
        !self.finish_reasons.is_empty() && self.finish_reasons.iter().all(Option::is_some)
    }

    fn into_response(
        mut self,
        request: &Request,
        headers: &HeaderMap,
    ) -> Result<Response, ProviderError> {
        let tool_calls = self.finished_tool_calls();
        let mut texts = self.texts.into_iter();
        let Some(text) = texts.next() else {
            return Err(ProviderError::new(
                ErrorKind::MalformedResponse,
                "the answer has no choices",
            ));
        };
        let other_choices: Vec<String> = texts.collect();
        // Usage the server left out is counted with the tokenizer of the
        // model that answered, where tiktoken knows it.
        let model = self.model.as_deref().or(request.model.as_deref());
        // A count of the output takes the tool calls' arguments in with the text.
        let arguments = tool_calls.iter().map(|c| c.arguments.as_str());
        let output: String = std::iter::once(text.as_str()).chain(arguments).collect();
        let (usage, usage_estimated) =
            usage_or_count(self.usage, model, request, &output, &other_choices);
        Ok(Response {
            text,
            other_choices,
            tool_calls,
            usage,
            usage_estimated,
            finish_reason: self.finish_reasons.into_iter().next().flatten(),
            model: self.model,
            request_id: request_id(headers),
            rate_limit: RateLimit::from_headers(headers, SystemTime::now()),
            raw: None,
        })
    }
}

/// Servers that report no usage (some ignore `stream_options.include_usage`)
/// get a count made here, so TPM accounting still works; the flag says it is
/// not the server's own, so nobody is billed on a guess unknowingly.
fn usage_or_count(
    usage: Option<WireUsage>,
    model: Option<&str>,
    request: &Request,
    text: &str,
    others: &[String],
) -> (Usage, bool) {
    let usage = usage.unwrap_or_default();
    let estimated = usage.prompt_tokens.is_none() || usage.completion_tokens.is_none();
    let cached_input_tokens =
        usage.prompt_tokens_details.and_then(|d| d.cached_tokens).unwrap_or(0);
    let usage = Usage {
        cached_input_tokens,
        input_tokens: usage.prompt_tokens.unwrap_or_else(|| tokens::count_prompt(model, request)),
        output_tokens: usage.completion_tokens.unwrap_or_else(|| {
            std::iter::once(text)
                .chain(others.iter().map(String::as_str))
                .map(|choice| tokens::count_text(model, choice))
                .sum()
        }),
    };
    (usage, estimated)
}

fn malformed(what: &str, error: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(ErrorKind::MalformedResponse, format!("{what}: {error}"))
}

/// Parses a whole (non-streaming) answer body.
pub(crate) fn parse_completion(
    body: &[u8],
    request: &Request,
    headers: &HeaderMap,
) -> Result<Response, ProviderError> {
    let completion: Completion = serde_json::from_slice(body)
        .map_err(|e| malformed("the answer is not a chat completion", e))?;
    let mut assembly =
        Assembly { model: completion.model, usage: completion.usage, ..Assembly::default() };
    for choice in completion.choices {
        let slot = assembly.slot(choice.index);
        let (content, tool_calls) =
            choice.message.map(|m| (m.content, m.tool_calls)).unwrap_or_default();
        if slot == 0 {
            // Whole calls: each its own, whatever their index says.
            for (position, call) in tool_calls.into_iter().flatten().enumerate() {
                assembly.add_tool_call(WireToolCall { index: Some(position), ..call });
            }
        }
        assembly.texts[slot] = content.or(choice.text).unwrap_or_default();
        assembly.finish_reasons[slot] = choice.finish_reason;
    }
    assembly.into_response(request, headers)
}

/// Assembles a streamed answer from the body's bytes, however they are split,
/// marking `progress` at every event. A stream that ends before every choice
/// has its finish reason is malformed (and retried), `[DONE]` or not.
pub(crate) async fn assemble_stream<S, B, E>(
    endpoint: &Endpoint,
    body: S,
    request: &Request,
    headers: &HeaderMap,
    progress: &Progress,
) -> Result<Response, ProviderError>
where
    S: futures_util::Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    let mut events = std::pin::pin!(sse::events(endpoint, body));
    let mut assembly = Assembly::default();
    while let Some(event) = events.next().await {
        let data = event?.data;
        progress.mark();
        if data.trim() == "[DONE]" {
            break;
        }
        if let Some(error) = endpoint.body_error(data.as_bytes()) {
            return Err(error);
        }
        let chunk: Chunk =
            serde_json::from_str(&data).map_err(|e| malformed("bad stream chunk", e))?;
        assembly.model = assembly.model.or(chunk.model);
        if chunk.usage.is_some() {
            assembly.usage = chunk.usage;
        }
        for choice in chunk.choices {
            let slot = assembly.slot(choice.index);
            let Delta { content, tool_calls } =
                choice.delta.unwrap_or(Delta { content: None, tool_calls: None });
            if let Some(content) = content {
                assembly.texts[slot].push_str(&content);
            }
            if slot == 0 {
                for piece in tool_calls.into_iter().flatten() {
                    assembly.add_tool_call(piece);
                }
            }
            if choice.finish_reason.is_some() {
                assembly.finish_reasons[slot] = choice.finish_reason;
            }
        }
    }
    if !assembly.finished() {
        return Err(ProviderError::new(
            ErrorKind::MalformedResponse,
            "the stream ended before the answer did (no finish_reason)",
        ));
    }
    assembly.into_response(request, headers)
}

#[async_trait::async_trait]
impl Provider for OpenAi {
    fn name(&self) -> &str {
        "openai"
    }

    fn default_model(&self) -> Option<&str> {
        Some(&self.model)
    }

    async fn complete(&self, request: &Request) -> Result<Response, ProviderError> {
        self.complete_observed(request, &Progress::new()).await
    }

    /// Asks for the configured model's description, which needs a good key.
    async fn check(&self) -> Check {
        self.endpoint.check(&self.model_url).await
    }

    async fn complete_observed(
        &self,
        request: &Request,
        progress: &Progress,
    ) -> Result<Response, ProviderError> {
        let request = &*super::read_image_files(request).await?;
        if request.body.is_some() {
            let parse =
                |bytes: &[u8], headers: &HeaderMap| parse_completion(bytes, request, headers);
            let assemble = |events, headers| async move {
                assemble_stream(&self.endpoint, events, request, &headers, progress).await
            };
            return forward(&self.endpoint, request, progress, parse, assemble).await;
        }
        let response = self.endpoint.post(&self.body(request)).await?;
        if self.stream {
            let headers = response.headers().clone();
            let body = response.bytes_stream();
            return assemble_stream(&self.endpoint, body, request, &headers, progress).await;
        }
        let headers = response.headers().clone();
        let body = self.endpoint.body(response).await?;
        parse_completion(&body, request, &headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::HttpOptions;
    use proptest::prelude::*;

    const STREAM: &str = concat!(
        ": keep-alive comment\n\n",
        "data: {\"id\":\"c1\",\"model\":\"gpt-x\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo ✓\"}},{\"index\":1,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"},{\"index\":1,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n",
        "data: [DONE]\n\n",
    );

    fn endpoint() -> Endpoint {
        Endpoint::new("http://127.0.0.1:9".into(), HeaderMap::new(), None, &HttpOptions::default())
            .unwrap()
    }

    fn assemble(chunks: Vec<Vec<u8>>) -> Result<Response, ProviderError> {
        let body = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(assemble_stream(
            &endpoint(),
            body,
            &Request::user("q"),
            &HeaderMap::new(),
            &Progress::new(),
        ))
    }

    fn split(bytes: &[u8], points: &[usize]) -> Vec<Vec<u8>> {
        let mut points: Vec<usize> = points.iter().map(|p| p % (bytes.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for point in points.into_iter().chain([bytes.len()]) {
            chunks.push(bytes[start..point].to_vec());
            start = point;
        }
        chunks
    }

    #[test]
    fn stream_is_assembled_however_it_is_split() {
        let bytes = STREAM.as_bytes();
        for at in 0..=bytes.len() {
            let response =
                assemble(split(bytes, &[at])).unwrap_or_else(|e| panic!("split at {at}: {e}"));
            assert_eq!(response.text, "Hello ✓", "split at {at}");
            assert_eq!(response.other_choices, ["Hi"]);
            assert_eq!(response.usage, Usage::new(7, 3));
            assert_eq!(response.finish_reason.as_deref(), Some("stop"));
            assert_eq!(response.model.as_deref(), Some("gpt-x"));
        }
    }

    #[test]
    fn truncated_or_garbled_streams_are_malformed() {
        let truncated =
            &STREAM[..STREAM.find("data: {\"choices\":[{\"index\":0,\"delta\":{},").unwrap()];
        let error = assemble(vec![truncated.as_bytes().to_vec()]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::MalformedResponse);
        assert!(error.message().contains("ended before"), "{error}");
        // Cut off with [DONE] and no finish reason (llama-cpp-python does this to
        // a stream when a second request arrives): not an answer.
        let cut = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            "data: [DONE]\n\n",
        );
        let error = assemble(vec![cut.as_bytes().to_vec()]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::MalformedResponse);
        let one_of_two = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"},\"finish_reason\":\"stop\"},{\"index\":1,\"delta\":{\"content\":\"b\"}}]}\n\n",
            "data: [DONE]\n\n",
        );
        assert!(assemble(vec![one_of_two.as_bytes().to_vec()]).is_err(), "choice 1 never finished");
        let garbage = assemble(vec![b"data: {not json}\n\n".to_vec()]).unwrap_err();
        assert_eq!(garbage.kind(), ErrorKind::MalformedResponse);
        let in_band = b"data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\",\"code\":null}}\n\n";
        let error = assemble(vec![in_band.to_vec()]).unwrap_err();
        assert_eq!((error.kind(), error.message()), (ErrorKind::Server, "overloaded"));
    }

    #[test]
    fn tolerant_parsing_of_drifting_servers() {
        let minimal = br#"{"choices":[{"message":{"content":"hi"}}],"something_new":{"x":1}}"#;
        let response =
            parse_completion(minimal, &Request::user("abcdefgh"), &HeaderMap::new()).unwrap();
        assert_eq!(response.text, "hi");
        assert_eq!(response.usage, Usage::new(6, 1));
        assert!(response.usage_estimated);
        let legacy = br#"{"choices":[{"text":"old style","finish_reason":"length"}],"usage":{"prompt_tokens":3}}"#;
        let response = parse_completion(legacy, &Request::user("q"), &HeaderMap::new()).unwrap();
        assert_eq!((response.text.as_str(), response.usage.input_tokens), ("old style", 3));
        let cached = br#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":2000,
            "completion_tokens":5,"prompt_tokens_details":{"cached_tokens":1536}}}"#;
        let response = parse_completion(cached, &Request::user("q"), &HeaderMap::new()).unwrap();
        let expected = Usage { cached_input_tokens: 1536, ..Usage::new(2000, 5) };
        assert_eq!(response.usage, expected, "cached tokens are part of prompt_tokens");
        let empty = parse_completion(br#"{"choices":[]}"#, &Request::user("q"), &HeaderMap::new());
        assert!(empty.unwrap_err().message().contains("no choices"));
        let error =
            parse_completion(b"<html>", &Request::user("q"), &HeaderMap::new()).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::MalformedResponse);
    }

    #[test]
    fn usage_a_stream_leaves_out_is_counted_with_the_models_tokenizer() {
        // llama-cpp-python ignores stream_options.include_usage: no usage chunk.
        let without_usage = concat!(
            "data: {\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello world\"},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        let response = assemble(vec![without_usage.as_bytes().to_vec()]).unwrap();
        // o200k_base: the prompt "q" is 1 token + 3 framing + 1 role + 3
        // priming; "Hello world" is 2 tokens (chars/4 would say 2 and 3).
        assert_eq!(response.usage, Usage::new(8, 2));
        assert!(response.usage_estimated, "a count made here is not the server's");
        let unknown_model = without_usage.replace("gpt-4o-mini", "smollm2");
        let response = assemble(vec![unknown_model.into_bytes()]).unwrap();
        assert_eq!(response.usage, Usage::new(5, 3));
        assert!(response.usage_estimated);
    }

    proptest! {
        #[test]
        fn any_split_of_a_valid_stream_gives_the_same_answer(points in proptest::collection::vec(any::<usize>(), 0..6)) {
            let response = assemble(split(STREAM.as_bytes(), &points)).unwrap();
            prop_assert_eq!(response.text, "Hello ✓");
        }

        #[test]
        fn parsers_never_panic_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            points in proptest::collection::vec(any::<usize>(), 0..4),
            status in 100u16..600,
        ) {
            let _ = parse_completion(&bytes, &Request::user("q"), &HeaderMap::new());
            let _ = assemble(split(&bytes, &points));
            let _ = endpoint().answer_error(status, &HeaderMap::new(), &bytes);
            let mut framed = b"data: ".to_vec();
            framed.extend_from_slice(&bytes);
            let _ = assemble(split(&framed, &points));
        }
    }

    #[test]
    fn strict_is_asked_only_for_schemas_openai_takes_strictly() {
        let strict = json!({"type": "object", "properties": {"a": {"type": "object",
            "properties": {"b": {"type": "integer"}}, "required": ["b"], "additionalProperties": false}},
            "required": ["a"], "additionalProperties": false});
        assert!(strict_compatible(&strict));
        let optional = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        assert!(!strict_compatible(&optional));
        let mut nested_open = strict.clone();
        nested_open["properties"]["a"]["additionalProperties"] = json!(true);
        assert!(!strict_compatible(&nested_open));
    }
}
