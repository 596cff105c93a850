//! Server-sent events from a streaming answer.
//!
//! `eventsource-stream` does the framing (events split across reads, comments,
//! `event:` names, CRLF); this module maps its errors to [`ProviderError`]s.

use eventsource_stream::{Event, Eventsource};
use futures_util::{Stream, StreamExt};

use super::http::Endpoint;
use super::{ErrorKind, ProviderError};

/// The events of a streaming answer, ending with the body.
pub(crate) fn events<S, B, E>(
    endpoint: &Endpoint,
    body: S,
) -> impl Stream<Item = Result<Event, ProviderError>> + '_
where
    S: Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    body.eventsource().map(move |event| {
        event.map_err(|e| match e {
            eventsource_stream::EventStreamError::Transport(e) => ProviderError::new(
                ErrorKind::Connection,
                endpoint.scrub(&format!("the stream broke off: {e}")),
            ),
            other => ProviderError::new(
                ErrorKind::MalformedResponse,
                format!("bad event stream: {other}"),
            ),
        })
    })
}
