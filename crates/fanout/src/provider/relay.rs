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

use super::{ErrorKind, ProviderError};

/// The sending side, carried by [`Request::relay`](super::Request::relay).
/// Clones share one relay.
#[derive(Clone)]
pub struct Relay {
    shared: Arc<Shared>,
}

struct Shared {
    /// The seat holding the relay; 0 while none does.
    holder: AtomicU64,
    next_seat: AtomicU64,
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
        let shared = Shared {
            holder: AtomicU64::new(0),
            next_seat: AtomicU64::new(1),
            sender,
            request_id: Arc::clone(&request_id),
        };
        (Self { shared: Arc::new(shared) }, Relayed { receiver, request_id })
    }

    /// Whether an attempt's bytes were passed on: the call is committed to it.
    pub(crate) fn is_held(&self) -> bool {
        self.shared.holder.load(Ordering::Acquire) != 0
    }

    /// A place for one attempt's answer, which may take the relay.
    pub(crate) fn seat(&self, request_id: Option<String>) -> Seat {
        let id = self.shared.next_seat.fetch_add(1, Ordering::Relaxed);
        Seat { shared: Arc::clone(&self.shared), id, request_id }
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

/// One attempt's place at a relay.
#[derive(Clone)]
pub(crate) struct Seat {
    shared: Arc<Shared>,
    id: u64,
    request_id: Option<String>,
}

impl Seat {
    /// Passes `bytes` on, taking the relay if it is free. `false` when the
    /// attempt should stop reading: another holds the relay, or the reader
    /// went away.
    pub(crate) fn pass(&self, bytes: &Bytes) -> bool {
        let holder =
            self.shared.holder.compare_exchange(0, self.id, Ordering::AcqRel, Ordering::Acquire);
        match holder {
            Ok(_) => {
                if let Some(id) = &self.request_id {
                    let _ = self.shared.request_id.set(id.clone());
                }
            }
            Err(holder) if holder == self.id => {}
            Err(_) => return false,
        }
        self.shared.sender.send(bytes.clone()).is_ok()
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
    pub(crate) fn settle<T>(&self, result: Result<T, ProviderError>) -> Result<T, ProviderError> {
        match (self.standing(), result) {
            (Standing::Holding, Err(error)) => Err(error.relayed()),
            (Standing::Outrun, _) => Err(ProviderError::new(
                ErrorKind::InvalidOutput,
                "the answer was already passed on as it streamed: it cannot be asked again",
            )),
            (_, result) => result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_attempt_with_bytes_holds_the_relay() {
        let (relay, mut relayed) = Relay::new();
        let (first, second) = (relay.seat(Some("req_1".into())), relay.seat(Some("req_2".into())));
        assert_eq!(first.standing(), Standing::Unseated);
        assert!(second.pass(&Bytes::from_static(b"data: a\n\n")));
        assert!(!first.pass(&Bytes::from_static(b"data: b\n\n")), "outrun: stop reading");
        assert!(second.pass(&Bytes::from_static(b"data: c\n\n")));
        assert_eq!((first.standing(), second.standing()), (Standing::Outrun, Standing::Holding));
        assert_eq!(relayed.request_id(), Some("req_2"));
        drop((relay, first, second));
        assert_eq!(relayed.next().await.as_deref(), Some(&b"data: a\n\n"[..]));
        assert_eq!(relayed.next().await.as_deref(), Some(&b"data: c\n\n"[..]));
        assert_eq!(relayed.next().await, None);
    }

    #[test]
    fn a_holder_that_breaks_off_is_not_retried_and_an_outrun_one_fails() {
        let (relay, _relayed) = Relay::new();
        let (holder, outrun) = (relay.seat(None), relay.seat(None));
        holder.pass(&Bytes::from_static(b"x"));
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
        assert!(!relay.seat(None).pass(&Bytes::from_static(b"x")));
    }
}
