//! Resuming a pattern job (`fanout jobs resume NAME` on a vote, workflow,
//! sections, perspectives, map-reduce or ask job): the command runs again
//! from the arguments it was started with, and every call whose request the
//! job already answered is answered from the job instead of the provider —
//! free, since it was paid for once. So a workflow whose last step failed
//! (or whose file was mended) sends only that step and what depends on it;
//! a map-reduce sends only what its finished map and collapse calls do not
//! cover. Calls are matched by a hash of the whole request, so an edited
//! prompt is asked anew, and by occurrence, so N samples of one prompt are
//! N answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use fanout::{Check, Progress, Provider, ProviderError, Request, Response, Usage};
use fanout_store::Store;

use crate::fingerprint::request_hash;

/// A job's answers, by request hash, served once each.
#[derive(Debug, Default)]
pub struct Replay {
    answers: Mutex<HashMap<String, Vec<Response>>>,
    /// Hashes served, not yet seen by the recorder (which must not record
    /// them again: the job has them).
    served: Mutex<HashMap<String, u32>>,
}

impl Replay {
    /// The succeeded records of `job` that carry their request's hash.
    pub fn load(store: &Store, job: i64) -> Result<Self> {
        let mut answers: HashMap<String, Vec<Response>> = HashMap::new();
        store.each_record::<anyhow::Error>(job, |record| {
            let (Some(hash), Some(text)) = (record.request_hash, record.answer) else {
                return Ok(());
            };
            if record.status == "succeeded" {
                let mut response = Response::new(text, Usage::default());
                response.finish_reason = record.finish_reason;
                response.model = record.model;
                answers.entry(hash).or_default().push(response);
            }
            Ok(())
        })?;
        // Served in the order they were recorded.
        answers.values_mut().for_each(|list| list.reverse());
        Ok(Self { answers: Mutex::new(answers), served: Mutex::default() })
    }

    /// How many answers are kept for a rerun.
    pub fn len(&self) -> usize {
        self.answers.lock().unwrap_or_else(|p| p.into_inner()).values().map(Vec::len).sum()
    }

    fn take(&self, hash: &str) -> Option<Response> {
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        let response = answers.get_mut(hash)?.pop()?;
        *self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(hash.to_owned())
            .or_default() += 1;
        Some(response)
    }

    /// Whether a result of the request with `hash` was answered from the job
    /// (each served answer says so once).
    pub fn was_served(&self, hash: &str) -> bool {
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        match served.get_mut(hash) {
            Some(count) if *count > 0 => {
                *count -= 1;
                true
            }
            _ => false,
        }
    }
}

/// A provider that answers from a [`Replay`] first.
pub struct Replayed {
    inner: Arc<dyn Provider>,
    replay: Arc<Replay>,
}

impl Replayed {
    pub fn new(inner: Arc<dyn Provider>, replay: Arc<Replay>) -> Self {
        Self { inner, replay }
    }
}

#[fanout::async_trait]
impl Provider for Replayed {
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
        if let Some(response) = self.replay.take(&request_hash(request)) {
            return Ok(response);
        }
        self.inner.complete_observed(request, progress).await
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
    use fanout_store::{Fingerprint, Record};

    /// Answers come back once per recorded occurrence, free; anything else,
    /// or an occurrence more, goes to the provider.
    #[tokio::test]
    async fn recorded_answers_are_served_once_each_and_the_rest_is_asked() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("fanout.db")).unwrap();
        let job = store
            .create_job("vote-1", "-", &Fingerprint::default(), &serde_json::json!({}))
            .unwrap()
            .id;
        let sample = |i: u32| {
            let mut request = Request::user("6 x 7?");
            request.sample_index = i;
            request
        };
        let record = |i: u32, status: &str, answer: &str| Record {
            task_id: i.to_string(),
            status: status.into(),
            answer: (status == "succeeded").then(|| answer.to_owned()),
            input_tokens: 10,
            output_tokens: 2,
            request_hash: Some(request_hash(&sample(i))),
            ..Record::default()
        };
        store
            .append(
                job,
                &[
                    record(0, "succeeded", "42"),
                    record(1, "failed", ""),
                    record(2, "succeeded", "41"),
                ],
            )
            .unwrap();
        let replay = Arc::new(Replay::load(&store, job).unwrap());
        assert_eq!(replay.len(), 2, "only succeeded answers are kept");
        let mock = MockProvider::new();
        let provider = Replayed::new(Arc::new(mock.clone()), Arc::clone(&replay));
        let first = provider.complete(&sample(0)).await.unwrap();
        assert_eq!((first.text.as_str(), first.usage), ("42", Usage::default()), "free");
        assert_eq!(provider.complete(&sample(2)).await.unwrap().text, "41");
        assert_eq!(mock.calls(), 0);
        provider.complete(&sample(1)).await.unwrap();
        provider.complete(&sample(0)).await.unwrap();
        assert_eq!(mock.calls(), 2, "the failed one and a second occurrence are asked");
        assert!(replay.was_served(&request_hash(&sample(0))));
        assert!(!replay.was_served(&request_hash(&sample(0))), "said once per answer served");
        assert!(!replay.was_served(&request_hash(&sample(1))));
    }
}
