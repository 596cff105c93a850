//! [`LocalModel`]: the embedded model as a [`fanout::Provider`].

use std::path::Path;
use std::sync::Arc;

use fanout::{
    Check, ErrorKind, Provider, ProviderError, Request, Response, ResponseFormat, Role, Usage,
};

use crate::LocalError;
use crate::chat::ChatTemplate;
use crate::engine::{
    Engine, EngineOptions, EngineStats, FinishReason, Generation, GenerationRequest,
};
use crate::gguf::{GgufFile, ModelConfig};
use crate::grammar::OutputFormat;
use crate::model::Model;
use crate::sampling::SamplingParams;
use crate::tokenizer::ChatTokenizer;

/// How a [`LocalModel`] runs and what a request gets when it names no value.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalOptions {
    /// Threads, batch size and prefill chunk of the scheduler.
    pub engine: EngineOptions,
    /// Answer length when a request gives no `max_tokens`.
    pub default_max_tokens: u32,
    /// Sampling when a request gives no temperature / top-p.
    pub default_sampling: SamplingParams,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            engine: EngineOptions::default(),
            default_max_tokens: 256,
            default_sampling: SamplingParams::default(),
        }
    }
}

/// A GGUF model loaded in this process, answering chat requests.
#[derive(Debug, Clone)]
pub struct LocalModel {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    config: ModelConfig,
    tokenizer: Arc<ChatTokenizer>,
    template: ChatTemplate,
    engine: Engine,
    options: LocalOptions,
}

impl LocalModel {
    /// Loads the weights (the matrices kept in the GGUF's own quantized form, the
    /// small norm vectors as f32; see the crate's notes on precision)
    /// and starts the scheduler thread.
    pub fn load(path: &Path, options: LocalOptions) -> Result<Self, LocalError> {
        let gguf = GgufFile::open(path)?;
        let tokenizer = Arc::new(ChatTokenizer::from_gguf(&gguf)?);
        let template = ChatTemplate::from_gguf(&gguf, &tokenizer)?;
        let model = Model::load(&gguf)?;
        let config = model.config.clone();
        let name = gguf
            .optional_string("general.name")
            .map(str::to_owned)
            .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "local".to_owned());
        let engine = Engine::start(model, tokenizer.clone(), options.engine.clone())?;
        Ok(Self { inner: Arc::new(Inner { name, config, tokenizer, template, engine, options }) })
    }

    /// `general.name` from the file, else the file's stem, else `local`.
    pub fn model_name(&self) -> &str {
        &self.inner.name
    }

    /// The loaded model's dimensions.
    pub fn config(&self) -> &ModelConfig {
        &self.inner.config
    }

    /// The model's own tokenizer.
    pub fn tokenizer(&self) -> &ChatTokenizer {
        &self.inner.tokenizer
    }

    /// Runs one generation on the shared engine (the provider's `complete` in
    /// token terms, with the time to first token).
    pub async fn generate(&self, request: GenerationRequest) -> Result<Generation, LocalError> {
        self.inner.engine.generate(request).await
    }

    /// Counters of the engine's work so far.
    pub fn stats(&self) -> EngineStats {
        self.inner.engine.stats()
    }

    /// The prompt's token ids: the conversation through the chat template.
    pub fn prompt_tokens(&self, request: &Request) -> Result<Vec<u32>, LocalError> {
        let text = self.inner.template.render(&request.messages)?;
        self.inner.tokenizer.encode(&text)
    }

    fn generation_request(
        &self,
        request: &Request,
        prompt: Vec<u32>,
        choice: u32,
    ) -> GenerationRequest {
        let defaults = &self.inner.options.default_sampling;
        let seed =
            request.seed.unwrap_or_else(|| derived_seed(request)).wrapping_add(u64::from(choice));
        GenerationRequest {
            prompt,
            max_tokens: request.max_tokens.unwrap_or(self.inner.options.default_max_tokens)
                as usize,
            stop: request.stop.clone(),
            sampling: SamplingParams {
                temperature: request.temperature.unwrap_or(defaults.temperature),
                top_p: request.top_p.unwrap_or(defaults.top_p),
                top_k: request
                    .extra
                    .get("top_k")
                    .and_then(|v| v.as_u64())
                    .map_or(defaults.top_k, |k| k as usize),
                seed,
            },
            ignore_eos: false,
            // A response format constrains decoding: the answer always parses.
            format: request.response_format.as_ref().map(|format| match format {
                ResponseFormat::JsonObject => OutputFormat::JsonObject,
                ResponseFormat::JsonSchema { schema, .. } => {
                    OutputFormat::JsonSchema(schema.clone())
                }
            }),
        }
    }
}

/// Without an explicit seed, the seed follows the conversation and the sample
/// index: the same request gives the same answer, and a vote's samples differ.
///
/// SHA-256 over an explicit encoding (each message's role and length-prefixed
/// text, then the sample index), not `DefaultHasher`, whose algorithm Rust may
/// change between releases: the same request gives the same answer after a
/// toolchain update too.
fn derived_seed(request: &Request) -> u64 {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for message in &request.messages {
        let role: u8 = match message.role {
            Role::System => 0,
            Role::User => 1,
            Role::Assistant => 2,
            Role::Tool => 3,
        };
        hash.update([role]);
        hash.update((message.content.len() as u64).to_le_bytes());
        hash.update(message.content.as_bytes());
    }
    hash.update(request.sample_index.to_le_bytes());
    let digest = hash.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

#[async_trait::async_trait]
impl Provider for LocalModel {
    fn name(&self) -> &str {
        "local"
    }

    fn default_model(&self) -> Option<&str> {
        Some(&self.inner.name)
    }

    async fn complete(&self, request: &Request) -> Result<Response, ProviderError> {
        if !request.tools.is_empty() {
            // SmolLM2-360M's chat template has no tool-call format, so no
            // convention fanout invented for it could be relied on: refused
            // plainly instead (not retried), naming the providers that can.
            return Err(ProviderError::new(
                ErrorKind::BadRequest,
                "the local model does not call tools; give tools to an OpenAI-compatible or \
                 Anthropic provider (--provider openai|anthropic)",
            ));
        }
        if request.messages.iter().any(|m| !m.images.is_empty()) {
            return Err(ProviderError::new(
                ErrorKind::BadRequest,
                "the local model takes text only; send images to an OpenAI-compatible or \
                 Anthropic provider (--provider openai|anthropic)",
            ));
        }
        let prompt = self.prompt_tokens(request)?;
        let choices = request.n.unwrap_or(1).max(1);
        let answers = futures_util::future::join_all((0..choices).map(|choice| {
            self.inner.engine.generate(self.generation_request(request, prompt.clone(), choice))
        }))
        .await;
        let mut usage = Usage::new(prompt.len() as u64, 0);
        let mut texts = Vec::with_capacity(answers.len());
        let mut finish_reason = None;
        for answer in answers {
            let answer = answer?;
            usage.output_tokens += answer.tokens.len() as u64;
            finish_reason.get_or_insert(match answer.finish {
                FinishReason::Stop => "stop",
                FinishReason::Length => "length",
            });
            texts.push(answer.text);
        }
        let mut texts = texts.into_iter();
        let mut response = Response::new(texts.next().unwrap_or_default(), usage);
        response.other_choices = texts.collect();
        response.finish_reason = finish_reason.map(str::to_owned);
        response.model = Some(self.inner.name.clone());
        Ok(response)
    }

    /// In-process: no key to be wrong, and the model was loaded before any run.
    async fn check(&self) -> Check {
        Check::Ready
    }

    /// The prompt's real token count.
    fn estimate_prompt_tokens(&self, request: &Request) -> u64 {
        self.prompt_tokens(request).map_or(0, |p| p.len() as u64)
    }

    /// The prompt's real token count plus the answer budget.
    fn estimate_tokens(&self, request: &Request) -> u64 {
        self.estimate_prompt_tokens(request)
            + u64::from(request.max_tokens.unwrap_or(self.inner.options.default_max_tokens))
    }
}

#[cfg(test)]
mod seed_tests {
    use super::*;

    /// Pinned: a change here changes every local answer given without a seed.
    #[test]
    fn the_derived_seed_is_pinned() {
        let request = Request::user("What is 6 x 7?").with_system("Be brief.");
        assert_eq!(derived_seed(&request), 13_314_059_006_871_129_660);
        let mut second = request.clone();
        second.sample_index = 1;
        assert_ne!(derived_seed(&second), derived_seed(&request), "samples differ");
    }
}
