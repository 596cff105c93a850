//! Anthropic's Message Batches: the requests posted whole to
//! `/v1/messages/batches`, the batch polled until its `processing_status` is
//! `ended`, and its `results_url` read (a line per request: succeeded,
//! errored, canceled or expired).

use http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Batch, BatchAnswer, BatchApi, BatchCounts, BatchLimits, BatchOutcome, each_line, malformed_line,
};
use crate::provider::anthropic::{self, parse_message, structured};
use crate::provider::{Anthropic, HttpApi, HttpBuilder, HttpSettings, ProviderError, Request};

/// Anthropic's Message Batches API.
#[derive(Clone, Debug)]
pub struct AnthropicBatches {
    /// Builds each request's params, and holds the client and key.
    messages: Anthropic,
    base: String,
}

impl HttpApi for AnthropicBatches {
    const DEFAULT_BASE_URL: &'static str = anthropic::DEFAULT_BASE_URL;
    const ENV: (&'static str, &'static str) = <Anthropic as HttpApi>::ENV;

    fn connect(mut settings: HttpSettings) -> Result<Self, ProviderError> {
        // A batch's answers come whole.
        settings.stream = false;
        let base = settings.base_url.trim_end_matches('/').to_owned();
        Ok(Self { messages: Anthropic::connect(settings)?, base })
    }
}

impl AnthropicBatches {
    /// Settings with the defaults, ignoring the environment.
    pub fn builder(model: impl Into<String>) -> HttpBuilder<Self> {
        HttpBuilder::new(model)
    }

    /// Settings from `ANTHROPIC_BASE_URL` and `ANTHROPIC_API_KEY`.
    pub fn from_env(model: impl Into<String>) -> HttpBuilder<Self> {
        HttpBuilder::from_env(model)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/messages/batches{path}", self.base)
    }

    async fn batch_at(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Batch, ProviderError> {
        let endpoint = self.messages.endpoint();
        let mut request = endpoint.request(method, url);
        if let Some(body) = body {
            request = request.header(http::header::CONTENT_TYPE, "application/json").body(body);
        }
        let bytes = endpoint.body(endpoint.send(request).await?).await?;
        let wire: WireBatch =
            serde_json::from_slice(&bytes).map_err(|e| malformed_line("description", e))?;
        Ok(wire.into_batch())
    }
}

#[derive(Debug, Deserialize)]
struct WireBatch {
    id: String,
    #[serde(default)]
    processing_status: String,
    #[serde(default)]
    request_counts: WireCounts,
    #[serde(default)]
    results_url: Option<String>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    cancel_initiated_at: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct WireCounts {
    #[serde(default)]
    processing: u64,
    #[serde(default)]
    succeeded: u64,
    #[serde(default)]
    errored: u64,
    #[serde(default)]
    canceled: u64,
    #[serde(default)]
    expired: u64,
}

impl WireBatch {
    fn into_batch(self) -> Batch {
        let c = self.request_counts;
        let failed = c.errored + c.canceled + c.expired;
        let created_at = self
            .created_at
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        Batch {
            ended: self.processing_status == "ended",
            cancelled: self.cancel_initiated_at.is_some(),
            id: self.id,
            status: self.processing_status,
            counts: BatchCounts {
                total: c.processing + c.succeeded + failed,
                succeeded: c.succeeded,
                failed,
            },
            results: self.results_url.into_iter().collect(),
            errors: Vec::new(),
            created_at,
        }
    }
}

#[derive(Debug, Deserialize)]
struct WireList {
    #[serde(default)]
    data: Vec<WireBatch>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ResultLine {
    custom_id: String,
    result: WireResult,
}

#[derive(Debug, Deserialize)]
struct WireResult {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

/// The HTTP status an error type stands for, as the Messages API answers it
/// online: the batch's line has the type only.
fn status_of(error_type: &str) -> u16 {
    match error_type {
        "authentication_error" => 401,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "api_error" => 500,
        "overloaded_error" => 529,
        _ => 400,
    }
}

impl AnthropicBatches {
    fn outcome(&self, result: WireResult, shape: &Request) -> BatchOutcome {
        let endpoint = self.messages.endpoint();
        match result.kind.as_str() {
            "succeeded" => {
                let body = serde_json::to_vec(&result.message.unwrap_or(Value::Null))
                    .expect("a JSON value serializes");
                match parse_message(&body, &HeaderMap::new()) {
                    Ok(answer) => BatchOutcome::Answered(structured(shape, answer)),
                    Err(error) => BatchOutcome::Failed(error),
                }
            }
            "errored" => {
                let error = result.error.unwrap_or(Value::Null);
                let kind = error.pointer("/error/type").and_then(Value::as_str).unwrap_or("");
                let body = serde_json::to_vec(&error).expect("a JSON value serializes");
                BatchOutcome::Failed(endpoint.answer_error(
                    status_of(kind),
                    &HeaderMap::new(),
                    &body,
                ))
            }
            "expired" => BatchOutcome::Expired,
            "canceled" => BatchOutcome::Cancelled,
            other => BatchOutcome::Failed(malformed_line("results", format!("type `{other}`"))),
        }
    }
}

#[async_trait::async_trait]
impl BatchApi for AnthropicBatches {
    fn name(&self) -> &str {
        "anthropic"
    }

    /// 100,000 requests or 256 MB, as documented.
    fn limits(&self) -> BatchLimits {
        BatchLimits { max_requests: 100_000, max_bytes: 256 * 1024 * 1024 }
    }

    fn line(&self, custom_id: &str, request: &Request) -> Vec<u8> {
        let line = json!({"custom_id": custom_id, "params": self.messages.body(request)});
        let mut bytes = serde_json::to_vec(&line).expect("a JSON value serializes");
        bytes.push(b'\n');
        bytes
    }

    async fn upload(&self, _tag: &str, _lines: &[u8]) -> Result<Option<String>, ProviderError> {
        Ok(None)
    }

    /// Posts the lines as the batch's `requests`, joined as they are (each
    /// is one JSON object already).
    async fn create(
        &self,
        _tag: &str,
        _file: Option<&str>,
        lines: &[u8],
    ) -> Result<Batch, ProviderError> {
        let mut body = Vec::with_capacity(lines.len() + 16);
        body.extend_from_slice(b"{\"requests\":[");
        let lines = lines.split(|b| *b == b'\n').filter(|l| !l.is_empty());
        for (i, line) in lines.enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(line);
        }
        body.extend_from_slice(b"]}");
        self.batch_at(reqwest::Method::POST, &self.url(""), Some(body)).await
    }

    /// Message batches keep no metadata: every batch created since `since`
    /// with `requests` requests may be the one.
    async fn find(
        &self,
        _tag: &str,
        since: i64,
        requests: u64,
    ) -> Result<Vec<Batch>, ProviderError> {
        let endpoint = self.messages.endpoint();
        let mut after: Option<String> = None;
        let mut found = Vec::new();
        loop {
            let mut url = self.url("?limit=100");
            if let Some(after) = &after {
                url.push_str(&format!("&after_id={after}"));
            }
            let bytes = endpoint
                .body(endpoint.send(endpoint.request(reqwest::Method::GET, &url)).await?)
                .await?;
            let list: WireList =
                serde_json::from_slice(&bytes).map_err(|e| malformed_line("list", e))?;
            let mut older = list.data.is_empty();
            for batch in list.data.into_iter().map(WireBatch::into_batch) {
                // The service's clock and ours may differ by a little.
                if batch.created_at < since - 60 {
                    older = true;
                } else if batch.counts.total == requests {
                    found.push(batch);
                }
            }
            after = list.last_id;
            if !list.has_more || older || after.is_none() {
                break;
            }
        }
        Ok(found)
    }

    async fn get(&self, id: &str) -> Result<Batch, ProviderError> {
        self.batch_at(reqwest::Method::GET, &self.url(&format!("/{id}")), None).await
    }

    async fn cancel(&self, id: &str) -> Result<Batch, ProviderError> {
        self.batch_at(reqwest::Method::POST, &self.url(&format!("/{id}/cancel")), None).await
    }

    async fn answers(
        &self,
        batch: &Batch,
        shape: &Request,
        each: &mut (dyn FnMut(BatchAnswer) + Send),
    ) -> Result<(), ProviderError> {
        let endpoint = self.messages.endpoint();
        if !batch.results.is_empty() {
            // The key goes only where the base URL points: the results URL
            // the service gives is this same path there.
            let url = self.url(&format!("/{}/results", batch.id));
            let response = endpoint.send(endpoint.request(reqwest::Method::GET, &url)).await?;
            each_line(endpoint, response, |bytes| {
                let line: ResultLine =
                    serde_json::from_slice(bytes).map_err(|e| malformed_line("results", e))?;
                let outcome = self.outcome(line.result, shape);
                each(BatchAnswer { custom_id: line.custom_id, outcome });
                Ok(())
            })
            .await?;
        }
        Ok(())
    }
}
