//! `--cache`: answers stored by a hash of everything that shapes them.
//!
//! The key covers the provider, its endpoint and default model, and the whole
//! request (model, parameters, messages with their images' bytes, and the
//! sample index), so N samples of one prompt are N entries, never N copies of
//! one answer, and an image file changed in place is asked about again. An
//! answer from the cache costs nothing: its usage is zero, so budgets, costs
//! and records count only what was paid.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use fanout::{Check, ErrorKind, Progress, Provider, ProviderError, Request, Response, Usage};
use fanout_store::Store;

pub struct Cached {
    inner: Arc<dyn Provider>,
    scope: String,
    /// The scope an older version wrote the same answers under: read too, so
    /// an upgrade never pays for a cached answer again.
    legacy_scope: String,
    store: Mutex<Store>,
}

impl Cached {
    pub fn new(
        inner: Arc<dyn Provider>,
        scope: String,
        legacy_scope: String,
        store: &Path,
    ) -> Result<Self> {
        Ok(Self { inner, scope, legacy_scope, store: Mutex::new(Store::open(store)?) })
    }

    fn key(scope: &str, request: &Request) -> String {
        crate::fingerprint::request_key(scope, request)
    }

    /// The stored answer to `request`, under the current scope or the old one
    /// (copied to the current one when found there).
    fn lookup(&self, key: &str, request: &Request) -> Option<Response> {
        let store = self.store.lock().unwrap();
        let read = |key: &str| {
            let json = store.cache_get(key).ok().flatten()?;
            serde_json::from_str::<Response>(&json).ok().map(|r| (r, json))
        };
        if let Some((response, _)) = read(key) {
            return Some(response);
        }
        let (response, json) = read(&Self::key(&self.legacy_scope, request))?;
        let _ = store.cache_put(key, &json);
        Some(response)
    }
}

#[fanout::async_trait]
impl Provider for Cached {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn default_model(&self) -> Option<&str> {
        self.inner.default_model()
    }

    async fn complete(&self, request: &Request) -> Result<Response, ProviderError> {
        self.complete_observed(request, &Progress::new()).await
    }

    async fn complete_observed(
        &self,
        request: &Request,
        progress: &Progress,
    ) -> Result<Response, ProviderError> {
        // Keyed by what is sent: an image file's bytes, not its path.
        let request = &*fanout::read_image_files(request).await?;
        let key = Self::key(&self.scope, request);
        if let Some(mut response) = self.lookup(&key, request) {
            response.usage = Usage::default();
            response.usage_estimated = false;
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

#[cfg(test)]
mod tests {
    use super::*;
    use fanout::MockProvider;

    /// An answer cached under the old scope is found (and not paid for again)
    /// after an upgrade, and copied under the new one.
    #[tokio::test]
    async fn answers_cached_under_the_old_scope_are_still_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fanout.db");
        let request = Request::user("hello");
        let stored = Response::new("cached answer", Usage::default());
        let old_key = Cached::key("old scope", &request);
        Store::open(&path)
            .unwrap()
            .cache_put(&old_key, &serde_json::to_string(&stored).unwrap())
            .unwrap();
        let mock = MockProvider::new();
        let cached =
            Cached::new(Arc::new(mock.clone()), "new scope".into(), "old scope".into(), &path)
                .unwrap();
        assert_eq!(cached.complete(&request).await.unwrap().text, "cached answer");
        assert_eq!(mock.calls(), 0, "not asked again");
        let new_key = Cached::key("new scope", &request);
        assert!(Store::open(&path).unwrap().cache_get(&new_key).unwrap().is_some());
        // Anything else is asked, once.
        cached.complete(&Request::user("other")).await.unwrap();
        cached.complete(&Request::user("other")).await.unwrap();
        assert_eq!(mock.calls(), 1);
    }

    /// The key holds an image file's bytes, not its path: a picture changed in
    /// place is asked about again. A hit is free: its usage is zero.
    #[tokio::test]
    async fn images_are_keyed_by_their_bytes_and_hits_cost_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let picture = dir.path().join("essay.png");
        let png = |extra: u8| [&[0x89, b'P', b'N', b'G', 13, 10, 26, 10][..], &[extra]].concat();
        std::fs::write(&picture, png(1)).unwrap();
        let mock = MockProvider::new()
            .with_rule(|_| Some(fanout::Behavior::respond(Response::new("B+", Usage::new(30, 7)))));
        let cached =
            Cached::new(Arc::new(mock.clone()), "s".into(), "old".into(), &dir.path().join("db"))
                .unwrap();
        let mut request = Request::user("Grade this page.");
        request.messages[0].images.push(fanout::Image::File(picture.clone()));
        assert_eq!(cached.complete(&request).await.unwrap().usage, Usage::new(30, 7));
        let hit = cached.complete(&request).await.unwrap();
        assert_eq!((mock.calls(), hit.usage), (1, Usage::default()), "answered from the cache");
        std::fs::write(&picture, png(2)).unwrap();
        cached.complete(&request).await.unwrap();
        assert_eq!(mock.calls(), 2, "the changed picture is asked about");
    }
}
