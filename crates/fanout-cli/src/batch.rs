//! `fanout batch`: a prompt template over every row of a file, as a durable job.
//!
//! Every finished task is committed to the job store before it is written out
//! or counted anywhere, so a crash loses nothing finished and never pays for it
//! twice: running the same job again (or `fanout jobs resume`) restores the
//! finished results from the store and calls only for the rest.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use fanout::{
    CancellationToken, ErrorKind, NotRun, Outcome, ProviderError, Task, TaskResult, Timeout,
};
use fanout_store::{Fingerprint, Finished, Store};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::Refusal;
use crate::cache::Cached;
use crate::input::{self, Content, Format};
use crate::output::{Output, OutputFormat};
use crate::progress::{self, Progress};
use crate::record::{to_outcome, to_record};
use crate::settings::Settings;
use crate::template::Prompt;

/// What a job was started with: enough to run it again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Spec {
    pub input: PathBuf,
    pub format: Format,
    pub prompt: Option<String>,
    pub system: Option<String>,
    pub id_field: Option<String>,
    pub output_format: OutputFormat,
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
    pub quiet: bool,
    pub json: bool,
    /// After the first Ctrl-C, how long in-flight calls may take to finish.
    pub grace: Duration,
}

/// Results are committed in groups of this many, or after [`COMMIT_EVERY`].
const COMMIT_BATCH: usize = 256;
const COMMIT_EVERY: Duration = Duration::from_millis(200);

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The input's hash and its number of lines, in one streaming pass.
fn scan_input(path: &Path) -> Result<(String, u64)> {
    let mut file =
        File::open(path).with_context(|| format!("cannot open input {}", path.display()))?;
    let (mut hash, mut lines, mut buffer) = (Sha256::new(), 0u64, vec![0u8; 1 << 16]);
    let mut last = b'\n';
    loop {
        let read = file
            .read(&mut buffer)
            .with_context(|| format!("cannot read input {}", path.display()))?;
        if read == 0 {
            break;
        }
        hash.update(&buffer[..read]);
        lines += buffer[..read].iter().filter(|b| **b == b'\n').count() as u64;
        last = buffer[read - 1];
    }
    Ok((format!("{:x}", hash.finalize()), lines + u64::from(last != b'\n')))
}

fn fingerprint(spec: &Spec, input_hash: String) -> Fingerprint {
    let mut parts = std::collections::BTreeMap::new();
    parts.insert("input file".to_string(), input_hash);
    parts.insert(
        "prompt template".to_string(),
        sha256(spec.prompt.as_deref().unwrap_or("").as_bytes()),
    );
    parts.insert(
        "system prompt".to_string(),
        sha256(spec.system.as_deref().unwrap_or("").as_bytes()),
    );
    let shape =
        format!("{:?}|{:?}|{}", spec.format, spec.id_field, spec.settings.answer_settings());
    parts.insert("provider, model or parameters".to_string(), sha256(shape.as_bytes()));
    Fingerprint(parts)
}

/// Turns input rows into tasks: restored, invalid, or to call.
fn tasks(
    spec: &Spec,
    prompt: Option<Arc<Prompt>>,
    restore: Store,
    job: i64,
    finished: Finished,
) -> Result<impl Iterator<Item = Task> + Send + 'static> {
    let rows = input::rows(&spec.input, spec.format, spec.id_field.clone())?;
    let (temperature, max_tokens) = (spec.settings.temperature, spec.settings.max_tokens);
    Ok(rows.map(move |row| {
        let invalid = |message: String| {
            let error = ProviderError::new(ErrorKind::BadRequest, message);
            Outcome::Failed { error, attempts: 0 }
        };
        if finished.contains(row.index) {
            let outcome = match restore.record_at(job, row.index) {
                Ok(Some(record)) => to_outcome(record),
                Ok(None) => invalid(format!("line {}: the stored result disappeared", row.line)),
                Err(e) => invalid(format!("line {}: {e}", row.line)),
            };
            return Task::settled(row.id, outcome);
        }
        let request = match row.content {
            Content::Invalid(message) => return Task::settled(row.id, invalid(message)),
            Content::Request(request) => request,
            Content::Fields(fields) => match prompt.as_ref().map(|p| p.render(&fields, row.line)) {
                Some(Ok(request)) => request,
                Some(Err(message)) => return Task::settled(row.id, invalid(message)),
                None => {
                    return Task::settled(
                        row.id,
                        invalid(format!("line {}: no prompt template", row.line)),
                    );
                }
            },
        };
        let mut request = request;
        request.temperature = temperature.or(request.temperature);
        request.max_tokens = max_tokens.or(request.max_tokens);
        Task::with_id(row.id, request)
    }))
}

/// How the results ended, for the exit code.
#[derive(Default)]
struct Ending {
    failed: u64,
    unfinished: u64,
    cannot_succeed: Option<String>,
}

impl Ending {
    fn add(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Succeeded(_) => {}
            Outcome::Failed { .. } | Outcome::TimedOut { timeout: Timeout::Task, .. } => {
                self.failed += 1
            }
            Outcome::NotRun(NotRun::CircuitOpen(cause)) => {
                self.unfinished += 1;
                self.cannot_succeed.get_or_insert_with(|| cause.to_string());
            }
            _ => self.unfinished += 1,
        }
    }

    /// 0 all succeeded; 3 some failed; 4 stopped before finishing; 5 the job cannot succeed.
    fn code(&self) -> ExitCode {
        ExitCode::from(if self.cannot_succeed.is_some() {
            5
        } else if self.unfinished > 0 {
            4
        } else if self.failed > 0 {
            3
        } else {
            0
        })
    }
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
    command
}

pub async fn run(spec: Spec, options: RunOptions) -> Result<ExitCode> {
    let prompt = match (&spec.prompt, spec.format) {
        (Some(template), _) => {
            Some(Arc::new(Prompt::new(template, spec.system.as_deref()).map_err(Refusal)?))
        }
        (None, Format::OpenaiBatch) => None,
        (None, _) => {
            return Err(Refusal(anyhow::anyhow!(
                "batch needs --prompt or --prompt-file (or OpenAI Batch input)"
            ))
            .into());
        }
    };
    let stdin = spec.input.as_os_str() == "-";
    let (input_hash, lines) = if stdin {
        ("stdin".to_string(), None)
    } else {
        let (hash, lines) = scan_input(&spec.input).map_err(Refusal)?;
        (hash, Some(lines))
    };
    if lines == Some(0) {
        eprintln!("fanout: {} is empty: there is nothing to do", spec.input.display());
        return Ok(ExitCode::SUCCESS);
    }

    let mut store = Store::open(&options.store)?;
    let fingerprint = fingerprint(&spec, input_hash);
    let job = match store.job(&options.job)? {
        Some(job) => {
            let changed = job.fingerprint.differences(&fingerprint);
            if !changed.is_empty() && !stdin {
                return Err(Refusal(anyhow::anyhow!(
                    "job `{}` was started with a different {}; run it with the same ones, or start a new job with another --job name",
                    job.name,
                    changed.join(", ")
                ))
                .into());
            }
            job
        }
        None => {
            let settings = serde_json::to_value(&spec).expect("the spec serializes");
            store.create_job(
                &options.job,
                &spec.input.display().to_string(),
                &fingerprint,
                &settings,
            )?
        }
    };
    let finished = store.finished(job.id, !options.retry_failed)?;
    if !finished.is_empty() && !options.quiet {
        eprintln!(
            "fanout: job `{}`: {} tasks already finished; running the rest",
            job.name,
            finished.len()
        );
    }

    let mut provider = spec.settings.provider(options.quiet).await.map_err(Refusal)?;
    if options.cache {
        let scope = format!(
            "{:?}|{}|{:?}",
            spec.settings.provider, spec.settings.model, spec.settings.base_url
        );
        provider = Arc::new(Cached::new(provider, scope, &options.store)?);
    }
    let progress = Progress::new(lines, options.quiet, spec.settings.price);
    let (drain, cancel) = (CancellationToken::new(), CancellationToken::new());
    let interrupted = Arc::new(AtomicBool::new(false));
    handle_interrupts(drain.clone(), cancel.clone(), options.grace, Arc::clone(&interrupted));
    let executor = spec
        .settings
        .executor(provider)
        .drain_token(drain)
        .cancel_token(cancel)
        .on_event(progress.events())
        .build();

    let restore = Store::open(&options.store)?;
    let restored = finished.clone();
    let tasks = tasks(&spec, prompt, restore, job.id, finished).map_err(Refusal)?;
    let mut results = executor.stream_ordered(futures_util::stream::iter(tasks));
    let mut output = Output::new(spec.output_format, open_output(options.output.as_deref())?)?;
    let mut ending = Ending::default();
    let mut pending: Vec<TaskResult> = Vec::with_capacity(COMMIT_BATCH);
    let mut commit = |pending: &mut Vec<TaskResult>, output: &mut Output| -> Result<()> {
        let records: Vec<_> = pending
            .iter()
            .filter(|r| !restored.contains(r.index as u64))
            .filter_map(to_record)
            .collect();
        if !records.is_empty() {
            store.record(job.id, &records)?;
        }
        for result in pending.drain(..) {
            output.write(&result).context("cannot write the output")?;
            progress.record(&result);
            ending.add(&result.outcome);
        }
        output.flush().context("cannot write the output")
    };
    let mut commit_at = None;
    loop {
        let next = match commit_at {
            None => results.next().await,
            Some(at) => match tokio::time::timeout_at(at, results.next()).await {
                Ok(next) => next,
                Err(_) => {
                    commit(&mut pending, &mut output)?;
                    commit_at = None;
                    continue;
                }
            },
        };
        let Some(result) = next else { break };
        pending.push(result);
        commit_at.get_or_insert_with(|| Instant::now() + COMMIT_EVERY);
        if pending.len() >= COMMIT_BATCH {
            commit(&mut pending, &mut output)?;
            commit_at = None;
        }
    }
    commit(&mut pending, &mut output)?;
    let totals = results.totals().await;
    progress.finish();
    store.set_total(job.id, totals.tasks as u64)?;

    if options.json {
        eprintln!("{}", serde_json::to_string(&totals).expect("totals serialize"));
    } else if !options.quiet {
        eprintln!("{}", progress::summary(&totals));
    }
    if let Some(cause) = &ending.cannot_succeed {
        eprintln!("fanout: stopped: the job cannot succeed: {cause}");
    }
    if ending.unfinished > 0 || interrupted.load(Ordering::Relaxed) {
        eprintln!(
            "fanout: {} tasks did not finish; resume with: {}",
            ending.unfinished,
            resume_command(&options)
        );
    }
    Ok(ending.code())
}
