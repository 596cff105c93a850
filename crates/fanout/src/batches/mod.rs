//! The providers' Batch APIs: the same requests at half the price, answered
//! within a day. [`OpenAiBatches`] speaks OpenAI's (`/v1/files` and
//! `/v1/batches`), [`AnthropicBatches`] Anthropic's Message Batches; both are a
//! [`BatchApi`], so a job can be written once for either.
//!
//! A batch goes: its requests as lines ([`BatchApi::line`]), made ready
//! ([`BatchApi::upload`]: OpenAI's input file), created ([`BatchApi::create`]),
//! polled ([`BatchApi::get`]) until it has ended, then its answers read
//! ([`BatchApi::answers`]), one per request, matched by the `custom_id` each
//! line was given. Nothing here retries or remembers: a caller that must
//! survive a crash stores the tag, file and batch ids as it goes, and asks
//! [`BatchApi::find`] for a batch whose creation it did not see answered.

mod anthropic;
mod openai;

use serde::{Deserialize, Serialize};

use crate::provider::{ProviderError, Request, Response};

pub use anthropic::AnthropicBatches;
pub use openai::OpenAiBatches;

/// How much one batch may hold: the services' limits, which they change, so
/// they are settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchLimits {
    /// Requests in one batch.
    pub max_requests: usize,
    /// Bytes of one batch's input (its lines, as [`BatchApi::line`] wrote them).
    pub max_bytes: usize,
}

/// A created batch, as the service last described it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// The service's id for it (`batch_…`, `msgbatch_…`).
    pub id: String,
    /// The service's own word for its state (`validating`, `in_progress`,
    /// `finalizing`, `completed`, `expired`, `cancelling`, `ended`, …).
    pub status: String,
    /// Whether it will change no more: its answers can be read.
    pub ended: bool,
    /// Whether someone asked for it to be cancelled.
    pub cancelled: bool,
    /// Its requests, by how far they have got.
    pub counts: BatchCounts,
    /// Where its answers are: OpenAI's output and error file ids, Anthropic's
    /// results URL. Empty until it has ended (and for a batch that failed).
    pub results: Vec<String>,
    /// Why the service refused the batch as a whole (OpenAI checks every line
    /// before it runs any): the line, counting from 1, and what is wrong.
    pub errors: Vec<LineError>,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
}

/// A batch's requests, counted by how they stand.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchCounts {
    /// Requests in the batch.
    pub total: u64,
    /// Answered.
    pub succeeded: u64,
    /// Errored, expired or cancelled.
    pub failed: u64,
}

impl BatchCounts {
    /// Requests not yet answered nor failed.
    pub fn pending(&self) -> u64 {
        self.total.saturating_sub(self.succeeded + self.failed)
    }
}

/// A reason the service gives for refusing a batch's line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineError {
    /// The line it names, counting from 1; `None` when it names none.
    pub line: Option<u64>,
    /// The service's words.
    pub message: String,
}

/// How one request of an ended batch came out.
#[derive(Debug)]
// Answers are the common case: boxing them to shrink the rare failures
// would cost an allocation per answer.
#[allow(clippy::large_enum_variant)]
pub enum BatchOutcome {
    /// It was answered.
    Answered(Response),
    /// It was answered with an error (classified as any call's error is).
    Failed(ProviderError),
    /// The batch's time ran out before it ran.
    Expired,
    /// The batch was cancelled before it ran.
    Cancelled,
}

/// One request's outcome, known by the `custom_id` its line was given.
#[derive(Debug)]
pub struct BatchAnswer {
    /// The id the request's line was given.
    pub custom_id: String,
    /// How it came out.
    pub outcome: BatchOutcome,
}

/// A provider's Batch API.
#[async_trait::async_trait]
pub trait BatchApi: Send + Sync + 'static {
    /// The provider's name (`openai`, `anthropic`).
    fn name(&self) -> &str;

    /// The service's documented limits for one batch.
    fn limits(&self) -> BatchLimits;

    /// `request` as one line of a batch (ending in a newline), under
    /// `custom_id`: the body the online call would send, without streaming.
    fn line(&self, custom_id: &str, request: &Request) -> Vec<u8>;

    /// Makes `lines` ready to be created as a batch: OpenAI's input file is
    /// uploaded (named after `tag`) and its id returned, to be kept until the
    /// batch exists; Anthropic takes the lines with the batch, and this does
    /// nothing.
    async fn upload(&self, tag: &str, lines: &[u8]) -> Result<Option<String>, ProviderError>;

    /// Creates the batch, from the uploaded `file` or from `lines`, marked
    /// with `tag` where the service keeps one.
    async fn create(
        &self,
        tag: &str,
        file: Option<&str>,
        lines: &[u8],
    ) -> Result<Batch, ProviderError>;

    /// The batches that may be the one created with `tag` (of `requests`
    /// requests) since `since` (seconds since the Unix epoch): for a creation
    /// whose answer was lost (a crash, a dropped connection), so the same
    /// requests are never submitted twice. OpenAI's keep the tag, so at most
    /// one is; Anthropic's keep none, so every batch of that size made since
    /// is, and the caller rules out those it knows.
    async fn find(&self, tag: &str, since: i64, requests: u64)
    -> Result<Vec<Batch>, ProviderError>;

    /// The batch as it stands now.
    async fn get(&self, id: &str) -> Result<Batch, ProviderError>;

    /// Asks the service to cancel the batch: what has run keeps its answers,
    /// and the rest come back [`BatchOutcome::Cancelled`].
    async fn cancel(&self, id: &str) -> Result<Batch, ProviderError>;

    /// Reads an ended batch's answers, handing each to `each` as it is read.
    /// `shape` is a request like the batch's (its response format), which
    /// decides how an answer is read.
    async fn answers(
        &self,
        batch: &Batch,
        shape: &Request,
        each: &mut (dyn FnMut(BatchAnswer) + Send),
    ) -> Result<(), ProviderError>;
}

/// Hands `body`'s lines to `each` as they arrive, however the bytes are split.
async fn each_line(
    endpoint: &crate::provider::Endpoint,
    response: reqwest::Response,
    mut each: impl FnMut(&[u8]) -> Result<(), ProviderError>,
) -> Result<(), ProviderError> {
    use futures_util::StreamExt;
    let mut body = response.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| endpoint.transport_error(e))?;
        pending.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(end) = pending[start..].iter().position(|b| *b == b'\n') {
            let line = &pending[start..start + end];
            if !line.iter().all(u8::is_ascii_whitespace) {
                each(line)?;
            }
            start += end + 1;
        }
        pending.drain(..start);
    }
    if !pending.iter().all(u8::is_ascii_whitespace) {
        each(&pending)?;
    }
    Ok(())
}

/// A results line that is not one: the service's answer is malformed.
fn malformed_line(what: &str, error: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(
        crate::ErrorKind::MalformedResponse,
        format!("a line of the batch's {what} cannot be read: {error}"),
    )
}
