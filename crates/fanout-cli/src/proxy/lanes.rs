//! One lane per API key: its own executor (concurrency cap, RPM, TPM, 429
//! pause, breaker), since a vendor counts limits per key. Every client that
//! sends the same key shares its lane. Keys are known by a hash; the key
//! itself lives only in the lane's provider, which sends it upstream.
//!
//! A lane whose breaker opened (a bad key, an unknown model, no quota) refuses
//! its calls at once, without paying for them, for `--cool-down` seconds; the next
//! call after that gets a fresh lane, so a key that was fixed (or a model
//! another client names correctly) works again without a restart.
//!
//! A lane no call has used for [`IDLE_LANE`] is let go, so a proxy that sees
//! many keys over its life (keys rotated, one per user) keeps only the ones
//! in use; what it had learned of the vendor's limits is long stale by then.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow};
use fanout::{
    Branch, BranchResults, CallEnd, Calls, CancellationToken, Event, Executor, NotRun, Outcome,
    Request, SharedSpending, TaskResult, Usage,
};
use tokio::sync::{OnceCell, oneshot};
use tokio::time::Instant;

use super::records::LaneEvents;
use super::stats::Stats;
use crate::cache::Cached;
use crate::connect;
use crate::fingerprint;
use crate::settings::{self, Settings};

/// How long a lane is kept with no call in it.
pub const IDLE_LANE: Duration = Duration::from_secs(15 * 60);

/// How often lanes are looked into for idle ones.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// How lanes are made.
pub struct LaneSettings {
    pub settings: Settings,
    /// The spending limit every lane draws on.
    pub spending: Option<SharedSpending>,
    /// The response cache's store, with `--cache`.
    pub cache: Option<std::path::PathBuf>,
    pub stats: Arc<Stats>,
    /// Where the lanes' pauses and limit changes are kept for the records.
    pub events: LaneEvents,
    /// How long a lane whose breaker opened keeps refusing calls.
    pub cool_down: Duration,
    /// Cancelled when the proxy stops: every lane's run ends with it.
    pub shutdown: CancellationToken,
}

/// What a lane has seen of how fast its calls get through, to say how long
/// a new one would wait.
struct Pace {
    since: Instant,
    /// Answered calls' time from launch to answer, smoothed; 0 before the first.
    service_micros: AtomicU64,
    /// When the 429 pause in force ends, in milliseconds after `since`; 0: none.
    paused_until_ms: AtomicU64,
}

impl Pace {
    fn new() -> Self {
        Self { since: Instant::now(), service_micros: AtomicU64::new(0), paused_until_ms: 0.into() }
    }

    fn observe(&self, event: &Event) {
        if let Event::Paused { duration, .. } = event {
            let until = (self.since.elapsed() + *duration).as_millis() as u64;
            self.paused_until_ms.fetch_max(until, Ordering::Relaxed);
        }
    }

    /// Adds an answered call's service time to the average (a moving one, so
    /// it follows an upstream that slows down). Concurrent updates may lose
    /// one sample, which an estimate can afford.
    fn answered_in(&self, service: Duration) {
        let sample = service.as_micros().min(u128::from(u64::MAX)) as u64;
        let old = self.service_micros.load(Ordering::Relaxed);
        let new = if old == 0 { sample } else { (old * 7 + sample) / 8 };
        self.service_micros.store(new.max(1), Ordering::Relaxed);
    }

    fn service(&self) -> Duration {
        Duration::from_micros(self.service_micros.load(Ordering::Relaxed))
    }

    fn pause_left(&self) -> Duration {
        let until = Duration::from_millis(self.paused_until_ms.load(Ordering::Relaxed));
        until.saturating_sub(self.since.elapsed())
    }
}

/// A key's executor, kept running for the proxy's life.
pub struct Lane {
    /// What the lane is known by: its key's hash.
    pub name: String,
    calls: Calls,
    /// Calls taken in and not yet answered, waiting or running.
    pending: AtomicU64,
    /// When the breaker opened, if it did.
    broken_since: Mutex<Option<Instant>>,
    /// When a call last came in or left.
    last_active: Mutex<Instant>,
    pace: Arc<Pace>,
    rpm: Option<u64>,
    // Kept alive with the lane: dropping it would end its run.
    _run: BranchResults<()>,
    executor: Executor,
}

impl Lane {
    async fn start(made: &LaneSettings, name: String, key: Option<String>) -> Result<Self> {
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
        let (stats, events, lane) = (Arc::clone(&made.stats), made.events.clone(), name.clone());
        let pace = Arc::new(Pace::new());
        let paced = Arc::clone(&pace);
        // A proxy runs until it is stopped: no deadline ends its lanes.
        let mut builder = connect::executor(settings, provider, Usage::default()).deadline(None);
        if let Some(spending) = &made.spending {
            builder = builder.shared_spend_limit(spending);
        }
        let executor = builder
            .on_event(move |event| {
                stats.observe(event);
                events.observe(&lane, event);
                paced.observe(event);
            })
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
            name,
            calls,
            pending: AtomicU64::new(0),
            broken_since: Mutex::new(None),
            last_active: Mutex::new(Instant::now()),
            pace,
            rpm: settings.rpm,
            _run: run,
            executor,
        })
    }

    /// How long a call taken in now would wait for its turn: the 429 pause
    /// in force, then the calls ahead of it. Those leave as fast as the
    /// lane's RPM lets them, or as its slots free (one per answer time and
    /// slot, at the concurrency limit in force), whichever is slower.
    pub fn expected_wait(&self) -> Duration {
        let limit = self.executor.concurrency_limit().max(1) as u64;
        let pending = self.pending.load(Ordering::Relaxed);
        // Its place in the queue: 0 once a slot is free.
        let ahead = pending.saturating_sub(limit);
        let by_rpm = match self.rpm.filter(|r| *r > 0) {
            Some(rpm) => Duration::from_secs_f64(ahead as f64 * 60.0 / rpm as f64),
            None => Duration::ZERO,
        };
        // It starts when one more call than are ahead of it has answered.
        let answers_needed = if pending < limit { 0 } else { ahead + 1 };
        let by_slots = self.pace.service().mul_f64(answers_needed as f64 / limit as f64);
        self.pace.pause_left() + by_rpm.max(by_slots)
    }

    /// Takes a call in: it counts as waiting from now, for the calls that
    /// come after it, until its [`Queued`] is dropped.
    pub fn enqueue(self: &Arc<Self>) -> Queued {
        self.pending.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Queued { lane: Arc::clone(self) }
    }

    fn touch(&self) {
        *self.last_active.lock().expect("never poisoned") = Instant::now();
    }

    /// Whether no call is in the lane, and none was for `idle`.
    fn idle_for(&self, idle: Duration) -> bool {
        self.pending.load(Ordering::Relaxed) == 0
            && self.last_active.lock().expect("never poisoned").elapsed() >= idle
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
        if let Outcome::Succeeded(success) = &result.outcome {
            // The answering call's own time: retries and 429 pauses before it
            // are not what a slot takes to free (the pause is counted apart).
            let answered = result.calls.iter().rev().find(|call| call.end == CallEnd::Answered);
            self.lane.pace.answered_in(answered.map_or(success.latency, |call| call.elapsed));
        }
        if matches!(result.outcome, Outcome::NotRun(NotRun::CircuitOpen(_))) {
            let mut broken_since = self.lane.broken_since.lock().expect("never poisoned");
            broken_since.get_or_insert_with(Instant::now);
        }
        result
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.lane.touch();
        self.lane.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The lanes, by key hash, each made on its first call.
pub struct Lanes {
    made: LaneSettings,
    lanes: Mutex<HashMap<String, Arc<OnceCell<Arc<Lane>>>>>,
    /// When idle lanes were last let go: it is looked into once a minute,
    /// not on every call.
    swept: Mutex<Instant>,
}

impl Lanes {
    pub fn new(made: LaneSettings) -> Self {
        Self { made, lanes: Mutex::default(), swept: Mutex::new(Instant::now()) }
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
            let mut swept = self.swept.lock().expect("never poisoned");
            if swept.elapsed() >= SWEEP_EVERY {
                *swept = Instant::now();
                // A lane being made (no value yet) is kept: its first call is on its way.
                lanes.retain(|_, cell| cell.get().is_none_or(|lane| !lane.idle_for(IDLE_LANE)));
            }
            drop(swept);
            let cell = lanes.entry(name.clone()).or_default();
            if cell.get().is_some_and(|lane| lane.cooled_down(self.made.cool_down)) {
                // Its run ends when the last call holding it does.
                *cell = Arc::default();
            }
            Arc::clone(cell)
        };
        let lane = cell
            .get_or_try_init(|| async { Lane::start(&self.made, name, key).await.map(Arc::new) })
            .await?;
        // Active from now, so no sweep lets it go before its call is taken in.
        lane.touch();
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        flags: crate::settings::Flags,
    }

    fn lanes() -> Lanes {
        let args = ["fanout", "--provider", "openai", "--base-url", "http://127.0.0.1:9/v1"];
        let flags = Command::try_parse_from(args).unwrap().flags;
        Lanes::new(LaneSettings {
            settings: Settings::resolve(&flags).unwrap(),
            spending: None,
            cache: None,
            stats: Arc::default(),
            events: LaneEvents::default(),
            cool_down: Duration::from_secs(30),
            shutdown: CancellationToken::new(),
        })
    }

    /// Lanes of keys no call used for a quarter of an hour are let go; one
    /// with a call waiting in it is kept however long ago it began.
    #[tokio::test(start_paused = true)]
    async fn idle_lanes_are_let_go() {
        let lanes = lanes();
        let busy = lanes.of(Some("sk-busy".into())).await.unwrap();
        let waiting = busy.enqueue();
        lanes.of(Some("sk-gone".into())).await.unwrap();
        assert_eq!(lanes.count(), 2);
        tokio::time::advance(IDLE_LANE - Duration::from_secs(1)).await;
        lanes.of(Some("sk-new".into())).await.unwrap();
        assert_eq!(lanes.count(), 3, "none idle long enough yet");
        tokio::time::advance(Duration::from_secs(61)).await;
        lanes.of(Some("sk-new".into())).await.unwrap();
        assert_eq!(lanes.count(), 2, "sk-gone let go; sk-busy and sk-new kept");
        drop(waiting);
        tokio::time::advance(IDLE_LANE + SWEEP_EVERY).await;
        lanes.of(Some("sk-last".into())).await.unwrap();
        assert_eq!(lanes.count(), 1, "sk-busy and sk-new idle now");
    }
}
