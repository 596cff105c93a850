//! `fanout worker redis://…`: runs the rows of jobs sent to a Redis queue by
//! `fanout batch --queue`, on as many machines as there are workers.
//!
//! A worker takes rows as its executor has slots for them (so it holds no
//! more than it runs), calls the provider with its own key (read from its
//! environment, never from Redis), and hands each result back in the same
//! transaction that removes its row from the queue. Rows a worker took and
//! has not answered are kept alive by it; a worker that dies stops doing so,
//! and after `--claim-after` another worker takes them over. All workers
//! keep one set of limits together through the same Redis: the job's --rpm
//! and --tpm are their total, a 429 pauses them all, and
//! `--global-concurrency` caps their calls in flight.

use std::collections::{HashMap, VecDeque};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use fanout::{CancellationToken, Task, TaskId, Usage};
use fanout_queue::{Answer, JobMeta, JobQueue, QueuedTask};
use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;

use crate::Refusal;
use crate::exit::{Ending, Exit};
use crate::record::to_record;
use crate::settings::{Flags, Settings};

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The Redis queue the jobs were sent to (`fanout batch --queue redis://host:6379/0`)
    #[arg(value_name = "URL", env = "FANOUT_QUEUE", hide_env_values = true)]
    queue: String,
    /// Serve this job only, and stop once all its rows are answered [default:
    /// every job in the queue, until Ctrl-C]
    #[arg(long)]
    job: Option<String>,
    /// Seconds a row another worker took may go without news before this one
    /// takes it over (that worker died)
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    claim_after: f64,
    /// The most calls in flight at once, all workers together
    #[arg(long, value_name = "N")]
    global_concurrency: Option<usize>,
}

/// How long an idle worker waits between two looks for work.
const IDLE_LOOK: Duration = Duration::from_millis(250);
/// The most results handed back in one transaction.
const MAX_ANSWERS: usize = 256;
/// How long one read of a job's queue waits for a row.
const TAKE_WAIT: Duration = Duration::from_millis(500);
/// Rows taken in one read: one round trip to Redis per row would bound a
/// worker at a few thousand rows a second. Rows waiting for a slot are kept
/// alive like running ones, and were not called: a worker that dies with
/// them costs nothing twice.
const TAKEN_AT_ONCE: usize = 16;

pub async fn command(flags: &Flags, args: WorkerArgs) -> Result<ExitCode> {
    if args.claim_after.is_nan() || args.claim_after <= 0.0 {
        return Err(Refusal(anyhow::anyhow!("--claim-after must be more than 0 seconds")).into());
    }
    // An unreachable Redis is exit 2, before anything else.
    // One pair of connections for every job this worker looks at.
    let any_job = JobQueue::connect(&args.queue, "").await.map_err(|e| Refusal(e.into()))?;
    let known = any_job.jobs().await.map_err(|e| Refusal(e.into()))?;
    let quiet = flags.quiet;
    let drain = CancellationToken::new();
    tokio::spawn({
        let drain = drain.clone();
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\nfanout: stopping: no new rows; rows in flight finish first");
                drain.cancel();
            }
        }
    });
    let consumer = format!("worker-{}-{:08x}", std::process::id(), fastrand::u32(..));
    let mut refused: Vec<String> = Vec::new();
    let mut seen_job = known.iter().any(|job| Some(job) == args.job.as_ref());
    let mut down = false;
    while !drain.is_cancelled() {
        let names = match &args.job {
            Some(job) => Ok(vec![job.clone()]),
            None => any_job.jobs().await,
        };
        let names = match names {
            Ok(names) => {
                if std::mem::take(&mut down) && !quiet {
                    eprintln!("fanout: Redis answers again");
                }
                names
            }
            Err(error) => {
                if !std::mem::replace(&mut down, true) && !quiet {
                    eprintln!("fanout: {error}; waiting for it to come back");
                }
                tokio::time::sleep(IDLE_LOOK).await;
                continue;
            }
        };
        let mut served = false;
        for name in names {
            let queue = any_job.of_job(&name);
            let Ok(Some(meta)) = queue.meta().await else {
                if args.job.is_some() && seen_job {
                    // Its producer stored every row and removed it.
                    return Ok(ExitCode::SUCCESS);
                }
                continue;
            };
            seen_job = true;
            let settings = match job_settings(&meta, flags) {
                Ok(settings) => settings,
                Err(why) => {
                    if !refused.contains(&name) {
                        eprintln!("fanout: this worker refuses job `{name}`: {why:#}");
                        refused.push(name.clone());
                    }
                    if args.job.is_some() {
                        return Ok(Exit::Refused.into());
                    }
                    continue;
                }
            };
            if queue.is_drained().await.unwrap_or(false) {
                if args.job.is_some() {
                    return Ok(ExitCode::SUCCESS);
                }
                continue;
            }
            let ending = serve(&queue, settings, &args, &consumer, drain.clone(), quiet).await?;
            served = true;
            if let Some(cause) = ending.cannot_succeed {
                eprintln!(
                    "fanout: this worker cannot run job `{name}`: {cause}; its rows wait for other workers"
                );
                return Ok(Exit::CannotSucceed.into());
            }
        }
        if !served {
            tokio::time::sleep(IDLE_LOOK).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The settings this worker runs a job with: the job's (what shapes the
/// answers), with this worker's run limits and key variable. A worker told
/// another provider or model, or of another queue format, refuses the job.
fn job_settings(meta: &JobMeta, flags: &Flags) -> Result<Settings> {
    if meta.format != fanout_queue::FORMAT {
        anyhow::bail!(
            "it was queued in format {} and this worker reads format {}: run a fanout of the producer's version",
            meta.format,
            fanout_queue::FORMAT
        );
    }
    let settings: Settings = serde_json::from_str(&meta.settings)
        .map_err(|error| anyhow::anyhow!("its settings do not parse: {error}"))?;
    let asked = &flags.choices;
    if let Some(provider) = asked.provider
        && provider != settings.provider
    {
        anyhow::bail!(
            "it runs on provider {:?} and this worker was given {provider:?}",
            settings.provider
        );
    }
    if let Some(model) = &asked.model
        && *model != settings.model
    {
        anyhow::bail!("it runs on model `{}` and this worker was given `{model}`", settings.model);
    }
    let mut settings = settings.with_run_limits(flags)?;
    // The producer's --deadline ends the job's run; a worker stops at its own only.
    settings.deadline = asked.deadline;
    Ok(settings)
}

/// Runs the job's rows until its queue is empty (or Ctrl-C).
async fn serve(
    queue: &JobQueue,
    mut settings: Settings,
    args: &WorkerArgs,
    consumer: &str,
    drain: CancellationToken,
    quiet: bool,
) -> Result<Ending> {
    let provider = crate::connect::provider(&settings, quiet).await.map_err(Refusal)?;
    let shared = crate::limits::SharedLimitsArgs {
        limits: Some(args.queue.clone()),
        global_concurrency: args.global_concurrency,
        limits_scope: None,
    }
    .connect(&settings, quiet)
    .await?;
    // The job's --rpm and --tpm are every worker's total, kept in Redis.
    (settings.rpm, settings.tpm) = (None, None);
    let mut builder =
        crate::connect::executor(&settings, provider, Usage::default()).drain_token(drain.clone());
    if let Some(shared) = &shared {
        builder = builder.shared_limits(Arc::clone(shared));
    }
    let executor = builder.build();
    if !quiet {
        eprintln!("fanout: worker {consumer}: running job `{}`", queue.job());
    }
    let taken = Taken::default();
    let claim_after = Duration::from_secs_f64(args.claim_after);
    let heartbeat =
        tokio::spawn(keep_alive(queue.clone(), consumer.to_owned(), taken.clone(), claim_after));
    let rows = Rows {
        queue: queue.clone(),
        consumer: consumer.to_owned(),
        claim_after,
        taken: taken.clone(),
        buffer: VecDeque::new(),
        next: 0,
        last_claim: None,
        drain,
        down: false,
        quiet,
    };
    let tasks = futures_util::stream::unfold(rows, |mut rows| async move {
        let task = rows.next().await?;
        Some((task, rows))
    });
    let mut results = executor.stream_held(tasks);
    let (mut ending, mut answered) = (Ending::default(), 0u64);
    let mut down = false;
    while let Some(first) = results.next().await {
        // Whatever else has finished meanwhile goes back in the same transaction.
        let mut group = vec![first];
        while group.len() < MAX_ANSWERS {
            match results.next().now_or_never() {
                Some(Some(next)) => group.push(next),
                _ => break,
            }
        }
        let answers: Vec<Answer> = group
            .iter()
            .filter_map(|held| {
                ending.add(&held.result.outcome);
                let (entry, row) = taken.finish(held.result.index)?;
                // Not finished (cancelled, not run): left in the queue, where
                // another worker takes it over.
                let mut record = to_record(&held.result)?;
                record.index = row;
                let record = serde_json::to_string(&record).expect("a record serializes");
                Some(Answer { entry, index: row, record })
            })
            .collect();
        // The slots stay held until the results are in Redis: a worker cut
        // off from Redis stops taking rows and keeps what it finished.
        while let Err(error) = queue.answer(&answers).await {
            if !std::mem::replace(&mut down, true) && !quiet {
                eprintln!("fanout: {error}; finished results wait here until it is back");
            }
            tokio::time::sleep(IDLE_LOOK).await;
        }
        if std::mem::take(&mut down) && !quiet {
            eprintln!("fanout: Redis answers again; results handed back");
        }
        answered += answers.len() as u64;
        drop(group);
    }
    heartbeat.abort();
    if let Some(shared) = &shared {
        shared.close().await;
    }
    if !quiet {
        eprintln!(
            "fanout: worker {consumer}: job `{}`: {answered} rows answered here",
            queue.job()
        );
    }
    Ok(ending)
}

/// The rows this worker has taken and not answered: those waiting for a
/// slot, and those running (by the executor's index of each, with its queue
/// entry and row).
#[derive(Clone, Default)]
struct Taken(Arc<Mutex<TakenRows>>);

#[derive(Default)]
struct TakenRows {
    waiting: std::collections::HashSet<String>,
    running: HashMap<usize, (String, u64)>,
}

impl Taken {
    fn hold(&self, rows: &[QueuedTask]) {
        let mut taken = self.0.lock().expect("never poisoned");
        taken.waiting.extend(rows.iter().map(|row| row.entry.clone()));
    }

    fn start(&self, index: usize, task: &QueuedTask) {
        let mut taken = self.0.lock().expect("never poisoned");
        taken.waiting.remove(&task.entry);
        taken.running.insert(index, (task.entry.clone(), task.index));
    }

    fn finish(&self, index: usize) -> Option<(String, u64)> {
        self.0.lock().expect("never poisoned").running.remove(&index)
    }

    fn entries(&self) -> Vec<String> {
        let taken = self.0.lock().expect("never poisoned");
        let running = taken.running.values().map(|(entry, _)| entry);
        taken.waiting.iter().chain(running).cloned().collect()
    }
}

/// Tells the queue, a few times per `claim_after`, that this worker is still
/// working on the rows it took: only the rows of a worker that died are taken over.
async fn keep_alive(queue: JobQueue, consumer: String, taken: Taken, claim_after: Duration) {
    loop {
        tokio::time::sleep(claim_after / 3).await;
        let _ = queue.touch(&consumer, &taken.entries()).await;
    }
}

/// The job's rows as this worker's executor asks for them.
struct Rows {
    queue: JobQueue,
    consumer: String,
    claim_after: Duration,
    taken: Taken,
    buffer: VecDeque<QueuedTask>,
    /// The executor's index of the next task.
    next: usize,
    last_claim: Option<Instant>,
    drain: CancellationToken,
    down: bool,
    quiet: bool,
}

impl Rows {
    /// The next row; `None` once the job's queue is empty or on Ctrl-C.
    async fn next(&mut self) -> Option<Task> {
        loop {
            if self.drain.is_cancelled() {
                return None;
            }
            if let Some(row) = self.buffer.pop_front() {
                let index = self.next;
                self.next += 1;
                self.taken.start(index, &row);
                return Some(task_of(&row));
            }
            match self.look().await {
                Ok(true) => {}
                Ok(false) => {
                    if self.queue.is_drained().await.unwrap_or(false) {
                        return None;
                    }
                }
                Err(error) => {
                    // Its queue removed: the producer has every result.
                    if self.queue.is_drained().await.unwrap_or(false) {
                        return None;
                    }
                    if !std::mem::replace(&mut self.down, true) && !self.quiet {
                        eprintln!("fanout: {error}; no new rows until it is back");
                    }
                    tokio::time::sleep(IDLE_LOOK).await;
                }
            }
        }
    }

    /// Takes over rows of dead workers (now and then), else new rows.
    /// Returns whether any came.
    async fn look(&mut self) -> Result<bool, fanout_queue::QueueError> {
        let due = self.last_claim.is_none_or(|at| at.elapsed() >= self.claim_after / 2);
        if due {
            self.last_claim = Some(Instant::now());
            let claimed = self.queue.claim(&self.consumer, self.claim_after, TAKEN_AT_ONCE).await?;
            if !claimed.is_empty() {
                self.taken.hold(&claimed);
                self.buffer.extend(claimed);
                return Ok(true);
            }
        }
        let taken = self.queue.take(&self.consumer, TAKEN_AT_ONCE, TAKE_WAIT).await?;
        if std::mem::take(&mut self.down) && !self.quiet {
            eprintln!("fanout: Redis answers again; taking rows");
        }
        let any = !taken.is_empty();
        self.taken.hold(&taken);
        self.buffer.extend(taken);
        Ok(any)
    }
}

/// The task a queued row stands for; a request that does not parse fails its row.
fn task_of(row: &QueuedTask) -> Task {
    match serde_json::from_str(&row.request) {
        Ok(request) => Task::with_id(TaskId::from(row.id.clone()), request),
        Err(error) => Task::settled(
            TaskId::from(row.id.clone()),
            fanout::Outcome::failed(
                fanout::ProviderError::new(
                    fanout::ErrorKind::BadRequest,
                    format!("row {}'s request in the queue does not parse: {error}", row.index),
                ),
                0,
            ),
        ),
    }
}
