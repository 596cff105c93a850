//! What the server has seen, served at `/stats`.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

#[derive(Debug, Default)]
pub(crate) struct Stats {
    requests: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    streamed: AtomicU64,
    by_status: Mutex<BTreeMap<u16, u64>>,
    /// Client addresses seen: one per connection, so keep-alive shows here.
    peers: Mutex<HashSet<SocketAddr>>,
    prompts: Mutex<BTreeMap<String, u64>>,
}

/// A snapshot of the server's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    /// Requests received, whatever their answer.
    pub requests: u64,
    /// Requests being handled now; a stream's until its headers go out.
    pub in_flight: u64,
    /// The most requests in flight at once.
    pub max_in_flight: u64,
    /// Requests that asked for an SSE stream.
    pub streamed: u64,
    /// Distinct client connections that sent requests.
    pub connections: u64,
    /// Answers by HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests by prompt, when the server counts them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prompts: BTreeMap<String, u64>,
    /// The Batch APIs' files, batches and submissions.
    #[serde(default)]
    pub batches: crate::batches::BatchStats,
}

impl StatsSnapshot {
    /// Answers with HTTP status `status` (0 when none).
    pub fn count(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }
}

/// Counts a request in flight until dropped.
pub(crate) struct InFlight<'a>(&'a Stats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Stats {
    pub(crate) fn begin(&self, peer: SocketAddr, streamed: bool) -> InFlight<'_> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.peers.lock().unwrap().insert(peer);
        if streamed {
            self.streamed.fetch_add(1, Ordering::Relaxed);
        }
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.max_in_flight.fetch_max(now, Ordering::AcqRel);
        InFlight(self)
    }

    pub(crate) fn saw_prompt(&self, prompt: &str) {
        *self.prompts.lock().unwrap().entry(prompt.to_owned()).or_default() += 1;
    }

    pub(crate) fn answered(&self, status: u16) {
        *self.by_status.lock().unwrap().entry(status).or_default() += 1;
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            max_in_flight: self.max_in_flight.load(Ordering::Relaxed),
            streamed: self.streamed.load(Ordering::Relaxed),
            connections: self.peers.lock().unwrap().len() as u64,
            by_status: self.by_status.lock().unwrap().clone(),
            prompts: self.prompts.lock().unwrap().clone(),
            batches: crate::batches::BatchStats::default(),
        }
    }

    pub(crate) fn reset(&self) {
        self.requests.store(0, Ordering::Relaxed);
        self.streamed.store(0, Ordering::Relaxed);
        self.max_in_flight.store(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
        self.by_status.lock().unwrap().clear();
        self.peers.lock().unwrap().clear();
        self.prompts.lock().unwrap().clear();
    }
}
