//! `fanout batch`: a prompt template over every row of a file, as a durable job.
//!
//! The data path, one way through: the job is opened or resumed ([`job`]),
//! input rows become tasks ([`rows`]), the executor runs them and hands each
//! result over as it finishes, and the [`committer`] stores it, frees its slot
//! and writes the output in input order from the store. Every finished task is
//! committed before it is written out or counted anywhere, so a crash loses
//! nothing finished and never pays for it twice: running the same job again (or
//! `fanout jobs resume`) restores the finished results from the store and calls
//! only for the rest.

mod args;
mod committer;
mod dry_run;
mod job;
mod keep;
mod queued;
mod remote;
mod rows;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use fanout::{CancellationToken, Executor, Usage};
use fanout_store::Store;
use serde::{Deserialize, Serialize};

use crate::Refusal;
use crate::cache::Cached;
use crate::connect;
use crate::history::{self, RunLog};
use crate::input::Format;
use crate::output::{Columns, Output, OutputFormat};
use crate::progress::{self, Progress};
use crate::settings::Settings;
use crate::template::Prompt;
pub use args::{BatchArgs, JobRunArgs, command};
use committer::{Committed, Committer, RunResults};
use job::Opened;
pub use keep::Keep;
use keep::KeptFields;
pub use remote::ViaBatchApi;

/// What a job was started with: enough to run it again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Spec {
    pub input: PathBuf,
    pub format: Format,
    pub prompt: Option<String>,
    pub system: Option<String>,
    pub id_field: Option<String>,
    pub output_format: OutputFormat,
    /// Input fields each output row keeps beside its answer.
    #[serde(default)]
    pub keep: Option<Keep>,
    /// The JSON Schema every answer must follow (`--schema`).
    #[serde(default)]
    pub schema: Option<fanout::ResponseFormat>,
    /// Fields whose values are images of the row's message (`--image`).
    #[serde(default)]
    pub images: Vec<String>,
    /// Through the provider's Batch API (`--via batch-api`), not online.
    #[serde(default)]
    pub via: Option<ViaBatchApi>,
    /// The rows of the input this job runs (`--shard K/N`); every row without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<crate::shard::Shard>,
    /// Its rows run on `fanout worker`s through a Redis queue (`--queue`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub queued: bool,
    pub settings: Settings,
}

/// How this run goes, beyond the job's spec.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub job: String,
    pub store: PathBuf,
    pub output: Option<PathBuf>,
    pub retry_failed: bool,
    pub cache: bool,
    /// Count what would be sent, and send nothing.
    pub dry_run: bool,
    pub quiet: bool,
    pub json: bool,
    /// After the first Ctrl-C, how long in-flight calls may take to finish.
    pub grace: Duration,
    /// Whether the store keeps each call's history and the run's events.
    pub history: bool,
    /// Limits shared with other processes (`--limits redis://…`); never stored,
    /// since the address may hold a password.
    pub shared_limits: crate::limits::SharedLimitsArgs,
    /// The Redis queue whose workers run the rows (`--queue redis://…`); never
    /// stored, like `--limits`.
    pub queue: Option<String>,
}

/// Ctrl-C once: stop launching and let in-flight calls finish within the grace
/// period. Twice (or when the grace runs out): cancel them.
fn handle_interrupts(
    drain: CancellationToken,
    cancel: CancellationToken,
    grace: Duration,
    interrupted: Arc<AtomicBool>,
) {
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_err() {
            return;
        }
        interrupted.store(true, Ordering::Relaxed);
        eprintln!(
            "\nfanout: stopping: no new calls; in-flight calls may finish within {:.0} s (Ctrl-C again to cancel them)",
            grace.as_secs_f64()
        );
        drain.cancel();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => eprintln!("fanout: cancelling in-flight calls"),
            () = tokio::time::sleep(grace) => {}
        }
        cancel.cancel();
    });
}

fn open_output(path: Option<&Path>) -> Result<Box<dyn Write + Send>> {
    Ok(match path {
        Some(path) => Box::new(BufWriter::new(
            File::create(path)
                .with_context(|| format!("cannot create output {}", path.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout())),
    })
}

pub fn resume_command(options: &RunOptions) -> String {
    let mut command = format!("fanout jobs resume {}", options.job);
    if options.store != crate::settings::default_store() {
        command.push_str(&format!(" --store {}", options.store.display()));
    }
    if let Some(output) = &options.output {
        command.push_str(&format!(" -o {}", output.display()));
    }
    if let Some(url) = &options.queue {
        // An address with a password is not printed: it is read from the environment.
        if fanout_queue::redacted(url) == *url {
            command.push_str(&format!(" --queue {url}"));
        } else {
            command.push_str(" --queue \"$FANOUT_QUEUE\"");
        }
    }
    command
}

/// The prompt template, checked before any call (a syntax error is exit 2).
fn prompt(spec: &Spec) -> Result<Option<Arc<Prompt>>> {
    match (&spec.prompt, spec.format) {
        (Some(template), _) => {
            Ok(Some(Arc::new(Prompt::new(template, spec.system.as_deref()).map_err(Refusal)?)))
        }
        (None, Format::OpenaiBatch) => Ok(None),
        (None, _) => Err(Refusal(anyhow::anyhow!(
            "batch needs --prompt or --prompt-file (or OpenAI Batch input)"
        ))
        .into()),
    }
}

/// Ctrl-C's tokens, and whether it was pressed.
struct Interrupts {
    drain: CancellationToken,
    cancel: CancellationToken,
    pressed: Arc<AtomicBool>,
}

impl Interrupts {
    fn install(grace: Duration) -> Self {
        let interrupts = Self {
            drain: CancellationToken::new(),
            cancel: CancellationToken::new(),
            pressed: Arc::new(AtomicBool::new(false)),
        };
        handle_interrupts(
            interrupts.drain.clone(),
            interrupts.cancel.clone(),
            grace,
            Arc::clone(&interrupts.pressed),
        );
        interrupts
    }
}

/// The provider (behind the cache when asked) and the executor over it, with
/// the limits it shares with other processes (`--limits`); `spent` is what
/// the job's earlier runs used of its spending limit.
async fn executor_builder(
    spec: &Spec,
    options: &RunOptions,
    progress: &Progress,
    interrupts: &Interrupts,
    spent: Usage,
    run_log: &RunLog,
) -> Result<(fanout::ExecutorBuilder, Option<Arc<dyn fanout::SharedLimits>>)> {
    let mut provider = connect::provider(&spec.settings, options.quiet).await.map_err(Refusal)?;
    if spent.total() == 0
        && let Some(request) = first_request(spec)?
    {
        connect::check_budget_fits(&spec.settings, &*provider, &request).map_err(Refusal)?;
    }
    if options.cache {
        let scope = crate::fingerprint::cache_scope(&spec.settings);
        let legacy_scope = crate::fingerprint::legacy_cache_scope(&spec.settings);
        provider = Arc::new(Cached::new(provider, scope, legacy_scope, &options.store)?);
    }
    let (shown, logged) = (progress.events(), run_log.clone());
    let history = options.history;
    let shared = options.shared_limits.connect(&spec.settings, options.quiet).await?;
    let mut settings = spec.settings.clone();
    if shared.is_some() {
        // --rpm and --tpm are everyone's total, kept by the shared limiter.
        (settings.rpm, settings.tpm) = (None, None);
    }
    let mut builder = connect::executor(&settings, provider, spent);
    if let Some(shared) = &shared {
        builder = builder.shared_limits(Arc::clone(shared));
    }
    let builder = builder
        .drain_token(interrupts.drain.clone())
        .cancel_token(interrupts.cancel.clone())
        .call_history(history)
        .on_event(move |event| {
            shown(event);
            if history {
                logged.observe(event);
            }
        });
    Ok((builder, shared))
}

/// A Batch API job's records are priced one by one: its rows cost the batch
/// price, or the online one where they finished online.
fn record_costs(spec: &Spec) -> Option<committer::RecordCosts> {
    let (via, price) = (spec.via.as_ref()?, spec.settings.price?);
    Some(committer::RecordCosts { online: price, batch: price.scaled(via.discount) })
}

/// The job's tasks rendered afresh from the input, for rows a Batch API run
/// sends a second time (after an error, an expiry, or to finish online).
fn rendered_again(
    spec: &Spec,
    prompt: Option<Arc<Prompt>>,
    store: &Path,
    job: i64,
) -> Box<dyn Fn() -> Result<Box<dyn Iterator<Item = fanout::Task> + Send>> + Send + Sync> {
    let (spec, store) = (spec.clone(), store.to_path_buf());
    Box::new(move || {
        let tasks = rows::tasks(
            &spec,
            prompt.clone(),
            Store::open(&store)?,
            job,
            Default::default(),
            KeptFields::default(),
        )?;
        Ok(Box::new(tasks) as Box<dyn Iterator<Item = fanout::Task> + Send>)
    })
}

/// What a job's stored results used, all its runs together.
fn job_usage(summary: &fanout_store::JobSummary) -> Usage {
    Usage {
        cached_input_tokens: summary.cached_input_tokens,
        ..Usage::new(summary.input_tokens, summary.output_tokens)
    }
}

/// What the job has spent of its limit, its earlier runs included.
fn spending_said(settings: &Settings, spent: Usage) -> String {
    let mut parts = Vec::new();
    if let (Some(budget), Some(price)) = (settings.budget, settings.price) {
        parts.push(format!("${:.4} of the ${budget} budget", price.cost(spent)));
    }
    if let Some(tokens) = settings.max_total_tokens {
        parts.push(format!("{} of the {tokens} tokens allowed", spent.total()));
    }
    format!("the spending limit is reached: {} spent", parts.join(" and "))
}

/// The request of the input's first valid row, rendered: what one call of
/// the job looks like. Only read when a spending limit is set.
fn first_request(spec: &Spec) -> Result<Option<fanout::Request>> {
    let limited = spec.settings.budget.is_some() || spec.settings.max_total_tokens.is_some();
    // Standard input can be read once only.
    if !limited || crate::input::is_stdin(&spec.input) {
        return Ok(None);
    }
    let Ok(prompt) = prompt(spec) else { return Ok(None) };
    // Nothing is restored with nothing finished: an empty store will do.
    let scratch = Store::open(Path::new(":memory:"))?;
    let mut tasks =
        rows::tasks(spec, prompt, scratch, 0, Default::default(), KeptFields::default())
            .map_err(Refusal)?;
    Ok(tasks.find_map(|task| task.request().cloned()))
}

/// The CSV columns of the kept fields: as named, or for `--keep '*'` those
/// of the input's first row.
fn kept_columns(spec: &Spec) -> Result<Vec<String>> {
    let Some(keep) = &spec.keep else { return Ok(Vec::new()) };
    if *keep != Keep::All || spec.output_format != OutputFormat::Csv {
        return Ok(keep.columns(None));
    }
    if crate::input::is_stdin(&spec.input) {
        return Err(Refusal(anyhow::anyhow!(
            "--keep '*' with CSV output needs the fields named (--keep a,b) when the input is standard input"
        ))
        .into());
    }
    let mut rows =
        crate::input::rows(&spec.input, spec.format, spec.id_field.clone()).map_err(Refusal)?;
    let first = rows.find_map(|row| match row.content {
        crate::input::Content::Fields(fields) => Some(fields),
        _ => None,
    });
    Ok(keep.columns(first.as_ref()))
}

/// The most rows of a queued job enqueued and unanswered at once: enough to
/// keep many workers busy, never the whole of a large input.
fn queued_window(concurrency: usize) -> usize {
    concurrency.saturating_mul(64).clamp(1024, 65_536)
}

/// Runs a job: every row from the input, through the executor, to the store,
/// then to the output in input order.
pub async fn run(mut spec: Spec, options: RunOptions) -> Result<ExitCode> {
    // A job resumed with --queue goes on through the queue from now on.
    spec.queued |= options.queue.is_some() && spec.via.is_none();
    if options.dry_run {
        return dry_run::run(&spec, &options).await;
    }
    let prompt = prompt(&spec)?;
    if spec.via.is_some()
        && (spec.settings.budget.is_some() || spec.settings.max_total_tokens.is_some())
    {
        // A spending limit stops calls before they start; a batch is paid
        // for whole once it is made, so it would not be bounded.
        return Err(Refusal(anyhow::anyhow!(
            "--budget and --max-total-tokens bound online calls; they do not work with --via batch-api yet \
             (--dry-run gives the job's cost range first)"
        ))
        .into());
    }
    if spec.queued {
        // Workers call with executors of their own: a spending limit or a
        // cache here would bound or serve none of their calls.
        let limited = spec.settings.budget.is_some() || spec.settings.max_total_tokens.is_some();
        let refused = if limited {
            Some("--budget and --max-total-tokens")
        } else {
            options.cache.then_some("--cache")
        };
        if let Some(flags) = refused {
            return Err(Refusal(anyhow::anyhow!(
                "{flags} work on calls made by this process; with --queue the workers make them (not supported yet)"
            ))
            .into());
        }
    }
    let open = match job::open(&spec, &options)? {
        Opened::Ready(open) => *open,
        Opened::Empty => {
            let input = spec.input.display();
            match spec.shard {
                Some(shard) => eprintln!(
                    "fanout: shard {shard} of {input} has no rows: there is nothing to do"
                ),
                None => eprintln!("fanout: {input} is empty: there is nothing to do"),
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    if !open.finished.is_empty() && !options.quiet {
        let finished = open.finished.len();
        let rest = if open.lines == Some(finished) {
            "nothing left to run; writing the results again"
        } else {
            "running the rest"
        };
        eprintln!("fanout: job `{}`: {finished} tasks already finished; {rest}", open.job.name);
    }
    // A batch's answers cost its discount of the price.
    let shown_price = match &spec.via {
        Some(via) => spec.settings.price.map(|p| p.scaled(via.discount)),
        None => spec.settings.price,
    };
    let progress = Progress::new(open.lines, options.quiet, shown_price);
    let interrupts = Interrupts::install(options.grace);
    let spent = job_usage(&open.store.summary(open.job.clone())?);
    let run_log = RunLog::default();
    let (builder, shared) =
        executor_builder(&spec, &options, &progress, &interrupts, spent, &run_log).await?;
    let restore = Store::open(&options.store)?;
    let kept = KeptFields::default();
    let tasks = rows::tasks(
        &spec,
        prompt.clone(),
        restore,
        open.job.id,
        open.finished.clone(),
        kept.clone(),
    )
    .map_err(Refusal)?;
    let (committed_tx, committed_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut committed_tx = Some(committed_tx);
    let results = match &spec.via {
        None if spec.queued => {
            let Some(url) = &options.queue else {
                return Err(Refusal(anyhow::anyhow!(
                    "job `{}` runs through a Redis queue: give its address with --queue redis://… (or FANOUT_QUEUE)",
                    options.job
                ))
                .into());
            };
            let queue = fanout_queue::JobQueue::connect(url, &options.job)
                .await
                .map_err(|e| Refusal(e.into()))?;
            let meta = fanout_queue::JobMeta {
                format: fanout_queue::FORMAT,
                fingerprint: serde_json::to_string(&open.job.fingerprint.0)
                    .expect("a fingerprint serializes"),
                settings: serde_json::to_string(&spec.settings).expect("settings serialize"),
            };
            RunResults::Driven(
                queued::start(queued::Queued {
                    queue,
                    meta,
                    tasks: Box::new(tasks),
                    window: queued_window(spec.settings.concurrency),
                    committed: committed_rx,
                    drain: interrupts.drain.clone(),
                    deadline: spec.settings.deadline.map(|d| Duration::from_secs_f64(d.max(0.0))),
                    quiet: options.quiet,
                    retry_failed: options.retry_failed,
                })
                .await?,
            )
        }
        None => {
            committed_tx = None;
            let executor: Executor = builder.build();
            if options.history {
                run_log.push(history::kind::START, executor.concurrency_limit() as f64, None);
            }
            RunResults::Online(executor.stream_held(futures_util::stream::iter(tasks)))
        }
        Some(via) => {
            committed_tx = None;
            let remote = remote::Remote {
                api: connect::batch_api(&spec.settings).map_err(Refusal)?,
                via: via.clone(),
                store: Store::open(&options.store)?,
                job: open.job.id,
                tasks: Box::new(tasks),
                again: rendered_again(&spec, prompt, &options.store, open.job.id),
                finished: open.finished.clone(),
                online: builder,
                price: spec.settings.price,
                retries: spec.settings.retries,
                deadline: spec.settings.deadline.map(|d| Duration::from_secs_f64(d.max(0.0))),
                drain: interrupts.drain.clone(),
                quiet: options.quiet,
            };
            RunResults::Driven(remote::start(remote))
        }
    };
    let columns = Columns {
        kept: kept_columns(&spec)?,
        answer: spec.schema.as_ref().map(crate::schema::fields),
    };
    let output = Output::new(spec.output_format, open_output(options.output.as_deref())?, columns)?;
    let in_memory = committer::memory_budget(spec.settings.concurrency);
    let job_id = open.job.id;
    let committer =
        Committer::new(open, output, kept, progress, in_memory, interrupts.drain.clone())
            .with_run_log(options.history.then(|| run_log.clone()))
            .with_costs(record_costs(&spec))
            .with_committed(committed_tx);
    let Committed { ending, totals, output_closed } = committer.run(results).await?;
    if let Some(shared) = &shared {
        // The last calls' places go back to the other processes now, not when
        // their leases run out.
        shared.close().await;
    }
    let totals_json = serde_json::to_value(&totals).expect("totals serialize");
    Store::open(&options.store)?.set_last_run(job_id, &totals_json)?;
    if output_closed {
        // `fanout batch ... | head`: a quiet end, as for any command in a pipe;
        // every finished result is in the store.
        return Ok(ExitCode::SUCCESS);
    }

    if options.json {
        eprintln!("{totals_json}");
    } else if !options.quiet {
        eprintln!("{}", progress::summary(&totals));
        if let (Some(_), Some(price), Some(cost)) = (&spec.via, spec.settings.price, totals.cost) {
            eprintln!(
                "fanout: through the Batch API: ${cost:.4}; the same answers online: ${:.4}",
                price.cost(totals.usage)
            );
        }
    }
    if let Some(cause) = &ending.cannot_succeed {
        eprintln!("fanout: stopped: the job cannot succeed: {cause}");
    }
    if ending.budget_spent {
        // The store has every run's results: this run's and the earlier ones.
        let store = Store::open(&options.store)?;
        let job = store.job(&options.job)?.context("the job disappeared from the store")?;
        eprintln!(
            "fanout: stopped: {}",
            spending_said(&spec.settings, job_usage(&store.summary(job)?))
        );
    }
    if ending.unfinished > 0 || interrupts.pressed.load(Ordering::Relaxed) {
        let (how, raise) = match (ending.budget_spent, spec.settings.budget) {
            (false, _) => (" with", ""),
            (true, Some(_)) if spec.settings.max_total_tokens.is_some() => {
                (" with a larger limit", " --budget DOLLARS --max-total-tokens TOKENS")
            }
            (true, Some(_)) => (" with a larger limit", " --budget DOLLARS"),
            (true, None) => (" with a larger limit", " --max-total-tokens TOKENS"),
        };
        eprintln!(
            "fanout: {} tasks did not finish; resume{how}: {}{raise}",
            ending.unfinished,
            resume_command(&options)
        );
    }
    Ok(ending.exit().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The resume command names the queue a queued job goes on through,
    /// never a password: an address with one is read from the environment.
    #[test]
    fn the_resume_command_names_the_queue_without_its_password() {
        let options = |queue: Option<&str>| RunOptions {
            job: "essays".into(),
            store: crate::settings::default_store(),
            output: None,
            retry_failed: false,
            cache: false,
            dry_run: false,
            quiet: true,
            json: false,
            grace: Duration::ZERO,
            history: true,
            shared_limits: Default::default(),
            queue: queue.map(str::to_owned),
        };
        assert_eq!(resume_command(&options(None)), "fanout jobs resume essays");
        assert_eq!(
            resume_command(&options(Some("redis://127.0.0.1:6379/0"))),
            "fanout jobs resume essays --queue redis://127.0.0.1:6379/0"
        );
        let secret = resume_command(&options(Some("redis://:hunter2@127.0.0.1:6379/0")));
        assert_eq!(secret, "fanout jobs resume essays --queue \"$FANOUT_QUEUE\"");
    }
}
