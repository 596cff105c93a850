//! `fanout batch --queue redis://…`: the job's rows go to a Redis queue, and
//! `fanout worker`s on any number of machines run them. This side enqueues
//! the rendered requests in bounded chunks, collects the workers' results for
//! the committer (which stores and writes them as for any run), and tells the
//! queue once each result is committed, so it leaves Redis only then.
//!
//! Nothing is lost or asked twice across crashes: the queue's `enqueued` mark
//! moves in the same transaction as the rows it counts, so a producer that
//! comes back enqueues only what is past it; results it had been given but
//! not committed are given again; a result that arrives twice (a slow worker
//! finishing a row another worker took over) is stored once.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use fanout::{
    CancellationToken, HeldResult, NotRun, Outcome, Tally, Task, TaskId, TaskResult, Totals,
};
use fanout_queue::{JobMeta, JobQueue, QueuedResult, QueuedTask};
use fanout_store::Record;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::committer::DrivenResults;
use crate::record::to_result;

/// Rows enqueued per transaction.
const CHUNK: usize = 256;
/// How long one read of the results waits for one.
const RESULTS_WAIT: Duration = Duration::from_millis(200);
/// How long the producer waits before trying an unreachable Redis again.
const RETRY_REDIS: Duration = Duration::from_secs(1);

/// What a queued run needs.
pub struct Queued {
    pub queue: JobQueue,
    pub meta: JobMeta,
    pub tasks: Box<dyn Iterator<Item = Task> + Send>,
    /// Rows the queue holds no result for that are still to come; the most
    /// enqueued and unanswered at once, so neither Redis nor this process
    /// holds a million rows.
    pub window: usize,
    /// Indices the committer has committed, to be acknowledged.
    pub committed: mpsc::UnboundedReceiver<Vec<u64>>,
    pub drain: CancellationToken,
    pub deadline: Option<Duration>,
    pub quiet: bool,
    /// Failed rows are run again (`--retry-failed`).
    pub retry_failed: bool,
}

/// Announces the job (an unreachable Redis or another job of the same name
/// is an error here, before any row is sent) and starts collecting its
/// results for the committer.
pub async fn start(queued: Queued) -> Result<DrivenResults> {
    let enqueued =
        queued.queue.announce(&queued.meta).await.map_err(|e| crate::Refusal(e.into()))?;
    if queued.retry_failed && enqueued > 0 {
        return Err(crate::Refusal(anyhow::anyhow!(
            "--retry-failed sends failed rows again, but job `{}` still has rows in its queue: resume it without --retry-failed first",
            queued.queue.job()
        ))
        .into());
    }
    Ok(DrivenResults::spawn("the queued run", |sender| {
        Producer::new(queued, enqueued, sender).run()
    }))
}

struct Producer {
    queue: JobQueue,
    tasks: Box<dyn Iterator<Item = Task> + Send>,
    window: usize,
    committed: mpsc::UnboundedReceiver<Vec<u64>>,
    drain: CancellationToken,
    deadline: Option<Instant>,
    quiet: bool,
    sender: mpsc::Sender<HeldResult>,
    /// Rows enqueued by an earlier run: found in the queue, not sent again.
    enqueued_before: u64,
    /// The next row's index.
    next: u64,
    input_done: bool,
    /// Whether the queue has been told every row is in.
    finished_enqueuing: bool,
    /// Rows taken from the input and not yet in Redis.
    unsent: Vec<QueuedTask>,
    /// Rows in the queue (or on their way there) without a result yet, with their ids.
    outstanding: HashMap<u64, TaskId>,
    /// Result entries handed to the committer and not yet acknowledged.
    unacknowledged: HashMap<u64, Vec<String>>,
    /// While the results given before a crash are read again: the last one
    /// read (`"0"` before the first); `None` once they all are.
    reread_after: Option<String>,
    /// Whether Redis is out of reach now (said once per outage).
    down: bool,
    tally: Tally,
    /// Attempts the workers made for the rows answered (their hedges unknown here).
    calls: u64,
    started: Instant,
}

impl Producer {
    fn new(queued: Queued, enqueued_before: u64, sender: mpsc::Sender<HeldResult>) -> Self {
        let now = Instant::now();
        Self {
            queue: queued.queue,
            tasks: queued.tasks,
            window: queued.window.max(1),
            committed: queued.committed,
            drain: queued.drain,
            deadline: queued.deadline.map(|d| now + d),
            quiet: queued.quiet,
            sender,
            enqueued_before,
            next: 0,
            input_done: false,
            finished_enqueuing: false,
            unsent: Vec::new(),
            outstanding: HashMap::new(),
            unacknowledged: HashMap::new(),
            reread_after: Some("0".into()),
            down: false,
            tally: Tally::new(),
            calls: 0,
            started: now,
        }
    }

    async fn run(mut self) -> Totals {
        loop {
            let stopping =
                self.drain.is_cancelled() || self.deadline.is_some_and(|d| Instant::now() >= d);
            if stopping {
                break;
            }
            if self.input_done && self.outstanding.is_empty() {
                break;
            }
            let step = async {
                self.fill().await?;
                self.collect().await?;
                self.acknowledge_committed().await
            };
            match step.await {
                Ok(()) => self.reachable(),
                Err(error) => {
                    if let Ok(None) = self.queue.meta().await {
                        // Redis answers, without the job: it restarted
                        // without persistence, or someone removed the keys.
                        eprintln!(
                            "fanout: job `{}` is gone from the queue (Redis restarted without saving its data?); \
                             a resume enqueues its unfinished rows again",
                            self.queue.job()
                        );
                        break;
                    }
                    self.unreachable(&error).await;
                }
            }
            if self.sender.is_closed() {
                return self.totals();
            }
        }
        self.finish().await;
        self.totals()
    }

    /// Enqueues rows while fewer than the window wait for a result.
    async fn fill(&mut self) -> Result<(), fanout_queue::QueueError> {
        // Rows an earlier run enqueued are taken whatever the window: their
        // results may be on their way back already.
        let has_room =
            |this: &Self| this.next < this.enqueued_before || this.outstanding.len() < this.window;
        loop {
            while !self.input_done && self.unsent.len() < CHUNK && has_room(self) {
                let Some((index, id, task)) = self.next_task() else {
                    self.input_done = true;
                    break;
                };
                let Some(request) = task.request() else {
                    // A bad row or a restored result: known without a call.
                    let outcome = settled(&task, NotRun::Cancelled);
                    self.emit(TaskResult::new(index as usize, id, outcome)).await;
                    continue;
                };
                if index >= self.enqueued_before {
                    // Image files are read here: a worker on another machine cannot.
                    let request = match fanout::read_image_files(request).await {
                        Ok(request) => {
                            serde_json::to_string(&*request).expect("a request serializes")
                        }
                        Err(error) => {
                            self.emit(TaskResult::new(
                                index as usize,
                                id,
                                Outcome::failed(error, 0),
                            ))
                            .await;
                            continue;
                        }
                    };
                    let id = id.to_string();
                    self.unsent.push(QueuedTask { entry: String::new(), index, id, request });
                }
                self.outstanding.insert(index, id);
            }
            // Kept until Redis has them: a chunk that failed goes again.
            if self.next > self.enqueued_before {
                self.queue.enqueue(&self.unsent, self.next).await?;
                self.enqueued_before = self.next;
                self.unsent.clear();
            }
            if self.input_done {
                if !self.finished_enqueuing {
                    self.queue.finish_enqueuing().await?;
                    self.finished_enqueuing = true;
                }
                return Ok(());
            }
            if !has_room(self) {
                return Ok(());
            }
        }
    }

    /// The input's next task, with its index and id.
    fn next_task(&mut self) -> Option<(u64, TaskId, Task)> {
        let task = self.tasks.next()?;
        let index = self.next;
        self.next += 1;
        let id = task.id().cloned().unwrap_or_else(|| TaskId::from(index.to_string()));
        Some((index, id, task))
    }

    /// Hands the workers' new results to the committer.
    async fn collect(&mut self) -> Result<(), fanout_queue::QueueError> {
        let results = self.queue.results(self.reread_after.as_deref(), 1024, RESULTS_WAIT).await?;
        if self.reread_after.is_some() {
            // Page by page past the last one read: those not yet committed are
            // still pending, and must not be read again as duplicates.
            self.reread_after = results.last().map(|result| result.entry.clone());
        }
        let mut duplicates = Vec::new();
        for result in results {
            // A row with no result yet, or a duplicate (answered twice, or
            // restored from the store): the latter leaves Redis at once.
            match self.outstanding.remove(&result.index) {
                Some(id) => {
                    self.unacknowledged.entry(result.index).or_default().push(result.entry.clone());
                    let outcome = outcome_of(&result, &id);
                    self.emit(TaskResult::new(result.index as usize, id, outcome)).await;
                }
                _ => duplicates.push(result.entry),
            }
        }
        self.queue.acknowledge(&duplicates).await
    }

    /// Lets the results the committer has stored leave the queue.
    async fn acknowledge_committed(&mut self) -> Result<(), fanout_queue::QueueError> {
        let mut committed = Vec::new();
        while let Ok(indices) = self.committed.try_recv() {
            committed.extend(indices);
        }
        self.acknowledge(committed).await
    }

    /// Acknowledges the results of the `committed` rows; on an error they
    /// wait for the next try.
    async fn acknowledge(&mut self, committed: Vec<u64>) -> Result<(), fanout_queue::QueueError> {
        let entries: Vec<(u64, Vec<String>)> = committed
            .into_iter()
            .filter_map(|index| Some((index, self.unacknowledged.remove(&index)?)))
            .collect();
        let flat: Vec<String> = entries.iter().flat_map(|(_, e)| e.iter().cloned()).collect();
        if let Err(error) = self.queue.acknowledge(&flat).await {
            self.unacknowledged.extend(entries);
            return Err(error);
        }
        Ok(())
    }

    async fn emit(&mut self, result: TaskResult) {
        self.calls += u64::from(result.outcome.attempts());
        self.tally.add(&result);
        let _ = self.sender.send(HeldResult { result, slot: None }).await;
    }

    /// Ends the run: with every row answered, waits for the last commits and
    /// removes the job from Redis; stopped early (Ctrl-C, the deadline), the
    /// rows still out are left to the workers and to a resume.
    async fn finish(&mut self) {
        if self.outstanding.is_empty() && self.input_done {
            while !self.unacknowledged.is_empty() {
                match tokio::time::timeout(Duration::from_secs(5), self.committed.recv()).await {
                    Ok(Some(indices)) => {
                        if self.acknowledge(indices).await.is_err() {
                            // Left in Redis: the job's queue stays for a resume.
                            return;
                        }
                    }
                    _ => return,
                }
            }
            if let Err(error) = self.queue.remove().await
                && !self.quiet
            {
                eprintln!("fanout: the job's queue could not be removed: {error}");
            }
            return;
        }
        let past_deadline = self.deadline.is_some_and(|d| Instant::now() >= d);
        let why = if past_deadline { NotRun::Deadline } else { NotRun::Cancelled };
        let rows: Vec<(u64, TaskId)> = self.outstanding.drain().collect();
        for (index, id) in rows {
            self.emit(TaskResult::new(index as usize, id, Outcome::NotRun(why.clone()))).await;
        }
        // Every row is accounted for, those never enqueued too.
        while let Some((index, id, task)) = self.next_task() {
            let outcome = settled(&task, why.clone());
            self.emit(TaskResult::new(index as usize, id, outcome)).await;
        }
    }

    fn reachable(&mut self) {
        if std::mem::take(&mut self.down) && !self.quiet {
            eprintln!("fanout: Redis answers again; collecting results");
        }
    }

    async fn unreachable(&mut self, error: &fanout_queue::QueueError) {
        if !std::mem::replace(&mut self.down, true) && !self.quiet {
            eprintln!(
                "fanout: {error}; the finished results are safe in the store, and collecting goes on when Redis is back (Ctrl-C to stop)"
            );
        }
        tokio::time::sleep(RETRY_REDIS).await;
    }

    fn totals(&mut self) -> Totals {
        let mut totals = std::mem::replace(&mut self.tally, Tally::new()).finish(None);
        totals.calls = self.calls;
        totals.wall = self.started.elapsed();
        let minutes = totals.wall.as_secs_f64().max(1e-9) / 60.0;
        totals.requests_per_minute = totals.calls as f64 / minutes;
        totals.tokens_per_minute = totals.usage.total() as f64 / minutes;
        totals
    }
}

/// A task known without a call (a bad row, a restored result); `otherwise` for one to call.
fn settled(task: &Task, otherwise: NotRun) -> Outcome {
    task.settled_outcome().cloned().unwrap_or(Outcome::NotRun(otherwise))
}

/// The outcome a worker's result stands for; one that does not parse fails its row.
fn outcome_of(result: &QueuedResult, id: &TaskId) -> Outcome {
    match serde_json::from_str::<Record>(&result.record) {
        Ok(mut record) => {
            record.index = result.index;
            record.task_id = id.to_string();
            to_result(record).outcome
        }
        Err(error) => Outcome::failed(
            fanout::ProviderError::new(
                fanout::ErrorKind::InvalidOutput,
                format!("a worker's result for row {} does not parse: {error}", result.index),
            ),
            0,
        ),
    }
}
