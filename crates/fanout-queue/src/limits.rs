//! One set of limits for every process that calls with one key, kept in Redis:
//! requests and tokens per minute (GCRA on the server's clock), the 429 pause,
//! and a global cap on calls in flight (leased slots that expire when their
//! process dies). Each reservation is one atomic Lua script, so any number of
//! processes on any number of machines reserve against the same state.
//!
//! What goes into Redis is counters and times under `fanout:limits:SCOPE:`;
//! never a key, a prompt or an answer.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fanout::{Rate, SharedLease, SharedLimits, async_trait};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

/// What the limits are, shared by every process that uses the same scope.
#[derive(Clone, Debug)]
pub struct LimitsConfig {
    /// Names the shared state: processes with the same scope share limits.
    pub scope: String,
    /// Requests per minute, all processes together.
    pub rpm: Option<Rate>,
    /// Tokens per minute, all processes together (reserved before each call,
    /// corrected with the usage reported).
    pub tpm: Option<Rate>,
    /// Calls in flight at once, all processes together.
    pub max_in_flight: Option<usize>,
    /// How long a slot stays taken when its process stops renewing it (dies).
    pub lease_time: Duration,
}

impl LimitsConfig {
    /// No limit yet, in `scope`; leases of 30 s.
    pub fn new(scope: impl Into<String>) -> Self {
        Self {
            scope: scope.into(),
            rpm: None,
            tpm: None,
            max_in_flight: None,
            lease_time: Duration::from_secs(30),
        }
    }
}

/// Why the shared limits cannot be used.
#[derive(Debug)]
pub struct LimitsError {
    message: String,
}

impl fmt::Display for LimitsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LimitsError {}

impl LimitsError {
    pub(crate) fn new(message: String) -> Self {
        Self { message }
    }
}

/// `url` with any password (or user) replaced, for messages.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// A GCRA bucket's parameters, in microseconds as the scripts take them.
#[derive(Clone, Copy, Debug)]
struct Cell {
    /// Microseconds per unit.
    interval: f64,
    /// Burst units times the interval.
    burst: f64,
}

impl Cell {
    fn of(rate: Rate) -> Self {
        let interval = 60_000_000.0 / rate.per_minute.max(1) as f64;
        Self { interval, burst: interval * rate.burst.max(1) as f64 }
    }
}

/// Sent once per outage and once when it ends, to whoever runs the process.
pub type Notices = Arc<dyn Fn(&str) + Send + Sync>;

struct Scripts {
    reserve: Script,
    settle: Script,
    pause: Script,
    pause_left: Script,
    acquire: Script,
    renew: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            reserve: Script::new(include_str!("scripts/reserve.lua")),
            settle: Script::new(include_str!("scripts/settle.lua")),
            pause: Script::new(include_str!("scripts/pause.lua")),
            pause_left: Script::new(include_str!("scripts/pause_left.lua")),
            acquire: Script::new(include_str!("scripts/acquire.lua")),
            renew: Script::new(include_str!("scripts/renew.lua")),
        }
    }
}

struct Keys {
    pause: String,
    requests: String,
    tokens: String,
    leases: String,
}

struct Inner {
    connection: ConnectionManager,
    scripts: Scripts,
    keys: Keys,
    requests: Option<Cell>,
    tokens: Option<Cell>,
    /// The shared TPM as given (the cell holds it as an interval).
    tokens_per_minute: Option<u64>,
    max_in_flight: Option<usize>,
    lease_time: Duration,
    /// This process's part of every lease id.
    holder: String,
    next_lease: AtomicU64,
    /// The leases this process holds, renewed until given back.
    held: Mutex<HashSet<String>>,
    /// Whether Redis is out of reach now (said once per outage).
    down: AtomicBool,
    /// Corrections spawned and not yet done, and a signal when one is.
    pending: std::sync::atomic::AtomicUsize,
    corrected: tokio::sync::Notify,
    notices: Notices,
    location: String,
}

/// Limits shared through Redis; see the module's documentation.
pub struct RedisLimits {
    inner: Arc<Inner>,
    renewal: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for RedisLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimits")
            .field("redis", &self.inner.location)
            .field("scope", &self.inner.keys.pause)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisLimits {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// How long a call waits between two looks at a full in-flight cap, at first
/// and at most.
const SLOT_POLL: Duration = Duration::from_millis(10);
const SLOT_POLL_MAX: Duration = Duration::from_millis(100);

impl RedisLimits {
    /// Connects to Redis at `url` (`redis://host:port/db`) and checks it
    /// answers: an unreachable server is an error here, before any call.
    /// `notices` hears of outages later on (and of their end).
    pub async fn connect(
        url: &str,
        config: LimitsConfig,
        notices: Notices,
    ) -> Result<Self, LimitsError> {
        let location = redacted(url);
        let connection = connect(url).await?;
        let prefix = format!("fanout:limits:{}:", config.scope);
        let inner = Arc::new(Inner {
            connection,
            scripts: Scripts::new(),
            keys: Keys {
                pause: format!("{prefix}pause"),
                requests: format!("{prefix}requests"),
                tokens: format!("{prefix}tokens"),
                leases: format!("{prefix}leases"),
            },
            requests: config.rpm.map(Cell::of),
            tokens: config.tpm.map(Cell::of),
            tokens_per_minute: config.tpm.map(|rate| rate.per_minute),
            max_in_flight: config.max_in_flight,
            lease_time: config.lease_time.max(Duration::from_secs(1)),
            holder: format!("{}-{:016x}", std::process::id(), fastrand::u64(..)),
            next_lease: AtomicU64::new(0),
            held: Mutex::new(HashSet::new()),
            down: AtomicBool::new(false),
            pending: std::sync::atomic::AtomicUsize::new(0),
            corrected: tokio::sync::Notify::new(),
            notices,
            location,
        });
        let renewal = tokio::spawn(renew_leases(Arc::clone(&inner)));
        Ok(Self { inner, renewal })
    }

    /// Reserves one call now, without waiting: `(reserved, wait, now)` as the
    /// reserve script returns them (microseconds, the server's clock).
    /// [`SharedLimits::admit`] waits the `wait` out; tests read the schedule.
    pub async fn reserve(&self, tokens: u64) -> Result<(bool, u64, u64), LimitsError> {
        self.inner.reserve(tokens).await.map_err(|e| self.inner.error(&e))
    }

    /// Takes a slot of the global cap now, without waiting; `None` when all
    /// are held (or there is no cap). The lease gives it back when dropped.
    pub async fn try_acquire(&self) -> Result<Option<SharedLease>, LimitsError> {
        self.inner.try_acquire().await.map_err(|e| self.inner.error(&e))
    }

    /// [`SharedLimits::settle`], waited for.
    pub async fn settle_now(&self, reserved: u64, used: u64) -> Result<(), LimitsError> {
        self.inner.settle(reserved, used).await.map_err(|e| self.inner.error(&e))
    }

    /// [`SharedLimits::pause`], waited for.
    pub async fn pause_now(&self, wait: Duration) -> Result<(), LimitsError> {
        self.inner.pause(wait).await.map_err(|e| self.inner.error(&e))
    }
}

/// A Redis error as a person reads it.
/// A reconnecting connection to `url`, checked with a PING: an unreachable
/// Redis is an error now, before any work, naming the address without its password.
pub(crate) async fn connect(url: &str) -> Result<ConnectionManager, LimitsError> {
    let location = redacted(url);
    let failed = |e: RedisError| LimitsError {
        message: format!("cannot reach Redis at {location}: {}", described(&e)),
    };
    let client = redis::Client::open(url).map_err(|e| LimitsError {
        message: format!("{location} is not a Redis address: {}", described(&e)),
    })?;
    let settings = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(1));
    let mut connection =
        ConnectionManager::new_with_config(client, settings).await.map_err(failed)?;
    redis::cmd("PING").query_async::<String>(&mut connection).await.map_err(failed)?;
    Ok(connection)
}

pub(crate) fn described(error: &RedisError) -> String {
    if error.is_connection_refusal() {
        "connection refused".into()
    } else if error.is_timeout() {
        "no answer in time".into()
    } else {
        error.to_string()
    }
}

impl Inner {
    fn error(&self, error: &RedisError) -> LimitsError {
        LimitsError { message: format!("Redis at {}: {}", self.location, described(error)) }
    }

    async fn reserve(&self, tokens: u64) -> Result<(bool, u64, u64), RedisError> {
        let mut invocation = self.scripts.reserve.prepare_invoke();
        invocation.key(&self.keys.pause).key(&self.keys.requests).key(&self.keys.tokens);
        for (cell, cost) in [(self.requests, 1), (self.tokens, tokens)] {
            let cell = cell.unwrap_or(Cell { interval: 0.0, burst: 0.0 });
            invocation.arg(cell.interval).arg(cell.burst).arg(cost);
        }
        let (reserved, wait, now): (i64, i64, i64) =
            invocation.invoke_async(&mut self.connection.clone()).await?;
        Ok((reserved == 1, wait.max(0) as u64, now.max(0) as u64))
    }

    async fn try_acquire(self: &Arc<Self>) -> Result<Option<SharedLease>, RedisError> {
        let Some(cap) = self.max_in_flight else { return Ok(None) };
        let id = format!("{}:{}", self.holder, self.next_lease.fetch_add(1, Ordering::Relaxed));
        // Held (renewed, and given back if this is abandoned) from before the
        // script runs: a wait dropped after Redis took the slot, before its
        // answer came, must not leave the slot taken until the lease expires.
        self.held.lock().unwrap().insert(id.clone());
        let mut pending = PendingLease { inner: Some(Arc::clone(self)), id: id.clone() };
        let taken: i64 = self
            .scripts
            .acquire
            .key(&self.keys.leases)
            .arg(cap)
            .arg(self.lease_time.as_micros() as u64)
            .arg(&id)
            .invoke_async(&mut self.connection.clone())
            .await?;
        let inner = pending.inner.take().expect("taken once");
        if taken != 1 {
            inner.held.lock().unwrap().remove(&id);
            return Ok(None);
        }
        Ok(Some(SharedLease::new(move || inner.release(id))))
    }

    /// Waits out the shared pause, if one is on; an unreachable Redis (said
    /// by the next reservation) lets the call go.
    async fn wait_for_pause(&self) {
        loop {
            let left: Result<i64, _> = self
                .scripts
                .pause_left
                .key(&self.keys.pause)
                .invoke_async(&mut self.connection.clone())
                .await;
            match left {
                Ok(left) if left > 0 => {
                    tokio::time::sleep(Duration::from_micros(left as u64)).await
                }
                _ => return,
            }
        }
    }

    /// Moves a bucket on by `delta` units (back, when negative).
    async fn correct(&self, key: &str, cell: Cell, delta: f64) -> Result<(), RedisError> {
        let mut invocation = self.scripts.settle.key(key);
        invocation.arg(cell.interval).arg(delta);
        invocation.invoke_async::<i64>(&mut self.connection.clone()).await.map(drop)
    }

    async fn settle(&self, reserved: u64, used: u64) -> Result<(), RedisError> {
        let Some(cell) = self.tokens else { return Ok(()) };
        self.correct(&self.keys.tokens, cell, used as f64 - reserved as f64).await
    }

    /// Gives back a reservation whose call will not start.
    async fn unreserve(&self, tokens: u64) -> Result<(), RedisError> {
        if let Some(cell) = self.requests {
            self.correct(&self.keys.requests, cell, -1.0).await?;
        }
        match self.tokens {
            Some(cell) if tokens > 0 => {
                self.correct(&self.keys.tokens, cell, -(tokens as f64)).await
            }
            _ => Ok(()),
        }
    }

    async fn pause(&self, wait: Duration) -> Result<(), RedisError> {
        let mut invocation = self.scripts.pause.key(&self.keys.pause);
        invocation.arg(wait.as_micros() as u64);
        invocation.invoke_async::<i64>(&mut self.connection.clone()).await.map(drop)
    }

    /// Gives a slot back: at once where a runtime is at hand, else when its
    /// lease runs out.
    fn release(self: Arc<Self>, id: String) {
        self.held.lock().unwrap().remove(&id);
        let inner = Arc::clone(&self);
        self.spawn_correction(async move {
            let mut connection = inner.connection.clone();
            redis::cmd("ZREM")
                .arg(&inner.keys.leases)
                .arg(&id)
                .query_async::<i64>(&mut connection)
                .await
                .map(drop)
        });
    }

    /// Runs a correction (a slot given back, a settlement, a pause) that
    /// nobody waits for, counted until it is done so that [`SharedLimits::close`]
    /// can wait for it. One that cannot be sent is lost: the shared budget then
    /// errs on the provider's side (a refund not given back, a slot held until
    /// its lease runs out), or the others meet a 429 of their own and pause.
    fn spawn_correction(
        self: &Arc<Self>,
        correction: impl std::future::Future<Output = Result<(), RedisError>> + Send + 'static,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        self.pending.fetch_add(1, Ordering::AcqRel);
        let inner = Arc::clone(self);
        runtime.spawn(async move {
            let _ = correction.await;
            inner.pending.fetch_sub(1, Ordering::AcqRel);
            inner.corrected.notify_waiters();
        });
    }

    /// Says once that Redis is out of reach, and waits a little before the
    /// next try: no call starts while the limits cannot be kept.
    async fn wait_out(&self, error: &RedisError, tries: &mut u32) {
        if !self.down.swap(true, Ordering::Relaxed) {
            (self.notices)(&format!(
                "Redis at {} is out of reach ({}): no new calls until it is back",
                self.location,
                described(error)
            ));
        }
        let backoff = Duration::from_millis(100 << (*tries).min(4));
        *tries += 1;
        tokio::time::sleep(backoff).await;
    }

    fn reached(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            (self.notices)(&format!("Redis at {} is back: calls go on", self.location));
        }
    }
}

/// A slot being taken: given back if the wait for Redis's answer is dropped.
struct PendingLease {
    inner: Option<Arc<Inner>>,
    id: String,
}

impl Drop for PendingLease {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.release(std::mem::take(&mut self.id));
        }
    }
}

/// A reservation to give back unless its call starts (see `admit`).
struct Unreserve {
    inner: Arc<Inner>,
    tokens: u64,
    /// Until the call starts.
    armed: bool,
}

impl Drop for Unreserve {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (inner, tokens) = (Arc::clone(&self.inner), self.tokens);
        self.inner.spawn_correction(async move { inner.unreserve(tokens).await });
    }
}

/// Renews this process's leases a few times per lease time, so they
/// outlive it by at most one lease time.
async fn renew_leases(inner: Arc<Inner>) {
    let every = inner.lease_time / 3;
    loop {
        tokio::time::sleep(every).await;
        let held: Vec<String> = inner.held.lock().unwrap().iter().cloned().collect();
        if held.is_empty() {
            continue;
        }
        let mut invocation = inner.scripts.renew.key(&inner.keys.leases);
        invocation.arg(inner.lease_time.as_micros() as u64);
        for id in &held {
            invocation.arg(id);
        }
        let _: Result<i64, _> = invocation.invoke_async(&mut inner.connection.clone()).await;
    }
}

#[async_trait]
impl SharedLimits for RedisLimits {
    async fn admit(&self, tokens: u64) -> SharedLease {
        let inner = &self.inner;
        let mut tries = 0;
        let mut poll = SLOT_POLL;
        // A slot first: a call that holds rate budget should not then queue
        // for a slot. Taken as a lease at once, so an abandoned wait gives it back.
        let lease = loop {
            match inner.try_acquire().await {
                Ok(Some(lease)) => break lease,
                Ok(None) if inner.max_in_flight.is_none() => break SharedLease::none(),
                Ok(None) => {
                    inner.reached();
                    // Jittered, so waiting processes do not ask in lockstep,
                    // and slower while the cap stays full, so many waiters
                    // do not keep Redis busy asking.
                    tokio::time::sleep(poll.mul_f64(0.5 + fastrand::f64())).await;
                    poll = (poll * 3 / 2).min(SLOT_POLL_MAX);
                }
                Err(error) => inner.wait_out(&error, &mut tries).await,
            }
        };
        loop {
            match inner.reserve(tokens).await {
                Ok((true, wait, _)) => {
                    inner.reached();
                    // An admission abandoned while it waits for its turn (a
                    // hedge no longer needed, a drain, the deadline) gives
                    // its reservation back for the others.
                    let mut unreserve = Unreserve { inner: Arc::clone(inner), tokens, armed: true };
                    if wait > 0 {
                        tokio::time::sleep(Duration::from_micros(wait)).await;
                        // A 429 another call met meanwhile holds this one
                        // back too; its turn is kept for when the pause ends.
                        inner.wait_for_pause().await;
                    }
                    unreserve.armed = false;
                    return lease;
                }
                Ok((false, wait, _)) => {
                    // Paused: nothing is reserved; ask again when it ends.
                    inner.reached();
                    tokio::time::sleep(Duration::from_micros(wait)).await;
                }
                Err(error) => inner.wait_out(&error, &mut tries).await,
            }
        }
    }

    fn settle(&self, reserved: u64, used: u64) {
        // Nothing to correct: no task spawned on the call's path.
        if used == reserved || self.inner.tokens.is_none() {
            return;
        }
        let inner = Arc::clone(&self.inner);
        self.inner.spawn_correction(async move { inner.settle(reserved, used).await });
    }

    fn tokens_per_minute(&self) -> Option<u64> {
        self.inner.tokens_per_minute
    }

    fn pause(&self, wait: Duration) {
        let inner = Arc::clone(&self.inner);
        self.inner.spawn_correction(async move { inner.pause(wait).await });
    }

    async fn close(&self) {
        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        loop {
            let corrected = self.inner.corrected.notified();
            if self.inner.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, corrected).await.is_err() {
                return;
            }
        }
    }
}

/// The longest [`SharedLimits::close`] waits for corrections still on their way.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
