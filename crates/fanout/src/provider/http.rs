//! What the HTTP providers share: the client, authentication that never leaks,
//! and turning HTTP answers into [`ProviderError`]s.
//!
//! One `reqwest::Client` per provider: its connections are kept alive and
//! pooled, so a run at concurrency 500 opens at most 500 connections, once.

use std::fmt;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use super::{Check, ErrorKind, ProviderError, RateLimit};

/// Connection settings for the HTTP providers.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Idle connections kept per host; set it to the executor's concurrency so
    /// every task reuses a warm connection.
    pub max_idle_connections: usize,
    /// How long connecting to the server may take before the attempt fails.
    pub connect_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self { max_idle_connections: 512, connect_timeout: Duration::from_secs(10) }
    }
}

/// An API key. Its `Debug` never shows it, and errors are scrubbed of it.
#[derive(Clone)]
pub(crate) struct ApiKey(String);

impl ApiKey {
    /// `None` for a missing or blank key (local servers need none).
    pub(crate) fn new(key: Option<String>) -> Option<Self> {
        key.map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()).map(Self)
    }

    pub(crate) fn header(&self, prefix: &str) -> Result<HeaderValue, ProviderError> {
        let mut value = HeaderValue::from_str(&format!("{prefix}{}", self.0)).map_err(|_| {
            ProviderError::new(
                ErrorKind::Auth,
                "the API key contains characters not allowed in a header",
            )
        })?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// Removes the key from text that may be shown or stored.
    pub(crate) fn scrub(&self, text: &str) -> String {
        text.replace(&self.0, "[redacted]")
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

/// Whether a client's own body asks for a streamed answer.
fn streams(body: &str) -> bool {
    #[derive(Deserialize)]
    struct Stream {
        #[serde(default)]
        stream: Option<bool>,
    }
    serde_json::from_str::<Stream>(body).ok().and_then(|s| s.stream).unwrap_or(false)
}

/// An answer's body as it streams in.
pub(crate) type BodyStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// Sends a client's own body as it is, and reads the answer both ways: with
/// `parse` (a whole body) or `assemble` (a stream), for usage and records,
/// and as the bytes that came, kept in [`Response::raw`](super::Response::raw).
/// A streamed answer's bytes are also passed on through the request's relay
/// as they arrive.
pub(crate) async fn forward<Assembled>(
    endpoint: &Endpoint,
    request: &super::Request,
    progress: &super::Progress,
    parse: impl FnOnce(&[u8], &HeaderMap) -> Result<super::Response, ProviderError>,
    assemble: impl FnOnce(BodyStream, HeaderMap) -> Assembled,
) -> Result<super::Response, ProviderError>
where
    Assembled: std::future::Future<Output = Result<super::Response, ProviderError>>,
{
    use futures_util::StreamExt;
    let body = request.body.as_deref().unwrap_or_default();
    let answer = endpoint.post_text(body.to_owned(), &request.headers).await?;
    let headers = answer.headers().clone();
    if !streams(body) {
        let bytes = endpoint.body(answer).await?;
        let mut response = parse(&bytes, &headers)?;
        response.raw = Some(String::from_utf8_lossy(&bytes).into_owned());
        return Ok(response);
    }
    // Passed on only as events: an API that ignored `stream` and answered
    // JSON is not half-relayed as one.
    let is_event_stream = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let seat = request
        .relay
        .as_ref()
        .filter(|_| is_event_stream)
        .map(|relay| Arc::new(Mutex::new(relay.seat(progress, request_id(&headers)))));
    // Every chunk is copied as the assembly reads it, and passed on; the
    // stream ends early for an attempt that may not pass its bytes on.
    let copy = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&copy);
    let passing = seat.clone();
    let events = answer
        .bytes_stream()
        .inspect(move |chunk| {
            if let Ok(chunk) = chunk {
                sink.lock().expect("never poisoned").extend_from_slice(chunk);
            }
        })
        .take_while(move |chunk| {
            let go_on = match (&passing, chunk) {
                (Some(seat), Ok(bytes)) => seat.lock().expect("never poisoned").pass(bytes),
                _ => true,
            };
            std::future::ready(go_on)
        });
    let assembled = assemble(Box::pin(events), headers).await;
    let mut response = match &seat {
        Some(seat) => seat.lock().expect("never poisoned").settle(assembled)?,
        None => assembled?,
    };
    let copied = copy.lock().expect("never poisoned");
    response.raw = Some(String::from_utf8_lossy(&copied).into_owned());
    Ok(response)
}

/// The largest error body kept whole with its error ([`ProviderError::body`]).
const MAX_KEPT_ERROR_BODY: usize = 64 * 1024;

/// An HTTP endpoint with its client and authentication headers.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    client: reqwest::Client,
    /// Parsed once: parsing it for every call was a measurable share of a
    /// call's CPU at thousands of calls a second.
    url: reqwest::Url,
    headers: HeaderMap,
    key: Option<ApiKey>,
}

pub(crate) fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Another part of the program may have installed one already; that one stays.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Endpoint {
    pub(crate) fn new(
        url: String,
        headers: HeaderMap,
        key: Option<ApiKey>,
        options: &HttpOptions,
    ) -> Result<Self, ProviderError> {
        install_crypto_provider();
        let url = reqwest::Url::parse(&url).map_err(|e| {
            ProviderError::new(ErrorKind::BadRequest, format!("`{url}` is not a valid URL: {e}"))
        })?;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(options.max_idle_connections)
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            // API endpoints answer, they do not redirect (a redirected POST
            // would become a GET anyway); following them cost a URL and header
            // copy per call.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| {
                ProviderError::new(
                    ErrorKind::Connection,
                    format!("cannot build the HTTP client: {e}"),
                )
            })?;
        Ok(Self { client, url, headers, key })
    }

    /// Posts a JSON body; a non-2xx answer becomes a classified error.
    pub(crate) async fn post(
        &self,
        body: &serde_json::Value,
    ) -> Result<reqwest::Response, ProviderError> {
        let body = serde_json::to_vec(body).expect("a JSON value always serializes");
        self.post_text(body, &[]).await
    }

    /// Posts JSON text as it is (a client's own body: its keys keep their
    /// order, which a schema's properties depend on).
    pub(crate) async fn post_text(
        &self,
        body: impl Into<reqwest::Body>,
        extra_headers: &[(String, String)],
    ) -> Result<reqwest::Response, ProviderError> {
        let request = self
            .client
            .post(self.url.clone())
            .headers(self.headers_with(extra_headers))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body);
        self.send(request).await
    }

    /// A request to `url`, another path of the same API, with this endpoint's
    /// authentication (the Batch APIs' files and batches).
    pub(crate) fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.client.request(method, url).headers(self.headers.clone())
    }

    /// Sends `request`; a non-2xx answer becomes a classified error.
    pub(crate) async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ProviderError> {
        let response = request.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap_or_default();
        Err(self.answer_error(status.as_u16(), &headers, &body))
    }

    /// The endpoint's headers, with `extra` ones replacing those of their name,
    /// except the key and the body's framing, and any that are not valid.
    fn headers_with(&self, extra: &[(String, String)]) -> HeaderMap {
        const KEPT: [&str; 5] =
            ["authorization", "x-api-key", "content-type", "content-length", "host"];
        let mut headers = self.headers.clone();
        for (name, value) in extra {
            let (Ok(name), Ok(value)) =
                (HeaderName::try_from(name.as_str()), HeaderValue::try_from(value))
            else {
                continue;
            };
            if !KEPT.contains(&name.as_str()) {
                headers.insert(name, value);
            }
        }
        headers
    }

    /// Asks `url` (beside the endpoint, with its authentication) whether the
    /// credentials and model are good: a success says yes, 401/403 says no, and
    /// anything else (a server without that route, a network error) cannot tell.
    pub(crate) async fn check(&self, url: &str) -> Check {
        let sent = self
            .client
            .get(url)
            .headers(self.headers.clone())
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        let Ok(response) = sent else { return Check::Unknown };
        let status = response.status();
        if status.is_success() {
            return Check::Ready;
        }
        if !matches!(status.as_u16(), 401 | 403) {
            return Check::Unknown;
        }
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap_or_default();
        Check::Refused(self.answer_error(status.as_u16(), &headers, &body))
    }

    /// Reads a whole successful body.
    pub(crate) async fn body(
        &self,
        response: reqwest::Response,
    ) -> Result<bytes::Bytes, ProviderError> {
        response.bytes().await.map_err(|e| self.transport_error(e))
    }

    pub(crate) fn transport_error(&self, error: reqwest::Error) -> ProviderError {
        let kind = if error.is_timeout() {
            ErrorKind::Timeout
        } else if error.is_decode() {
            ErrorKind::MalformedResponse
        } else {
            ErrorKind::Connection
        };
        // reqwest's own text stops at "error sending request"; the cause
        // (connection refused, DNS, TLS) is further down the chain.
        let mut message = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !message.contains(&cause_text) {
                message.push_str(": ");
                message.push_str(&cause_text);
            }
            source = cause.source();
        }
        ProviderError::new(kind, self.scrub(&message))
    }

    /// Where a 404 came from, and a hint when the base URL looks like it lacks
    /// the `/v1` that OpenAI-compatible servers serve under.
    fn not_found_detail(&self) -> String {
        let mut url = self.url.clone();
        // A base URL may carry credentials; they stay out of errors.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        // Only a base URL with no path at all (`http://host:8080`) is the
        // classic slip; `/v1beta`, Azure's `/openai/deployments/...` are not.
        let bare = ["/chat/completions", "/messages"].contains(&url.path());
        let hint = if bare {
            "; servers usually answer under /v1: does the base URL lack it?"
        } else {
            ""
        };
        format!(" (404 at {url}{hint})")
    }

    /// An error for a non-2xx answer, classified from its status and body.
    pub(crate) fn answer_error(
        &self,
        status: u16,
        headers: &HeaderMap,
        body: &[u8],
    ) -> ProviderError {
        let detail = ErrorBody::parse(body);
        let kind = detail
            .as_ref()
            .and_then(ErrorBody::kind)
            .or_else(|| ErrorKind::from_status(status))
            .unwrap_or(ErrorKind::MalformedResponse);
        let mut message = match &detail {
            Some(detail) => detail.message.clone(),
            None => String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
        };
        if status == 404 {
            message.push_str(&self.not_found_detail());
        }
        if (300..400).contains(&status) {
            let to = headers.get(http::header::LOCATION).and_then(|l| l.to_str().ok());
            message = format!(
                "the endpoint redirects (HTTP {status}) to {}: use that address as the base URL",
                to.unwrap_or("another address")
            );
        }
        let mut error = ProviderError::new(kind, self.scrub(&message)).with_status(status);
        // Kept for a proxy's client, which gets the upstream's error as it
        // came (its code and param too); only a JSON error is one, and one
        // past any real error's size is not worth keeping.
        // A body read as an error above is JSON already: parsed once, not twice.
        let json =
            || detail.is_some() || serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
        if body.len() <= MAX_KEPT_ERROR_BODY && json() {
            error = error.with_body(self.scrub(&String::from_utf8_lossy(body)));
        }
        if let Some(id) = request_id(headers) {
            error = error.with_request_id(id);
        }
        if let Some(rate_limit) = RateLimit::from_headers(headers, SystemTime::now()) {
            error = error.with_rate_limit(rate_limit);
        }
        error
    }

    /// An error reported inside a successful answer (an SSE `error` event).
    pub(crate) fn body_error(&self, body: &[u8]) -> Option<ProviderError> {
        let detail = ErrorBody::parse(body)?;
        let kind = detail.kind().unwrap_or(ErrorKind::Server);
        let event = self.scrub(&String::from_utf8_lossy(body));
        Some(ProviderError::new(kind, self.scrub(&detail.message)).with_body(event))
    }

    pub(crate) fn scrub(&self, text: &str) -> String {
        match &self.key {
            Some(key) => key.scrub(text),
            None => text.to_owned(),
        }
    }
}

pub(crate) fn request_id(headers: &HeaderMap) -> Option<String> {
    ["x-request-id", "request-id"]
        .iter()
        .find_map(|name| headers.get(*name)?.to_str().ok())
        .map(str::to_owned)
}

/// An `f32` parameter as JSON, written as its shortest decimal (`0.9`, not
/// `0.8999999761581421`).
pub(crate) fn decimal(value: f32) -> serde_json::Value {
    value.to_string().parse::<f64>().map_or(serde_json::Value::Null, serde_json::Value::from)
}

pub(crate) fn header(name: &'static str, value: &str) -> (HeaderName, HeaderValue) {
    (HeaderName::from_static(name), HeaderValue::from_str(value).expect("a valid header value"))
}

/// The error bodies of OpenAI (`{"error": {"message", "type", "code"}}`) and
/// Anthropic (`{"type": "error", "error": {"type", "message"}}`).
#[derive(Debug, Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default, deserialize_with = "code_as_text")]
    code: Option<String>,
}

/// OpenAI-compatible servers send `code` as a string, a number, or null.
fn code_as_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

impl ErrorBody {
    fn parse(body: &[u8]) -> Option<Self> {
        serde_json::from_slice::<ErrorEnvelope>(body).ok().map(|e| e.error)
    }

    /// The kind the body names, where it is more precise than the status: a 429
    /// can be a rate limit (retry) or an empty account (stop).
    fn kind(&self) -> Option<ErrorKind> {
        let named = |name: &str| match name {
            "insufficient_quota" | "billing_hard_limit_reached" | "billing_error" => {
                Some(ErrorKind::Quota)
            }
            "rate_limit_exceeded" | "rate_limit_error" => Some(ErrorKind::RateLimited),
            "overloaded_error" => Some(ErrorKind::Overloaded),
            "invalid_api_key" | "authentication_error" | "permission_error" => {
                Some(ErrorKind::Auth)
            }
            "model_not_found" | "not_found_error" => Some(ErrorKind::NotFound),
            "context_length_exceeded" | "request_too_large" => Some(ErrorKind::BadRequest),
            "api_error" => Some(ErrorKind::Server),
            _ => None,
        };
        self.code.as_deref().and_then(named).or_else(|| self.kind.as_deref().and_then(named))
    }
}
