//! One lane per API key: its own executor (concurrency cap, RPM, TPM, 429
//! pause, breaker), since a vendor counts limits per key. Every client that
//! sends the same key shares its lane. Keys are known by a hash; the key
//! itself lives only in the lane's provider, which sends it upstream.
//!
//! A lane whose breaker opened (a bad key, an unknown model, no quota) refuses
//! its calls at once, without paying for them, for `--cool-down` seconds; the next
//! call after that gets a fresh lane, so a key that was fixed (or a model
//! another client names correctly) works again without a restart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use fanout::{
    Branch, BranchResults, Calls, CancellationToken, Executor, NotRun, Outcome, Request,
    TaskResult, Usage,
};
use tokio::sync::{OnceCell, oneshot};

use super::stats::Stats;
use crate::cache::Cached;
use crate::connect;
use crate::fingerprint;
use crate::settings::{self, Settings};

/// How lanes are made.
pub struct LaneSettings {
    pub settings: Settings,
    /// The response cache's store, with `--cache`.
    pub cache: Option<std::path::PathBuf>,
    pub stats: Arc<Stats>,
    /// How long a lane whose breaker opened keeps refusing calls.
    pub cool_down: Duration,
    /// Cancelled when the proxy stops: every lane's run ends with it.
    pub shutdown: CancellationToken,
}

/// A key's executor, kept running for the proxy's life.
pub struct Lane {
    calls: Calls,
    /// Calls taken in and not yet answered, waiting or running.
    pending: AtomicU64,
    /// When the breaker opened, if it did.
    broken_since: Mutex<Option<Instant>>,
    concurrency: u64,
    rpm: Option<u64>,
    // Kept alive with the lane: dropping them would end its run.
    _run: BranchResults<()>,
    _executor: Executor,
}

impl Lane {
    async fn start(made: &LaneSettings, key: Option<String>) -> Result<Self> {
        // The client's body is sent as it came: an answer cut off at its
        // max_tokens cannot be asked again with more room.
        let settings = &Settings { retry_truncated: None, ..made.settings.clone() };
        let scope = key.as_deref().map(key_hash).unwrap_or_default();
        let mut provider = connect::http_provider(settings, key)?;
        if let Some(store) = &made.cache {
            // Answers paid by one key are never given to another.
            let scope = format!("{}|key {scope}", fingerprint::cache_scope(settings));
            provider = Arc::new(Cached::new(provider, scope.clone(), scope, store)?);
        }
        let stats = Arc::clone(&made.stats);
        // A proxy runs until it is stopped: no deadline ends its lanes.
        let executor = connect::executor(settings, provider, Usage::default())
            .deadline(None)
            .on_event(move |event| stats.observe(event))
            .build();
        let (give, handle) = oneshot::channel();
        let stop = made.shutdown.clone();
        let branch = Branch::new("proxy", move |calls| async move {
            let _ = give.send(calls);
            stop.cancelled().await;
        });
        let run = executor.stream_branches([branch]);
        let calls = handle.await.map_err(|_| anyhow!("the lane's run ended before it began"))?;
        Ok(Self {
            calls,
            pending: AtomicU64::new(0),
            broken_since: Mutex::new(None),
            concurrency: settings.concurrency as u64,
            rpm: settings.rpm,
            _run: run,
            _executor: executor,
        })
    }

    /// How long a call taken in now would wait for its turn, when the lane's
    /// RPM says (without one, calls start as slots free, and nothing says
    /// how soon: the call waits).
    pub fn expected_wait(&self) -> Duration {
        let Some(rpm) = self.rpm.filter(|r| *r > 0) else { return Duration::ZERO };
        let ahead = self.pending.load(Ordering::Relaxed).saturating_sub(self.concurrency);
        Duration::from_secs_f64(ahead as f64 * 60.0 / rpm as f64)
    }

    /// Takes a call in: it counts as waiting from now, for the calls that
    /// come after it, until its [`Queued`] is dropped.
    pub fn enqueue(self: &Arc<Self>) -> Queued {
        self.pending.fetch_add(1, Ordering::Relaxed);
        Queued { lane: Arc::clone(self) }
    }

    /// Whether the breaker opened longer than `cool_down` ago.
    fn cooled_down(&self, cool_down: Duration) -> bool {
        let since = *self.broken_since.lock().expect("never poisoned");
        since.is_some_and(|since| since.elapsed() >= cool_down)
    }
}

/// A call taken into a lane and not yet answered.
pub struct Queued {
    lane: Arc<Lane>,
}

impl Queued {
    /// Sends `request` through the lane's call path. Dropping the future
    /// (the client went away) cancels the call upstream. The result
    /// carries the history of the call's attempts.
    pub async fn complete(&self, request: Request) -> TaskResult {
        let result = self.lane.calls.complete_result(request).await;
        if matches!(result.outcome, Outcome::NotRun(NotRun::CircuitOpen(_))) {
            let mut broken_since = self.lane.broken_since.lock().expect("never poisoned");
            broken_since.get_or_insert_with(Instant::now);
        }
        result
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.lane.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The lanes, by key hash, each made on its first call.
pub struct Lanes {
    made: LaneSettings,
    lanes: Mutex<HashMap<String, Arc<OnceCell<Arc<Lane>>>>>,
}

impl Lanes {
    pub fn new(made: LaneSettings) -> Self {
        Self { made, lanes: Mutex::default() }
    }

    /// The lane of a client's own key (`None`: the client sent none, and
    /// none is sent upstream).
    pub async fn of(&self, key: Option<String>) -> Result<Arc<Lane>> {
        let name = key.as_deref().map(key_hash).unwrap_or_default();
        self.lane(name, key).await
    }

    /// The lane of the proxy's own key, from the provider's key variable
    /// (with `--client-token`).
    pub async fn own(&self) -> Result<Arc<Lane>> {
        let key = settings::env(&self.made.settings.api_key_env);
        self.lane("own".to_owned(), key).await
    }

    async fn lane(&self, name: String, key: Option<String>) -> Result<Arc<Lane>> {
        let cell = {
            let mut lanes = self.lanes.lock().expect("never poisoned");
            let cell = lanes.entry(name).or_default();
            if cell.get().is_some_and(|lane| lane.cooled_down(self.made.cool_down)) {
                // Its run ends when the last call holding it does.
                *cell = Arc::default();
            }
            Arc::clone(cell)
        };
        let lane = cell
            .get_or_try_init(|| async { Lane::start(&self.made, key).await.map(Arc::new) })
            .await?;
        Ok(Arc::clone(lane))
    }

    /// How many keys have a lane.
    pub fn count(&self) -> usize {
        self.lanes.lock().expect("never poisoned").len()
    }
}

/// What a key is known by: the start of its SHA-256, never the key.
pub fn key_hash(key: &str) -> String {
    super::short_hash(key.as_bytes())
}
