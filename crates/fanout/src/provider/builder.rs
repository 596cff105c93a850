//! The settings every HTTP provider is built from, and the one builder for them.

use std::marker::PhantomData;

use super::ProviderError;
use super::http::{ApiKey, HttpOptions};

/// Where and how an HTTP provider connects.
#[derive(Debug)]
pub struct HttpSettings {
    pub(crate) base_url: String,
    pub(crate) api_key: Option<ApiKey>,
    pub(crate) model: String,
    pub(crate) stream: bool,
    pub(crate) http: HttpOptions,
}

/// An HTTP API that can be built from [`HttpSettings`].
pub trait HttpApi: Sized {
    /// The base URL when none is given.
    const DEFAULT_BASE_URL: &'static str;
    /// The variables `from_env` reads: base URL, then key.
    const ENV: (&'static str, &'static str);

    /// Builds the provider from `settings`; fails on an invalid URL or key, before any call.
    fn connect(settings: HttpSettings) -> Result<Self, ProviderError>;
}

/// Settings for an HTTP provider (`OpenAi::builder`, `Anthropic::from_env`, ...).
#[derive(Debug)]
#[must_use]
pub struct HttpBuilder<Api> {
    settings: HttpSettings,
    api: PhantomData<fn() -> Api>,
}

impl<Api: HttpApi> HttpBuilder<Api> {
    /// Settings with the defaults, ignoring the environment.
    pub fn new(model: impl Into<String>) -> Self {
        let settings = HttpSettings {
            base_url: Api::DEFAULT_BASE_URL.into(),
            api_key: None,
            model: model.into(),
            stream: false,
            http: HttpOptions::default(),
        };
        Self { settings, api: PhantomData }
    }

    /// Settings with the base URL and key from the API's usual variables.
    pub fn from_env(model: impl Into<String>) -> Self {
        let (url_variable, key_variable) = Api::ENV;
        let mut builder = Self::new(model);
        if let Ok(url) = std::env::var(url_variable)
            && !url.trim().is_empty()
        {
            builder = builder.base_url(url.trim());
        }
        builder.settings.api_key = ApiKey::new(std::env::var(key_variable).ok());
        builder
    }

    /// The API root; the API's path (`/chat/completions`, `/v1/messages`) is appended.
    pub fn base_url(mut self, base_url: impl Into<String>) -> Self {
        self.settings.base_url = base_url.into();
        self
    }

    /// The API key; a blank one counts as none (local servers need none).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.settings.api_key = ApiKey::new(Some(key.into()));
        self
    }

    /// Streams answers over SSE (usage included) instead of waiting for the whole body.
    pub fn stream(mut self, stream: bool) -> Self {
        self.settings.stream = stream;
        self
    }

    /// Connection settings for the HTTP client.
    pub fn http(mut self, options: HttpOptions) -> Self {
        self.settings.http = options;
        self
    }

    /// The provider; fails on an invalid URL or key, before any call.
    pub fn build(self) -> Result<Api, ProviderError> {
        Api::connect(self.settings)
    }
}
