//! The two APIs the proxy serves, as their clients see them: the path, where
//! the key travels, a reading of a body for the limits, and error bodies in
//! each API's own shape.

use fanout::{ErrorKind, Message, ProviderError, Request, Role};
use serde_json::{Value, json};

/// A failed call as its client is told it.
#[derive(Debug, PartialEq)]
pub struct ErrorAnswer {
    pub status: u16,
    /// JSON text: the upstream's as it came, or one in the API's shape.
    pub body: String,
    pub retry_after: Option<std::time::Duration>,
}

/// Which vendor API the proxy speaks (and forwards to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// OpenAI Chat Completions (and every server compatible with it).
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
}

impl Api {
    /// The path clients post to, beside the base URL they were given.
    pub fn path(self) -> &'static str {
        match self {
            Self::OpenAi => "/v1/chat/completions",
            Self::Anthropic => "/v1/messages",
        }
    }

    /// The client's key as it sent it: OpenAI's `Authorization: Bearer`,
    /// Anthropic's `x-api-key` (or a bearer token, which its SDKs also send).
    pub fn client_key(self, headers: &axum::http::HeaderMap) -> Option<String> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let bearer = header("authorization")
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
        let key = match self {
            Self::OpenAi => bearer,
            Self::Anthropic => header("x-api-key").or(bearer),
        };
        key.map(str::trim).filter(|k| !k.is_empty()).map(str::to_owned)
    }

    /// The client's headers that go upstream with its body: those that change
    /// what the API does (a beta, a version, the organization billed).
    pub fn forwarded_headers(self, headers: &axum::http::HeaderMap) -> Vec<(String, String)> {
        let names: &[&str] = match self {
            Self::OpenAi => &["openai-organization", "openai-project", "openai-beta"],
            Self::Anthropic => &["anthropic-version", "anthropic-beta"],
        };
        names
            .iter()
            .filter_map(|name| {
                Some((name.to_string(), headers.get(*name)?.to_str().ok()?.to_owned()))
            })
            .collect()
    }

    /// The client's body as a [`Request`] that carries it whole (sent byte
    /// for byte) and a reading of it for the limits: the messages' text, the
    /// model, the output allowance; and whether it asks to stream. Anything
    /// but a JSON object with a list of messages is refused, as the API
    /// itself would refuse it.
    pub fn read(self, bytes: &[u8]) -> Result<(Request, bool), String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("the body is not UTF-8: {e}"))?;
        let body: Value =
            serde_json::from_str(text).map_err(|e| format!("the body is not valid JSON: {e}"))?;
        let object = body.as_object().ok_or("the body must be a JSON object")?;
        let messages = object
            .get("messages")
            .and_then(Value::as_array)
            .ok_or("`messages` must be a list of messages")?;
        let mut request = Request::default();
        if let Some(system) = object.get("system") {
            request.messages.push(Message::system(text_of(system)));
        }
        for (index, message) in messages.iter().enumerate() {
            let message = message
                .as_object()
                .ok_or_else(|| format!("`messages[{index}]` must be an object"))?;
            let role = match message.get("role").and_then(Value::as_str) {
                Some("system" | "developer") => Role::System,
                Some("assistant") => Role::Assistant,
                Some("tool") => Role::Tool,
                Some("user") => Role::User,
                _ => return Err(format!("`messages[{index}].role` is missing or unknown")),
            };
            let content = message.get("content").map(text_of).unwrap_or_default();
            request.messages.push(Message::new(role, content));
        }
        let count = |name: &str| object.get(name).and_then(Value::as_u64);
        request.model = object.get("model").and_then(Value::as_str).map(str::to_owned);
        let max_tokens = count("max_completion_tokens").or_else(|| count("max_tokens"));
        request.max_tokens = max_tokens.map(|m| m.min(u64::from(u32::MAX)) as u32);
        request.n = count("n").map(|n| n.min(128) as u32);
        if self == Self::Anthropic && request.max_tokens.is_none() {
            return Err("`max_tokens` is required".into());
        }
        let streams = object.get("stream").and_then(Value::as_bool).unwrap_or(false);
        request.body = Some(text.to_owned());
        Ok((request, streams))
    }

    /// An error body in the API's own shape, for `status`.
    pub fn error_body(self, status: u16, message: &str) -> Value {
        match self {
            Self::OpenAi => json!({"error": {
                "message": message, "type": openai_type(status), "param": null, "code": null,
            }}),
            Self::Anthropic => json!({"type": "error", "error": {
                "type": anthropic_type(status), "message": message,
            }}),
        }
    }

    /// What the client is told of a call that failed upstream: the
    /// upstream's own status and error body when it answered with one (its
    /// code and param are the client's to read), and its Retry-After; for a
    /// failure without one what it was (a request that can never fit the
    /// limits 400, no answer in time 504, anything else 502), and its message.
    pub fn failure(self, error: &ProviderError) -> ErrorAnswer {
        // The provider keeps a body only when it is JSON.
        if let Some((status, body)) = error.status().zip(error.body()) {
            return ErrorAnswer { status, body: body.to_owned(), retry_after: error.retry_after() };
        }
        let status = error.status().unwrap_or(match error.kind() {
            ErrorKind::BadRequest => 400,
            ErrorKind::Timeout => 504,
            _ => 502,
        });
        ErrorAnswer { retry_after: error.retry_after(), ..self.error(status, error.message()) }
    }

    /// The proxy's spending limit is reached: a 429 as the API says an
    /// exhausted quota (OpenAI's `insufficient_quota`), which waiting does not cure.
    pub fn budget_spent(self, message: &str) -> ErrorAnswer {
        let body = match self {
            Self::OpenAi => json!({"error": {
                "message": message, "type": "insufficient_quota", "param": null,
                "code": "insufficient_quota",
            }}),
            Self::Anthropic => self.error_body(429, message),
        };
        ErrorAnswer { status: 429, body: body.to_string(), retry_after: None }
    }

    /// An error of the proxy's own, in the API's shape.
    pub fn error(self, status: u16, message: &str) -> ErrorAnswer {
        ErrorAnswer {
            status,
            body: self.error_body(status, message).to_string(),
            retry_after: None,
        }
    }

    /// An error as the last event of a stream that broke off, as each API
    /// sends one (its SDKs raise it).
    pub fn stream_event(self, error: &ErrorAnswer) -> axum::body::Bytes {
        // Compact: an SSE data line holds no line break.
        let data = match error.body.contains(['\n', '\r']) {
            true => serde_json::from_str::<Value>(&error.body)
                .map_or_else(|_| error.body.replace(['\n', '\r'], " "), |body| body.to_string()),
            false => error.body.clone(),
        };
        let event = match self {
            Self::OpenAi => format!("data: {data}\n\n"),
            Self::Anthropic => format!("event: error\ndata: {data}\n\n"),
        };
        axum::body::Bytes::from(event)
    }

    /// Whether relayed `events` hold the stream's last event (OpenAI's
    /// `data: [DONE]`, Anthropic's `message_stop`): after it the client has
    /// the whole answer. Events are passed on whole, so a marker is never split.
    pub fn ends_stream(self, events: &[u8]) -> bool {
        let marker: &[u8] = match self {
            Self::OpenAi => b"data: [DONE]",
            Self::Anthropic => b"event: message_stop",
        };
        events.windows(marker.len()).any(|window| window == marker)
    }

    /// The header the API's clients read the upstream's request id from.
    pub fn request_id_header(self) -> &'static str {
        match self {
            Self::OpenAi => "x-request-id",
            Self::Anthropic => "request-id",
        }
    }
}

/// The text of a message's content: a string, or the text parts of a list
/// (images and other parts have no text to count).
fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn openai_type(status: u16) -> &'static str {
    match status {
        400 | 404 | 413 | 422 => "invalid_request_error",
        401 | 403 => "authentication_error",
        429 => "rate_limit_exceeded",
        _ => "server_error",
    }
}

fn anthropic_type(status: u16) -> &'static str {
    match status {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_read_for_the_limits_and_kept_whole() {
        let body = br#"{"model":"gpt-4o-mini","max_tokens":30,"n":2,"future":1,
            "messages":[{"role":"system","content":"Be brief."},
                        {"role":"user","content":[{"type":"text","text":"Hi"},{"type":"image_url"}]}]}"#;
        let (request, streams) = Api::OpenAi.read(body).unwrap();
        assert!(!streams);
        assert_eq!(request.messages.len(), 2);
        assert_eq!(
            (request.messages[1].role, request.messages[1].content.as_str()),
            (Role::User, "Hi")
        );
        assert_eq!((request.max_tokens, request.n), (Some(30), Some(2)));
        assert_eq!(request.model.as_deref(), Some("gpt-4o-mini"));
        let sent = std::str::from_utf8(body).unwrap();
        assert_eq!(request.body.as_deref(), Some(sent), "byte for byte");

        let anthropic = br#"{"model":"claude","max_tokens":9,"system":"Brief.","messages":[{"role":"user","content":"Hi"}]}"#;
        let (request, _) = Api::Anthropic.read(anthropic).unwrap();
        assert_eq!(request.messages[0].role, Role::System);
    }

    #[test]
    fn malformed_bodies_are_named() {
        for (body, said) in [
            (&b"{not json"[..], "not valid JSON"),
            (b"{\"a\":\"\xff\"}", "not UTF-8"),
            (b"[1]", "must be a JSON object"),
            (b"{\"model\":\"m\"}", "`messages` must be a list"),
            (b"{\"messages\":[3]}", "`messages[0]` must be an object"),
            (b"{\"messages\":[{\"role\":\"wizard\"}]}", "`messages[0].role`"),
        ] {
            let error = Api::OpenAi.read(body).unwrap_err();
            assert!(error.contains(said), "{error}");
        }
        let error = Api::Anthropic.read(br#"{"messages":[]}"#).unwrap_err();
        assert!(error.contains("max_tokens"), "{error}");
    }

    #[test]
    fn errors_take_each_apis_shape() {
        let openai = Api::OpenAi.error_body(429, "slow down");
        assert_eq!(openai["error"]["type"], "rate_limit_exceeded");
        let anthropic = Api::Anthropic.error_body(400, "bad");
        assert_eq!(
            (anthropic["type"].as_str(), anthropic["error"]["type"].as_str()),
            (Some("error"), Some("invalid_request_error"))
        );
    }

    #[test]
    fn failures_without_a_status_are_told_what_they_were() {
        let status = |kind| Api::OpenAi.failure(&ProviderError::new(kind, "x")).status;
        assert_eq!(status(ErrorKind::BadRequest), 400);
        assert_eq!(status(ErrorKind::Timeout), 504);
        assert_eq!(status(ErrorKind::Connection), 502);
        let upstream = ProviderError::from_status(529, "overloaded");
        let answer = Api::Anthropic.failure(&upstream);
        let body: Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(
            (answer.status, body["error"]["type"].as_str()),
            (529, Some("overloaded_error"))
        );
    }

    #[test]
    fn the_upstreams_own_error_is_passed_on() {
        let body = r#"{"error":{"message":"no","type":"invalid_request_error","param":"n","code":"bad_n"}}"#;
        let upstream = ProviderError::from_status(400, "no")
            .with_body(body)
            .with_retry_after(std::time::Duration::from_secs(3));
        let answer = Api::OpenAi.failure(&upstream);
        assert_eq!(answer.body, body, "as it came");
        assert_eq!((answer.status, answer.retry_after.map(|d| d.as_secs())), (400, Some(3)));
        // Without a body (a load balancer's page is not kept): the API's shape.
        let page = ProviderError::from_status(502, "bad gateway");
        let built: Value = serde_json::from_str(&Api::OpenAi.failure(&page).body).unwrap();
        assert_eq!(built["error"]["message"], "bad gateway");
        let pretty =
            ErrorAnswer { body: "{\n  \"error\": {}\n}".into(), ..Api::OpenAi.error(500, "x") };
        assert_eq!(&Api::OpenAi.stream_event(&pretty)[..], b"data: {\"error\":{}}\n\n");
        let event = Api::Anthropic.stream_event(&Api::Anthropic.error(529, "busy"));
        let event = std::str::from_utf8(&event).unwrap();
        assert!(event.starts_with("event: error\ndata: {") && event.ends_with("}\n\n"), "{event}");
        assert_eq!(event.matches('\n').count(), 3, "one line of data: {event}");
    }

    #[test]
    fn keys_are_read_where_each_api_sends_them() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("authorization", "Bearer sk-one".parse().unwrap());
        assert_eq!(Api::OpenAi.client_key(&headers).as_deref(), Some("sk-one"));
        headers.insert("x-api-key", "sk-ant".parse().unwrap());
        assert_eq!(Api::Anthropic.client_key(&headers).as_deref(), Some("sk-ant"));
        assert_eq!(Api::OpenAi.client_key(&axum::http::HeaderMap::new()), None);
    }
}
