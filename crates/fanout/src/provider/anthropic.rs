//! Anthropic's Messages API.
//!
//! Defaults: base URL from `ANTHROPIC_BASE_URL` or `https://api.anthropic.com`,
//! key from `ANTHROPIC_API_KEY` (sent as `x-api-key`), `anthropic-version:
//! 2023-06-01`, and `max_tokens` 1024 when a request sets none (the API
//! requires one). System messages become the `system` field. A 529 "overloaded"
//! answer is retried like a 503. JSON response formats and `n` are not part of
//! this API and are not sent.

use std::time::SystemTime;

use futures_util::StreamExt;
use http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::builder::{HttpApi, HttpBuilder, HttpSettings};
use super::http::{Endpoint, decimal, forward, header, request_id};
use super::{
    Check, ErrorKind, Image, Progress, Provider, ProviderError, RateLimit, Request, Response,
    ResponseFormat, Role, ToolCall, ToolChoice, Usage, sse,
};

pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
pub const API_VERSION: &str = "2023-06-01";
/// `max_tokens` for requests that set none.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;

/// Settings for an [`Anthropic`] provider.
pub type AnthropicBuilder = HttpBuilder<Anthropic>;

impl HttpApi for Anthropic {
    const DEFAULT_BASE_URL: &'static str = DEFAULT_BASE_URL;
    const ENV: (&'static str, &'static str) = ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY");

    fn connect(settings: HttpSettings) -> Result<Self, ProviderError> {
        let base = settings.base_url.trim_end_matches('/');
        let url = format!("{base}/v1/messages");
        let model_url = format!("{base}/v1/models/{}", settings.model);
        let mut headers = HeaderMap::new();
        if let Some(key) = &settings.api_key {
            headers.insert("x-api-key", key.header("")?);
        }
        let (name, value) = header("anthropic-version", API_VERSION);
        headers.insert(name, value);
        let endpoint = Endpoint::new(url, headers, settings.api_key, &settings.http)?;
        Ok(Self { endpoint, model_url, model: settings.model, stream: settings.stream })
    }
}

/// The Anthropic Messages provider.
#[derive(Clone, Debug)]
pub struct Anthropic {
    endpoint: Endpoint,
    /// Describes the configured model: the cheap [`Provider::check`].
    model_url: String,
    model: String,
    stream: bool,
}

impl Anthropic {
    /// Settings with the defaults, ignoring the environment.
    pub fn builder(model: impl Into<String>) -> AnthropicBuilder {
        HttpBuilder::new(model)
    }

    /// Settings from `ANTHROPIC_BASE_URL` and `ANTHROPIC_API_KEY`.
    pub fn from_env(model: impl Into<String>) -> AnthropicBuilder {
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
        let system: Vec<&str> = request
            .messages
            .iter()
            .filter(|m| m.role == Role::System)
            .map(|m| m.content.as_str())
            .collect();
        let messages = wire_messages(request);
        let mut body = json!({
            "model": request.model.as_deref().unwrap_or(&self.model),
            "max_tokens": request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            "messages": messages,
        });
        let fields = body.as_object_mut().expect("an object");
        let mut set = |key: &str, value: Option<Value>| {
            if let Some(value) = value {
                fields.insert(key.into(), value);
            }
        };
        set("system", (!system.is_empty()).then(|| Value::from(system.join("\n\n"))));
        set("temperature", request.temperature.map(decimal));
        set("top_p", request.top_p.map(decimal));
        set("stop_sequences", (!request.stop.is_empty()).then(|| json!(request.stop)));
        if let Some((name, schema)) = answer_schema(request) {
            // Anthropic's structured output: one tool whose input is the answer, forced.
            let description = "Give your answer as this tool's input.";
            set(
                "tools",
                Some(json!([{"name": name, "description": description, "input_schema": schema}])),
            );
            set("tool_choice", Some(json!({"type": "tool", "name": name})));
        } else {
            set("tools", (!request.tools.is_empty()).then(|| wire_tools(request)));
            set("tool_choice", request.tool_choice.as_ref().map(wire_tool_choice));
        }
        set("stream", self.stream.then_some(Value::Bool(true)));
        for (key, value) in &request.extra {
            fields.insert(key.clone(), value.clone());
        }
        body
    }
}

/// The conversation as the Messages API takes it: system messages left out
/// (they are the `system` field), tool calls as `tool_use` blocks of the
/// assistant's turn, and the results that follow them as `tool_result` blocks
/// of one user turn (the API wants every result of a turn together).
fn wire_messages(request: &Request) -> Vec<Value> {
    let mut messages: Vec<Value> = Vec::new();
    for message in request.messages.iter().filter(|m| m.role != Role::System) {
        match message.role {
            Role::Tool => {
                let result = json!({"type": "tool_result",
                    "tool_use_id": message.tool_call_id.as_deref().unwrap_or_default(),
                    "content": message.content});
                let follows_results = messages.last().is_some_and(|last| {
                    last["role"] == "user" && last["content"][0]["type"] == "tool_result"
                });
                match messages.last_mut() {
                    Some(last) if follows_results => {
                        last["content"].as_array_mut().expect("blocks").push(result);
                    }
                    _ => messages.push(json!({"role": "user", "content": [result]})),
                }
            }
            _ if !message.tool_calls.is_empty() => {
                let text = (!message.content.is_empty())
                    .then(|| json!({"type": "text", "text": message.content}));
                let calls = message.tool_calls.iter().map(|call| {
                    json!({"type": "tool_use", "id": call.id, "name": call.name,
                           "input": call.arguments_value()})
                });
                let blocks: Vec<Value> = text.into_iter().chain(calls).collect();
                messages.push(json!({"role": message.role, "content": blocks}));
            }
            _ if !message.images.is_empty() => {
                // Images first, then the text that asks about them, as Anthropic advises.
                let images = message.images.iter().map(image_block);
                let text = json!({"type": "text", "text": message.content});
                let blocks: Vec<Value> = images.chain(std::iter::once(text)).collect();
                messages.push(json!({"role": message.role, "content": blocks}));
            }
            _ => messages.push(json!({"role": message.role, "content": message.content})),
        }
    }
    messages
}

/// The schema a request's answer must follow, when it is asked for as a forced
/// tool call: a JSON Schema response format and no tools of its own.
fn answer_schema(request: &Request) -> Option<(&str, &Value)> {
    match &request.response_format {
        Some(ResponseFormat::JsonSchema { name, schema }) if request.tools.is_empty() => {
            Some((name.as_str(), schema))
        }
        _ => None,
    }
}

/// A forced answer tool's input becomes the answer's text (JSON), as OpenAI's
/// structured output gives it.
pub(crate) fn structured(request: &Request, mut response: Response) -> Response {
    if let Some((name, _)) = answer_schema(request)
        && let Some(at) = response.tool_calls.iter().position(|call| call.name == name)
    {
        response.text = response.tool_calls.remove(at).arguments;
    }
    response
}

/// An image as a content block: by URL, or its base64 data.
fn image_block(image: &Image) -> Value {
    match image.loaded().as_deref() {
        Ok(Image::Url(url)) => json!({"type": "image", "source": {"type": "url", "url": url}}),
        Ok(Image::Data { media_type, base64 }) => json!({"type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": base64}}),
        Ok(Image::File(_)) => unreachable!("a loaded image is not a file"),
        // Only when the files were not read first (`body` called directly).
        Err(error) => json!({"type": "text", "text": error.to_string()}),
    }
}

fn wire_tools(request: &Request) -> Value {
    let tools: Vec<Value> = request
        .tools
        .iter()
        .map(|tool| {
            json!({"name": tool.name, "description": tool.description,
                   "input_schema": tool.parameters})
        })
        .collect();
    Value::Array(tools)
}

fn wire_tool_choice(choice: &ToolChoice) -> Value {
    match choice {
        ToolChoice::Auto => json!({"type": "auto"}),
        ToolChoice::None => json!({"type": "none"}),
        ToolChoice::Required => json!({"type": "any"}),
        ToolChoice::Tool(name) => json!({"type": "tool", "name": name}),
    }
}

#[derive(Debug, Deserialize)]
struct Message {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    content: Option<Vec<Block>>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct Block {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    /// `tool_use` blocks: the call's id, the tool and its arguments.
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Value>,
}

impl Block {
    fn tool_call(self) -> Option<ToolCall> {
        (self.kind == "tool_use").then(|| ToolCall {
            id: self.id.unwrap_or_default(),
            name: self.name.unwrap_or_default(),
            arguments: self.input.map_or_else(|| "{}".to_owned(), |input| input.to_string()),
        })
    }
}

#[derive(Debug, Default, Deserialize)]
struct WireUsage {
    /// Anthropic's `input_tokens` leaves out the prompt-cache reads and writes.
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl WireUsage {
    /// fanout's usage: every prompt token in `input_tokens`, the cache reads
    /// also in `cached_input_tokens`. Cache writes are counted as plain input
    /// (Anthropic bills them at 1.25 times that).
    fn usage(&self) -> Usage {
        let cached = self.cache_read_input_tokens.unwrap_or(0);
        let written = self.cache_creation_input_tokens.unwrap_or(0);
        Usage {
            input_tokens: self.input_tokens.unwrap_or(0) + cached + written,
            output_tokens: self.output_tokens.unwrap_or(0),
            cached_input_tokens: cached,
        }
    }
}

/// One streaming event; fields of every event type, all optional.
#[derive(Debug, Deserialize)]
struct StreamEvent {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<Message>,
    /// Which content block a `content_block_*` event is about.
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    content_block: Option<Block>,
    #[serde(default)]
    delta: Option<StreamDelta>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct StreamDelta {
    #[serde(default)]
    text: Option<String>,
    /// A piece of a `tool_use` block's arguments (`input_json_delta`).
    #[serde(default)]
    partial_json: Option<String>,
    #[serde(default)]
    stop_reason: Option<String>,
}

fn malformed(what: &str, error: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(ErrorKind::MalformedResponse, format!("{what}: {error}"))
}

fn response(
    text: String,
    tool_calls: Vec<ToolCall>,
    usage: Usage,
    stop_reason: Option<String>,
    model: Option<String>,
    headers: &HeaderMap,
) -> Response {
    Response {
        text,
        other_choices: Vec::new(),
        tool_calls,
        usage,
        usage_estimated: false,
        finish_reason: stop_reason,
        model,
        request_id: request_id(headers),
        rate_limit: RateLimit::from_headers(headers, SystemTime::now()),
        raw: None,
    }
}

/// Parses a whole (non-streaming) answer body.
pub(crate) fn parse_message(body: &[u8], headers: &HeaderMap) -> Result<Response, ProviderError> {
    let message: Message =
        serde_json::from_slice(body).map_err(|e| malformed("the answer is not a message", e))?;
    let Some(content) = message.content else {
        return Err(ProviderError::new(ErrorKind::MalformedResponse, "the answer has no content"));
    };
    let text: String =
        content.iter().filter(|b| b.kind == "text").filter_map(|b| b.text.as_deref()).collect();
    let tool_calls = content.into_iter().filter_map(Block::tool_call).collect();
    let usage = message.usage.unwrap_or_default().usage();
    Ok(response(text, tool_calls, usage, message.stop_reason, message.model, headers))
}

/// Assembles a streamed answer from the body's bytes, however they are split,
/// marking `progress` at every event.
pub(crate) async fn assemble_stream<S, B, E>(
    endpoint: &Endpoint,
    body: S,
    headers: &HeaderMap,
    progress: &Progress,
) -> Result<Response, ProviderError>
where
    S: futures_util::Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    let mut events = std::pin::pin!(sse::events(endpoint, body));
    let (mut text, mut usage, mut stop_reason, mut model) =
        (String::new(), Usage::default(), None, None);
    // Tool calls by content block index; their arguments arrive in pieces.
    let mut tool_calls: Vec<(usize, ToolCall)> = Vec::new();
    let mut stopped = false;
    while let Some(event) = events.next().await {
        let event = event?;
        progress.mark();
        if event.event == "ping" || event.data.is_empty() {
            continue;
        }
        let parsed: StreamEvent =
            serde_json::from_str(&event.data).map_err(|e| malformed("bad stream event", e))?;
        match parsed.kind.as_str() {
            "error" => {
                let error = endpoint.body_error(event.data.as_bytes());
                return Err(error.unwrap_or_else(|| malformed("error event", &event.data)));
            }
            "message_start" => {
                if let Some(message) = parsed.message {
                    model = message.model;
                    if let Some(u) = message.usage {
                        usage = u.usage();
                    }
                }
            }
            "content_block_start" => {
                if let Some(call) = parsed.content_block.and_then(Block::tool_call) {
                    // The start carries `input: {}`; the arguments follow as deltas.
                    let call = ToolCall { arguments: String::new(), ..call };
                    tool_calls.push((parsed.index.unwrap_or(tool_calls.len()), call));
                }
            }
            "content_block_delta" => {
                let Some(delta) = parsed.delta else { continue };
                if let Some(piece) = delta.text {
                    text.push_str(&piece);
                }
                if let Some(piece) = delta.partial_json
                    && let Some((_, call)) =
                        tool_calls.iter_mut().find(|(i, _)| Some(*i) == parsed.index)
                {
                    call.arguments.push_str(&piece);
                }
            }
            "message_delta" => {
                if let Some(reason) = parsed.delta.and_then(|d| d.stop_reason) {
                    stop_reason = Some(reason);
                }
                if let Some(output) = parsed.usage.and_then(|u| u.output_tokens) {
                    usage.output_tokens = output;
                }
            }
            "message_stop" => {
                stopped = true;
                break;
            }
            _ => {}
        }
    }
    if !stopped {
        return Err(ProviderError::new(
            ErrorKind::MalformedResponse,
            "the stream ended before the answer did",
        ));
    }
    let tool_calls = tool_calls.into_iter().map(|(_, call)| call).collect();
    Ok(response(text, tool_calls, usage, stop_reason, model, headers))
}

#[async_trait::async_trait]
impl Provider for Anthropic {
    fn name(&self) -> &str {
        "anthropic"
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

    /// The prompt and the answer's limit as sent: without `max_tokens`, the
    /// [`DEFAULT_MAX_TOKENS`] this provider asks for (the API requires one).
    fn estimate_tokens(&self, request: &Request) -> u64 {
        self.estimate_prompt_tokens(request)
            + u64::from(request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS))
    }

    async fn complete_observed(
        &self,
        request: &Request,
        progress: &Progress,
    ) -> Result<Response, ProviderError> {
        let request = &*super::read_image_files(request).await?;
        if request.body.is_some() {
            let assemble = |events, headers| async move {
                assemble_stream(&self.endpoint, events, &headers, progress).await
            };
            return forward(&self.endpoint, request, progress, parse_message, assemble).await;
        }
        let answer = self.endpoint.post(&self.body(request)).await?;
        let headers = answer.headers().clone();
        let response = if self.stream {
            assemble_stream(&self.endpoint, answer.bytes_stream(), &headers, progress).await?
        } else {
            parse_message(&self.endpoint.body(answer).await?, &headers)?
        };
        Ok(structured(request, response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::HttpOptions;
    use proptest::prelude::*;

    const STREAM: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude-x\",\"content\":[],\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Bonjour \"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"à tous\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":5}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    fn assemble(chunks: Vec<Vec<u8>>) -> Result<Response, ProviderError> {
        let endpoint = Endpoint::new(
            "http://127.0.0.1:9".into(),
            HeaderMap::new(),
            None,
            &HttpOptions::default(),
        )
        .unwrap();
        let body = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(assemble_stream(&endpoint, body, &HeaderMap::new(), &Progress::new()))
    }

    #[test]
    fn stream_is_assembled_however_it_is_split() {
        let bytes = STREAM.as_bytes();
        for at in 0..=bytes.len() {
            let chunks = vec![bytes[..at].to_vec(), bytes[at..].to_vec()];
            let response = assemble(chunks).unwrap_or_else(|e| panic!("split at {at}: {e}"));
            assert_eq!(response.text, "Bonjour à tous");
            assert_eq!(response.usage, Usage::new(12, 5));
            assert_eq!(response.finish_reason.as_deref(), Some("end_turn"));
            assert_eq!(response.model.as_deref(), Some("claude-x"));
        }
    }

    #[test]
    fn error_events_and_early_ends() {
        let overloaded = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"content\":[]}}\n\n",
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
        );
        let error = assemble(vec![overloaded.as_bytes().to_vec()]).unwrap_err();
        assert_eq!((error.kind(), error.is_retryable()), (ErrorKind::Overloaded, true));
        let early = &STREAM[..STREAM.find("event: message_stop").unwrap()];
        let error = assemble(vec![early.as_bytes().to_vec()]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::MalformedResponse);
    }

    proptest! {
        #[test]
        fn parsers_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400), at in any::<usize>()) {
            let _ = parse_message(&bytes, &HeaderMap::new());
            let at = at % (bytes.len() + 1);
            let _ = assemble(vec![bytes[..at].to_vec(), bytes[at..].to_vec()]);
        }
    }

    /// Anthropic's `input_tokens` leaves the prompt cache out: fanout's
    /// input counts every prompt token, and the cache reads apart.
    #[test]
    fn cache_reads_and_writes_count_as_input() {
        let body = br#"{"content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn",
            "usage":{"input_tokens":20,"output_tokens":4,"cache_creation_input_tokens":100,
            "cache_read_input_tokens":1500}}"#;
        let response = parse_message(body, &HeaderMap::new()).unwrap();
        assert_eq!(response.usage, Usage { cached_input_tokens: 1500, ..Usage::new(1620, 4) });
    }
}
