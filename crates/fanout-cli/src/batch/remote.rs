//! `fanout batch --via batch-api`: the job's requests go to the provider's
//! Batch API (half the price, within a day) instead of one call each, and
//! their answers come back into the same committer as online results do, so
//! the store, the ordered output and the progress line work unchanged.
//!
//! Durability: a batch is written to the store with the rows it holds before
//! anything is sent; its file and batch ids are written as the service gives
//! them. A rerun (`fanout jobs resume`) finds every batch it made: a batch
//! whose creation it never saw answered is looked for at the service by its
//! tag ([`BatchApi::find`]) and only made again when it is not there, so no
//! row is submitted twice. A row's latest batch is the one that answers it.
//!
//! Rows that come back retryable (a server error, expired, or cancelled to
//! finish online) go into a following batch, or online with `--then online`;
//! a non-retryable error is final. With `--then online` and a deadline, the
//! open batches are cancelled when the deadline nears and what they still
//! hold runs online; whichever answer of a row arrives first is kept, and the
//! other is discarded uncounted.

use super::committer::DrivenResults;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use fanout::batches::{Batch, BatchAnswer, BatchApi, BatchLimits, BatchOutcome};
use fanout::{
    CancellationToken, ErrorKind, Executor, ExecutorBuilder, HeldResult, NotRun, Outcome, Price,
    ProviderError, Request, Success, Tally, Task, TaskId, TaskResult, Totals, Usage,
};
use fanout_store::{Finished, RemoteBatch, Store, remote_state};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How a job goes through a Batch API (`--via batch-api`), kept with its spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ViaBatchApi {
    /// What is still unanswered when a batch cannot answer it (errors,
    /// expiry) or the deadline nears: online calls, or another batch.
    pub then_online: bool,
    /// Seconds between two looks at a batch.
    pub poll_interval: f64,
    /// Requests in one batch, when not the service's documented limit.
    pub max_requests: Option<usize>,
    /// Bytes of one batch's input, when not the service's documented limit.
    pub max_bytes: Option<usize>,
    /// The share of the online price a batch costs (0.5: half).
    pub discount: f64,
}

impl Default for ViaBatchApi {
    fn default() -> Self {
        Self {
            then_online: false,
            poll_interval: 30.0,
            max_requests: None,
            max_bytes: None,
            discount: 0.5,
        }
    }
}

/// The share of the deadline kept for finishing online, the rest waited out
/// for the batches; at least a minute when the deadline allows it.
fn online_reserve(deadline: Duration) -> Duration {
    (deadline / 10).max(Duration::from_secs(60).min(deadline / 2))
}

/// A batch's custom id for the row at `index`: Anthropic allows only
/// `[a-zA-Z0-9_-]{1,64}`, and a row's own id may not fit it.
fn custom_id(index: u64) -> String {
    format!("row-{index}")
}

fn index_of(custom_id: &str) -> Option<u64> {
    custom_id.strip_prefix("row-")?.parse().ok()
}

/// Everything the run needs, given by the batch command.
pub struct Remote {
    pub api: Arc<dyn BatchApi>,
    pub via: ViaBatchApi,
    pub store: Store,
    pub job: i64,
    /// The job's tasks in input order, settled ones included.
    pub tasks: Box<dyn Iterator<Item = Task> + Send>,
    /// The same tasks again, made fresh: for the rows sent a second time.
    pub again: Box<dyn Fn() -> Result<Box<dyn Iterator<Item = Task> + Send>> + Send + Sync>,
    /// Finished rows (restored by the committer, never sent).
    pub finished: Finished,
    /// Runs what finishes online (given the time left of the deadline).
    pub online: ExecutorBuilder,
    pub price: Option<Price>,
    pub retries: u32,
    pub deadline: Option<Duration>,
    /// Ctrl-C: stop sending and looking; the batches go on at the service.
    pub drain: CancellationToken,
    pub quiet: bool,
}

/// The results of a job's rows through a Batch API, for the committer.
pub fn start(remote: Remote) -> DrivenResults {
    DrivenResults::spawn("the Batch API run", |sender| Driver::new(remote, sender).run())
}

/// A batch this run waits on, with the rows it answers.
struct Open {
    stored: RemoteBatch,
    rows: Vec<u64>,
    /// Every row it was made with, in the order of its lines.
    all_rows: Vec<u64>,
    /// Cancelled by this run, to finish its rows online.
    cancelled_for_online: bool,
    /// Cancelled by `fanout jobs cancel` before this run: its cancelled rows go again.
    resend_cancelled: bool,
}

struct Driver {
    api: Arc<dyn BatchApi>,
    via: ViaBatchApi,
    /// Behind a lock only so the driver can be shared across its awaits:
    /// it alone uses it.
    store: Mutex<Store>,
    job: i64,
    tag: String,
    limits: BatchLimits,
    sender: mpsc::Sender<HeldResult>,
    /// Rows given a result (by either side): a second one is discarded.
    emitted: Arc<Mutex<Finished>>,
    tally: Arc<Mutex<Tally>>,
    /// What the batches' answers used, and the online calls': priced apart.
    batch_usage: Usage,
    online_usage: Arc<Mutex<Usage>>,
    /// The ids of the rows at the service or on their way there.
    ids: HashMap<u64, TaskId>,
    /// Submissions of each row, this run's and earlier ones.
    submissions: HashMap<u64, u32>,
    /// A request like the job's: how answers are read.
    shape: Request,
    open: Vec<Open>,
    /// Rows to send again.
    again: Vec<u64>,
    remote: RemoteParts,
    started: Instant,
    online_totals: Vec<Totals>,
}

/// The parts of [`Remote`] the driver keeps as they are.
struct RemoteParts {
    tasks: Mutex<Option<Box<dyn Iterator<Item = Task> + Send>>>,
    again: Box<dyn Fn() -> Result<Box<dyn Iterator<Item = Task> + Send>> + Send + Sync>,
    finished: Finished,
    online: Mutex<Option<ExecutorBuilder>>,
    online_executor: Option<Executor>,
    price: Option<Price>,
    retries: u32,
    deadline: Option<Duration>,
    drain: CancellationToken,
    quiet: bool,
}

/// What a line's outcome means for its row.
// Made and matched at once, one at a time: its size costs nothing.
#[allow(clippy::large_enum_variant)]
enum Verdict {
    Final(Outcome),
    SendAgain,
    /// Its batch was cancelled to run it online, where it runs now.
    Online,
    /// Cancelled by someone else (`fanout jobs cancel`): left unfinished.
    Leave,
}

impl Driver {
    fn new(remote: Remote, sender: mpsc::Sender<HeldResult>) -> Self {
        let mut limits = remote.api.limits();
        limits.max_requests = remote.via.max_requests.unwrap_or(limits.max_requests).max(1);
        limits.max_bytes = remote.via.max_bytes.unwrap_or(limits.max_bytes).max(1);
        let nonce = fastrand::u64(..);
        Self {
            tag: format!("fanout-{}-{nonce:016x}", remote.job),
            api: remote.api,
            via: remote.via,
            store: Mutex::new(remote.store),
            job: remote.job,
            limits,
            sender,
            emitted: Arc::new(Mutex::new(Finished::default())),
            tally: Arc::new(Mutex::new(Tally::new())),
            batch_usage: Usage::default(),
            online_usage: Arc::new(Mutex::new(Usage::default())),
            ids: HashMap::new(),
            submissions: HashMap::new(),
            shape: Request::user(""),
            open: Vec::new(),
            again: Vec::new(),
            remote: RemoteParts {
                tasks: Mutex::new(Some(remote.tasks)),
                again: remote.again,
                finished: remote.finished,
                online: Mutex::new(Some(remote.online)),
                online_executor: None,
                price: remote.price,
                retries: remote.retries,
                deadline: remote.deadline,
                drain: remote.drain,
                quiet: remote.quiet,
            },
            started: Instant::now(),
            online_totals: Vec::new(),
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().expect("never poisoned")
    }

    fn say(&self, text: &str) {
        if !self.remote.quiet {
            eprintln!("fanout: {text}");
        }
    }

    async fn run(mut self) -> Totals {
        if let Err(error) = self.drive().await {
            self.say(&format!("the Batch API run stopped: {error:#}"));
        }
        self.leave_unfinished(NotRun::Cancelled).await;
        self.totals()
    }

    async fn drive(&mut self) -> Result<()> {
        let in_remote = self.settle_earlier_batches().await?;
        self.send_new_rows(&in_remote).await?;
        let deadline = self.remote.deadline.map(|d| self.started + d);
        let online_from = match (deadline, self.via.then_online) {
            (Some(deadline), true) => {
                Some(deadline - online_reserve(self.remote.deadline.expect("a deadline")))
            }
            _ => None,
        };
        let poll = Duration::from_secs_f64(self.via.poll_interval.max(0.01));
        let mut online_runs = Vec::new();
        while !self.open.is_empty() || !self.again.is_empty() {
            // A batch all of whose rows were answered (online, first) is not waited for.
            let emitted = self.emitted.lock().expect("never poisoned").clone();
            self.open.retain(|open| open.rows.iter().any(|row| !emitted.contains(*row)));
            if self.open.is_empty() && self.again.is_empty() {
                break;
            }
            if !self.again.is_empty() {
                let rows = std::mem::take(&mut self.again);
                if self.via.then_online {
                    online_runs.push(self.run_online(rows)?);
                } else {
                    self.send_rows(rows).await?;
                }
                continue;
            }
            let now = Instant::now();
            let to_cancel = self.open.iter().any(|o| !o.cancelled_for_online);
            // Past times wake nobody: only what is still ahead counts.
            let ahead = [online_from.filter(|_| to_cancel), deadline].into_iter().flatten();
            let until = ahead.filter(|at| *at > now).chain([now + poll]).min();
            tokio::select! {
                biased;
                () = self.remote.drain.cancelled() => {
                    self.say("stopped: the batches go on at the service; `fanout jobs resume` collects them");
                    break;
                }
                () = tokio::time::sleep_until(until.expect("a wake time")) => {}
            }
            let now = Instant::now();
            if online_from.is_some_and(|at| now >= at)
                && self.open.iter().any(|o| !o.cancelled_for_online)
            {
                self.cancel_for_online().await;
            }
            if deadline.is_some_and(|d| now >= d) && !self.via.then_online {
                self.say("the deadline has come: the batches go on at the service; `fanout jobs resume` collects them");
                break;
            }
            self.look().await?;
        }
        for run in online_runs {
            if let Ok(totals) = run.await {
                self.online_totals.push(totals);
            }
        }
        Ok(())
    }

    /// Finds the job's earlier batches and the rows they still answer. A
    /// batch whose creation was never seen answered is looked for at the
    /// service; one that is not there is abandoned, and its rows sent anew.
    async fn settle_earlier_batches(&mut self) -> Result<Finished> {
        let batches = self.store().remote_batches(self.job)?;
        // A row's latest batch is the one that answers it.
        let mut latest: HashMap<u64, usize> = HashMap::new();
        let mut rows_of = Vec::with_capacity(batches.len());
        for (at, batch) in batches.iter().enumerate() {
            let rows = self.store().remote_rows(batch.id)?;
            if batch.state != remote_state::ABANDONED {
                for row in &rows {
                    *self.submissions.entry(*row).or_default() += 1;
                    latest.insert(*row, at);
                }
            }
            rows_of.push(rows);
        }
        let mut in_remote = Finished::default();
        for (at, (mut batch, all_rows)) in batches.into_iter().zip(rows_of).enumerate() {
            let rows: Vec<u64> = all_rows
                .iter()
                .copied()
                .filter(|row| latest.get(row) == Some(&at) && !self.remote.finished.contains(*row))
                .collect();
            if rows.is_empty() || batch.state == remote_state::ABANDONED {
                continue;
            }
            if batch.remote_id.is_none() {
                let found = self.api.find(&batch.tag, batch.created_at, batch.requests).await;
                match found.map_err(anyhow::Error::from).and_then(|c| self.adopt(c)) {
                    Ok(Some(found)) => {
                        self.say(&format!(
                            "found batch {} at the service, made before the crash",
                            found.id
                        ));
                        batch.remote_id = Some(found.id.clone());
                        apply(&mut batch, &found);
                        self.store().update_remote_batch(&batch)?;
                    }
                    Ok(None) => {
                        batch.state = remote_state::ABANDONED.into();
                        batch.detail =
                            Some("never made at the service: its rows are sent again".into());
                        self.store().update_remote_batch(&batch)?;
                        for row in &rows {
                            // Never submitted: it does not count as a submission.
                            self.submissions.entry(*row).and_modify(|n| *n = n.saturating_sub(1));
                        }
                        continue;
                    }
                    Err(error) => anyhow::bail!(
                        "cannot tell whether batch {} (rows from {}) was made: {error}",
                        batch.tag,
                        rows[0]
                    ),
                }
            }
            for row in &rows {
                in_remote.insert(*row);
            }
            // Cancelled (`fanout jobs cancel`) before this run: a resume sends its rows again.
            let resend_cancelled = batch.state == remote_state::CANCELLED;
            self.open.push(Open {
                stored: batch,
                rows,
                all_rows,
                cancelled_for_online: false,
                resend_cancelled,
            });
        }
        if !self.open.is_empty() {
            let rows: usize = self.open.iter().map(|o| o.rows.len()).sum();
            self.say(&format!(
                "{} batches at the service hold {rows} of the job's rows",
                self.open.len()
            ));
        }
        Ok(in_remote)
    }

    /// Sends every row not finished nor at the service, in batches as large
    /// as the limits allow; settled rows (invalid, restored) go straight on.
    async fn send_new_rows(&mut self, in_remote: &Finished) -> Result<()> {
        let tasks = self.remote.tasks.lock().expect("never poisoned").take();
        let tasks = tasks.expect("the tasks are read once");
        let mut chunk = Chunk::default();
        for (index, task) in tasks.enumerate() {
            let index = index as u64;
            if self.remote.drain.is_cancelled() {
                break;
            }
            let id = task_id(&task, index);
            if let Some(outcome) = task.settled_outcome() {
                self.emit(TaskResult::new(index as usize, id, outcome.clone()), None).await;
                continue;
            }
            if self.ids.is_empty()
                && let Some(request) = task.request()
            {
                self.shape = request.clone();
            }
            self.ids.insert(index, id);
            if in_remote.contains(index) {
                continue;
            }
            if let Some(full) = self.add_to(&mut chunk, index, &task).await {
                self.submit(full).await?;
            }
        }
        if !chunk.rows.is_empty() {
            self.submit(chunk).await?;
        }
        Ok(())
    }

    /// Adds a row's line to `chunk`; returns the chunk to send when the row
    /// does not fit in it (the row then starts the next one).
    async fn add_to(&mut self, chunk: &mut Chunk, index: u64, task: &Task) -> Option<Chunk> {
        let request = task.request()?;
        let line = self.api.line(&custom_id(index), request);
        if line.len() > self.limits.max_bytes {
            let message = format!(
                "row {}: its request is {} bytes, more than one batch takes ({} bytes)",
                self.ids[&index],
                line.len(),
                self.limits.max_bytes
            );
            let error = ProviderError::new(ErrorKind::BadRequest, message);
            let id = self.ids.remove(&index).expect("an id");
            self.emit(TaskResult::new(index as usize, id, Outcome::failed(error, 0)), None).await;
            return None;
        }
        let full = chunk.rows.len() >= self.limits.max_requests
            || chunk.lines.len() + line.len() > self.limits.max_bytes;
        let sent = full.then(|| std::mem::take(chunk));
        chunk.rows.push(index);
        chunk.lines.extend_from_slice(&line);
        sent
    }

    /// Sends `rows` again, rendered afresh from the input.
    async fn send_rows(&mut self, mut rows: Vec<u64>) -> Result<()> {
        rows.sort_unstable();
        let wanted: HashSet<u64> = rows.into_iter().collect();
        let mut chunk = Chunk::default();
        for (index, task) in (self.remote.again)()?.enumerate() {
            let index = index as u64;
            if !wanted.contains(&index) {
                continue;
            }
            if let Some(full) = self.add_to(&mut chunk, index, &task).await {
                self.submit(full).await?;
            }
        }
        if !chunk.rows.is_empty() {
            self.submit(chunk).await?;
        }
        Ok(())
    }

    /// Makes one batch: written to the store first, then uploaded and
    /// created, each id stored as it comes. A creation whose answer is lost
    /// is looked for before it is tried again.
    async fn submit(&mut self, chunk: Chunk) -> Result<()> {
        let mut batch =
            self.store().add_remote_batch(self.job, self.api.name(), &self.tag, &chunk.rows)?;
        for row in &chunk.rows {
            *self.submissions.entry(*row).or_default() += 1;
        }
        let made = self.make(&mut batch, &chunk.lines).await;
        match made {
            Ok(remote) => {
                self.say(&format!(
                    "batch {} sent: {} rows ({} bytes)",
                    remote.id,
                    chunk.rows.len(),
                    chunk.lines.len()
                ));
                batch.remote_id = Some(remote.id.clone());
                apply(&mut batch, &remote);
                self.store().update_remote_batch(&batch)?;
                self.open.push(Open {
                    stored: batch,
                    all_rows: chunk.rows.clone(),
                    rows: chunk.rows,
                    cancelled_for_online: false,
                    resend_cancelled: false,
                });
                Ok(())
            }
            Err(error) if !error.kind().is_retryable() => {
                // The service refused it as a whole: its rows fail with its words.
                batch.state = remote_state::ABANDONED.into();
                batch.detail = Some(error.to_string());
                self.store().update_remote_batch(&batch)?;
                self.say(&format!(
                    "the service refused a batch of {} rows (rows {} to {}): {error}",
                    chunk.rows.len(),
                    self.ids[&chunk.rows[0]],
                    self.ids[chunk.rows.last().expect("a row")]
                ));
                for row in chunk.rows {
                    self.finish(row, Outcome::failed(error.clone(), 1)).await;
                }
                Ok(())
            }
            Err(error) => {
                // Kept as it is: a resume looks for it, then makes it.
                batch.detail = Some(error.to_string());
                self.store().update_remote_batch(&batch)?;
                anyhow::bail!(
                    "a batch of {} rows could not be sent ({error}); it is kept, and \
                     `fanout jobs resume` sends it (or finds it, if it was made)",
                    chunk.rows.len()
                )
            }
        }
    }

    async fn make(&self, batch: &mut RemoteBatch, lines: &[u8]) -> Result<Batch, ProviderError> {
        let tag = batch.tag.clone();
        if batch.file_id.is_none()
            && let Some(file) = self.persist(|| self.api.upload(&tag, lines)).await?
        {
            batch.file_id = Some(file);
            batch.state = remote_state::UPLOADED.into();
            self.store()
                .update_remote_batch(batch)
                .map_err(|e| ProviderError::new(ErrorKind::Connection, e.to_string()))?;
        }
        let file = batch.file_id.clone();
        let (since, requests) = (batch.created_at, batch.requests);
        let mut tries = 0;
        loop {
            tries += 1;
            match self.api.create(&tag, file.as_deref(), lines).await {
                Ok(made) => return Ok(made),
                Err(error) if error.kind().is_retryable() && tries <= self.remote.retries => {
                    // Its answer may be what was lost: look before making it again.
                    tokio::time::sleep(backoff(tries)).await;
                    let candidates = self.api.find(&tag, since, requests).await?;
                    match self.adopt(candidates) {
                        Ok(Some(found)) => return Ok(found),
                        Ok(None) => {}
                        // Made, perhaps, and not told apart: kept for a resume to look again.
                        Err(why) => return Err(ProviderError::new(error.kind(), why.to_string())),
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// The one of `candidates` that is a batch this job made and does not
    /// know yet; an error when more than one may be.
    fn adopt(&self, candidates: Vec<Batch>) -> Result<Option<Batch>> {
        let known: HashSet<String> = self
            .store()
            .remote_batches(self.job)?
            .into_iter()
            .filter_map(|batch| batch.remote_id)
            .collect();
        let mut unknown: Vec<Batch> =
            candidates.into_iter().filter(|batch| !known.contains(&batch.id)).collect();
        match unknown.len() {
            0 | 1 => Ok(unknown.pop()),
            n => anyhow::bail!(
                "{n} batches at the service may be the one whose creation was not answered ({}): \
                 cancel the ones this job did not make, or wait for them to end, then resume",
                unknown.iter().map(|b| b.id.as_str()).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// `attempt` again after retryable errors, within the retries allowed.
    async fn persist<T, F>(&self, attempt: impl Fn() -> F) -> Result<T, ProviderError>
    where
        F: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let mut tries = 0;
        loop {
            tries += 1;
            match attempt().await {
                Err(error) if error.kind().is_retryable() && tries <= self.remote.retries => {
                    tokio::time::sleep(backoff(tries)).await;
                }
                other => return other,
            }
        }
    }

    /// Looks at every open batch, and reads the answers of those that ended.
    async fn look(&mut self) -> Result<()> {
        let mut at = 0;
        while at < self.open.len() {
            let id = self.open[at].stored.remote_id.clone().expect("an open batch was made");
            let now = match self.persist(|| self.api.get(&id)).await {
                Ok(now) => now,
                Err(error) if !error.kind().is_retryable() => anyhow::bail!(
                    "cannot look at batch {id} ({} rows): {error}; it is kept, and \
                     `fanout jobs resume` looks again",
                    self.open[at].rows.len()
                ),
                Err(error) => {
                    self.say(&format!("cannot look at batch {id} now: {error}"));
                    at += 1;
                    continue;
                }
            };
            let before = self.open[at].stored.remote_status.clone();
            apply(&mut self.open[at].stored, &now);
            self.store().update_remote_batch(&self.open[at].stored)?;
            if before.as_deref() != Some(now.status.as_str()) || now.ended {
                self.say(&format!(
                    "batch {id}: {} ({} of {} answered, {} failed)",
                    now.status, now.counts.succeeded, now.counts.total, now.counts.failed
                ));
            }
            if now.ended {
                let open = self.open.remove(at);
                self.collect(open, &now).await?;
            } else {
                at += 1;
            }
        }
        Ok(())
    }

    /// Reads an ended batch's answers into results; its rows without an
    /// answer are sent again.
    async fn collect(&mut self, open: Open, batch: &Batch) -> Result<()> {
        let mut answers: Vec<BatchAnswer> = Vec::new();
        let shape = self.shape.clone();
        let read = self
            .persist(|| async {
                let mut lines = Vec::new();
                self.api.answers(batch, &shape, &mut |answer| lines.push(answer)).await?;
                Ok(lines)
            })
            .await;
        match read {
            Ok(lines) => answers = lines,
            Err(error) if batch.errors.is_empty() => {
                anyhow::bail!("cannot read the answers of batch {}: {error}", batch.id)
            }
            Err(_) => {}
        }
        let mut unanswered: HashSet<u64> = open.rows.iter().copied().collect();
        // Rows cancelled to finish online are running online already.
        let send_again = !open.cancelled_for_online;
        // A batch refused at validation ran nothing: the lines it names fail
        // with its words, the others go again.
        for error in &batch.errors {
            let line = error.line.and_then(|line| line.checked_sub(1));
            let Some(row) = line.and_then(|line| open.all_rows.get(line as usize)) else {
                continue;
            };
            if open.rows.contains(row) {
                let refusal = ProviderError::new(ErrorKind::BadRequest, error.message.clone());
                self.finish(*row, Outcome::failed(refusal, self.attempts(*row))).await;
            }
        }
        // A refusal of the whole batch (OpenAI's enqueued token limit, say)
        // sends its rows again as an error would, then ends them with its words.
        let refused_whole: Vec<&str> =
            batch.errors.iter().filter(|e| e.line.is_none()).map(|e| e.message.as_str()).collect();
        if !refused_whole.is_empty() {
            self.say(&format!("batch {} was refused: {}", batch.id, refused_whole.join("; ")));
        }
        let waited =
            Duration::from_secs((fanout_store::now() - open.stored.created_at).max(0) as u64);
        for answer in answers {
            let Some(row) =
                index_of(&answer.custom_id).filter(|row| open.rows.binary_search(row).is_ok())
            else {
                continue;
            };
            let attempts = self.attempts(row);
            let verdict = match answer.outcome {
                BatchOutcome::Answered(response) => {
                    Verdict::Final(Outcome::Succeeded(Success::new(response, waited, attempts)))
                }
                BatchOutcome::Failed(error)
                    if error.kind().is_retryable() && attempts <= self.remote.retries =>
                {
                    Verdict::SendAgain
                }
                BatchOutcome::Failed(error) => Verdict::Final(Outcome::failed(error, attempts)),
                BatchOutcome::Expired
                    if attempts <= self.remote.retries || self.via.then_online =>
                {
                    Verdict::SendAgain
                }
                BatchOutcome::Expired => Verdict::Final(Outcome::failed(
                    ProviderError::new(
                        ErrorKind::Timeout,
                        format!("the batch expired before this row ran, {attempts} times"),
                    ),
                    attempts,
                )),
                BatchOutcome::Cancelled if open.cancelled_for_online => Verdict::Online,
                BatchOutcome::Cancelled if open.resend_cancelled => Verdict::SendAgain,
                BatchOutcome::Cancelled => Verdict::Leave,
            };
            unanswered.remove(&row);
            match verdict {
                Verdict::Final(outcome) => self.finish(row, outcome).await,
                Verdict::SendAgain if send_again => self.again.push(row),
                Verdict::SendAgain | Verdict::Online => {}
                Verdict::Leave => self.finish(row, Outcome::NotRun(NotRun::Cancelled)).await,
            }
        }
        let emitted = self.emitted.lock().expect("never poisoned").clone();
        // Cancelled by someone else in this run: its unanswered rows stay so.
        let left = batch.cancelled && !open.cancelled_for_online && !open.resend_cancelled;
        for row in open.rows {
            if !send_again || !unanswered.contains(&row) || emitted.contains(row) {
                continue;
            }
            if left {
                self.finish(row, Outcome::NotRun(NotRun::Cancelled)).await;
                continue;
            }
            // No line came back for it (or its batch ran nothing): it goes
            // again, as often as a retryable error would.
            let attempts = self.attempts(row);
            if attempts <= self.remote.retries || self.via.then_online {
                self.again.push(row);
            } else {
                let why = format!("the batches gave no answer for this row, {attempts} times");
                let error = ProviderError::new(ErrorKind::MalformedResponse, why);
                self.finish(row, Outcome::failed(error, attempts)).await;
            }
        }
        let mut stored = open.stored;
        stored.state = remote_state::ENDED.into();
        self.store().update_remote_batch(&stored)?;
        Ok(())
    }

    /// Cancels the open batches: what they still hold finishes online.
    async fn cancel_for_online(&mut self) {
        self.say("the deadline nears: cancelling the open batches and finishing their rows online");
        for open in &mut self.open {
            if open.cancelled_for_online {
                continue;
            }
            open.cancelled_for_online = true;
            let id = open.stored.remote_id.clone().expect("an open batch was made");
            if let Err(error) = self.api.cancel(&id).await {
                eprintln!("fanout: cannot cancel batch {id}: {error}");
            }
            // Their rows start online now; an answer from the batch that
            // comes first is kept instead.
            let rows: Vec<u64> = open.rows.clone();
            self.again.extend(rows);
        }
    }

    /// Runs `rows` online through the executor, in the background; their
    /// results join the batch's, and the second answer of a row is dropped.
    fn run_online(&mut self, mut rows: Vec<u64>) -> Result<tokio::task::JoinHandle<Totals>> {
        rows.sort_unstable();
        rows.dedup();
        let wanted: HashSet<u64> = rows.iter().copied().collect();
        let emitted = Arc::clone(&self.emitted);
        let mut positions = Vec::with_capacity(rows.len());
        let mut tasks = Vec::with_capacity(rows.len());
        for (index, task) in (self.remote.again)()?.enumerate() {
            let index = index as u64;
            if wanted.contains(&index) && !emitted.lock().expect("never poisoned").contains(index) {
                positions.push(index);
                tasks.push(task);
            }
        }
        self.say(&format!("{} rows go online", tasks.len()));
        let mut results = self.online_executor().stream_held(futures_util::stream::iter(tasks));
        let (sender, tally) = (self.sender.clone(), Arc::clone(&self.tally));
        let online_usage = Arc::clone(&self.online_usage);
        Ok(tokio::spawn(async move {
            while let Some(mut held) = results.next().await {
                let row = positions[held.result.index];
                held.result.index = row as usize;
                let first = {
                    let mut emitted = emitted.lock().expect("never poisoned");
                    let first = !emitted.contains(row);
                    emitted.insert(row);
                    first
                };
                if first {
                    tally.lock().expect("never poisoned").add(&held.result);
                    *online_usage.lock().expect("never poisoned") += held.result.outcome.usage();
                    let _ = sender.send(held).await;
                }
            }
            results.totals().await
        }))
    }

    /// The executor for online rows, made at the first: its deadline is
    /// what is left of the job's.
    fn online_executor(&mut self) -> &Executor {
        if self.remote.online_executor.is_none() {
            let left = self.remote.deadline.map(|d| d.saturating_sub(self.started.elapsed()));
            let builder = self.remote.online.lock().expect("never poisoned").take();
            let builder = builder.expect("built once");
            self.remote.online_executor = Some(builder.deadline(left).build());
        }
        self.remote.online_executor.as_ref().expect("just made")
    }

    fn attempts(&self, row: u64) -> u32 {
        self.submissions.get(&row).copied().unwrap_or(1).max(1)
    }

    async fn finish(&mut self, row: u64, outcome: Outcome) {
        let Some(id) = self.ids.get(&row).cloned() else { return };
        self.emit(TaskResult::new(row as usize, id, outcome), None).await;
    }

    /// Hands a result to the committer, unless the row has one already.
    async fn emit(&mut self, result: TaskResult, slot: Option<fanout::Slot>) {
        let row = result.index as u64;
        {
            let mut emitted = self.emitted.lock().expect("never poisoned");
            if emitted.contains(row) {
                return;
            }
            emitted.insert(row);
        }
        self.tally.lock().expect("never poisoned").add(&result);
        self.batch_usage += result.outcome.usage();
        let _ = self.sender.send(HeldResult { result, slot }).await;
    }

    /// The rows still at the service when the run stops: unfinished, to be
    /// collected by a resume.
    async fn leave_unfinished(&mut self, why: NotRun) {
        let rows: Vec<u64> =
            self.open.iter().flat_map(|o| o.rows.clone()).chain(self.again.drain(..)).collect();
        for row in rows {
            self.finish(row, Outcome::NotRun(why.clone())).await;
        }
        self.open.clear();
    }

    fn totals(&mut self) -> Totals {
        let tally = std::mem::take(&mut *self.tally.lock().expect("never poisoned"));
        let mut totals = tally.finish(None);
        let online = *self.online_usage.lock().expect("never poisoned");
        totals.cost = self.remote.price.map(|price| {
            price.scaled(self.via.discount).cost(self.batch_usage) + price.cost(online)
        });
        for online in &self.online_totals {
            totals.calls += online.calls;
            totals.retries += online.retries;
            totals.rate_limited += online.rate_limited;
            totals.hedges += online.hedges;
            totals.hedges_won += online.hedges_won;
        }
        totals.wall = self.started.elapsed();
        let minutes = totals.wall.as_secs_f64().max(1e-9) / 60.0;
        totals.requests_per_minute = totals.calls as f64 / minutes;
        totals.tokens_per_minute = totals.usage.total() as f64 / minutes;
        totals
    }
}

/// A batch's lines being gathered, and the rows they are.
#[derive(Default)]
struct Chunk {
    rows: Vec<u64>,
    lines: Vec<u8>,
}

fn task_id(task: &Task, index: u64) -> TaskId {
    task.id().cloned().unwrap_or_else(|| TaskId::from(index.to_string()))
}

fn backoff(tries: u32) -> Duration {
    Duration::from_secs(1 << tries.min(6))
}

/// Takes what the service says of a batch into its stored record.
fn apply(stored: &mut RemoteBatch, batch: &Batch) {
    stored.state = if batch.ended { remote_state::ENDED } else { remote_state::SUBMITTED }.into();
    stored.remote_status = Some(batch.status.clone());
    stored.succeeded = batch.counts.succeeded;
    stored.failed = batch.counts.failed;
    stored.described = serde_json::to_string(batch).ok();
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use fanout::batches::BatchCounts;
    use fanout::{MockProvider, Response};

    use super::*;

    /// A Batch API whose one batch runs until it is cancelled; then it has
    /// answered its first `answered` rows and cancelled the rest.
    struct NeverEnding {
        rows: AtomicUsize,
        cancelled: AtomicBool,
        answered: usize,
    }

    impl NeverEnding {
        fn batch(&self) -> Batch {
            let cancelled = self.cancelled.load(Ordering::SeqCst);
            let total = self.rows.load(Ordering::SeqCst) as u64;
            Batch {
                id: "batch_1".into(),
                status: if cancelled { "cancelled" } else { "in_progress" }.into(),
                ended: cancelled,
                cancelled,
                counts: BatchCounts { total, succeeded: 0, failed: 0 },
                results: vec!["file-out".into()],
                errors: Vec::new(),
                created_at: fanout_store::now(),
            }
        }
    }

    #[fanout::async_trait]
    impl BatchApi for NeverEnding {
        fn name(&self) -> &str {
            "openai"
        }
        fn limits(&self) -> BatchLimits {
            BatchLimits { max_requests: 1000, max_bytes: 1 << 20 }
        }
        fn line(&self, custom_id: &str, _: &Request) -> Vec<u8> {
            format!("{custom_id}\n").into_bytes()
        }
        async fn upload(&self, _: &str, _: &[u8]) -> Result<Option<String>, ProviderError> {
            Ok(None)
        }
        async fn create(
            &self,
            _: &str,
            _: Option<&str>,
            lines: &[u8],
        ) -> Result<Batch, ProviderError> {
            let rows = lines.iter().filter(|b| **b == b'\n').count();
            self.rows.fetch_add(rows, Ordering::SeqCst);
            Ok(self.batch())
        }
        async fn find(&self, _: &str, _: i64, _: u64) -> Result<Vec<Batch>, ProviderError> {
            Ok(Vec::new())
        }
        async fn get(&self, _: &str) -> Result<Batch, ProviderError> {
            Ok(self.batch())
        }
        async fn cancel(&self, _: &str) -> Result<Batch, ProviderError> {
            self.cancelled.store(true, Ordering::SeqCst);
            Ok(self.batch())
        }
        async fn answers(
            &self,
            _: &Batch,
            _: &Request,
            each: &mut (dyn FnMut(BatchAnswer) + Send),
        ) -> Result<(), ProviderError> {
            for row in 0..self.rows.load(Ordering::SeqCst) as u64 {
                let outcome = if (row as usize) < self.answered {
                    BatchOutcome::Answered(Response::new("from the batch", Usage::new(10, 2)))
                } else {
                    BatchOutcome::Cancelled
                };
                each(BatchAnswer { custom_id: custom_id(row), outcome });
            }
            Ok(())
        }
    }

    fn tasks(rows: usize) -> Box<dyn Iterator<Item = Task> + Send> {
        Box::new((0..rows).map(|i| Task::with_id(format!("r{i}"), Request::user(format!("q{i}")))))
    }

    /// `--via batch-api --deadline 1h --then online`, under paused time: the
    /// batch is waited for until the deadline nears, then cancelled, and its
    /// unanswered rows run online; each row is answered once, the batch's
    /// answers first, and the online duplicates are dropped uncounted.
    #[tokio::test(start_paused = true)]
    async fn near_the_deadline_the_batch_is_cancelled_and_the_rest_runs_online() {
        let api = Arc::new(NeverEnding {
            rows: AtomicUsize::new(0),
            cancelled: AtomicBool::new(false),
            answered: 3,
        });
        let provider = MockProvider::new().with_latency(Duration::from_secs(1));
        let store = Store::open(std::path::Path::new(":memory:")).unwrap();
        let job = store_job(&store);
        let start = Instant::now();
        let remote = Remote {
            api: Arc::clone(&api) as Arc<dyn BatchApi>,
            via: ViaBatchApi { then_online: true, poll_interval: 60.0, ..ViaBatchApi::default() },
            store,
            job,
            tasks: tasks(10),
            again: Box::new(|| Ok(tasks(10))),
            finished: Finished::default(),
            online: Executor::builder(provider),
            price: Some(Price::new(1.0, 1.0)),
            retries: 4,
            deadline: Some(Duration::from_secs(3600)),
            drain: CancellationToken::new(),
            quiet: true,
        };
        let mut results = super::start(remote);
        let mut answers = std::collections::BTreeMap::new();
        while let Some(held) = results.next().await {
            let text = held.result.outcome.text().unwrap_or_default().to_owned();
            assert!(answers.insert(held.result.index, text).is_none(), "a row answered twice");
        }
        let totals = results.totals().await;
        assert!(api.cancelled.load(Ordering::SeqCst));
        assert_eq!(answers.len(), 10);
        assert!(answers.values().take(3).all(|t| t == "from the batch"), "{answers:?}");
        assert!(answers.values().skip(3).all(|t| t != "from the batch"), "{answers:?}");
        assert_eq!((totals.tasks, totals.succeeded, totals.calls), (10, 10, 7));
        // Cancelled at 1 h less its reserve (6 min), seen at the next look.
        let cancelled_at = start.elapsed();
        assert!(cancelled_at >= Duration::from_secs(3240), "{cancelled_at:?}");
        assert!(cancelled_at < Duration::from_secs(3600), "{cancelled_at:?}");
        // The batch's answers at half price, the online ones at full.
        let online = Usage::new(totals.usage.input_tokens - 30, totals.usage.output_tokens - 6);
        let expected =
            Price::new(0.5, 0.5).cost(Usage::new(30, 6)) + Price::new(1.0, 1.0).cost(online);
        assert!((totals.cost.unwrap() - expected).abs() < 1e-12);
    }

    /// A Batch API that refuses its first batch at validation, naming its
    /// second line, and answers every later batch whole.
    #[derive(Default)]
    struct RefusesTheFirst {
        made: Mutex<Vec<Vec<String>>>,
    }

    impl RefusesTheFirst {
        fn batch(&self, at: usize) -> Batch {
            let made = self.made.lock().unwrap();
            let refused = at == 0;
            Batch {
                id: at.to_string(),
                status: if refused { "failed" } else { "completed" }.into(),
                ended: true,
                cancelled: false,
                counts: BatchCounts { total: made[at].len() as u64, succeeded: 0, failed: 0 },
                results: if refused { Vec::new() } else { vec![at.to_string()] },
                errors: if refused {
                    vec![fanout::batches::LineError {
                        line: Some(2),
                        message: "invalid_request: this line is bad".into(),
                    }]
                } else {
                    Vec::new()
                },
                created_at: fanout_store::now(),
            }
        }
    }

    #[fanout::async_trait]
    impl BatchApi for RefusesTheFirst {
        fn name(&self) -> &str {
            "openai"
        }
        fn limits(&self) -> BatchLimits {
            BatchLimits { max_requests: 1000, max_bytes: 1 << 20 }
        }
        fn line(&self, custom_id: &str, _: &Request) -> Vec<u8> {
            format!("{custom_id}\n").into_bytes()
        }
        async fn upload(&self, _: &str, _: &[u8]) -> Result<Option<String>, ProviderError> {
            Ok(None)
        }
        async fn create(
            &self,
            _: &str,
            _: Option<&str>,
            lines: &[u8],
        ) -> Result<Batch, ProviderError> {
            let ids = String::from_utf8_lossy(lines).lines().map(str::to_owned).collect();
            let at = {
                let mut made = self.made.lock().unwrap();
                made.push(ids);
                made.len() - 1
            };
            Ok(self.batch(at))
        }
        async fn find(&self, _: &str, _: i64, _: u64) -> Result<Vec<Batch>, ProviderError> {
            Ok(Vec::new())
        }
        async fn get(&self, id: &str) -> Result<Batch, ProviderError> {
            Ok(self.batch(id.parse().unwrap()))
        }
        async fn cancel(&self, id: &str) -> Result<Batch, ProviderError> {
            self.get(id).await
        }
        async fn answers(
            &self,
            batch: &Batch,
            _: &Request,
            each: &mut (dyn FnMut(BatchAnswer) + Send),
        ) -> Result<(), ProviderError> {
            if batch.results.is_empty() {
                return Ok(());
            }
            let ids = self.made.lock().unwrap()[batch.id.parse::<usize>().unwrap()].clone();
            for custom_id in ids {
                let response = Response::new(format!("answer to {custom_id}"), Usage::new(3, 1));
                each(BatchAnswer { custom_id, outcome: BatchOutcome::Answered(response) });
            }
            Ok(())
        }
    }

    /// A batch refused at validation: the line it names fails with the
    /// service's words, and the rest go into the next batch, once.
    #[tokio::test(start_paused = true)]
    async fn a_batch_refused_at_validation_fails_the_lines_it_names_and_sends_the_rest_again() {
        let api = Arc::new(RefusesTheFirst::default());
        let store = Store::open(std::path::Path::new(":memory:")).unwrap();
        let job = store_job(&store);
        let remote = Remote {
            api: Arc::clone(&api) as Arc<dyn BatchApi>,
            via: ViaBatchApi { poll_interval: 30.0, ..ViaBatchApi::default() },
            store,
            job,
            tasks: tasks(5),
            again: Box::new(|| Ok(tasks(5))),
            finished: Finished::default(),
            online: Executor::builder(MockProvider::new()),
            price: None,
            retries: 4,
            deadline: None,
            drain: CancellationToken::new(),
            quiet: true,
        };
        let mut results = start(remote);
        let mut outcomes = std::collections::BTreeMap::new();
        while let Some(held) = results.next().await {
            outcomes.insert(held.result.index, held.result.outcome);
        }
        assert_eq!(outcomes.len(), 5);
        let Outcome::Failed { error, .. } = &outcomes[&1] else { panic!("{:?}", outcomes[&1]) };
        assert_eq!(
            (error.kind(), error.message()),
            (ErrorKind::BadRequest, "invalid_request: this line is bad")
        );
        for row in [0, 2, 3, 4] {
            assert_eq!(outcomes[&row].text(), Some(format!("answer to row-{row}").as_str()));
        }
        let made = api.made.lock().unwrap().clone();
        assert_eq!(made.len(), 2);
        assert_eq!(made[1], ["row-0", "row-2", "row-3", "row-4"]);
    }

    fn store_job(store: &Store) -> i64 {
        store
            .create_job("hybrid", "rows.jsonl", &Default::default(), &serde_json::Value::Null)
            .unwrap()
            .id
    }
}
