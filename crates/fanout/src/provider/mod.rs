//! The provider trait and the types every provider shares.
//!
//! A [`Provider`] turns a [`Request`] into a [`Response`] or a [`ProviderError`].
//! Providers do one attempt and never retry on their own: retries, pauses and
//! limits belong to the executor, which must see every 429 to share it across
//! tasks.
//!
//! - [`OpenAi`]: any OpenAI-compatible Chat Completions endpoint (OpenAI, vLLM,
//!   llama.cpp server, Ollama, OpenRouter, Groq, Together, `fanout-mock`).
//! - [`Anthropic`]: the Messages API.
//! - [`MockProvider`]: in-process and scriptable, for tests and examples.

pub mod anthropic;
mod builder;
mod error;
pub mod headers;
mod http;
mod image;
pub mod mock;
pub mod openai;
mod progress;
mod relay;
mod request;
mod sse;
mod tool;

pub use anthropic::Anthropic;
pub use builder::{HttpApi, HttpBuilder, HttpSettings};
pub use error::{ErrorKind, ProviderError};
pub use headers::RateLimit;
pub(crate) use http::Endpoint;
pub use http::HttpOptions;
pub(crate) use http::install_crypto_provider;
pub use image::Image;
pub use image::read_image_files;
pub use mock::{Behavior, MockProvider};
pub use openai::OpenAi;
pub use progress::Progress;
pub use relay::{Relay, Relayed};
pub use request::{Message, Request, Response, ResponseFormat, Role, Usage};
pub use tool::{ToolCall, ToolChoice, ToolSpec};

use crate::tokens;

/// What a provider's [`Provider::check`] found.
#[derive(Clone, Debug, PartialEq)]
pub enum Check {
    /// The credentials work and the model is there.
    Ready,
    /// It could not tell (no cheap check, or an inconclusive answer).
    Unknown,
    /// The provider refused: a bad key or an unknown model.
    Refused(ProviderError),
}

/// Something that answers chat requests: an HTTP API, a local model, a mock.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + 'static {
    /// A short name for logs and reports (`openai`, `anthropic`, `local`, `mock`).
    fn name(&self) -> &str;

    /// The model a request without a `model` of its own is sent to, for
    /// telemetry spans and reports; `None` when it is not known.
    fn default_model(&self) -> Option<&str> {
        None
    }

    /// Makes one attempt. Dropping the future cancels the call.
    async fn complete(&self, request: &Request) -> Result<Response, ProviderError>;

    /// Makes one attempt, marking `progress` as parts of the answer arrive, so
    /// the executor can tell a call that streams steadily from one that is
    /// stuck. Providers that stream implement it; the default ignores `progress`.
    async fn complete_observed(
        &self,
        request: &Request,
        progress: &Progress,
    ) -> Result<Response, ProviderError> {
        let _ = progress;
        self.complete(request).await
    }

    /// A cheap check, before the first calls, that the credentials and the model
    /// are good (e.g. listing the models). [`Check::Ready`] lets the executor
    /// start at full concurrency at once instead of probing with a few calls;
    /// the default cannot tell.
    async fn check(&self) -> Check {
        Check::Unknown
    }

    /// The request's prompt tokens. Providers with a real tokenizer can be
    /// exact; the default estimates.
    fn estimate_prompt_tokens(&self, request: &Request) -> u64 {
        tokens::estimate_prompt(request)
    }

    /// The tokens the request may consume at most (prompt + maximum output), which
    /// the executor reserves against a TPM limit before the call (for a request
    /// without `max_tokens`, once it has seen answers, it reserves the prompt
    /// and the longest recent answer instead).
    fn estimate_tokens(&self, request: &Request) -> u64 {
        self.estimate_prompt_tokens(request) + tokens::max_output(request)
    }
}

#[async_trait::async_trait]
impl<P: Provider + ?Sized> Provider for std::sync::Arc<P> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn default_model(&self) -> Option<&str> {
        (**self).default_model()
    }

    async fn complete(&self, request: &Request) -> Result<Response, ProviderError> {
        (**self).complete(request).await
    }

    async fn complete_observed(
        &self,
        request: &Request,
        progress: &Progress,
    ) -> Result<Response, ProviderError> {
        (**self).complete_observed(request, progress).await
    }

    async fn check(&self) -> Check {
        (**self).check().await
    }

    fn estimate_prompt_tokens(&self, request: &Request) -> u64 {
        (**self).estimate_prompt_tokens(request)
    }

    fn estimate_tokens(&self, request: &Request) -> u64 {
        (**self).estimate_tokens(request)
    }
}
