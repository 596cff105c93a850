//! Passing a streamed answer on as it arrives, to someone who cannot wait for
//! the whole of it (`fanout proxy`'s streaming clients).
//!
//! A call may be sent more than once (a hedge races its primary, a retry
//! follows a failure), but its reader must see one answer, once. So the first
//! of the call's attempts whose bytes arrive takes the relay, and only its
//! bytes are passed on. From then on that call is committed to it: if its
//! stream breaks off, the error is marked [`ProviderError::was_relayed`] and
//! the call ends there, neither retried nor left to a hedge, since the reader
//! already has half of it. Until a byte has come, retries and hedges work as
//! for any call.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{ErrorKind, Progress, ProviderError};

/// The sending side, carried by [`Request::relay`](super::Request::relay).
/// Clones share one relay.
#[derive(Clone)]
pub struct Relay {
    shared: Arc<Shared>,
}

struct Shared {
    /// The call holding the relay, by its [`Progress::id`]; 0 while none does.
    holder: AtomicU64,
    /// Unbounded: what it holds is at most the answer, which the call keeps
    /// whole anyway (`Response::raw`), and a bounded one would stall the
    /// upstream read behind a slow reader until the attempt timeout cut it.
    sender: mpsc::UnboundedSender<Bytes>,
    /// The holding answer's request id, from its headers.
    request_id: Arc<OnceLock<String>>,
}

/// The reading side: the holding attempt's bytes, in order.
pub struct Relayed {
    receiver: mpsc::UnboundedReceiver<Bytes>,
    request_id: Arc<OnceLock<String>>,
}

impl Relay {
    /// A relay and its reading side.
    pub fn new() -> (Self, Relayed) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let request_id = Arc::new(OnceLock::new());
        let shared =
            Shared { holder: AtomicU64::new(0), sender, request_id: Arc::clone(&request_id) };
        (Self { shared: Arc::new(shared) }, Relayed { receiver, request_id })
    }

    /// Whether an attempt's bytes were passed on: the call is committed to it.
    pub fn is_held(&self) -> bool {
        self.shared.holder.load(Ordering::Acquire) != 0
    }

    /// Whether the call behind `progress` holds the relay.
    pub(crate) fn is_held_by(&self, progress: &Progress) -> bool {
        self.shared.holder.load(Ordering::Acquire) == progress.id()
    }

    /// A place for one call's answer (the call behind `progress`), which may
    /// take the relay.
    pub(crate) fn seat(&self, progress: &Progress, request_id: Option<String>) -> Seat {
        let id = progress.id();
        Seat { shared: Arc::clone(&self.shared), id, request_id, unsent: Vec::new() }
    }
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Relay")
    }
}

/// Requests are equal whatever reads their answers: a relay is not content.
impl PartialEq for Relay {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for Relayed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Relayed")
    }
}

impl Relayed {
    /// The next bytes passed on; `None` once the call is over (every
    /// [`Relay`] is dropped).
    pub async fn next(&mut self) -> Option<Bytes> {
        self.receiver.recv().await
    }

    /// The next bytes passed on if some are waiting, without waiting.
    pub fn try_next(&mut self) -> Option<Bytes> {
        self.receiver.try_recv().ok()
    }

    /// The request id of the answer being passed on, once one is.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.get().map(String::as_str)
    }
}

/// What became of one attempt's seat.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Standing {
    /// Nothing of it was passed on, and the relay is free.
    Unseated,
    /// Its bytes were passed on.
    Holding,
    /// Another attempt's bytes are passed on.
    Outrun,
}

/// One attempt's place at a relay. Bytes are passed on in whole SSE events,
/// so that an error event added after a break-off is never glued to half of
/// one; and the relay is taken only by an event with data, so that a
/// keep-alive comment does not commit the call before any answer came.
pub(crate) struct Seat {
    shared: Arc<Shared>,
    id: u64,
    request_id: Option<String>,
    /// Bytes read and not yet passed on: the end of an unfinished event, or
    /// (before the relay is taken) comments that came before any data.
    unsent: Vec<u8>,
}

impl Seat {
    /// Takes `bytes` in and passes on every event they complete, taking the
    /// relay at the first event with data. `false` when the attempt should
    /// stop reading: another holds the relay, or the reader went away.
    pub(crate) fn pass(&mut self, bytes: &[u8]) -> bool {
        self.unsent.extend_from_slice(bytes);
        let Some(end) = last_event_end(&self.unsent) else { return !self.outrun() };
        if !self.holds() {
            if !has_data(&self.unsent[..end]) {
                return !self.outrun();
            }
            if !self.take() {
                return false;
            }
        }
        let events: Vec<u8> = self.unsent.drain(..end).collect();
        self.shared.sender.send(Bytes::from(events)).is_ok()
    }

    /// Passes on what is left once the answer is complete (a last event the
    /// upstream did not end with a blank line).
    pub(crate) fn finish(&mut self) {
        if self.holds() && !self.unsent.is_empty() {
            let _ = self.shared.sender.send(Bytes::from(std::mem::take(&mut self.unsent)));
        }
    }

    fn take(&self) -> bool {
        let taken =
            self.shared.holder.compare_exchange(0, self.id, Ordering::AcqRel, Ordering::Acquire);
        if taken.is_ok()
            && let Some(id) = &self.request_id
        {
            let _ = self.shared.request_id.set(id.clone());
        }
        taken.is_ok()
    }

    fn holds(&self) -> bool {
        self.standing() == Standing::Holding
    }

    fn outrun(&self) -> bool {
        self.standing() == Standing::Outrun
    }

    pub(crate) fn standing(&self) -> Standing {
        match self.shared.holder.load(Ordering::Acquire) {
            0 => Standing::Unseated,
            holder if holder == self.id => Standing::Holding,
            _ => Standing::Outrun,
        }
    }

    /// What the attempt's result becomes, given how it stood: a holder's
    /// failure can no longer be retried; an outrun attempt fails quietly
    /// (its hedge partner's answer is the call's).
    pub(crate) fn settle<T>(
        &mut self,
        result: Result<T, ProviderError>,
    ) -> Result<T, ProviderError> {
        match (self.standing(), result) {
            (Standing::Holding, Err(error)) => Err(error.relayed()),
            (Standing::Holding, Ok(done)) => {
                self.finish();
                Ok(done)
            }
            (Standing::Outrun, _) => Err(ProviderError::new(
                ErrorKind::InvalidOutput,
                "the answer was already passed on as it streamed: it cannot be asked again",
            )),
            (Standing::Unseated, result) => result,
        }
    }
}

/// Where the last complete event in `bytes` ends (after its blank line).
fn last_event_end(bytes: &[u8]) -> Option<usize> {
    let after = |separator: &[u8]| {
        bytes.windows(separator.len()).rposition(|w| w == separator).map(|at| at + separator.len())
    };
    [after(b"\n\n"), after(b"\r\n\r\n"), after(b"\r\r")].into_iter().flatten().max()
}

/// Whether any line of `events` is a data line (the rest may be comments).
fn has_data(events: &[u8]) -> bool {
    events.split(|b| *b == b'\n' || *b == b'\r').any(|line| line.starts_with(b"data:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_attempt_with_data_holds_the_relay_and_passes_whole_events() {
        let (relay, mut relayed) = Relay::new();
        let calls = (Progress::new(), Progress::new());
        let (mut first, mut second) = (
            relay.seat(&calls.0, Some("req_1".into())),
            relay.seat(&calls.1, Some("req_2".into())),
        );
        assert!(first.pass(b": keep-alive\n\n"), "a comment takes nothing");
        assert_eq!(first.standing(), Standing::Unseated);
        assert!(second.pass(b"data: a\n\nda"), "half an event waits for its end");
        assert!(!first.pass(b"data: b\n\n"), "outrun: stop reading");
        assert!(second.pass(b"ta: c\r\n\r\n"));
        assert!(second.pass(b"data: [DONE]"));
        assert_eq!((first.standing(), second.standing()), (Standing::Outrun, Standing::Holding));
        assert_eq!(relayed.request_id(), Some("req_2"));
        assert!(relay.is_held_by(&calls.1) && !relay.is_held_by(&calls.0));
        second.settle(Ok(())).unwrap();
        drop((relay, first, second));
        let mut passed = Vec::new();
        while let Some(bytes) = relayed.next().await {
            passed.push(String::from_utf8(bytes.to_vec()).unwrap());
        }
        assert_eq!(passed, ["data: a\n\n", "data: c\r\n\r\n", "data: [DONE]"]);
    }

    #[test]
    fn a_holder_that_breaks_off_is_not_retried_and_an_outrun_one_fails() {
        let (relay, _relayed) = Relay::new();
        let calls = (Progress::new(), Progress::new());
        let (mut holder, mut outrun) = (relay.seat(&calls.0, None), relay.seat(&calls.1, None));
        holder.pass(b"data: x\n\n");
        let broke = ProviderError::new(ErrorKind::Connection, "reset");
        assert!(broke.is_retryable());
        let settled = holder.settle::<()>(Err(broke)).unwrap_err();
        assert!(settled.was_relayed() && !settled.is_retryable());
        let lost = outrun.settle(Ok(())).unwrap_err();
        assert!(!lost.is_retryable() && !lost.was_relayed());
    }

    #[test]
    fn a_reader_that_went_away_stops_the_reading() {
        let (relay, relayed) = Relay::new();
        drop(relayed);
        assert!(!relay.seat(&Progress::new(), None).pass(b"data: x\n\n"));
    }
}
