//! Pieces both APIs' handlers share: request text extraction, responses, SSE bodies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::server::{Cut, State};

/// Message content: a string, or a list of parts of which the text ones count.
#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<Part>),
    #[default]
    None,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Part {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    /// A `tool_result` block's content (Anthropic).
    #[serde(default)]
    content: Option<Box<Content>>,
}

impl Content {
    pub(crate) fn text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Parts(parts) => parts.iter().filter_map(|p| p.text.as_deref()).collect(),
            Self::None => String::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct WireMessage {
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub content: Content,
}

impl WireMessage {
    /// The tool results this message gives back: an OpenAI `tool` message, or
    /// an Anthropic user turn's `tool_result` blocks.
    pub(crate) fn tool_results(&self) -> Vec<String> {
        if self.role == "tool" {
            return vec![self.content.text()];
        }
        match &self.content {
            Content::Parts(parts) => parts
                .iter()
                .filter(|p| p.kind == "tool_result")
                .map(|p| p.content.as_ref().map(|c| c.text()).unwrap_or_default())
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Every message's text, and the last user message's (the last with text:
/// a turn of tool results is not the prompt).
pub(crate) fn texts(messages: &[WireMessage]) -> (Vec<String>, String) {
    let all: Vec<String> = messages.iter().map(|m| m.content.text()).collect();
    let prompt = messages
        .iter()
        .zip(&all)
        .rev()
        .find(|(m, text)| m.role == "user" && !text.is_empty())
        .map(|(_, text)| text.clone())
        .unwrap_or_default();
    (all, prompt)
}

pub(crate) fn json(
    status: StatusCode,
    headers: Vec<(&'static str, String)>,
    body: impl Into<Body>,
) -> Response {
    let mut map = HeaderMap::new();
    map.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    extend(&mut map, headers);
    (status, map, body.into()).into_response()
}

fn extend(map: &mut HeaderMap, headers: Vec<(&'static str, String)>) {
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            map.insert(HeaderName::from_static(name), value);
        }
    }
}

/// One piece of a body, already framed, and how long to wait before sending
/// it; `None` resets the connection instead.
pub(crate) struct Frame {
    pub delay: Duration,
    pub bytes: Option<Bytes>,
}

impl Frame {
    pub(crate) fn reset() -> Self {
        Self { delay: Duration::ZERO, bytes: None }
    }

    pub(crate) fn raw(delay: Duration, bytes: impl Into<Bytes>) -> Self {
        Self { delay, bytes: Some(bytes.into()) }
    }

    pub(crate) fn data(delay: Duration, event: Option<&str>, data: &str) -> Self {
        let text = match event {
            Some(event) => format!("event: {event}\ndata: {data}\n\n"),
            None => format!("data: {data}\n\n"),
        };
        Self { delay, bytes: Some(Bytes::from(text)) }
    }
}

/// A body that sends each frame after its delay.
fn framed(frames: Vec<Frame>) -> Body {
    let stream = futures_util::stream::unfold(frames.into_iter(), |mut frames| async move {
        let frame = frames.next()?;
        if !frame.delay.is_zero() {
            tokio::time::sleep(frame.delay).await;
        }
        let item = frame.bytes.ok_or_else(|| std::io::Error::other("injected connection reset"));
        Some((item, frames))
    });
    Body::from_stream(stream)
}

/// A `text/event-stream` answer that sends each frame after its delay.
pub(crate) fn event_stream(headers: Vec<(&'static str, String)>, frames: Vec<Frame>) -> Response {
    let mut map = HeaderMap::new();
    map.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    map.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    extend(&mut map, headers);
    (StatusCode::OK, map, framed(frames)).into_response()
}

/// Applies `cut` to a stream's frames: after the first piece, a stall of `hang`
/// or a reset.
pub(crate) fn cut_frames(frames: &mut Vec<Frame>, cut: Option<Cut>, hang: Duration) {
    match cut {
        None => {}
        Some(Cut::Stall) if frames.len() > 2 => frames[2].delay += hang,
        Some(Cut::Reset) => {
            frames.truncate(2);
            frames.push(Frame::reset());
        }
        Some(Cut::Stall) => {}
    }
}

/// A JSON answer, with `cut` applied: half the body, then a stall or a reset.
pub(crate) fn cut_json(
    headers: Vec<(&'static str, String)>,
    body: String,
    cut: Option<Cut>,
    hang: Duration,
) -> Response {
    let Some(cut) = cut else { return json(StatusCode::OK, headers, body) };
    let half = body.len() / 2;
    let (first, rest) =
        (Bytes::from(body[..half].to_owned()), Bytes::from(body[half..].to_owned()));
    let frames = match cut {
        Cut::Stall => vec![Frame::raw(Duration::ZERO, first), Frame::raw(hang, rest)],
        Cut::Reset => vec![Frame::raw(Duration::ZERO, first), Frame::reset()],
    };
    let mut map = HeaderMap::new();
    map.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    extend(&mut map, headers);
    (StatusCode::OK, map, framed(frames)).into_response()
}

/// Splits an answer into streaming pieces (a word each, with its space).
pub(crate) fn pieces(text: &str) -> Vec<&str> {
    text.split_inclusive(' ').collect()
}

/// Runs a handler between the stats' begin and answer.
pub(crate) async fn counted(
    state: &Arc<State>,
    peer: SocketAddr,
    streamed: bool,
    handle: impl Future<Output = Response>,
) -> Response {
    let _in_flight = state.stats.begin(peer, streamed);
    let response = handle.await;
    state.stats.answered(response.status().as_u16());
    response
}
