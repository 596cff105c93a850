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

/// What a replayed answer's `request_id` starts with: the recorder skips
/// results whose answer carries it (the job has them already), while an
/// answer the executor asked anew (a retry of a replayed answer cut off,
/// a repair) is recorded like any other.
const REPLAYED: &str = "fanout-replay:";

/// Whether `response` was answered from the job.
pub fn is_replayed(response: &Response) -> bool {
    response.request_id.as_deref().is_some_and(|id| id.starts_with(REPLAYED))
}

/// The key a call is recorded and replayed under: the provider, its
/// endpoint and model (`scope`, from the settings) and the whole request,
/// so a run against another model or server asks anew.
pub fn call_key(scope: &str, request: &Request) -> String {
    crate::fingerprint::request_key(scope, request)
}

/// The scope of [`call_key`] for these settings.
pub fn scope(settings: &crate::settings::Settings) -> String {
    format!(
        "{:?}\0{}\0{}",
        settings.provider,
        settings.model,
        settings.base_url.as_deref().unwrap_or("")
    )
}

/// A job's answers, by call key, each served once.
#[derive(Debug, Default)]
pub struct Replay {
    answers: Mutex<HashMap<String, Vec<Response>>>,
}

impl Replay {
    /// The succeeded records of `job` that carry their call's key.
    pub fn load(store: &Store, job: i64) -> Result<Self> {
        let mut answers: HashMap<String, Vec<Response>> = HashMap::new();
        store.each_record::<anyhow::Error>(job, |record| {
            let (Some(key), Some(text)) = (record.request_hash, record.answer) else {
                return Ok(());
            };
            if record.status == "succeeded" {
                let mut response = Response::new(text, Usage::default());
                response.finish_reason = record.finish_reason;
                response.model = record.model;
                let id = record.request_id.unwrap_or_default();
                response.request_id = Some(format!("{REPLAYED}{id}"));
                answers.entry(key).or_default().push(response);
            }
            Ok(())
        })?;
        // Served in the order they were recorded.
        answers.values_mut().for_each(|list| list.reverse());
        Ok(Self { answers: Mutex::new(answers) })
    }

    /// How many answers are kept for a rerun.
    pub fn len(&self) -> usize {
        self.answers.lock().unwrap_or_else(|p| p.into_inner()).values().map(Vec::len).sum()
    }

    fn take(&self, key: &str) -> Option<Response> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner()).get_mut(key)?.pop()
    }
}

/// A provider that answers from a [`Replay`] first.
pub struct Replayed {
    inner: Arc<dyn Provider>,
    replay: Arc<Replay>,
    scope: String,
}

impl Replayed {
    pub fn new(inner: Arc<dyn Provider>, replay: Arc<Replay>, scope: String) -> Self {
        Self { inner, replay, scope }
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
        let recorded = self.replay.take(&call_key(&self.scope, request)).or_else(|| {
            // Recorded by a version that sorted JSON keys.
            self.replay.take(&crate::fingerprint::sorted_request_key(&self.scope, request))
        });
        if let Some(response) = recorded {
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
    /// or an occurrence more, goes to the provider. A call recorded by a
    /// version that sorted JSON keys is found too.
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
            request.extra = serde_json::from_str(r#"{"b":1,"a":2}"#).unwrap();
            request
        };
        // Sample 2 was recorded by a version that sorted keys.
        let key = |i: u32| match i {
            2 => crate::fingerprint::sorted_request_key("scope", &sample(i)),
            _ => call_key("scope", &sample(i)),
        };
        let record = |i: u32, status: &str, answer: &str| Record {
            task_id: i.to_string(),
            status: status.into(),
            answer: (status == "succeeded").then(|| answer.to_owned()),
            input_tokens: 10,
            output_tokens: 2,
            request_hash: Some(key(i)),
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
                &[],
            )
            .unwrap();
        let replay = Arc::new(Replay::load(&store, job).unwrap());
        assert_eq!(replay.len(), 2, "only succeeded answers are kept");
        let mock = MockProvider::new();
        let provider = Replayed::new(Arc::new(mock.clone()), Arc::clone(&replay), "scope".into());
        let first = provider.complete(&sample(0)).await.unwrap();
        assert_eq!((first.text.as_str(), first.usage), ("42", Usage::default()), "free");
        assert!(is_replayed(&first));
        assert_eq!(provider.complete(&sample(2)).await.unwrap().text, "41");
        assert_eq!(mock.calls(), 0);
        provider.complete(&sample(1)).await.unwrap();
        provider.complete(&sample(0)).await.unwrap();
        assert_eq!(mock.calls(), 2, "the failed one and a second occurrence are asked");
        let other = Replayed::new(Arc::new(mock.clone()), replay, "another model".into());
        assert!(!is_replayed(&other.complete(&sample(2)).await.unwrap()), "keyed by model too");
    }
}
