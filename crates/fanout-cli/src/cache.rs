//! `--cache`: answers stored by a hash of everything that shapes them.
//!
//! The key covers the provider, its endpoint and default model, and the whole
//! request (model, parameters, messages, and the sample index), so N samples of
//! one prompt are N entries, never N copies of one answer.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use fanout::{Check, ErrorKind, Progress, Provider, ProviderError, Request, Response};
use fanout_store::Store;
use sha2::{Digest, Sha256};

pub struct Cached {
    inner: Arc<dyn Provider>,
    scope: String,
    store: Mutex<Store>,
}

impl Cached {
    pub fn new(inner: Arc<dyn Provider>, scope: String, store: &Path) -> Result<Self> {
        Ok(Self { inner, scope, store: Mutex::new(Store::open(store)?) })
    }

    fn key(&self, request: &Request) -> String {
        let mut hash = Sha256::new();
        hash.update(self.scope.as_bytes());
        hash.update([0]);
        hash.update(serde_json::to_vec(request).unwrap_or_default());
        format!("{:x}", hash.finalize())
    }
}

#[fanout::async_trait]
impl Provider for Cached {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn complete(&self, request: &Request) -> Result<Response, ProviderError> {
        self.complete_observed(request, &Progress::new()).await
    }

    async fn complete_observed(
        &self,
        request: &Request,
        progress: &Progress,
    ) -> Result<Response, ProviderError> {
        let key = self.key(request);
        let stored = self.store.lock().unwrap().cache_get(&key);
        if let Ok(Some(json)) = stored
            && let Ok(response) = serde_json::from_str::<Response>(&json)
        {
            return Ok(response);
        }
        let response = self.inner.complete_observed(request, progress).await?;
        let json = serde_json::to_string(&response).expect("a response serializes");
        self.store.lock().unwrap().cache_put(&key, &json).map_err(|e| {
            ProviderError::new(ErrorKind::Server, format!("the answer could not be cached: {e}"))
        })?;
        Ok(response)
    }

    async fn check(&self) -> Check {
        self.inner.check().await
    }

    fn estimate_prompt_tokens(&self, request: &Request) -> u64 {
        self.inner.estimate_prompt_tokens(request)
    }

    fn estimate_tokens(&self, request: &Request) -> u64 {
        self.inner.estimate_tokens(request)
    }
}
