//! One set of limits for every process that calls with one key, kept in Redis:
//! requests and tokens per minute (GCRA on the server's clock), the 429 pause,
//! and a global cap on calls in flight (leased slots that expire when their
//! process dies). Each reservation is one atomic Lua script, so any number of
//! processes on any number of machines reserve against the same state.
//!
//! Where no RPM or TPM is given, the limits the provider states in its
//! rate-limit headers are the shared ones: the first process to read them
//! writes them to Redis ([`SharedLimits::learn`]) and every reservation
//! after that, by any process, is paced to them.
//!
//! What goes into Redis is counters and times under `fanout:limits:SCOPE:`;
//! never a key, a prompt or an answer.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fanout::{Rate, SharedLease, SharedLimits, StatedLimits, async_trait};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

/// What the limits are, shared by every process that uses the same scope.
#[derive(Clone, Debug)]
pub struct LimitsConfig {
    /// Names the shared state: processes with the same scope share limits.
    pub scope: String,
    /// Requests per minute, all processes together; `None`: the provider's,
    /// once it has stated it.
    pub rpm: Option<Rate>,
    /// Tokens per minute, all processes together (reserved before each call,
    /// corrected with the usage reported); `None`: the provider's, once it
    /// has stated it.
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

/// `rate` with a tenth of its burst (at least one, and never all of it) left
/// to the network: calls reserved exactly at the provider's rate arrive with
/// jitter, and without slack in its bucket an early arrival is a 429.
pub fn leave_slack(rate: Rate) -> Rate {
    rate.with_burst(rate.burst - (rate.burst / 10).max(1).min(rate.burst - 1))
}

/// A GCRA bucket's parameters, in microseconds as the scripts take them.
#[derive(Clone, Copy, Debug, PartialEq)]
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
    stated: String,
    unmetered_requests: String,
    unmetered_tokens: String,
}

/// The limits the provider stated, as this process last wrote them to Redis.
#[derive(Debug, Default)]
struct Learned {
    requests: Option<Cell>,
    tokens: Option<Cell>,
    written: Option<tokio::time::Instant>,
}

/// How often unchanged stated limits are written again, and how long Redis
/// keeps them after the last write: limits of a key nobody calls with any
/// more do not stay in Redis for good.
const RESTATE_EVERY: Duration = Duration::from_secs(600);
const STATED_TTL: Duration = Duration::from_secs(3_600);

/// One reservation, as the reserve script made it.
#[derive(Clone, Copy, Debug)]
struct Reservation {
    reserved: bool,
    /// Microseconds until the call may start (or, if not reserved, until
    /// the pause ends).
    wait: u64,
    /// The server's clock, in microseconds.
    now: u64,
    /// The intervals it was reserved at (0.0: that bucket had no limit).
    requests_interval: f64,
    tokens_interval: f64,
}

struct Inner {
    connection: ConnectionManager,
    scripts: Scripts,
    keys: Keys,
    requests: Option<Cell>,
    tokens: Option<Cell>,
    /// The token interval of the latest reservation (`f64` bits; 0.0: none):
    /// what a settlement corrects by when no TPM is given, the stated one.
    tokens_interval: AtomicU64,
    learned: Mutex<Learned>,
    /// Closed once the provider has answered this process, or its first
    /// call has waited [`PROBE_TIME`] for that: until then, and while no limit
    /// is known, one call at a time goes unmetered (see `admit`).
    first_answer: Arc<tokio::sync::Semaphore>,
    /// When the probe ends: `PROBE_TIME` after the first admission began.
    probe_ends: std::sync::OnceLock<tokio::time::Instant>,
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

/// The longest a process admits one call at a time while it waits for its
/// first answer with no limit known (see `admit`): a provider that takes
/// minutes to answer one call must not hold the start back for as long.
const PROBE_TIME: Duration = Duration::from_secs(2);

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
                stated: format!("{prefix}stated"),
                unmetered_requests: format!("{prefix}unmetered:requests"),
                unmetered_tokens: format!("{prefix}unmetered:tokens"),
            },
            requests: config.rpm.map(Cell::of),
            tokens: config.tpm.map(Cell::of),
            tokens_interval: AtomicU64::new(0.0f64.to_bits()),
            learned: Mutex::new(Learned::default()),
            first_answer: Arc::new(tokio::sync::Semaphore::new(1)),
            probe_ends: std::sync::OnceLock::new(),
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
        let reservation = self.inner.reserve(tokens).await.map_err(|e| self.inner.error(&e))?;
        Ok((reservation.reserved, reservation.wait, reservation.now))
    }

    /// Takes a slot of the global cap now, without waiting; `None` when all
    /// are held (or there is no cap). The lease gives it back when dropped.
    pub async fn try_acquire(&self) -> Result<Option<SharedLease>, LimitsError> {
        self.inner.try_acquire().await.map_err(|e| self.inner.error(&e))
    }

    /// [`SharedLimits::settle`], waited for.
    pub async fn settle_now(&self, reserved: u64, used: u64) -> Result<(), LimitsError> {
        let Some(interval) = self.inner.tokens_interval() else { return Ok(()) };
        self.inner.settle(interval, reserved, used).await.map_err(|e| self.inner.error(&e))
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

    async fn reserve(&self, tokens: u64) -> Result<Reservation, RedisError> {
        let mut invocation = self.scripts.reserve.prepare_invoke();
        invocation.key(&self.keys.pause).key(&self.keys.requests).key(&self.keys.tokens);
        invocation.key(&self.keys.stated);
        invocation.key(&self.keys.unmetered_requests).key(&self.keys.unmetered_tokens);
        // What this process learned itself is used at once, not only once
        // Redis has it: the answer that stated it also widens the
        // concurrency limit, and the calls that follow must not go unmetered.
        let learned = {
            let learned = self.learned.lock().unwrap();
            (learned.requests, learned.tokens)
        };
        let cells = [(self.requests.or(learned.0), 1), (self.tokens.or(learned.1), tokens)];
        for (cell, cost) in cells {
            let cell = cell.unwrap_or(Cell { interval: 0.0, burst: 0.0 });
            invocation.arg(cell.interval).arg(cell.burst).arg(cost);
        }
        let (reserved, wait, now, requests_interval, tokens_interval): (i64, i64, i64, f64, f64) =
            invocation.invoke_async(&mut self.connection.clone()).await?;
        let reservation = Reservation {
            reserved: reserved == 1,
            wait: wait.max(0) as u64,
            now: now.max(0) as u64,
            requests_interval,
            tokens_interval,
        };
        if reservation.reserved {
            self.tokens_interval.store(tokens_interval.to_bits(), Ordering::Relaxed);
        }
        Ok(reservation)
    }

    /// The interval tokens are reserved at now: the TPM given, or the one
    /// the provider stated as of the latest reservation.
    fn tokens_interval(&self) -> Option<f64> {
        match self.tokens {
            Some(cell) => Some(cell.interval),
            None => Some(f64::from_bits(self.tokens_interval.load(Ordering::Relaxed)))
                .filter(|interval| *interval > 0.0),
        }
    }

    /// Writes the limits the provider stated where every process reads them,
    /// when they differ from what this process wrote last (or that is old).
    fn learn(self: &Arc<Self>, stated: StatedLimits) {
        self.first_answer.close();
        let stated_cell = |rate: Option<Rate>| rate.map(|rate| Cell::of(leave_slack(rate)));
        let now = tokio::time::Instant::now();
        let mut learned = self.learned.lock().unwrap();
        let requests = stated_cell(stated.requests).or(learned.requests);
        let tokens = stated_cell(stated.tokens).or(learned.tokens);
        let recent = learned.written.is_some_and(|at| now.duration_since(at) < RESTATE_EVERY);
        if recent && (learned.requests, learned.tokens) == (requests, tokens) {
            return;
        }
        *learned = Learned { requests, tokens, written: Some(now) };
        drop(learned);
        let inner = Arc::clone(self);
        self.spawn_correction(async move { inner.state(requests, tokens).await });
    }

    /// Writes stated limits where the reserve script reads them.
    async fn state(&self, requests: Option<Cell>, tokens: Option<Cell>) -> Result<(), RedisError> {
        let mut write = redis::cmd("HSET");
        write.arg(&self.keys.stated);
        for (name, cell) in [("requests", requests), ("tokens", tokens)] {
            if let Some(cell) = cell {
                write.arg(format!("{name}_interval")).arg(cell.interval);
                write.arg(format!("{name}_burst")).arg(cell.burst);
            }
        }
        let mut pipe = redis::pipe();
        pipe.atomic().add_command(write).ignore();
        pipe.cmd("PEXPIRE").arg(&self.keys.stated).arg(STATED_TTL.as_millis() as u64).ignore();
        pipe.query_async::<()>(&mut self.connection.clone()).await
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

    /// With no limit known, every process starting at its full concurrency
    /// at once could overrun the provider before any answer states its
    /// limits. Until this process's first answer (which may state none), or
    /// for [`PROBE_TIME`] at most, its calls are therefore admitted one at a
    /// time; one that is then reserved at no limit holds the returned permit,
    /// keeping the others waiting, until it ends.
    async fn probe(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if self.first_answer.is_closed() {
            return None;
        }
        let ends = *self.probe_ends.get_or_init(|| tokio::time::Instant::now() + PROBE_TIME);
        let permit = Arc::clone(&self.first_answer).acquire_owned();
        match tokio::time::timeout_at(ends, permit).await {
            Ok(permit) => permit.ok(),
            Err(_) => {
                self.first_answer.close();
                None
            }
        }
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

    /// Moves a bucket on by `delta` units (back, when negative) of
    /// `interval` µs.
    async fn correct(&self, key: &str, interval: f64, delta: f64) -> Result<(), RedisError> {
        let mut invocation = self.scripts.settle.key(key);
        invocation.arg(interval).arg(delta);
        invocation.invoke_async::<i64>(&mut self.connection.clone()).await.map(drop)
    }

    async fn settle(&self, interval: f64, reserved: u64, used: u64) -> Result<(), RedisError> {
        self.correct(&self.keys.tokens, interval, used as f64 - reserved as f64).await
    }

    /// Gives back `reservation`, whose call will not start.
    async fn unreserve(&self, reservation: Reservation, tokens: u64) -> Result<(), RedisError> {
        if reservation.requests_interval > 0.0 {
            self.correct(&self.keys.requests, reservation.requests_interval, -1.0).await?;
        }
        if reservation.tokens_interval > 0.0 && tokens > 0 {
            self.correct(&self.keys.tokens, reservation.tokens_interval, -(tokens as f64)).await?;
        }
        Ok(())
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
    reservation: Reservation,
    tokens: u64,
    /// Until the call starts.
    armed: bool,
}

impl Drop for Unreserve {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (inner, reservation, tokens) = (Arc::clone(&self.inner), self.reservation, self.tokens);
        self.inner.spawn_correction(async move { inner.unreserve(reservation, tokens).await });
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
        let mut probe = inner.probe().await;
        loop {
            match inner.reserve(tokens).await {
                Ok(reservation) if reservation.reserved => {
                    inner.reached();
                    // An admission abandoned while it waits for its turn (a
                    // hedge no longer needed, a drain, the deadline) gives
                    // its reservation back for the others.
                    let mut unreserve =
                        Unreserve { inner: Arc::clone(inner), reservation, tokens, armed: true };
                    if reservation.requests_interval > 0.0 || reservation.tokens_interval > 0.0 {
                        probe = None;
                    }
                    if reservation.wait > 0 {
                        tokio::time::sleep(Duration::from_micros(reservation.wait)).await;
                        // A 429 another call met meanwhile holds this one
                        // back too; its turn is kept for when the pause ends.
                        inner.wait_for_pause().await;
                    }
                    unreserve.armed = false;
                    return match probe {
                        Some(probe) => SharedLease::new(move || drop((lease, probe))),
                        None => lease,
                    };
                }
                Ok(paused) => {
                    // Paused: nothing is reserved; ask again when it ends.
                    inner.reached();
                    tokio::time::sleep(Duration::from_micros(paused.wait)).await;
                }
                Err(error) => inner.wait_out(&error, &mut tries).await,
            }
        }
    }

    fn settle(&self, reserved: u64, used: u64) {
        self.inner.first_answer.close();
        // Nothing to correct: no task spawned on the call's path. A call
        // reserved while no TPM was known was counted at its estimate, and
        // charged at it once one was (reserve.lua): it is corrected like any.
        let Some(interval) = self.inner.tokens_interval() else { return };
        if used == reserved {
            return;
        }
        let inner = Arc::clone(&self.inner);
        self.inner.spawn_correction(async move { inner.settle(interval, reserved, used).await });
    }

    fn tokens_per_minute(&self) -> Option<u64> {
        // The TPM given, or the one stated: both are held as an interval.
        self.inner.tokens_interval().map(|interval| (60e6 / interval).round() as u64)
    }

    fn learn(&self, stated: StatedLimits) {
        self.inner.learn(stated);
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
