//! Token counts: estimates for limits that must be charged before the provider
//! answers, and counts for usage a server did not report.
//!
//! The estimate is deliberately simple (about four characters a token, plus a
//! few tokens of framing per message): the executor reserves it against the TPM
//! budget before a call and corrects it with the usage the provider reports.
//! When a server reports no usage, [`count_prompt`] and [`count_text`] count
//! with the model's real tokenizer where one is known (OpenAI's models, through
//! tiktoken) and estimate otherwise.

use tiktoken_rs::{ChatCompletionRequestMessage, CoreBPE};

use crate::provider::{Request, ResponseFormat, Role};

/// Output tokens assumed for a request that sets no `max_tokens`.
pub const DEFAULT_OUTPUT_ESTIMATE: u32 = 256;

/// Framing tokens per message (role markers, separators).
const TOKENS_PER_MESSAGE: u64 = 4;

/// Tokens assumed for an image: about what a 1-megapixel picture costs on
/// either vendor (OpenAI's tiles at high detail, Anthropic's width x height / 750).
pub const IMAGE_TOKENS_ESTIMATE: u64 = 1_500;

/// Roughly how many tokens `text` is.
pub fn estimate_text(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

/// Roughly how many tokens the request's messages are, with the tool calls
/// replayed in them, and what it declares (tools, an answer schema).
pub fn estimate_prompt(request: &Request) -> u64 {
    let messages: u64 = request
        .messages
        .iter()
        .map(|m| {
            let calls: u64 = m.tool_calls.iter().map(|c| estimate_text(&c.arguments)).sum();
            let images = m.images.len() as u64 * IMAGE_TOKENS_ESTIMATE;
            estimate_text(&m.content) + calls + images + TOKENS_PER_MESSAGE
        })
        .sum();
    messages + declared(request, estimate_text)
}

/// What the request declares beside its messages, counted by `count`: the
/// tools it offers (schemas of an MCP server can be thousands of tokens, sent
/// with every turn) and the JSON Schema its answer must follow. How a
/// provider frames them is not published, so this is their text alone.
fn declared(request: &Request, count: impl Fn(&str) -> u64) -> u64 {
    let tools: u64 = request
        .tools
        .iter()
        .map(|t| count(&t.name) + count(&t.description) + count(&t.parameters.to_string()))
        .sum();
    let schema = match &request.response_format {
        Some(ResponseFormat::JsonSchema { name, schema }) => {
            count(name) + count(&schema.to_string())
        }
        _ => 0,
    };
    tools + schema
}

/// The most a request can consume: its prompt plus its maximum output. This is
/// what the TPM limiter reserves before the call.
pub fn estimate_request(request: &Request) -> u64 {
    estimate_prompt(request) + max_output(request)
}

/// The most output tokens the request allows: its `max_tokens`, or
/// [`DEFAULT_OUTPUT_ESTIMATE`].
pub fn max_output(request: &Request) -> u64 {
    u64::from(request.max_tokens.unwrap_or(DEFAULT_OUTPUT_ESTIMATE))
}

/// The tokenizer of `model`, when tiktoken knows it. Its tables are loaded
/// once, on first use, so runs whose servers report usage never pay for them.
fn tokenizer(model: &str) -> Option<&'static CoreBPE> {
    let known = tiktoken_rs::tokenizer::get_tokenizer(model)?;
    tiktoken_rs::bpe_for_tokenizer(known).ok()
}

/// Whether tiktoken knows `model`'s tokenizer, so [`count_text`] and
/// [`count_prompt`] are exact for it.
pub fn has_tokenizer(model: &str) -> bool {
    tokenizer(model).is_some()
}

/// How many tokens `text` is for `model`: exact with a known tokenizer,
/// estimated otherwise.
pub fn count_text(model: Option<&str>, text: &str) -> u64 {
    match model.and_then(tokenizer) {
        Some(bpe) => bpe.count_ordinary(text) as u64,
        None => estimate_text(text),
    }
}

/// How many prompt tokens the request's messages are for `model`, framing
/// included, as OpenAI counts chat prompts (images estimated), with its tools
/// and answer schema; estimated for unknown models.
pub fn count_prompt(model: Option<&str>, request: &Request) -> u64 {
    let Some((model, bpe)) = model.and_then(|m| Some((m, tokenizer(m)?))) else {
        return estimate_prompt(request);
    };
    let messages: Vec<ChatCompletionRequestMessage> = request
        .messages
        .iter()
        .map(|m| ChatCompletionRequestMessage {
            role: role_name(m.role).to_owned(),
            content: Some(m.content.clone()),
            ..Default::default()
        })
        .collect();
    // Models whose tokenizer has no chat framing (gpt-2, the old completion
    // models) are estimated.
    // Images have no text to count: they are estimated.
    let images: u64 = request.messages.iter().map(|m| m.images.len() as u64).sum();
    tiktoken_rs::num_tokens_from_messages(model, &messages).map_or_else(
        |_| estimate_prompt(request),
        |count| {
            let declared = declared(request, |text| bpe.count_ordinary(text) as u64);
            count as u64 + images * IMAGE_TOKENS_ESTIMATE + declared
        },
    )
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_count_prompt_framing_and_max_output() {
        assert_eq!(estimate_text(""), 0);
        assert_eq!(estimate_text("abcd"), 1);
        assert_eq!(estimate_text("abcde"), 2);
        let request = Request::user("x".repeat(400)).with_max_tokens(50);
        assert_eq!(estimate_prompt(&request), 100 + TOKENS_PER_MESSAGE);
        assert_eq!(estimate_request(&request), 154);
        let unbounded = Request::user("");
        assert_eq!(estimate_request(&unbounded), 4 + u64::from(DEFAULT_OUTPUT_ESTIMATE));
    }

    #[test]
    fn known_models_are_counted_with_their_tokenizer() {
        // o200k_base: "Hello world" is two tokens; a chat prompt adds 3 per
        // message, the role's own token and 3 for the reply's priming.
        assert_eq!(count_text(Some("gpt-4o-mini"), "Hello world"), 2);
        assert_eq!(count_prompt(Some("gpt-4o-mini"), &Request::user("Hello world")), 3 + 1 + 2 + 3);
        // A model tiktoken does not know is estimated, as is no model at all.
        assert_eq!(count_text(Some("smollm2-135m"), "Hello world"), 3);
        assert_eq!(count_text(None, "Hello world"), 3);
        let request = Request::user("Hello world");
        assert_eq!(count_prompt(Some("llama-3"), &request), estimate_prompt(&request));
    }

    /// The answer's schema is sent with the prompt, and counted with it.
    #[test]
    fn an_answer_schema_counts_as_prompt() {
        let plain = Request::user("Hello world");
        let mut structured = plain.clone();
        let schema = serde_json::json!({"type": "object"});
        structured.response_format =
            Some(ResponseFormat::JsonSchema { name: "grade".into(), schema: schema.clone() });
        let model = Some("gpt-4o-mini");
        let schema_tokens = count_text(model, "grade") + count_text(model, &schema.to_string());
        assert_eq!(count_prompt(model, &structured), count_prompt(model, &plain) + schema_tokens);
        // `{"type":"object"}` is 17 characters, `grade` 5: 5 + 2 estimated.
        assert_eq!(estimate_prompt(&structured), estimate_prompt(&plain) + 7);
    }
}
