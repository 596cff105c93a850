//! The one error type every provider returns.
//!
//! Callers classify it without matching variants, as with reqwest's error:
//! [`ProviderError::kind`], [`ProviderError::is_retryable`],
//! [`ProviderError::status`], [`ProviderError::retry_after`].

use std::fmt;
use std::time::Duration;

use super::headers::RateLimit;

/// What went wrong, in the terms the executor acts on. New kinds may come:
/// match with a wildcard arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// 429: too many requests or tokens for now.
    RateLimited,
    /// 529 or 503: the provider is overloaded.
    Overloaded,
    /// Any other 5xx.
    Server,
    /// The attempt ran out of time (ours or the server's 408).
    Timeout,
    /// Connecting, sending or receiving failed before an answer arrived.
    Connection,
    /// An answer arrived but could not be parsed.
    MalformedResponse,
    /// 401/403: the key is missing, wrong or lacks permission.
    Auth,
    /// Quota or billing exhausted: no retry will help until someone pays.
    Quota,
    /// 400/413/422: the request itself is wrong (context too long, bad field).
    BadRequest,
    /// 404: unknown model or endpoint.
    NotFound,
    /// The answer is not what was asked for: it breaks the requested JSON
    /// Schema after every repair, or it was cut off at `max_tokens` every time.
    InvalidOutput,
}

impl ErrorKind {
    /// Whether trying the same request again may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimited
                | Self::Overloaded
                | Self::Server
                | Self::Timeout
                | Self::Connection
                | Self::MalformedResponse
        )
    }

    /// Whether the answer says that no task of this job can succeed (a bad key,
    /// an unknown model, an empty account), so the executor should stop launching.
    pub fn is_fatal_for_job(self) -> bool {
        matches!(self, Self::Auth | Self::Quota | Self::NotFound)
    }

    /// Whether the provider is asking us to send less.
    pub fn is_backpressure(self) -> bool {
        matches!(self, Self::RateLimited | Self::Overloaded)
    }

    /// The kind an HTTP status implies before the body is read. Providers refine
    /// it from the body (a 429 that says `insufficient_quota` is [`Self::Quota`]).
    pub fn from_status(status: u16) -> Option<Self> {
        Some(match status {
            429 => Self::RateLimited,
            503 | 529 => Self::Overloaded,
            500..=599 => Self::Server,
            408 => Self::Timeout,
            401 | 403 => Self::Auth,
            402 => Self::Quota,
            404 => Self::NotFound,
            400..=499 => Self::BadRequest,
            // Redirects are not followed: the endpoint is elsewhere, for every
            // call alike, so retrying cannot help.
            300..=399 => Self::NotFound,
            _ => return None,
        })
    }

    /// A short name for the kind, as shown in error messages (`rate limited`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate limited",
            Self::Overloaded => "overloaded",
            Self::Server => "server error",
            Self::Timeout => "timeout",
            Self::Connection => "connection error",
            Self::MalformedResponse => "malformed response",
            Self::Auth => "authentication failed",
            Self::Quota => "quota exhausted",
            Self::BadRequest => "bad request",
            Self::NotFound => "not found",
            Self::InvalidOutput => "invalid output",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed call, with everything the executor and the caller need to decide
/// what to do next.
///
/// Providers must never put an API key in `message`: it is shown to users and
/// stored in reports.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderError {
    kind: ErrorKind,
    message: String,
    status: Option<u16>,
    retry_after: Option<Duration>,
    request_id: Option<String>,
    /// Boxed: most errors carry none, and errors travel in every `Result`.
    rate_limit: Option<Box<RateLimit>>,
    /// The answer's body as it came, for those who pass it on.
    body: Option<Box<str>>,
    /// Part of the answer was passed on as it streamed.
    relayed: bool,
}

impl ProviderError {
    /// An error of `kind`, with no status, retry-after or request id.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            status: None,
            retry_after: None,
            request_id: None,
            rate_limit: None,
            body: None,
            relayed: false,
        }
    }

    /// An error for an HTTP status, classified by [`ErrorKind::from_status`]
    /// (statuses below 400 count as a malformed response: they are not errors).
    pub fn from_status(status: u16, message: impl Into<String>) -> Self {
        let kind = ErrorKind::from_status(status).unwrap_or(ErrorKind::MalformedResponse);
        Self::new(kind, message).with_status(status)
    }

    /// Records the HTTP status the answer came with.
    #[must_use]
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// Records how long the provider asked us to wait before trying again.
    #[must_use]
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// Records the provider's id for the failed call.
    #[must_use]
    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }

    /// Attaches the answer's rate-limit headers. For a 429 their wait (an explicit
    /// retry-after, else the reset of the exhausted budget) becomes the
    /// retry-after unless one was already set.
    #[must_use]
    pub fn with_rate_limit(mut self, rate_limit: RateLimit) -> Self {
        if self.retry_after.is_none() {
            self.retry_after = match self.kind {
                ErrorKind::RateLimited => rate_limit.wait_hint(),
                _ => rate_limit.retry_after,
            };
        }
        self.rate_limit = Some(Box::new(rate_limit));
        self
    }

    /// Keeps the answer's body as it came (the upstream's own error, which
    /// `fanout proxy` gives its client unchanged).
    #[must_use]
    pub fn with_body(mut self, body: impl Into<Box<str>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Marks a failure after part of the answer was passed on through a
    /// [`Relay`](super::Relay): the call ends here, since asking again would
    /// show its reader the answer twice.
    #[must_use]
    pub(crate) fn relayed(mut self) -> Self {
        self.relayed = true;
        self
    }

    /// What went wrong, as the executor classifies it.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// What the provider (or the client) said, scrubbed of any API key.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The HTTP status, when the error came with an answer.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// How long the provider asked us to wait before trying again.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The provider's id for the failed call, when it sent one.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// The rate-limit headers of the failed answer, when it had any.
    pub fn rate_limit(&self) -> Option<&RateLimit> {
        self.rate_limit.as_deref()
    }

    /// The failed answer's body as the provider sent it, when it came with one.
    pub fn body(&self) -> Option<&str> {
        self.body.as_deref()
    }

    /// Whether part of the answer had been passed on as it streamed when the
    /// call failed (see [`Relay`](super::Relay)).
    pub fn was_relayed(&self) -> bool {
        self.relayed
    }

    /// Whether trying the same request again may succeed (never once part of
    /// the answer was passed on).
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable() && !self.relayed
    }

    /// Whether the attempt ran out of time (ours, or the server's 408).
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::Timeout
    }

    /// Whether the answer was a 429.
    pub fn is_rate_limited(&self) -> bool {
        self.kind == ErrorKind::RateLimited
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(status) = self.status {
            write!(f, " (HTTP {status})")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        if let Some(id) = &self.request_id {
            write!(f, " [request {id}]")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProviderError {}

impl serde::Serialize for ProviderError {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("ProviderError", 5)?;
        s.serialize_field("kind", &self.kind)?;
        s.serialize_field("message", &self.message)?;
        s.serialize_field("status", &self.status)?;
        s.serialize_field("retry_after_ms", &self.retry_after.map(|d| d.as_millis() as u64))?;
        s.serialize_field("request_id", &self.request_id)?;
        s.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The retry classification table: which answers are retried, which stop the
    /// whole job, and which only fail their own task.
    #[test]
    fn classification_table() {
        use ErrorKind::*;
        let table = [
            // kind,            retryable, fatal for job, backpressure
            (RateLimited, true, false, true),
            (Overloaded, true, false, true),
            (Server, true, false, false),
            (Timeout, true, false, false),
            (Connection, true, false, false),
            (MalformedResponse, true, false, false),
            (Auth, false, true, false),
            (Quota, false, true, false),
            (NotFound, false, true, false),
            (BadRequest, false, false, false),
        ];
        for (kind, retryable, fatal, backpressure) in table {
            assert_eq!(kind.is_retryable(), retryable, "{kind:?} retryable");
            assert_eq!(kind.is_fatal_for_job(), fatal, "{kind:?} fatal");
            assert_eq!(kind.is_backpressure(), backpressure, "{kind:?} backpressure");
        }
    }

    #[test]
    fn status_classification() {
        use ErrorKind::*;
        let table = [
            (429, Some(RateLimited)),
            (529, Some(Overloaded)),
            (503, Some(Overloaded)),
            (500, Some(Server)),
            (502, Some(Server)),
            (408, Some(Timeout)),
            (401, Some(Auth)),
            (403, Some(Auth)),
            (402, Some(Quota)),
            (404, Some(NotFound)),
            (400, Some(BadRequest)),
            (413, Some(BadRequest)),
            (422, Some(BadRequest)),
            (200, None),
        ];
        for (status, kind) in table {
            assert_eq!(ErrorKind::from_status(status), kind, "HTTP {status}");
        }
        assert!(!ProviderError::from_status(400, "bad").is_retryable());
        assert!(ProviderError::from_status(502, "gateway").is_retryable());
    }

    #[test]
    fn display_names_kind_status_and_request_id() {
        let err = ProviderError::from_status(429, "slow down").with_request_id("req_1");
        assert_eq!(err.to_string(), "rate limited (HTTP 429): slow down [request req_1]");
    }
}
