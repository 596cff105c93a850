//! The Batch APIs, as OpenAI and Anthropic document them: OpenAI's files
//! (`POST /v1/files`, `GET /v1/files/{id}/content`) and batches (`POST
//! /v1/batches`, `GET /v1/batches[/{id}]`, `POST /v1/batches/{id}/cancel`),
//! and Anthropic's message batches (`POST /v1/messages/batches`, `GET
//! /v1/messages/batches[/{id}]`, `…/{id}/cancel`, `…/{id}/results`).
//!
//! A batch takes `Config::batch_time` to run, its requests finishing evenly
//! over it, and ends `completed` (OpenAI) or `ended` (Anthropic). Each
//! request's fate is drawn when the batch is created: answered as the online
//! endpoint would answer it, an injected server error
//! (`Config::batch_error_rate`), or not run before the batch expired
//! (`Config::batch_expire_rate`: the batch then ends `expired`). A cancelled
//! batch keeps what had finished and cancels the rest. Lines that cannot be
//! read fail an OpenAI batch at validation, with its `errors` naming them.
//! Every request submitted is counted by its `custom_id` (`/stats`'s
//! `batches`), so tests can tell a row sent twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::{Multipart, Path, Query, State as Shared};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::answer;
use crate::server::State;
use crate::wire::{self, Content, WireMessage};

/// What `/stats` says of the Batch APIs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStats {
    /// Files uploaded to `/v1/files`.
    pub files: u64,
    /// Batches created, both APIs together.
    pub created: u64,
    /// Requests submitted in those batches.
    pub requests: u64,
    /// Submissions of a `custom_id` that had been submitted before.
    pub resubmitted: u64,
    /// The most times one `custom_id` was submitted.
    pub most_submissions: u64,
}

/// Which API a batch came through: the shapes of its answers differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    OpenAi,
    Anthropic,
}

/// How one request of a batch turns out, drawn when it is created.
#[derive(Clone, Debug)]
enum Fate {
    Answer(Value),
    /// Its params cannot be run: it comes back errored.
    Invalid(String),
    ServerError,
    Expires,
}

#[derive(Debug)]
struct MockBatch {
    api: Api,
    id: String,
    created: Instant,
    created_at: SystemTime,
    input_file_id: Option<String>,
    metadata: Value,
    requests: Vec<(String, Fate)>,
    cancelled: Option<Instant>,
    errors: Vec<Value>,
    /// Output and error file ids, once an ended OpenAI batch wrote them.
    files: Option<(Option<String>, Option<String>)>,
}

impl MockBatch {
    /// Requests finished by `now`, evenly over the processing time.
    fn finished_by(&self, now: Instant, batch_time: Duration) -> usize {
        let until = self.cancelled.map_or(now, |c| c.min(now));
        let elapsed = until.duration_since(self.created);
        if batch_time.is_zero() || elapsed >= batch_time {
            return self.requests.len();
        }
        (self.requests.len() as f64 * elapsed.as_secs_f64() / batch_time.as_secs_f64()) as usize
    }

    fn ended(&self, now: Instant, batch_time: Duration) -> bool {
        !self.errors.is_empty()
            || self.cancelled.is_some()
            || self.finished_by(now, batch_time) == self.requests.len()
    }

    fn expired(&self) -> bool {
        self.requests.iter().any(|(_, fate)| matches!(fate, Fate::Expires))
    }

    /// (succeeded, errored, expired, cancelled) by `now`.
    fn counts(&self, now: Instant, batch_time: Duration) -> (u64, u64, u64, u64) {
        let done = self.finished_by(now, batch_time);
        let ended = self.ended(now, batch_time);
        let mut counts = (0, 0, 0, 0);
        for (position, (_, fate)) in self.requests.iter().enumerate() {
            let expires = matches!(fate, Fate::Expires);
            if expires && self.cancelled.is_none() {
                // It never runs: the batch's time runs out first.
                counts.2 += u64::from(ended);
            } else if position >= done || expires {
                counts.3 += u64::from(ended);
            } else if matches!(fate, Fate::Answer(_)) {
                counts.0 += 1;
            } else {
                counts.1 += 1;
            }
        }
        counts
    }
}

/// The Batch APIs' files and batches.
#[derive(Debug, Default)]
pub(crate) struct Batches {
    files: std::sync::Mutex<HashMap<String, (String, Bytes)>>,
    batches: std::sync::Mutex<BTreeMap<u64, MockBatch>>,
    next: AtomicU64,
    submissions: std::sync::Mutex<HashMap<String, u64>>,
    files_uploaded: AtomicU64,
}

impl Batches {
    pub(crate) fn stats(&self) -> BatchStats {
        let submissions = self.submissions.lock().unwrap();
        BatchStats {
            files: self.files_uploaded.load(Ordering::Relaxed),
            created: self.batches.lock().unwrap().len() as u64,
            requests: submissions.values().sum(),
            resubmitted: submissions.values().map(|n| n - 1).sum(),
            most_submissions: submissions.values().copied().max().unwrap_or(0),
        }
    }

    fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn count_submitted(&self, requests: &[(String, Fate)]) {
        let mut submissions = self.submissions.lock().unwrap();
        for (custom_id, _) in requests {
            *submissions.entry(custom_id.clone()).or_default() += 1;
        }
    }
}

fn unix(at: SystemTime) -> i64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn openai_error(status: StatusCode, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error",
                                "param": null, "code": null}});
    wire::json(status, vec![], body.to_string())
}

fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    wire::json(status, vec![], body.to_string())
}

fn ok(body: &Value) -> Response {
    wire::json(StatusCode::OK, vec![], body.to_string())
}

/// A request's messages, as either API sends them.
#[derive(Debug, Deserialize)]
struct Params {
    #[serde(default)]
    model: String,
    messages: Vec<WireMessage>,
    #[serde(default)]
    system: Content,
    #[serde(default)]
    seed: Option<u64>,
}

/// A request as submitted: its custom id, and its params or why they cannot run.
type Submitted = (String, Result<Params, String>);

/// Draws how each request turns out, and the answers of those that will be.
fn fates(state: &State, api: Api, requests: Vec<Submitted>) -> Vec<(String, Fate)> {
    let config = &state.config;
    requests
        .into_iter()
        .map(|(custom_id, params)| {
            let params = match params {
                Ok(params) => params,
                Err(why) => return (custom_id, Fate::Invalid(why)),
            };
            let (fault, draw) = state.draws();
            if fault < config.batch_error_rate {
                return (custom_id, Fate::ServerError);
            }
            if fault < config.batch_error_rate + config.batch_expire_rate {
                return (custom_id, Fate::Expires);
            }
            let (mut messages, prompt) = wire::texts(&params.messages);
            messages.push(params.system.text());
            let text = answer::answer(&config.answers, config.seed, &prompt, params.seed, 0, draw);
            let (input, output) = (answer::prompt_tokens(&messages), answer::tokens(&text));
            let model = if params.model.is_empty() { config.model.clone() } else { params.model };
            let id = state.next_id();
            let body = match api {
                Api::OpenAi => json!({"id": format!("chatcmpl-mock-{id}"),
                    "object": "chat.completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": input, "completion_tokens": output,
                              "total_tokens": input + output}}),
                Api::Anthropic => json!({"id": format!("msg_mock_{id}"), "type": "message",
                    "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn", "stop_sequence": null,
                    "usage": {"input_tokens": input, "output_tokens": output}}),
            };
            (custom_id, Fate::Answer(body))
        })
        .collect()
}

// ---- OpenAI ----

pub(crate) async fn upload(Shared(state): Shared<Arc<State>>, mut form: Multipart) -> Response {
    let (mut purpose, mut file) = (None, None);
    while let Ok(Some(field)) = form.next_field().await {
        match field.name() {
            Some("purpose") => purpose = field.text().await.ok(),
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_owned();
                match field.bytes().await {
                    Ok(bytes) => file = Some((name, bytes)),
                    Err(e) => return openai_error(StatusCode::BAD_REQUEST, &e.to_string()),
                }
            }
            _ => {}
        }
    }
    let Some(purpose) = purpose else {
        return openai_error(StatusCode::BAD_REQUEST, "Missing required parameter: 'purpose'.");
    };
    let Some((filename, bytes)) = file else {
        return openai_error(StatusCode::BAD_REQUEST, "Missing required parameter: 'file'.");
    };
    let batches = &state.batches;
    let id = format!("file-mock{}", batches.next_id());
    let size = bytes.len();
    batches.files.lock().unwrap().insert(id.clone(), (filename.clone(), bytes));
    batches.files_uploaded.fetch_add(1, Ordering::Relaxed);
    ok(&json!({"id": id, "object": "file", "bytes": size, "created_at": unix(SystemTime::now()),
               "filename": filename, "purpose": purpose}))
}

pub(crate) async fn file_content(
    Shared(state): Shared<Arc<State>>,
    Path(id): Path<String>,
) -> Response {
    match state.batches.files.lock().unwrap().get(&id) {
        Some((_, bytes)) => {
            let kind = [(axum::http::header::CONTENT_TYPE, "application/octet-stream")];
            (StatusCode::OK, kind, bytes.clone()).into_response()
        }
        None => openai_error(StatusCode::NOT_FOUND, &format!("No such File object: {id}")),
    }
}

#[derive(Debug, Deserialize)]
struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Value,
}

#[derive(Debug, Deserialize)]
struct InputLine {
    custom_id: String,
    method: String,
    url: String,
    body: Params,
}

/// Reads an input file's lines; the errors name the lines that cannot be run.
fn input_lines(bytes: &[u8]) -> (Vec<Submitted>, Vec<Value>) {
    let (mut requests, mut errors) = (Vec::new(), Vec::new());
    let mut seen = std::collections::HashSet::new();
    let text = String::from_utf8_lossy(bytes);
    for (at, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let mut refuse = |message: String| {
            errors.push(json!({"code": "invalid_request", "message": message,
                               "param": null, "line": at + 1}));
        };
        match serde_json::from_str::<InputLine>(line) {
            Ok(line) if line.method != "POST" || line.url != "/v1/chat/completions" => {
                refuse(format!(
                    "The url and method ({} {}) are not supported.",
                    line.method, line.url
                ));
            }
            Ok(line) if !seen.insert(line.custom_id.clone()) => {
                refuse(format!("The custom_id {} is not unique in the file.", line.custom_id));
            }
            Ok(line) => requests.push((line.custom_id, Ok(line.body))),
            Err(e) => refuse(format!("This line is not a valid request: {e}")),
        }
    }
    (requests, errors)
}

pub(crate) async fn create(Shared(state): Shared<Arc<State>>, body: Bytes) -> Response {
    let create: CreateBatch = match serde_json::from_slice(&body) {
        Ok(create) => create,
        Err(e) => return openai_error(StatusCode::BAD_REQUEST, &format!("Invalid body: {e}")),
    };
    if create.endpoint != "/v1/chat/completions" || create.completion_window != "24h" {
        let message = "Only /v1/chat/completions with a 24h completion window is served here.";
        return openai_error(StatusCode::BAD_REQUEST, message);
    }
    let Some(bytes) =
        state.batches.files.lock().unwrap().get(&create.input_file_id).map(|f| f.1.clone())
    else {
        let message = format!("No such File object: {}", create.input_file_id);
        return openai_error(StatusCode::NOT_FOUND, &message);
    };
    let (requests, errors) = input_lines(&bytes);
    let requests =
        if errors.is_empty() { fates(&state, Api::OpenAi, requests) } else { Vec::new() };
    let batches = &state.batches;
    batches.count_submitted(&requests);
    let number = batches.next_id();
    let batch = MockBatch {
        api: Api::OpenAi,
        id: format!("batch_mock{number}"),
        created: Instant::now(),
        created_at: SystemTime::now(),
        input_file_id: Some(create.input_file_id),
        metadata: create.metadata,
        requests,
        cancelled: None,
        errors,
        files: None,
    };
    let described = describe(&state, &batch);
    batches.batches.lock().unwrap().insert(number, batch);
    ok(&described)
}

/// A batch as its API describes it, writing an ended OpenAI batch's files
/// the first time.
fn describe(state: &State, batch: &MockBatch) -> Value {
    let (now, batch_time) = (Instant::now(), state.config.batch_time);
    let (succeeded, errored, expired, cancelled) = batch.counts(now, batch_time);
    let ended = batch.ended(now, batch_time);
    let created_at = unix(batch.created_at);
    match batch.api {
        Api::OpenAi => {
            let status = match () {
                () if !batch.errors.is_empty() => "failed",
                () if batch.cancelled.is_some() => "cancelled",
                () if ended && batch.expired() => "expired",
                () if ended => "completed",
                () => "in_progress",
            };
            let (output, error) = batch.files.clone().unwrap_or_default();
            json!({"id": batch.id, "object": "batch", "endpoint": "/v1/chat/completions",
                "errors": (!batch.errors.is_empty()).then(|| json!({"object": "list", "data": batch.errors})),
                "input_file_id": batch.input_file_id, "completion_window": "24h",
                "status": status, "output_file_id": output, "error_file_id": error,
                "created_at": created_at, "expires_at": created_at + 86_400,
                "request_counts": {"total": batch.requests.len(), "completed": succeeded,
                                   "failed": errored + expired + cancelled},
                "metadata": batch.metadata})
        }
        Api::Anthropic => {
            let processing =
                batch.requests.len() as u64 - succeeded - errored - expired - cancelled;
            let results = ended.then(|| {
                format!("http://{}/v1/messages/batches/{}/results", state.addr(), batch.id)
            });
            json!({"id": batch.id, "type": "message_batch",
                "processing_status": if ended { "ended" } else { "in_progress" },
                "request_counts": {"processing": processing, "succeeded": succeeded,
                    "errored": errored, "canceled": cancelled, "expired": expired},
                "ended_at": ended.then(|| crate::anthropic::rfc3339_of(SystemTime::now())),
                "created_at": crate::anthropic::rfc3339_of(batch.created_at),
                "expires_at": crate::anthropic::rfc3339_of(batch.created_at + Duration::from_secs(86_400)),
                "cancel_initiated_at": batch.cancelled.map(|_| crate::anthropic::rfc3339_of(SystemTime::now())),
                "results_url": results})
        }
    }
}

/// How a request of an ended batch came out.
enum End<'a> {
    Answer(&'a Value),
    Invalid(&'a str),
    ServerError,
    Expired,
    Cancelled,
}

/// Each request's result line, once its batch has ended.
fn result_lines(state: &State, batch: &MockBatch) -> (Vec<String>, Vec<String>) {
    let done = batch.finished_by(Instant::now(), state.config.batch_time);
    let (mut answers, mut errors) = (Vec::new(), Vec::new());
    for (position, (custom_id, fate)) in batch.requests.iter().enumerate() {
        let id = state.next_id();
        let end = match fate {
            Fate::Expires if batch.cancelled.is_none() => End::Expired,
            _ if position >= done => End::Cancelled,
            Fate::Expires => End::Cancelled,
            Fate::Answer(body) => End::Answer(body),
            Fate::ServerError => End::ServerError,
            Fate::Invalid(why) => End::Invalid(why),
        };
        let request = format!("batch_req_{id}");
        let line = match (batch.api, end) {
            (Api::OpenAi, End::Expired) => json!({"id": request, "custom_id": custom_id,
                "response": null, "error": {"code": "batch_expired",
                "message": "This request could not be executed before the completion window expired."}}),
            (Api::OpenAi, End::Cancelled) => json!({"id": request, "custom_id": custom_id,
                "response": null, "error": {"code": "batch_cancelled",
                "message": "This request was not executed because the batch was cancelled."}}),
            (Api::OpenAi, End::Answer(body)) => json!({"id": request, "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": format!("req_mock_{id}"),
                "body": body}, "error": null}),
            (Api::OpenAi, End::ServerError) => json!({"id": request, "custom_id": custom_id,
                "response": {"status_code": 500, "request_id": format!("req_mock_{id}"),
                "body": {"error": {"message":
                "The mock server had an injected error while processing your request.",
                "type": "server_error", "param": null, "code": null}}}, "error": null}),
            (Api::OpenAi, End::Invalid(why)) => json!({"id": request, "custom_id": custom_id,
                "response": {"status_code": 400, "request_id": format!("req_mock_{id}"),
                "body": {"error": {"message": why, "type": "invalid_request_error",
                "param": null, "code": null}}}, "error": null}),
            (Api::Anthropic, End::Invalid(why)) => json!({"custom_id": custom_id, "result": {
                "type": "errored", "error": {"type": "error", "error": {
                "type": "invalid_request_error", "message": why}}}}),
            (Api::Anthropic, End::Expired) => {
                json!({"custom_id": custom_id, "result": {"type": "expired"}})
            }
            (Api::Anthropic, End::Cancelled) => {
                json!({"custom_id": custom_id, "result": {"type": "canceled"}})
            }
            (Api::Anthropic, End::Answer(message)) => {
                json!({"custom_id": custom_id, "result": {"type": "succeeded", "message": message}})
            }
            (Api::Anthropic, End::ServerError) => json!({"custom_id": custom_id, "result": {
                "type": "errored", "error": {"type": "error", "error": {"type": "api_error",
                "message": "Injected internal server error"}}}}),
        };
        let ok = line.pointer("/response/status_code").and_then(Value::as_u64) == Some(200)
            || line.pointer("/result/type").is_some();
        if ok { answers.push(line.to_string()) } else { errors.push(line.to_string()) }
    }
    (answers, errors)
}

/// Finds a batch by its id, writing an ended OpenAI batch's files first.
fn with_batch<T>(
    state: &State,
    api: Api,
    id: &str,
    act: impl FnOnce(&mut MockBatch) -> T,
) -> Option<T> {
    let mut batches = state.batches.batches.lock().unwrap();
    let batch = batches.values_mut().find(|b| b.id == id && b.api == api)?;
    if api == Api::OpenAi
        && batch.files.is_none()
        && batch.errors.is_empty()
        && batch.ended(Instant::now(), state.config.batch_time)
    {
        let (answers, errors) = result_lines(state, batch);
        let mut files = state.batches.files.lock().unwrap();
        let mut write = |lines: Vec<String>, kind: &str| {
            (!lines.is_empty()).then(|| {
                let file = format!("file-mock-{kind}-{}", batch.id);
                let bytes = Bytes::from(lines.join("\n") + "\n");
                files.insert(file.clone(), (format!("{}_{kind}.jsonl", batch.id), bytes));
                file
            })
        };
        batch.files = Some((write(answers, "output"), write(errors, "error")));
    }
    Some(act(batch))
}

pub(crate) async fn get_batch(
    Shared(state): Shared<Arc<State>>,
    Path(id): Path<String>,
) -> Response {
    match with_batch(&state, Api::OpenAi, &id, |batch| describe(&state, batch)) {
        Some(described) => ok(&described),
        None => openai_error(StatusCode::NOT_FOUND, &format!("No such Batch object: {id}")),
    }
}

pub(crate) async fn cancel_batch(
    Shared(state): Shared<Arc<State>>,
    Path(id): Path<String>,
) -> Response {
    let cancelled = with_batch(&state, Api::OpenAi, &id, |batch| {
        if !batch.ended(Instant::now(), state.config.batch_time) {
            batch.cancelled = Some(Instant::now());
        }
    });
    if cancelled.is_none() {
        return openai_error(StatusCode::NOT_FOUND, &format!("No such Batch object: {id}"));
    }
    get_batch(Shared(state), Path(id)).await
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    after_id: Option<String>,
}

/// Batches newest first, a page at a time after the id given.
fn list(state: &State, api: Api, query: &ListQuery) -> Value {
    let ids: Vec<String> = state
        .batches
        .batches
        .lock()
        .unwrap()
        .values()
        .rev()
        .filter(|b| b.api == api)
        .map(|b| b.id.clone())
        .collect();
    let after = query.after.as_ref().or(query.after_id.as_ref());
    let start = after.and_then(|a| ids.iter().position(|id| id == a)).map_or(0, |at| at + 1);
    let limit = query.limit.unwrap_or(20).clamp(1, 100);
    let page: Vec<&String> = ids.iter().skip(start).take(limit).collect();
    let data: Vec<Value> = page
        .iter()
        .filter_map(|id| with_batch(state, api, id, |batch| describe(state, batch)))
        .collect();
    let has_more = start + page.len() < ids.len();
    match api {
        Api::OpenAi => json!({"object": "list", "data": data, "has_more": has_more,
            "first_id": page.first(), "last_id": page.last()}),
        Api::Anthropic => json!({"data": data, "has_more": has_more,
            "first_id": page.first(), "last_id": page.last()}),
    }
}

pub(crate) async fn list_batches(
    Shared(state): Shared<Arc<State>>,
    Query(query): Query<ListQuery>,
) -> Response {
    ok(&list(&state, Api::OpenAi, &query))
}

// ---- Anthropic ----

#[derive(Debug, Deserialize)]
struct CreateMessageBatch {
    requests: Vec<BatchRequest>,
}

#[derive(Debug, Deserialize)]
struct BatchRequest {
    custom_id: String,
    params: Value,
}

pub(crate) async fn create_message_batch(
    Shared(state): Shared<Arc<State>>,
    body: Bytes,
) -> Response {
    let create: CreateMessageBatch = match serde_json::from_slice(&body) {
        Ok(create) => create,
        Err(e) => {
            let message = format!("requests: invalid request body: {e}");
            return anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", &message);
        }
    };
    let mut requests = Vec::with_capacity(create.requests.len());
    let mut seen = std::collections::HashSet::new();
    for (at, request) in create.requests.into_iter().enumerate() {
        let valid_id = (1..=64).contains(&request.custom_id.len())
            && request
                .custom_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid_id || !seen.insert(request.custom_id.clone()) {
            let message = format!(
                "requests.{at}.custom_id: must be unique and match ^[a-zA-Z0-9_-]{{1,64}}$"
            );
            return anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", &message);
        }
        // Each request's params are checked as it runs, as Anthropic's are:
        // a bad one comes back errored, the batch goes on.
        let params = if request.params.get("max_tokens").is_none() {
            Err("max_tokens: Field required".to_owned())
        } else {
            serde_json::from_value::<Params>(request.params).map_err(|e| format!("params: {e}"))
        };
        requests.push((request.custom_id, params));
    }
    let requests = fates(&state, Api::Anthropic, requests);
    let batches = &state.batches;
    batches.count_submitted(&requests);
    let number = batches.next_id();
    let batch = MockBatch {
        api: Api::Anthropic,
        id: format!("msgbatch_mock{number}"),
        created: Instant::now(),
        created_at: SystemTime::now(),
        input_file_id: None,
        metadata: Value::Null,
        requests,
        cancelled: None,
        errors: Vec::new(),
        files: None,
    };
    let described = describe(&state, &batch);
    batches.batches.lock().unwrap().insert(number, batch);
    ok(&described)
}

pub(crate) async fn get_message_batch(
    Shared(state): Shared<Arc<State>>,
    Path(id): Path<String>,
) -> Response {
    match with_batch(&state, Api::Anthropic, &id, |batch| describe(&state, batch)) {
        Some(described) => ok(&described),
        None => {
            anthropic_error(StatusCode::NOT_FOUND, "not_found_error", &format!("No batch {id}"))
        }
    }
}

pub(crate) async fn cancel_message_batch(
    Shared(state): Shared<Arc<State>>,
    Path(id): Path<String>,
) -> Response {
    let found = with_batch(&state, Api::Anthropic, &id, |batch| {
        if !batch.ended(Instant::now(), state.config.batch_time) {
            batch.cancelled = Some(Instant::now());
        }
    });
    if found.is_none() {
        return anthropic_error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!("No batch {id}"),
        );
    }
    get_message_batch(Shared(state), Path(id)).await
}

pub(crate) async fn message_batch_results(
    Shared(state): Shared<Arc<State>>,
    Path(id): Path<String>,
) -> Response {
    let lines = with_batch(&state, Api::Anthropic, &id, |batch| {
        batch.ended(Instant::now(), state.config.batch_time).then(|| result_lines(&state, batch).0)
    });
    match lines {
        None => {
            anthropic_error(StatusCode::NOT_FOUND, "not_found_error", &format!("No batch {id}"))
        }
        Some(None) => {
            let message = format!("Batch {id} has not ended: its results are not ready.");
            anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", &message)
        }
        Some(Some(lines)) => {
            let kind = [(axum::http::header::CONTENT_TYPE, "application/binary")];
            (StatusCode::OK, kind, Bytes::from(lines.join("\n") + "\n")).into_response()
        }
    }
}

pub(crate) async fn list_message_batches(
    Shared(state): Shared<Arc<State>>,
    Query(query): Query<ListQuery>,
) -> Response {
    ok(&list(&state, Api::Anthropic, &query))
}
