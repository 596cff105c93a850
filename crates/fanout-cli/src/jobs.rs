//! `fanout jobs`: list, show, export, remove and resume durable jobs.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use fanout::{Price, Usage};
use fanout_store::{Job, JobSummary, Store};

use std::path::PathBuf;

use crate::Refusal;
use crate::batch::{self, JobRunArgs, RunOptions, Spec};
use crate::output::{Columns, Output, OutputFormat};
use crate::progress;
use crate::record::{kept_of, to_result};
use crate::settings::{self, Flags};

#[derive(Debug, clap::Subcommand)]
pub enum JobsCommand {
    /// List jobs with their progress
    List,
    /// Show a job's settings, fingerprint and counts
    Show { name: String },
    /// Write a job's finished results
    Export {
        name: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[arg(long, value_enum)]
        output_format: Option<OutputFormat>,
    },
    /// Remove a job and its results
    Rm { name: String },
    /// Cancel a job's open batches at the provider's Batch API (what they
    /// answered so far is kept; `jobs resume` sends the rest again)
    Cancel { name: String },
    /// Put the shards of a job (`batch --shard K/N`) back together, in input
    /// order: their stores into one job in --store, or their output files into one
    Merge(crate::shard::MergeArgs),
    /// Run the unfinished tasks of a job
    Resume {
        name: String,
        #[command(flatten)]
        run: JobRunArgs,
    },
}

pub async fn command(flags: &Flags, command: JobsCommand) -> Result<ExitCode> {
    let store = flags.store.clone().unwrap_or_else(settings::default_store);
    match command {
        JobsCommand::List => list(&store, flags.json),
        JobsCommand::Show { name } => show(&store, &name),
        JobsCommand::Export { name, output, output_format } => {
            export(&store, &name, output.as_deref(), output_format)
        }
        JobsCommand::Rm { name } => remove(&store, &name),
        JobsCommand::Cancel { name } => cancel(&store, &name, flags).await,
        JobsCommand::Merge(args) => crate::shard::merge(&store, args, flags.quiet),
        JobsCommand::Resume { name, run } => resume(run.options(name, flags), flags).await,
    }
}

pub fn when(seconds: i64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(seconds.max(0) as u64))
        .to_string()
}

fn open(store: &Path) -> Result<Store> {
    Ok(Store::open(store)?)
}

/// What the job's finished tasks cost at the price it runs with, and that
/// projected over its whole input; `None` without a price.
pub fn job_cost(summary: &JobSummary) -> Option<(f64, Option<f64>)> {
    let settings = &summary.job.settings;
    let usage = Usage {
        cached_input_tokens: summary.cached_input_tokens,
        ..Usage::new(summary.input_tokens, summary.output_tokens)
    };
    let spent = match serde_json::from_value::<Spec>(settings.clone()) {
        // A Batch API job's records carry their own costs: the batch price,
        // or the online one.
        Ok(spec) if spec.via.is_some() && spec.settings.price.is_some() => {
            summary.priced_cost.unwrap_or(0.0)
        }
        Ok(spec) => spec.settings.price?.cost(usage),
        // A proxy's records carry their own costs (its clients name their
        // models); one made before they did keeps only one price.
        Err(_) => summary.priced_cost.or_else(|| {
            let price: Price = serde_json::from_value(settings["proxy"]["price"].clone()).ok()?;
            Some(price.cost(usage))
        })?,
    };
    let projected =
        summary.job.total.and_then(|total| progress::projected(spent, summary.finished(), total));
    Some((spent, projected))
}

/// The command that made the job: pattern jobs name theirs, a proxy's job
/// keeps where it forwarded to, and the rest are batches.
fn command_of(summary: &JobSummary) -> &str {
    let settings = &summary.job.settings;
    match settings.get("command").and_then(|c| c.as_str()) {
        Some(command) => command,
        None if settings.get("proxy").is_some() => "proxy",
        None => "batch",
    }
}

/// Whether the job's records carry their own costs (a proxy's).
fn priced_per_call(summary: &JobSummary) -> bool {
    summary.job.settings["proxy"]["priced"] == "per call"
}

fn summary_json(summary: &JobSummary) -> serde_json::Value {
    let cost = job_cost(summary);
    serde_json::json!({
        "cost": cost.map(|(spent, _)| spent),
        "projected_cost": cost.and_then(|(_, projected)| projected),
        // Calls not in `cost`: their model's price is unknown (jobs priced per call).
        "unpriced_calls": priced_per_call(summary).then_some(summary.unpriced),
        "cached_input_tokens": summary.cached_input_tokens,
        "last_run": summary.job.last_run,
        "name": summary.job.name,
        "command": command_of(summary),
        "input": summary.job.input,
        "created": when(summary.job.created_at),
        "updated": when(summary.job.updated_at),
        "total": summary.job.total,
        "finished": summary.finished(),
        "by_status": summary.counts,
        "input_tokens": summary.input_tokens,
        "output_tokens": summary.output_tokens,
    })
}

fn list(store: &Path, json: bool) -> Result<ExitCode> {
    let jobs = open(store)?.jobs()?;
    if json {
        let list: Vec<_> = jobs.iter().map(summary_json).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    if jobs.is_empty() {
        println!("no jobs in {}", store.display());
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header([
        "job",
        "created",
        "input",
        "finished / tasks",
        "succeeded",
        "failed",
        "tokens",
        "cost",
    ]);
    for s in &jobs {
        let count = |status: &str| s.counts.get(status).copied().unwrap_or(0);
        table.add_row(vec![
            s.job.name.clone(),
            when(s.job.created_at),
            s.job.input.clone(),
            format!("{} / {}", s.finished(), s.job.total.map_or("?".into(), |t| t.to_string())),
            count("succeeded").to_string(),
            (count("failed") + count("timed_out")).to_string(),
            (s.input_tokens + s.output_tokens).to_string(),
            job_cost(s).map_or("-".into(), |(spent, _)| format!("${spent:.4}")),
        ]);
    }
    println!("{table}");
    Ok(ExitCode::SUCCESS)
}

fn find(store: &Store, name: &str) -> Result<fanout_store::Job> {
    store.job(name)?.ok_or_else(|| Refusal(anyhow!("there is no job `{name}`")).into())
}

fn show(store: &Path, name: &str) -> Result<ExitCode> {
    let store = open(store)?;
    let summary = store.summary(find(&store, name)?)?;
    let mut details = summary_json(&summary);
    let batches = store.remote_batches(summary.job.id)?;
    if !batches.is_empty() {
        details["batches"] = batches.iter().map(batch_json).collect();
    }
    details["settings"] = summary.job.settings.clone();
    details["fingerprint"] = serde_json::to_value(&summary.job.fingerprint.0)?;
    println!("{}", serde_json::to_string_pretty(&details)?);
    Ok(ExitCode::SUCCESS)
}

/// A job's batch at a Batch API, as `jobs show` gives it.
fn batch_json(batch: &fanout_store::RemoteBatch) -> serde_json::Value {
    serde_json::json!({
        "api": batch.api,
        "id": batch.remote_id,
        "state": batch.state,
        "status": batch.remote_status,
        "requests": batch.requests,
        "succeeded": batch.succeeded,
        "failed": batch.failed,
        "pending": batch.requests.saturating_sub(batch.succeeded + batch.failed),
        "file_id": batch.file_id,
        "detail": batch.detail,
        "created_at": when(batch.created_at),
        "updated_at": when(batch.updated_at),
    })
}

/// Cancels the job's batches that the service still runs.
async fn cancel(store: &Path, name: &str, flags: &Flags) -> Result<ExitCode> {
    let store = open(store)?;
    let job = find(&store, name)?;
    let open_batches: Vec<_> = store
        .remote_batches(job.id)?
        .into_iter()
        .filter(|b| b.state == fanout_store::remote_state::SUBMITTED)
        .collect();
    if open_batches.is_empty() {
        let why = format!("job `{name}` has no batch running at a Batch API");
        return Err(Refusal(anyhow!(why)).into());
    }
    let spec: Spec = serde_json::from_value(job.settings.clone()).map_err(|e| {
        Refusal(anyhow!("job `{name}` was saved by another version of fanout: {e}"))
    })?;
    let settings = spec.settings.with_run_limits(flags).map_err(Refusal)?;
    let api = crate::connect::batch_api(&settings).map_err(Refusal)?;
    for mut batch in open_batches {
        let id = batch.remote_id.clone().expect("a submitted batch has its id");
        let now = api.cancel(&id).await.with_context(|| format!("cannot cancel batch {id}"))?;
        batch.remote_status = Some(now.status.clone());
        batch.state = fanout_store::remote_state::CANCELLED.into();
        batch.detail = Some("cancelled by `fanout jobs cancel`".into());
        store.update_remote_batch(&batch)?;
        eprintln!("fanout: batch {id} ({} rows): {}", batch.requests, now.status);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn export(
    store: &Path,
    name: &str,
    output: Option<&Path>,
    format: Option<OutputFormat>,
) -> Result<ExitCode> {
    let store = open(store)?;
    let job = find(&store, name)?;
    let spec: Option<Spec> = serde_json::from_value(job.settings.clone()).ok();
    let keep = spec.as_ref().and_then(|s| s.keep.clone());
    let answer = spec.as_ref().and_then(|s| s.schema.as_ref()).map(crate::schema::fields);
    let format = format.or(spec.map(|s| s.output_format)).unwrap_or(OutputFormat::Jsonl);
    let sink: Box<dyn std::io::Write + Send> = match output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    // For `--keep '*'`, the columns of the first record's kept fields.
    let first_kept = match &keep {
        Some(batch::Keep::All) => store.record_at(job.id, 0)?.as_ref().and_then(kept_of),
        _ => None,
    };
    let kept = keep.map(|k| k.columns(first_kept.as_ref())).unwrap_or_default();
    let mut writer = Output::new(format, sink, Columns { kept, answer })?;
    store.each_record(job.id, |record| -> Result<()> {
        let kept = kept_of(&record);
        writer.write(&to_result(record), kept.as_ref()).context("cannot write the export")
    })?;
    writer.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn remove(store: &Path, name: &str) -> Result<ExitCode> {
    if !open(store)?.remove_job(name)? {
        return Err(Refusal(anyhow!("there is no job `{name}`")).into());
    }
    eprintln!("removed job `{name}`");
    Ok(ExitCode::SUCCESS)
}

/// Runs a pattern job's command again from its arguments and folder, in
/// the same job, answering the calls it answered before from the job (see
/// [`crate::replay`]): only what failed, or what changed, is asked again.
async fn resume_pattern(job: &Job, command: &str, options: &RunOptions) -> Result<ExitCode> {
    let argv: Option<Vec<String>> =
        job.settings.get("argv").and_then(|argv| serde_json::from_value(argv.clone()).ok());
    let Some(argv) = argv else {
        return Err(Refusal(anyhow!(
            "job `{}` is a `fanout {command}` run recorded without its arguments \
             (by an older fanout): run the command again",
            job.name
        ))
        .into());
    };
    // The store as found from here, before moving to the job's folder.
    let store = std::path::absolute(&options.store).unwrap_or_else(|_| options.store.clone());
    if let Some(cwd) = job.settings.get("cwd").and_then(|c| c.as_str()) {
        std::env::set_current_dir(cwd).with_context(|| {
            format!("job `{}` ran in {cwd}, which cannot be entered now", job.name)
        })?;
    }
    let argv = resume_argv(argv, &job.name, &store.display().to_string());
    crate::rerun(argv).await
}

/// The command line that resumes job `name` from its stored `argv`: it goes
/// on in the store it was found in, whatever the command said then, and the
/// flags go first, before any `--` of the command.
fn resume_argv(argv: Vec<String>, name: &str, store: &str) -> Vec<String> {
    let mut kept =
        vec!["fanout".into(), "--resume-job".into(), name.into(), "--store".into(), store.into()];
    let mut stored = argv.into_iter();
    while let Some(arg) = stored.next() {
        match arg.as_str() {
            "--" => {
                kept.push(arg);
                kept.extend(stored.by_ref());
            }
            "--store" => {
                stored.next();
            }
            _ if arg.starts_with("--store=") => {}
            _ => kept.push(arg),
        }
    }
    kept
}

/// Runs a job's unfinished tasks with the settings of its latest run; run
/// limits given as flags now (concurrency, rates, timeouts, deadline, retries,
/// budget) apply, and are kept for the next resume.
async fn resume(options: RunOptions, flags: &Flags) -> Result<ExitCode> {
    let job = find(&open(&options.store)?, &options.job)?;
    if let Some(command) = job.settings.get("command").and_then(|c| c.as_str()) {
        return resume_pattern(&job, command, &options).await;
    }
    if job.settings.get("proxy").is_some() {
        let why = format!(
            "job `{}` records a proxy's calls: there is nothing to resume (its clients send them)",
            options.job
        );
        return Err(Refusal(anyhow!(why)).into());
    }
    let mut spec: Spec = serde_json::from_value(job.settings).map_err(|e| {
        Refusal(anyhow!("job `{}` was saved by another version of fanout: {e}", options.job))
    })?;
    spec.settings = spec.settings.with_run_limits(flags).map_err(Refusal)?;
    batch::run(spec, options).await
}

#[cfg(test)]
mod tests {
    use super::resume_argv;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    /// The found store wins over the one the command named; the resume flags
    /// go before the command, so a `--` in it keeps its meaning.
    #[test]
    fn a_resumed_command_line_keeps_its_arguments_and_takes_the_found_store() {
        let stored =
            strings(&["--store", "old.db", "-q", "map-reduce", "--store=x.db", "--", "--store"]);
        assert_eq!(
            resume_argv(stored, "mr-1", "/abs/fanout.db"),
            strings(&[
                "fanout",
                "--resume-job",
                "mr-1",
                "--store",
                "/abs/fanout.db",
                "-q",
                "map-reduce",
                "--",
                "--store"
            ])
        );
    }
}
