//! OpenAI's Batch API: the input file uploaded to `/v1/files` (purpose
//! `batch`), the batch created at `/v1/batches` (completion window 24 h),
//! polled, and its output and error files read back.

use http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Batch, BatchAnswer, BatchApi, BatchCounts, BatchLimits, BatchOutcome, LineError, each_line,
    malformed_line,
};
use crate::provider::openai::{self, parse_completion};
use crate::provider::{HttpApi, HttpBuilder, HttpSettings, OpenAi, ProviderError, Request};

/// The path each line of a Chat Completions batch names.
const CHAT_PATH: &str = "/v1/chat/completions";
/// The metadata key a batch's tag is kept under.
const TAG_KEY: &str = "fanout_tag";

/// OpenAI's Batch API (and that of compatible services), for chat requests.
#[derive(Clone, Debug)]
pub struct OpenAiBatches {
    /// Builds each line's body, and holds the client and key.
    chat: OpenAi,
    base: String,
}

impl HttpApi for OpenAiBatches {
    const DEFAULT_BASE_URL: &'static str = openai::DEFAULT_BASE_URL;
    const ENV: (&'static str, &'static str) = <OpenAi as HttpApi>::ENV;

    fn connect(mut settings: HttpSettings) -> Result<Self, ProviderError> {
        // A batch's answers come whole.
        settings.stream = false;
        let base = settings.base_url.trim_end_matches('/').to_owned();
        Ok(Self { chat: OpenAi::connect(settings)?, base })
    }
}

impl OpenAiBatches {
    /// Settings with the defaults, ignoring the environment.
    pub fn builder(model: impl Into<String>) -> HttpBuilder<Self> {
        HttpBuilder::new(model)
    }

    /// Settings from `OPENAI_BASE_URL` and `OPENAI_API_KEY`.
    pub fn from_env(model: impl Into<String>) -> HttpBuilder<Self> {
        HttpBuilder::from_env(model)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }

    async fn batch_at(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Batch, ProviderError> {
        let endpoint = self.chat.endpoint();
        let mut request = endpoint.request(method, &self.url(path));
        if let Some(body) = body {
            let bytes = serde_json::to_vec(&body).expect("a JSON value serializes");
            request = request.header(http::header::CONTENT_TYPE, "application/json").body(bytes);
        }
        let response = endpoint.send(request).await?;
        let bytes = endpoint.body(response).await?;
        let wire: WireBatch =
            serde_json::from_slice(&bytes).map_err(|e| malformed_line("description", e))?;
        Ok(wire.into_batch())
    }
}

#[derive(Debug, Deserialize)]
struct WireBatch {
    id: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    request_counts: Option<WireCounts>,
    #[serde(default)]
    output_file_id: Option<String>,
    #[serde(default)]
    error_file_id: Option<String>,
    #[serde(default)]
    errors: Option<WireErrors>,
    #[serde(default)]
    created_at: i64,
    #[serde(default)]
    metadata: Option<std::collections::BTreeMap<String, Value>>,
}

#[derive(Debug, Default, Deserialize)]
struct WireCounts {
    #[serde(default)]
    total: u64,
    #[serde(default)]
    completed: u64,
    #[serde(default)]
    failed: u64,
}

#[derive(Debug, Deserialize)]
struct WireErrors {
    #[serde(default)]
    data: Vec<WireLineError>,
}

#[derive(Debug, Deserialize)]
struct WireLineError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    line: Option<u64>,
}

impl WireBatch {
    fn tag(&self) -> Option<&str> {
        self.metadata.as_ref()?.get(TAG_KEY)?.as_str()
    }

    fn into_batch(self) -> Batch {
        let counts = self.request_counts.unwrap_or_default();
        let errors = self.errors.map(|e| e.data).unwrap_or_default();
        Batch {
            ended: matches!(self.status.as_str(), "completed" | "failed" | "expired" | "cancelled"),
            cancelled: matches!(self.status.as_str(), "cancelling" | "cancelled"),
            id: self.id,
            status: self.status,
            counts: BatchCounts {
                total: counts.total,
                succeeded: counts.completed,
                failed: counts.failed,
            },
            results: self.output_file_id.into_iter().chain(self.error_file_id).collect(),
            errors: errors
                .into_iter()
                .map(|e| LineError {
                    line: e.line,
                    message: match (e.code, e.message) {
                        (Some(code), Some(message)) => format!("{code}: {message}"),
                        (code, message) => message.or(code).unwrap_or_default(),
                    },
                })
                .collect(),
            created_at: self.created_at,
        }
    }
}

#[derive(Debug, Deserialize)]
struct WireList {
    #[serde(default)]
    data: Vec<WireBatch>,
    #[serde(default)]
    has_more: bool,
}

#[derive(Debug, Deserialize)]
struct OutputLine {
    custom_id: String,
    #[serde(default)]
    response: Option<LineResponse>,
    #[serde(default)]
    error: Option<WireLineError>,
}

#[derive(Debug, Deserialize)]
struct LineResponse {
    status_code: u16,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    body: Value,
}

impl OpenAiBatches {
    fn outcome(&self, line: OutputLine, shape: &Request) -> BatchOutcome {
        let endpoint = self.chat.endpoint();
        if let Some(response) = line.response {
            let body = serde_json::to_vec(&response.body).expect("a JSON value serializes");
            let request_id = response.request_id;
            if (200..300).contains(&response.status_code) {
                return match parse_completion(&body, shape, &HeaderMap::new()) {
                    Ok(mut answer) => {
                        answer.request_id = request_id;
                        BatchOutcome::Answered(answer)
                    }
                    Err(error) => BatchOutcome::Failed(error),
                };
            }
            let mut error = endpoint.answer_error(response.status_code, &HeaderMap::new(), &body);
            if let Some(id) = request_id {
                error = error.with_request_id(id);
            }
            return BatchOutcome::Failed(error);
        }
        let error = line.error.unwrap_or(WireLineError { code: None, message: None, line: None });
        match error.code.as_deref().unwrap_or_default() {
            code if code.contains("expired") => BatchOutcome::Expired,
            code if code.contains("cancel") => BatchOutcome::Cancelled,
            code => BatchOutcome::Failed(ProviderError::new(
                crate::ErrorKind::Server,
                endpoint.scrub(&format!(
                    "{code}: {}",
                    error.message.as_deref().unwrap_or("the batch gave no answer")
                )),
            )),
        }
    }
}

#[async_trait::async_trait]
impl BatchApi for OpenAiBatches {
    fn name(&self) -> &str {
        "openai"
    }

    /// 50,000 requests or 200 MB of input, as documented.
    fn limits(&self) -> BatchLimits {
        BatchLimits { max_requests: 50_000, max_bytes: 200 * 1024 * 1024 }
    }

    fn line(&self, custom_id: &str, request: &Request) -> Vec<u8> {
        let line = json!({"custom_id": custom_id, "method": "POST", "url": CHAT_PATH,
                          "body": self.chat.body(request)});
        let mut bytes = serde_json::to_vec(&line).expect("a JSON value serializes");
        bytes.push(b'\n');
        bytes
    }

    async fn upload(&self, tag: &str, lines: &[u8]) -> Result<Option<String>, ProviderError> {
        #[derive(Deserialize)]
        struct Uploaded {
            id: String,
        }
        let endpoint = self.chat.endpoint();
        let file = reqwest::multipart::Part::bytes(lines.to_vec())
            .file_name(format!("{tag}.jsonl"))
            .mime_str("application/jsonl")
            .expect("a valid MIME type");
        let form = reqwest::multipart::Form::new().text("purpose", "batch").part("file", file);
        let request = endpoint.request(reqwest::Method::POST, &self.url("files")).multipart(form);
        let bytes = endpoint.body(endpoint.send(request).await?).await?;
        let uploaded: Uploaded =
            serde_json::from_slice(&bytes).map_err(|e| malformed_line("upload's answer", e))?;
        Ok(Some(uploaded.id))
    }

    async fn create(
        &self,
        tag: &str,
        file: Option<&str>,
        _lines: &[u8],
    ) -> Result<Batch, ProviderError> {
        let Some(file) = file else {
            return Err(ProviderError::new(
                crate::ErrorKind::BadRequest,
                "an OpenAI batch is created from an uploaded file",
            ));
        };
        let body = json!({"input_file_id": file, "endpoint": CHAT_PATH,
                          "completion_window": "24h", "metadata": {TAG_KEY: tag}});
        self.batch_at(reqwest::Method::POST, "batches", Some(body)).await
    }

    /// Looks through the batches listed newest first, back to `since`, for
    /// the one whose metadata holds `tag`.
    async fn find(
        &self,
        tag: &str,
        since: i64,
        _requests: u64,
    ) -> Result<Vec<Batch>, ProviderError> {
        let endpoint = self.chat.endpoint();
        let mut after: Option<String> = None;
        loop {
            let mut url = self.url("batches?limit=100");
            if let Some(after) = &after {
                url.push_str(&format!("&after={after}"));
            }
            let response = endpoint.send(endpoint.request(reqwest::Method::GET, &url)).await?;
            let bytes = endpoint.body(response).await?;
            let list: WireList =
                serde_json::from_slice(&bytes).map_err(|e| malformed_line("list", e))?;
            // The service's clock and ours may differ by a little.
            let older = list.data.last().is_none_or(|b| b.created_at < since - 60);
            after = list.data.last().map(|b| b.id.clone());
            if let Some(found) = list.data.into_iter().find(|b| b.tag() == Some(tag)) {
                return Ok(vec![found.into_batch()]);
            }
            if !list.has_more || older {
                return Ok(Vec::new());
            }
        }
    }

    async fn get(&self, id: &str) -> Result<Batch, ProviderError> {
        self.batch_at(reqwest::Method::GET, &format!("batches/{id}"), None).await
    }

    async fn cancel(&self, id: &str) -> Result<Batch, ProviderError> {
        self.batch_at(reqwest::Method::POST, &format!("batches/{id}/cancel"), None).await
    }

    async fn answers(
        &self,
        batch: &Batch,
        shape: &Request,
        each: &mut (dyn FnMut(BatchAnswer) + Send),
    ) -> Result<(), ProviderError> {
        let endpoint = self.chat.endpoint();
        for file in &batch.results {
            let url = self.url(&format!("files/{file}/content"));
            let response = endpoint.send(endpoint.request(reqwest::Method::GET, &url)).await?;
            each_line(endpoint, response, |bytes| {
                let line: OutputLine =
                    serde_json::from_slice(bytes).map_err(|e| malformed_line("results", e))?;
                let custom_id = line.custom_id.clone();
                each(BatchAnswer { custom_id, outcome: self.outcome(line, shape) });
                Ok(())
            })
            .await?;
        }
        Ok(())
    }
}
