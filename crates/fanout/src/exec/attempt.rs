//! One task's life: admission, attempts, hedges, retries, and its outcome.

use std::borrow::Cow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use std::future::Future;
use std::pin::Pin;

use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Shared;
use super::breaker::CircuitBreaker;
use super::check::{self, Verdict};
use super::event::Event;
use super::hedge::Hedger;
use super::history::{CallRole, Epoch, History};
use super::limit::{Permit, SpendLimit};
use super::telemetry::{self, CallSpan};
use crate::provider::{ErrorKind, Progress, Provider, ProviderError, Request, Response, Usage};
use crate::task::{NotRun, Outcome, Success, TaskId, TaskResult, Timeout};

/// Why a run stopped before its tasks were done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    Deadline,
    Cancelled,
}

impl Stop {
    pub(crate) fn not_run(self) -> NotRun {
        match self {
            Self::Deadline => NotRun::Deadline,
            Self::Cancelled => NotRun::Cancelled,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub calls: AtomicU64,
    pub retries: AtomicU64,
    pub rate_limited: AtomicU64,
    pub hedges: AtomicU64,
    pub hedges_won: AtomicU64,
    pub repairs: AtomicU64,
}

/// State of one run, shared by its tasks.
#[derive(Debug)]
pub(crate) struct Run {
    pub exec: Arc<Shared>,
    /// Cancelled when the run must stop; a child of the executor's token.
    pub cancel: CancellationToken,
    /// Cancelled when the run must stop launching and let in-flight tasks finish.
    pub drain: CancellationToken,
    pub stop: OnceLock<Stop>,
    pub breaker: CircuitBreaker,
    pub counters: Counters,
    pub seed: u64,
    /// When the run started: its calls' times are told from it.
    pub epoch: Epoch,
    pub deadline: Option<Instant>,
    /// Whether results keep their call's slot until the receiver drops it.
    pub hold_slots: bool,
    /// The run's telemetry span, the parent of its tasks' spans.
    pub span: tracing::Span,
}

impl Run {
    /// Why the run stopped, if it did; a cancellation is known as soon as the
    /// token is, before the launch loop records it.
    pub(crate) fn stopped(&self) -> Option<Stop> {
        self.stop.get().copied().or_else(|| self.cancel.is_cancelled().then_some(Stop::Cancelled))
    }

    /// What an in-flight task becomes when the run is stopped under it.
    fn interrupted(&self, attempts: u32) -> Outcome {
        match self.stop.get() {
            Some(Stop::Deadline) => Outcome::TimedOut { timeout: Timeout::Deadline, attempts },
            _ => Outcome::Cancelled { attempts },
        }
    }
}

pub(crate) async fn run_task(
    run: Arc<Run>,
    index: usize,
    id: TaskId,
    request: Arc<Request>,
    permit: Permit,
) -> (TaskResult, Option<Permit>) {
    // Empty while the task waits to retry (see `attempt_until_done`).
    let mut slot = Some(permit);
    let call = Call { run: &run, index, id: &id, request: &request, sequence: 0 };
    let history = History::new(run.exec.config.history);
    let span = telemetry::task_span(&run.span, index, &id);
    let outcome = call
        .outcome(&mut slot, &history, run.exec.config.task_timeout, &run.cancel, |attempts| {
            run.interrupted(attempts)
        })
        .instrument(span.clone())
        .await;
    telemetry::task_ended(&span, &outcome);
    run.exec.emit(|| Event::Finished {
        index,
        id: id.clone(),
        status: outcome.status(),
        attempts: outcome.attempts(),
        usage: outcome.usage(),
        latency: outcome.success().map(|s| s.latency),
    });
    // The slot is freed here, unless the receiver frees it once the result is safe.
    let permit = slot.filter(|_| run.hold_slots);
    let request = kept_request(&run.exec.config, request);
    let result = TaskResult { index, id, outcome, calls: history.take(), request };
    run.exec.tell(&result);
    (result, permit)
}

/// The request a result keeps, when the executor keeps them: never a
/// relayed one, whose relay must close with its call (its reader waits for
/// that to end the answer).
pub(crate) fn kept_request(
    config: &super::builder::Config,
    request: Arc<Request>,
) -> Option<Arc<Request>> {
    (config.keep_requests && request.relay.is_none()).then_some(request)
}

/// One model call through the whole call path (attempts, retries, hedges),
/// whoever makes it: a task of a run, or a branch's call.
pub(crate) struct Call<'a> {
    pub run: &'a Run,
    pub index: usize,
    pub id: &'a TaskId,
    pub request: &'a Request,
    /// Which of its task's calls this is (a branch makes many), so that
    /// calls failing together do not retry in step.
    pub sequence: u64,
}

impl Call<'_> {
    /// The call's outcome, its attempts bounded by `limit` in all, and cut
    /// short when `cut` is cancelled (`interrupted` then says what it became).
    /// Each call it makes is logged in `history`, cut ones included.
    pub(crate) async fn outcome(
        &self,
        slot: &mut Option<Permit>,
        history: &History,
        limit: Option<Duration>,
        cut: &CancellationToken,
        interrupted: impl FnOnce(u32) -> Outcome,
    ) -> Outcome {
        // Read by the cancellation branch while the attempts future is dropped.
        let attempts = AtomicU32::new(0);
        let work =
            AssertUnwindSafe(attempt_until_done(self, &attempts, slot, history)).catch_unwind();
        let bounded = async {
            match limit {
                Some(limit) => timeout(limit, work).await.ok(),
                None => Some(work.await),
            }
        };
        tokio::select! {
            biased;
            () = cut.cancelled() => interrupted(attempts.load(Ordering::Acquire)),
            done = bounded => match done {
                Some(Ok(outcome)) => outcome,
                Some(Err(panic)) => {
                    Outcome::failed(panicked(&*panic), attempts.load(Ordering::Acquire))
                }
                None => Outcome::TimedOut {
                    timeout: Timeout::Task,
                    attempts: attempts.load(Ordering::Acquire),
                },
            },
        }
    }
}

fn panicked(panic: &(dyn std::any::Any + Send)) -> ProviderError {
    let message = panic_message(panic);
    ProviderError::new(ErrorKind::Server, format!("the provider panicked: {message}"))
}

/// What a caught panic said.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

async fn attempt_until_done(
    call: &Call<'_>,
    attempts: &AtomicU32,
    slot: &mut Option<Permit>,
    history: &History,
) -> Outcome {
    let Call { run, index, id, request, sequence } = *call;
    let exec = &*run.exec;
    let mut reserved = exec.limits.reservation(&*exec.provider, request);
    if let Err(error) = exec.limits.check_fits(reserved) {
        return Outcome::failed(error, 0);
    }
    // Seeded per task, so a run's jitter does not depend on scheduling.
    let salt = (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ sequence.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    let mut rng = fastrand::Rng::with_seed(run.seed ^ salt);
    let mut first_sent = None;
    let mut attempt = 0;
    // Rate-limit answers are counted apart: they are a wait, not a failure, and
    // must not use up the attempts meant for errors.
    let mut failed_attempts = 0;
    let mut rate_limited_attempts = 0;
    // The request as sent now: a repair or a truncated answer changes it.
    let mut current: Cow<'_, Request> = Cow::Borrowed(request);
    let mut repairs = 0;
    // What answers that failed their check used: the task paid for them too.
    let mut checked_out = Usage::default();
    // Why the last answer was refused, when one was.
    let mut refusal: Option<ProviderError> = None;
    // Why the next attempt is sent.
    let mut role = CallRole::First;
    loop {
        if let Some(cause) = run.breaker.cause() {
            let error = cause.clone();
            return match attempt {
                0 => Outcome::NotRun(NotRun::CircuitOpen(error)),
                _ => Outcome::Failed { error, attempts: attempt, usage: checked_out },
            };
        }
        // Reserved anew for each retry: the output allowance learns meanwhile.
        if attempt > 0 {
            reserved = exec.limits.reservation(&*exec.provider, &current);
        }
        let hold = match &exec.spending {
            Some(spending) => match spending
                .reserve(
                    priced_model(&*exec.provider, &current),
                    SpendLimit::most_spent(&*exec.provider, &current, reserved),
                )
                .await
            {
                Some(hold) => Some(hold),
                None => return budget_spent(refusal, attempt, checked_out),
            },
            None => None,
        };
        // Held until the attempt ends: its place in the shared limits.
        let admitted = exec.limits.admit(reserved).await;
        let launch = admitted.launch;
        attempt += 1;
        attempts.store(attempt, Ordering::Release);
        run.counters.calls.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let first_sent = *first_sent.get_or_insert(sent);
        exec.emit(|| Event::Started { index, id: id.clone(), attempt });
        let generation = exec.limits.concurrency.generation();
        let call = Attempt { run, index, id, request: &current, reserved, attempt, role, history };
        match call.watched().await {
            Ok(answer) => {
                let changed = exec.limits.on_success(
                    &current,
                    reserved,
                    launch,
                    sent,
                    &answer.response,
                    answer.first_sign,
                );
                if let Some(limit) = changed {
                    exec.emit(|| Event::ConcurrencyChanged { limit });
                }
                run.breaker.record_success();
                if let Some(hold) = hold {
                    hold.settle(answer.response.usage);
                }
                if let Some(hedger) = &exec.hedger {
                    hedger.record(answer.first_sign);
                }
                let response = answer.response;
                // Every answer that came is paid for, whether it is kept or refused.
                let mut paid = checked_out;
                paid += response.usage;
                let refused = |error: ProviderError| Outcome::Failed {
                    error,
                    attempts: attempt,
                    usage: paid,
                };
                let accepted = |mut response: Response| {
                    response.usage = paid;
                    let latency = first_sent.elapsed();
                    Outcome::Succeeded(Success { response, latency, attempts: attempt })
                };
                match exec.checker.check(&current, &response) {
                    Verdict::Accept => return accepted(response),
                    Verdict::CutOff => return refused(truncated(&current)),
                    Verdict::BadSchema(message) => {
                        let message = format!("the response schema is {message}");
                        return refused(ProviderError::new(ErrorKind::BadRequest, message));
                    }
                    Verdict::Truncated => {
                        failed_attempts += 1;
                        if failed_attempts >= exec.config.retry.max_attempts {
                            // Out of attempts: the last answer, paid for, stands
                            // (its finish reason says it was cut off).
                            return accepted(response);
                        }
                        let error = truncated(&current);
                        refusal = Some(error.clone());
                        let factor = exec.checker.policy.retry_truncated.unwrap_or(1.0);
                        run.counters.retries.fetch_add(1, Ordering::Relaxed);
                        current = Cow::Owned(check::with_more_room(&current, factor));
                        role = CallRole::Retry;
                        // Asked again at once: the answer came, so nothing needs to wait.
                        let delay = Duration::ZERO;
                        exec.emit(|| Event::Retrying {
                            index,
                            id: id.clone(),
                            attempt,
                            error,
                            delay,
                        });
                    }
                    Verdict::Invalid(errors) => {
                        let message =
                            format!("the answer does not match the JSON Schema: {errors}");
                        let error = ProviderError::new(ErrorKind::InvalidOutput, message);
                        if repairs >= exec.checker.policy.repairs {
                            return refused(error);
                        }
                        repairs += 1;
                        run.counters.repairs.fetch_add(1, Ordering::Relaxed);
                        current = Cow::Owned(check::repair(&current, &response.text, &errors));
                        role = CallRole::Repair;
                        refusal = Some(error.clone());
                        exec.emit(|| Event::Repairing { index, id: id.clone(), attempt, error });
                    }
                }
                // Refused, and asked again: the refused answer was paid for.
                checked_out = paid;
            }
            Err(error) => {
                // Whichever call of the attempt failed last, part of an answer
                // was passed on: the call ends here.
                let error = match current.relay_is_held() {
                    true => error.relayed(),
                    false => error,
                };
                // A failed call is charged nothing, and must not hold the
                // budget while it waits to retry: calls waiting for room would
                // take every slot, and the retry would never get one back.
                // Nor its place in the shared in-flight cap: tasks holding a
                // local slot while they wait for a shared one, and retries
                // holding a shared place while they wait for a local slot,
                // would wait for each other for ever.
                drop(hold);
                drop(admitted);
                let count = if error.is_rate_limited() {
                    run.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                    rate_limited_attempts += 1;
                    rate_limited_attempts
                } else {
                    failed_attempts += 1;
                    failed_attempts
                };
                run.breaker.record_failure(&error);
                let delay = exec.config.retry.delay_after(&error, count, &mut rng);
                let reaction = exec.limits.on_error(&error, launch, generation, delay);
                if let Some(duration) = reaction.paused_for {
                    exec.emit(|| Event::Paused { duration, error: error.clone() });
                }
                if let Some(limit) = reaction.new_limit {
                    exec.emit(|| Event::ConcurrencyChanged { limit });
                }
                let Some(delay) = delay else {
                    return Outcome::Failed { error, attempts: attempt, usage: checked_out };
                };
                run.counters.retries.fetch_add(1, Ordering::Relaxed);
                role = CallRole::Retry;
                let rate_limited = error.is_rate_limited();
                let timed_out = error.is_timeout();
                exec.emit(|| Event::Retrying { index, id: id.clone(), attempt, error, delay });
                if rate_limited {
                    // The shared pause holds every task back; the retry keeps
                    // its slot so it goes out the moment the pause ends.
                    sleep(delay).await;
                } else {
                    // Waiting to retry holds no slot, so a limit that shrank
                    // holds retries back too; the retry then goes ahead of new work.
                    let freed = slot.take();
                    if let (Some(freed), Some(hold)) = (freed, exec.config.attempt_timeout)
                        && timed_out
                        && exec.limits.concurrency.timeouts_are_congestion()
                    {
                        // A queueing server is still computing the abandoned
                        // call: its slot stays taken while it likely is.
                        exec.limits.concurrency.abandon(freed, sent, hold);
                    }
                    sleep(delay).await;
                    *slot = Some(exec.limits.concurrency.acquire_for_retry().await);
                }
            }
        }
    }
}

/// The model a call is priced at: the request's, else the provider's default.
fn priced_model<'a>(provider: &'a dyn Provider, request: &'a Request) -> &'a str {
    request.model.as_deref().or(provider.default_model()).unwrap_or_default()
}

/// A task whose next call the spending limit cannot pay for. Unfinished
/// (a resume with more budget runs it), unless answers it already paid for
/// were refused: then it fails with what it paid, naming why.
fn budget_spent(refusal: Option<ProviderError>, attempts: u32, paid: Usage) -> Outcome {
    match refusal {
        Some(refused) => {
            let message =
                format!("{}; asking again would pass the spending limit", refused.message());
            let error = ProviderError::new(refused.kind(), message);
            Outcome::Failed { error, attempts, usage: paid }
        }
        None => Outcome::NotRun(NotRun::BudgetSpent),
    }
}

fn truncated(request: &Request) -> ProviderError {
    let limit = request.max_tokens.map_or_else(|| "its default".to_owned(), |m| m.to_string());
    ProviderError::new(
        ErrorKind::InvalidOutput,
        format!("the answer was cut off at max_tokens ({limit})"),
    )
}

fn attempt_timed_out(limit: Duration) -> ProviderError {
    let secs = limit.as_secs_f64();
    ProviderError::new(ErrorKind::Timeout, format!("no sign of an answer for {secs:.3}s"))
}

/// A successful attempt, and how soon it first showed life (its first streamed
/// bytes, or the whole answer when it did not stream).
struct Answer {
    response: Response,
    first_sign: Duration,
}

/// One attempt of a task: the call, and a hedge of it if it straggles.
struct Attempt<'a> {
    run: &'a Run,
    index: usize,
    id: &'a TaskId,
    request: &'a Request,
    reserved: u64,
    attempt: u32,
    /// Why the attempt's first call is sent (its hedges are hedges).
    role: CallRole,
    history: &'a History,
}

/// The most calls one attempt may have racing: the primary and two hedges, for
/// when a hedge straggles too (at 2% stragglers, one hedge in fifty does).
const MAX_RACING: usize = 3;

/// The calls of one attempt, racing; each says whether it was a hedge.
type Racing<'a> = FuturesUnordered<Pin<Box<dyn Future<Output = Raced> + Send + 'a>>>;

struct Raced {
    hedge: bool,
    result: Result<Answer, ProviderError>,
}

impl Attempt<'_> {
    /// Sends the attempt and watches it. A call that has shown no life (no
    /// byte yet, or a stream that stopped) for longer than the learned hedging
    /// threshold gets a duplicate, within the budget and every limit — and so
    /// does a duplicate that straggles too, up to [`MAX_RACING`] calls. The
    /// first success wins and the others are dropped, which cancels them. A
    /// call that streams steadily is never hedged or cut, however long its answer.
    async fn watched(&self) -> Result<Answer, ProviderError> {
        let Some(hedger) = &self.run.exec.hedger else {
            return self.logged(&Progress::new(), self.role).await;
        };
        hedger.count_call();
        let primary = Arc::new(Progress::new());
        let mut watched = Some(Arc::clone(&primary));
        let mut racing: Racing<'_> = FuturesUnordered::new();
        racing.push(Box::pin(async move {
            Raced { hedge: false, result: self.logged(&primary, self.role).await }
        }));
        loop {
            let straggler = watched.as_deref().filter(|_| racing.len() < MAX_RACING);
            tokio::select! {
                biased;
                Some(raced) = racing.next() => {
                    if let Some(done) = self.settle(raced, racing.is_empty()) {
                        return done;
                    }
                    continue;
                }
                () = straggles(hedger, straggler) => {}
            }
            // Once a call's bytes are passed on, another cannot take over.
            if self.request.relay_is_held() || !hedger.try_spend() {
                watched = None;
                continue;
            }
            // A hedge is never worth waiting for money: without room now, none.
            let spending = self.run.exec.spending.as_ref();
            let most =
                SpendLimit::most_spent(&*self.run.exec.provider, self.request, self.reserved);
            let model = priced_model(&*self.run.exec.provider, self.request);
            let hold = match spending.map(|s| s.reserve_now(model, most)) {
                Some(None) => {
                    hedger.refund();
                    watched = None;
                    continue;
                }
                // A hedge that loses is cancelled mid-answer, and the
                // provider bills its prompt at least.
                Some(Some(hold)) => Some(hold.charged_if_dropped(Usage::new(most.input_tokens, 0))),
                None => None,
            };
            // The hedge queues for a slot and budget like any call; an answer
            // meanwhile makes it unnecessary.
            let admitted = self.run.exec.limits.admit_extra(self.reserved);
            tokio::pin!(admitted);
            let slot = loop {
                tokio::select! {
                    biased;
                    Some(raced) = racing.next() => {
                        if let Some(done) = self.settle(raced, racing.is_empty()) {
                            hedger.refund();
                            return done;
                        }
                    }
                    slot = &mut admitted => break slot,
                }
            };
            // Bytes may have been passed on while the hedge waited for its slot.
            if self.request.relay_is_held() {
                hedger.refund();
                watched = None;
                continue;
            }
            self.run.counters.hedges.fetch_add(1, Ordering::Relaxed);
            self.run.exec.emit(|| Event::Hedged {
                index: self.index,
                id: self.id.clone(),
                attempt: self.attempt,
            });
            let hedge = Arc::new(Progress::new());
            watched = Some(Arc::clone(&hedge));
            racing.push(Box::pin(async move {
                let (_slot, _hold) = (slot, hold);
                Raced { hedge: true, result: self.logged(&hedge, CallRole::Hedge).await }
            }));
        }
    }

    /// The attempt's result once a call has answered: its success, or its
    /// failure when no other call is left racing (or when it had passed part
    /// of its answer on: the others cannot take over); `None` to wait for
    /// the others.
    fn settle(&self, raced: Raced, last: bool) -> Option<Result<Answer, ProviderError>> {
        match raced.result {
            Ok(answer) => {
                if raced.hedge {
                    self.run.counters.hedges_won.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(answer))
            }
            Err(error) => (last || error.was_relayed()).then_some(Err(error)),
        }
    }

    /// [`Self::bounded`], logged in the task's history and in a telemetry
    /// span (as cancelled, should the call be dropped unfinished).
    async fn logged(&self, progress: &Progress, role: CallRole) -> Result<Answer, ProviderError> {
        let exec = &self.run.exec;
        let content = exec.config.span_content;
        let provider = &*exec.provider;
        let span = CallSpan::start(
            provider.name(),
            provider.default_model(),
            self.request,
            self.attempt,
            role,
            content,
        );
        let log = self.history.start(&self.run.epoch, self.attempt, role, progress);
        let result = self.bounded(progress).instrument(span.span.clone()).await;
        if let Some(log) = log {
            log.ended(result.as_ref().map(|answer| answer.response.usage));
        }
        span.ended(result.as_ref().map(|answer| &answer.response), content);
        result
    }

    /// One call to the provider, cut once it has shown no life for the attempt
    /// timeout, with its first sign of life measured.
    async fn bounded(&self, progress: &Progress) -> Result<Answer, ProviderError> {
        let call = self.run.exec.provider.complete_observed(self.request, progress);
        tokio::pin!(call);
        let limit = self.run.exec.config.attempt_timeout;
        loop {
            let cut_at = limit.map(|l| progress.last_sign_of_life() + l);
            tokio::select! {
                biased;
                result = &mut call => {
                    let first_sign = progress.first_activity().unwrap_or_else(|| progress.sent().elapsed());
                    return result.map(|response| Answer { response, first_sign });
                }
                () = sleep_until_or_never(cut_at) => {
                    if let Some(limit) = limit
                        && Instant::now() >= progress.last_sign_of_life() + limit
                    {
                        let error = attempt_timed_out(limit);
                        // A stream passed on that stopped: the call ends here,
                        // whatever else is racing (it was outrun).
                        let holds = self.request.relay.as_ref().is_some_and(|r| r.is_held_by(progress));
                        return Err(if holds { error.relayed() } else { error });
                    }
                }
            }
        }
    }
}

/// Completes once the call behind `progress` has shown no sign of life for
/// longer than the hedging threshold; never for `None`.
async fn straggles(hedger: &Hedger, progress: Option<&Progress>) {
    let Some(progress) = progress else { return std::future::pending().await };
    loop {
        // Registered before the threshold is read, so a threshold learned
        // meanwhile is not missed.
        let learned = hedger.learned();
        let Some(threshold) = hedger.threshold() else {
            learned.await;
            continue;
        };
        sleep_until(progress.last_sign_of_life() + threshold).await;
        // The threshold and the last sign of life may have moved meanwhile.
        if let Some(threshold) = hedger.threshold()
            && Instant::now() >= progress.last_sign_of_life() + threshold
        {
            return;
        }
    }
}
async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}
