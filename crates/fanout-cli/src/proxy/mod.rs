//! `fanout proxy`: an OpenAI- or Anthropic-compatible endpoint on this
//! machine that sends every client's calls through fanout's call path.
//!
//! Point `OPENAI_BASE_URL` (or `ANTHROPIC_BASE_URL`) at it and any program
//! gets one concurrency cap, RPM and TPM for all its calls together, the
//! shared 429 pause, retries, hedging and the circuit breaker, and a record of
//! every call in the store. A client's body goes upstream exactly as it came
//! and the upstream's answer comes back exactly as it was sent, a streamed
//! one event by event as it arrives ([`fanout::Relay`]): until its first
//! bytes a call is retried and hedged like any; after them it is committed,
//! and should it break off, the client gets an error event, never the
//! answer twice. An upstream error comes back as the upstream sent it.
//!
//! A call that would exceed a limit waits its turn rather than being refused;
//! only one whose expected wait (the 429 pause in force, then the calls ahead
//! of it at the lane's RPM or answer rate) would pass `--max-queue` gets a
//! 429, told in `Retry-After` when the queue will be short enough.
//!
//! Each call is costed at the price of the model its client names, and
//! `--budget` / `--max-total-tokens` bound the whole proxy run, every key and
//! model together, through one spending limit its lanes share.

mod lanes;
mod records;
mod stats;
mod wire;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fanout::prices::PriceTable;
use fanout::{
    CancellationToken, NotRun, Outcome, Price, Relay, Relayed, Request, SharedSpending, SpendLimit,
    TaskId, TaskResult, Timeout, Usage,
};
use fanout_store::Record;
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio_util::sync::DropGuard;
use tokio_util::task::TaskTracker;

use crate::Refusal;
use crate::fingerprint::sha256;
use crate::record::to_record;
use crate::settings::{self, Flags, ProviderKind, Settings};
use lanes::{LaneSettings, Lanes};
use records::{LaneEvents, Records, WriteError};
use stats::{Refused, Stats};
pub use wire::Api;
use wire::ErrorAnswer;

/// The largest client body taken: requests with images inline run to megabytes.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

#[derive(clap::Args, Debug)]
pub struct ProxyArgs {
    /// Address to listen on; anything but loopback needs --client-token
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: SocketAddr,
    /// Clients must send this token (as their API key); the proxy then calls
    /// upstream with its own key, from the provider's key variable
    #[arg(long, env = "FANOUT_PROXY_TOKEN", hide_env_values = true)]
    client_token: Option<String>,
    /// Seconds a call may wait for its turn before the client gets a 429
    #[arg(long, default_value_t = 60.0)]
    max_queue: f64,
    /// The job the calls are recorded in (a header `X-Fanout-Job` names
    /// another per request) [default: proxy-YYYYMMDD-HHMMSS]
    #[arg(long)]
    job: Option<String>,
    /// Answer identical requests from the store (a request's `X-Fanout-Sample`
    /// header keeps samples of one prompt apart)
    #[arg(long)]
    cache: bool,
    /// Seconds a key's calls are refused at once after its answers showed they
    /// cannot succeed (a bad key, an unknown model, no quota); then tried anew
    #[arg(long, default_value_t = 30.0)]
    cool_down: f64,
}

/// What every request handler shares.
struct Proxy {
    api: Api,
    /// The client token's SHA-256: keys are compared by their hashes, so
    /// the time taken says nothing of the token.
    client_token_hash: Option<String>,
    max_queue: Duration,
    /// The most a call may take, queue and every attempt together.
    call_limit: Duration,
    job: String,
    lanes: Lanes,
    records: Records,
    stats: Arc<Stats>,
    prices: Arc<Prices>,
    /// The spending limit all calls draw on, with `--budget` or `--max-total-tokens`.
    spending: Option<SharedSpending>,
    budget: Option<f64>,
    max_total_tokens: Option<u64>,
    /// The calls running, each in its own task: the proxy's stop waits for
    /// them (a client that went away after its answer's last event leaves
    /// its call to finish and be recorded).
    calls: TaskTracker,
}

/// The proxy's one spending limit, all keys and models together: money at
/// each call's own price, tokens, or both.
fn spend_limit(settings: &Settings, prices: &Arc<Prices>) -> Option<SharedSpending> {
    let mut limit = SpendLimit::default();
    if let Some(budget) = settings.budget {
        let prices = Arc::clone(prices);
        let price_of = move |model: &str| prices.price(Some(model).filter(|m| !m.is_empty()));
        limit = limit.with_max_cost_per_model(budget, Arc::new(price_of));
    }
    if let Some(tokens) = settings.max_total_tokens {
        limit = limit.with_max_tokens(tokens);
    }
    (settings.budget.is_some() || settings.max_total_tokens.is_some()).then(|| limit.shared())
}

/// What a call costs. Clients name their own models, so each call is priced
/// at its model's price from the built-in table; a price given as flags or
/// profile keys (`--price-in`, `--price-out`) is taken for every call instead.
/// The model is the one the request names (else the proxy's `--model`), as
/// the spending limit counts it before the call is sent.
struct Prices {
    given: Option<Price>,
    default_model: String,
    table: &'static PriceTable,
}

impl Prices {
    fn new(settings: &Settings) -> Self {
        let given = settings.price.filter(|_| settings.price_given);
        Self { given, default_model: settings.model.clone(), table: PriceTable::builtin() }
    }

    /// The price of a call of `model` (`None`: the proxy's); `None` when it has none.
    fn price(&self, model: Option<&str>) -> Option<Price> {
        let model = model.unwrap_or(&self.default_model);
        self.given.or_else(|| self.table.lookup(model).map(|m| m.price))
    }

    /// The cost of `usage` spent by a call of `model` (as for [`Self::price`]).
    fn cost(&self, model: Option<&str>, usage: Usage) -> Option<f64> {
        Some(self.price(model)?.cost(usage))
    }
}

pub async fn command(flags: &Flags, args: ProxyArgs) -> Result<ExitCode> {
    let settings = Settings::resolve(flags).map_err(Refusal)?;
    let api = match settings.provider {
        ProviderKind::Openai => Api::OpenAi,
        ProviderKind::Anthropic => Api::Anthropic,
        _ => {
            return Err(Refusal(anyhow::anyhow!(
                "fanout proxy forwards to an HTTP API: give --provider openai or --provider anthropic"
            ))
            .into());
        }
    };
    check_listen(&args).map_err(Refusal)?;
    for (flag, seconds) in [("--max-queue", args.max_queue), ("--cool-down", args.cool_down)] {
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(Refusal(anyhow::anyhow!("{flag} must be seconds, not {seconds}")).into());
        }
    }
    if args.client_token.is_some() && settings::env(&settings.api_key_env).is_none() {
        return Err(Refusal(anyhow::anyhow!(
            "with --client-token the proxy calls upstream with its own key: set {}",
            settings.api_key_env
        ))
        .into());
    }
    let store = flags.store.clone().unwrap_or_else(settings::default_store);
    let job = args.job.clone().unwrap_or_else(default_job);
    let shutdown = fanout::CancellationToken::new();
    let stats = Arc::new(Stats::default());
    let prices = Arc::new(Prices::new(&settings));
    let spending = spend_limit(&settings, &prices);
    let lane_events = LaneEvents::default();
    let lane_settings = LaneSettings {
        // Every lane draws on the proxy's one spending limit, not one of its own.
        settings: Settings { budget: None, max_total_tokens: None, ..settings.clone() },
        spending: spending.clone(),
        cache: args.cache.then(|| store.clone()),
        stats: Arc::clone(&stats),
        events: lane_events.clone(),
        cool_down: Duration::from_secs_f64(args.cool_down),
        shutdown: shutdown.clone(),
    };
    let recorded = serde_json::json!({"proxy": {
        "provider": format!("{:?}", settings.provider).to_lowercase(),
        "base_url": settings.base_url.as_deref().map(without_credentials),
        "model": settings.model,
        // Each record carries its own cost; this is the price given for all, if one was.
        "price": prices.given,
        "priced": "per call",
    }});
    let proxy = Arc::new(Proxy {
        api,
        client_token_hash: args.client_token.as_deref().map(|t| sha256(t.as_bytes())),
        max_queue: Duration::from_secs_f64(args.max_queue),
        call_limit: Duration::from_secs_f64(
            args.max_queue + settings.attempt_timeout * f64::from(settings.retries + 1),
        ),
        job: job.clone(),
        lanes: Lanes::new(lane_settings),
        records: Records::start(&store, recorded, lane_events, settings.concurrency)?,
        stats,
        prices,
        spending,
        budget: settings.budget,
        max_total_tokens: settings.max_total_tokens,
        calls: TaskTracker::new(),
    });
    let app = Router::new()
        .route(api.path(), post(complete))
        .route("/fanout/stats", get(stats_of))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Arc::clone(&proxy));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    eprintln!(
        "fanout proxy: http://{address}{} -> {}, recording in job `{job}` of {}",
        api.path(),
        settings.base_url.as_deref().map_or("the vendor's API".into(), without_credentials),
        store.display()
    );
    // Ctrl-C: no new connection is taken, the calls in flight finish and are
    // recorded, then the lanes stop.
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!(
                "fanout proxy: stopping; the calls in flight finish and are recorded (Ctrl-C again: now)"
            );
            tokio::spawn(async {
                let _ = tokio::signal::ctrl_c().await;
                // Every finished call is recorded already; those in flight are not finished.
                std::process::exit(4);
            });
        })
        .await?;
    proxy.calls.close();
    proxy.calls.wait().await;
    shutdown.cancel();
    proxy.records.finish().await;
    Ok(ExitCode::SUCCESS)
}

/// A URL without the user and password it may carry (`https://user:key@host`).
fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host_start = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(host_start);
            let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_owned(),
    }
}

fn check_listen(args: &ProxyArgs) -> Result<()> {
    if !args.listen.ip().is_loopback() && args.client_token.is_none() {
        bail!(
            "listening on {} lets other machines use your keys: give --client-token (or listen on 127.0.0.1)",
            args.listen
        );
    }
    if args.client_token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        bail!("--client-token must not be empty");
    }
    Ok(())
}

/// `proxy-20261201-200725`: the time the proxy started, in UTC.
fn default_job() -> String {
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let digits: String = stamp.chars().filter(|c| c.is_ascii_digit() || *c == 'T').collect();
    format!("proxy-{}", digits.replace('T', "-"))
}

/// Whether a client may call, and with whose key.
enum Admission {
    /// No client token is set: the client's own key goes upstream.
    ClientKey,
    /// The client sent the token: the proxy's key goes upstream.
    OwnKey,
    Refused,
}

impl Proxy {
    fn admits(&self, client_key: Option<&str>) -> Admission {
        let Some(token_hash) = &self.client_token_hash else { return Admission::ClientKey };
        match client_key.is_some_and(|key| sha256(key.as_bytes()) == *token_hash) {
            true => Admission::OwnKey,
            false => Admission::Refused,
        }
    }
}

/// One client call: checked, read, sent through its key's lane, recorded,
/// and answered in the API's own shape.
async fn complete(
    State(proxy): State<Arc<Proxy>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let api = proxy.api;
    proxy.stats.arrived();
    let refuse = |why: Refused, status: StatusCode, message: &str| {
        proxy.stats.refused(why);
        api_error(api, status, message)
    };
    // Refused in the API's shape, as any bad body is (axum's own is plain text).
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let message = format!("the body cannot be read: {}", rejection.body_text());
            let mut response = refuse(Refused::BadRequest, rejection.status(), &message);
            // What is left of the body was not read, so the connection cannot
            // carry another request: the client is told, rather than finding
            // out when its next request on it fails.
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    let client_key = api.client_key(&headers);
    let own_key = match proxy.admits(client_key.as_deref()) {
        // The proxy's own key (from its environment) goes upstream.
        Admission::OwnKey => true,
        Admission::Refused => {
            let message = "this proxy needs its client token as the API key";
            return refuse(Refused::Unauthorized, StatusCode::UNAUTHORIZED, message);
        }
        Admission::ClientKey => false,
    };
    let (mut request, streams) = match api.read(&body) {
        Ok(read) => read,
        Err(message) => return refuse(Refused::BadRequest, StatusCode::BAD_REQUEST, &message),
    };
    if proxy.budget.is_some() && proxy.prices.price(request.model.as_deref()).is_none() {
        let model = request.model.as_deref().unwrap_or(&proxy.prices.default_model);
        let message = format!(
            "the proxy keeps a --budget and knows no price for model `{model}`, so it cannot count the call (--price-in and --price-out set one price for every model)"
        );
        return refuse(Refused::BadRequest, StatusCode::BAD_REQUEST, &message);
    }
    request.headers = api.forwarded_headers(&headers);
    request.sample_index =
        header_text(&headers, "x-fanout-sample").and_then(|s| s.parse().ok()).unwrap_or(0);
    let job = header_text(&headers, "x-fanout-job").unwrap_or(&proxy.job).to_owned();
    let lane = if own_key { proxy.lanes.own().await } else { proxy.lanes.of(client_key).await };
    let lane = match lane {
        Ok(lane) => lane,
        Err(error) => {
            let message = format!("the proxy cannot call upstream: {error:#}");
            return api_error(api, StatusCode::INTERNAL_SERVER_ERROR, &message);
        }
    };
    let wait = lane.expected_wait();
    if wait > proxy.max_queue {
        proxy.stats.refused(Refused::QueueFull);
        let message =
            format!("the queue is {:.0} s long, more than --max-queue", wait.as_secs_f64());
        let retry_after = Some(wait - proxy.max_queue);
        return error_response(&ErrorAnswer { retry_after, ..api.error(429, &message) });
    }
    let queued = lane.enqueue();
    match proxy.records.check(&job).await {
        Ok(()) => {}
        Err(WriteError::NotTheProxys(why)) => {
            return refuse(Refused::BadRequest, StatusCode::BAD_REQUEST, &why);
        }
        Err(WriteError::Store(why)) => {
            let message = format!("the proxy cannot record calls now: {why}");
            return api_error(api, StatusCode::SERVICE_UNAVAILABLE, &message);
        }
    }
    let mut relayed = None;
    if streams {
        let (relay, reader) = Relay::new();
        request.relay = Some(relay);
        relayed = Some(reader);
    }
    // The call runs on its own, so that it is recorded however it ends; the
    // client going away (this handler, or its answer's body, dropped) cancels it.
    let cancel = CancellationToken::new();
    let (done, mut finished) = oneshot::channel();
    let id = TaskId::from(short_hash(&body));
    let client = Client { cancel: cancel.clone(), has_the_end: Arc::default() };
    let has_the_end = Arc::clone(&client.has_the_end);
    let recorded = Recorded { job, id, lane: lane.name.clone() };
    proxy.calls.spawn(call(Arc::clone(&proxy), queued, request, recorded, client, done));
    let cancel_if_dropped = cancel.drop_guard();
    let first_bytes = async {
        match relayed.as_mut() {
            Some(reader) => reader.next().await,
            None => None,
        }
    };
    tokio::select! {
        biased;
        // A relayed chunk is there before the call's outcome is.
        Some(first) = first_bytes => {
            let relayed = relayed.expect("bytes came through it");
            let to_client = ToClient { api, has_the_end, _cancel_if_dropped: cancel_if_dropped };
            streamed(first, relayed, finished, to_client)
        }
        outcome = &mut finished => {
            let outcome = outcome.unwrap_or(Outcome::Cancelled { attempts: 0 });
            answer(api, outcome, streams)
        }
    }
}

/// Where a call's record goes, and what it is known by.
struct Recorded {
    job: String,
    /// A hash of what was asked: the same request twice is the same id.
    id: TaskId,
    /// The lane the call goes through.
    lane: String,
}

/// What a call knows of its client.
struct Client {
    /// Cancelled when the client goes away.
    cancel: CancellationToken,
    /// Set once the stream's last event was passed on to the client.
    has_the_end: Arc<AtomicBool>,
}

/// Sends one client call through its lane, records it, then gives its outcome.
async fn call(
    proxy: Arc<Proxy>,
    queued: lanes::Queued,
    request: Request,
    recorded: Recorded,
    client: Client,
    done: oneshot::Sender<Outcome>,
) {
    let cancel = &client.cancel;
    let in_flight = proxy.stats.started();
    let started = Instant::now();
    let asked_model = request.model.clone();
    // However the upstream behaves (429s are retried without end), a client
    // gets an answer within its queue time and every attempt's; one whose
    // stream is being passed on is cut only by the attempt timeout (no byte
    // for that long), never while it streams.
    let relay = request.relay.clone();
    let too_long = async {
        tokio::time::sleep(proxy.call_limit).await;
        if relay.as_ref().is_some_and(Relay::is_held) {
            std::future::pending::<()>().await;
        }
    };
    // A client that closes once it has the stream's last event (as SDKs
    // do) has the whole answer: only the call's bookkeeping is left, and the
    // call is recorded as answered.
    let client_gone = async {
        cancel.cancelled().await;
        if client.has_the_end.load(Ordering::Acquire) {
            std::future::pending::<()>().await;
        }
    };
    let (outcome, calls) = tokio::select! {
        biased;
        () = client_gone => (Outcome::Cancelled { attempts: 0 }, Vec::new()),
        result = queued.complete(request) => (result.outcome, result.calls),
        () = too_long => (Outcome::TimedOut { timeout: Timeout::Task, attempts: 0 }, Vec::new()),
    };
    let cost = proxy.prices.cost(asked_model.as_deref(), outcome.usage());
    proxy.stats.ended(&outcome, cost);
    drop((queued, in_flight));
    let record = match &outcome {
        Outcome::Cancelled { .. } => Some(Record {
            task_id: recorded.id.to_string(),
            status: "cancelled".into(),
            error_message: Some(match cancel.is_cancelled() {
                true => "the client went away before its answer".into(),
                false => "the proxy stopped before its answer".into(),
            }),
            finished_at: fanout_store::now(),
            ..Record::default()
        }),
        _ => {
            let mut result = TaskResult::new(0, recorded.id, outcome.clone());
            result.calls = calls;
            to_record(&result)
        }
    };
    if let Some(mut record) = record {
        // As the client saw it: its wait for a turn included.
        record.latency_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        record.cost = cost;
        if let Err(error) = proxy.records.write(&recorded.job, &recorded.lane, record).await {
            eprintln!("fanout proxy: a call's record was not saved: {error}");
        }
    }
    let _ = done.send(outcome);
}

/// The streaming client's side of a call.
struct ToClient {
    api: Api,
    /// Set once the stream's last event is passed on.
    has_the_end: Arc<AtomicBool>,
    /// Cancels the call if the client goes away first (held, never read).
    _cancel_if_dropped: DropGuard,
}

impl ToClient {
    /// Passes `bytes` on, noting whether they end the stream.
    fn pass(&self, bytes: Bytes) -> Bytes {
        if self.api.ends_stream(&bytes) {
            self.has_the_end.store(true, Ordering::Release);
        }
        bytes
    }
}

/// A streamed answer passed on as it arrives; should the call fail after its
/// first bytes, it ends with an error event in the API's shape (unless the
/// upstream's own error event was passed on). It ends once the call is recorded.
fn streamed(
    first: Bytes,
    relayed: Relayed,
    finished: oneshot::Receiver<Outcome>,
    to_client: ToClient,
) -> Response {
    let api = to_client.api;
    let request_id = relayed.request_id().and_then(|id| HeaderValue::from_str(id).ok());
    let first = to_client.pass(first);
    let rest = futures_util::stream::unfold(
        (relayed, Some(finished), to_client),
        move |(mut relayed, finished, to_client)| async move {
            let mut finished = finished?;
            tokio::select! {
                biased;
                Some(bytes) = relayed.next() => {
                    let bytes = to_client.pass(bytes);
                    Some((bytes, (relayed, Some(finished), to_client)))
                }
                outcome = &mut finished => {
                    // Bytes passed on just before the outcome came go first.
                    let mut tail: Vec<Bytes> = std::iter::from_fn(|| relayed.try_next()).collect();
                    let failure = match outcome {
                        Ok(outcome) if told_in_the_stream(&outcome) => None,
                        Ok(outcome) => failure_of(api, &outcome),
                        // The call's task ended without an outcome (a panic).
                        Err(_) => Some(api.error(503, "the proxy lost the call")),
                    };
                    tail.extend(failure.map(|failure| api.stream_event(&failure)));
                    let tail = Bytes::from(tail.concat());
                    (!tail.is_empty()).then_some((tail, (relayed, None, to_client)))
                }
            }
        },
    );
    let chunks = futures_util::stream::once(std::future::ready(first)).chain(rest);
    let body = axum::body::Body::from_stream(chunks.map(Ok::<_, std::convert::Infallible>));
    let response = ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response();
    with_request_id(api, response, request_id)
}

/// Whether a failure is the upstream's own error event, already passed on in
/// the stream (an error inside a 200 answer has a body and no status).
fn told_in_the_stream(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Failed { error, .. } if error.status().is_none() && error.body().is_some())
}

fn with_request_id(api: Api, mut response: Response, id: Option<HeaderValue>) -> Response {
    if let Some(id) = id {
        response.headers_mut().insert(api.request_id_header(), id);
    }
    response
}

/// What a request is known by: the start of its SHA-256.
pub fn short_hash(bytes: &[u8]) -> String {
    sha256(bytes)[..16].to_owned()
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

/// The client's answer: the upstream's own bytes, or an error in the API's shape.
fn answer(api: Api, outcome: Outcome, streams: bool) -> Response {
    let Outcome::Succeeded(success) = outcome else {
        return error_response(&failure_of(api, &outcome).expect("not a success"));
    };
    let content_type = if streams { "text/event-stream" } else { "application/json" };
    let body = success.response.raw.unwrap_or_default();
    let response = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    let id = success.response.request_id.and_then(|id| HeaderValue::from_str(&id).ok());
    with_request_id(api, response, id)
}

/// What the client is told of a call that did not succeed; `None` for one that did.
fn failure_of(api: Api, outcome: &Outcome) -> Option<ErrorAnswer> {
    Some(match outcome {
        Outcome::Succeeded(_) => return None,
        Outcome::Failed { error, .. } | Outcome::NotRun(NotRun::CircuitOpen(error)) => {
            api.failure(error)
        }
        Outcome::TimedOut { timeout: Timeout::Task | Timeout::Deadline, .. } => api
            .error(504, "no answer in time (--max-queue, and --attempt-timeout for every attempt)"),
        Outcome::NotRun(NotRun::BudgetSpent) => {
            api.budget_spent("the proxy's spending limit (--budget, --max-total-tokens) is reached")
        }
        Outcome::Cancelled { .. } | Outcome::NotRun(_) => api.error(503, "the proxy is stopping"),
    })
}

fn error_response(error: &ErrorAnswer) -> Response {
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = [(header::CONTENT_TYPE, "application/json")];
    let mut response = (status, content_type, error.body.clone()).into_response();
    if let Some(wait) = error.retry_after {
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn api_error(api: Api, status: StatusCode, message: &str) -> Response {
    error_response(&api.error(status.as_u16(), message))
}

/// The live counters; with a client token, for its holders only.
async fn stats_of(State(proxy): State<Arc<Proxy>>, headers: HeaderMap) -> Response {
    if let Admission::Refused = proxy.admits(proxy.api.client_key(&headers).as_deref()) {
        let message = "this proxy needs its client token as the API key";
        return api_error(proxy.api, StatusCode::UNAUTHORIZED, message);
    }
    let mut stats = proxy.stats.json(proxy.lanes.count());
    if let Some(spending) = &proxy.spending {
        let (tokens, cost) = spending.spent();
        stats["spending_limit"] = serde_json::json!({
            "budget": proxy.budget,
            "max_total_tokens": proxy.max_total_tokens,
            "spent": proxy.budget.map(|_| cost),
            "tokens": tokens.total(),
        });
    }
    axum::Json(stats).into_response()
}

async fn not_found(State(proxy): State<Arc<Proxy>>) -> Response {
    let message = format!("this proxy serves POST {} and GET /fanout/stats", proxy.api.path());
    api_error(proxy.api, StatusCode::NOT_FOUND, &message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_a_url_are_never_shown() {
        assert_eq!(
            without_credentials("https://user:sk-1@api.host:8443/v1"),
            "https://api.host:8443/v1"
        );
        assert_eq!(without_credentials("http://127.0.0.1:9/v1"), "http://127.0.0.1:9/v1");
        assert_eq!(without_credentials("https://k@host"), "https://host");
    }
}
