//! `fanout batch`'s arguments, and how a job runs this time (shared with
//! `fanout jobs resume`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};

use super::{RunOptions, Spec};
use crate::Refusal;
use crate::input;
use crate::output::OutputFormat;
use crate::settings::{self, Flags, Settings};

#[derive(Debug, clap::Args)]
pub struct BatchArgs {
    /// Input file (`-` for stdin)
    input: PathBuf,
    /// Jinja prompt template; the row's fields are its variables: "Grade this essay: {{ essay }}"
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// System prompt (a template too)
    #[arg(long)]
    system: Option<String>,
    /// Field that holds each row's id [default: custom_id, else the line number]
    #[arg(long = "id")]
    id_field: Option<String>,
    /// Input format [default: from the extension and the first line]
    #[arg(long, value_enum)]
    format: Option<input::Format>,
    /// [default: openai-batch for OpenAI Batch input, else jsonl]
    #[arg(long, value_enum)]
    output_format: Option<OutputFormat>,
    /// Field holding an image (a path, relative to the input file; a URL; a data
    /// URI; or a list of them) to show with the row's prompt; repeatable
    #[arg(long = "image", value_name = "FIELD")]
    images: Vec<String>,
    /// JSON Schema file every answer must follow: sent as the provider's
    /// structured output, each answer validated (and repaired, --schema-repairs)
    #[arg(long, value_name = "FILE")]
    schema: Option<PathBuf>,
    /// Input fields each output row keeps beside its answer: `name,grade` or '*'
    #[arg(long, value_name = "FIELDS")]
    keep: Option<super::Keep>,
    /// Run only shard K of N: rows K, K+N, K+2N, … (from 1), as one task of an
    /// array job; `fanout jobs merge` puts the shards' results back in order
    #[arg(long, value_name = "K/N")]
    shard: Option<crate::shard::Shard>,
    /// Job name: running the same job again resumes it [default: the input's name and the time]
    #[arg(long)]
    job: Option<String>,
    /// How the requests are sent: one call each, or through the provider's
    /// Batch API (OpenAI, Anthropic: half the price, answered within 24 h)
    #[arg(long, value_enum, default_value_t = Via::Online)]
    via: Via,
    /// With --via batch-api: what a batch leaves unanswered (errors, expiry,
    /// or everything when --deadline nears) finishes online [default: another batch]
    #[arg(long, value_enum)]
    then: Option<Then>,
    /// With --via batch-api: seconds between two looks at a batch
    #[arg(long, default_value_t = 30.0)]
    poll_interval: f64,
    /// With --via batch-api: requests in one batch [default: the service's limit, 50,000 or 100,000]
    #[arg(long)]
    batch_max_requests: Option<usize>,
    /// With --via batch-api: bytes of one batch's input [default: the service's limit, 200 or 256 MB]
    #[arg(long)]
    batch_max_bytes: Option<usize>,
    #[command(flatten)]
    run: JobRunArgs,
}

/// How a job's requests are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// One call each, under the limits
    Online,
    /// The provider's Batch API
    BatchApi,
}

/// Where a Batch API job finishes what its batches leave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Then {
    /// Online calls
    Online,
}

impl BatchArgs {
    /// The Batch API settings the flags ask for, refusing those that mean
    /// nothing without `--via batch-api`.
    fn via(&self) -> Result<Option<super::ViaBatchApi>> {
        if self.via == Via::Online {
            if self.then.is_some() {
                let why = "--then online finishes a Batch API job: it needs --via batch-api";
                return Err(Refusal(anyhow::anyhow!(why)).into());
            }
            return Ok(None);
        }
        if self.poll_interval.is_nan() || self.poll_interval <= 0.0 {
            return Err(
                Refusal(anyhow::anyhow!("--poll-interval must be more than 0 seconds")).into()
            );
        }
        Ok(Some(super::ViaBatchApi {
            then_online: self.then == Some(Then::Online),
            poll_interval: self.poll_interval,
            max_requests: self.batch_max_requests,
            max_bytes: self.batch_max_bytes,
            ..super::ViaBatchApi::default()
        }))
    }
}

/// How a job runs this time (`batch` and `jobs resume`).
#[derive(Debug, clap::Args)]
pub struct JobRunArgs {
    /// Output file [default: stdout]
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// On resume, run the failed tasks again too
    #[arg(long)]
    retry_failed: bool,
    /// Reuse stored answers for identical requests
    #[arg(long)]
    cache: bool,
    /// Render and count every request (rows, invalid rows, tokens, cost) without any call
    #[arg(long)]
    dry_run: bool,
    /// Seconds in-flight calls may take to finish after Ctrl-C
    #[arg(long, default_value_t = 30.0)]
    grace: f64,
    /// Keep no history of each call (attempts, hedges, their times) or of the
    /// run's pauses in the store: `fanout report` then shows no timeline
    #[arg(long)]
    no_history: bool,
    #[command(flatten)]
    shared_limits: crate::limits::SharedLimitsArgs,
    /// Send the rows to this Redis queue (`redis://host:6379/0`), where
    /// `fanout worker`s on any number of machines run them; results come
    /// back to this job's store and output as they finish
    #[arg(long, value_name = "URL", env = "FANOUT_QUEUE", hide_env_values = true)]
    queue: Option<String>,
}

impl JobRunArgs {
    pub fn options(self, job: String, flags: &Flags) -> RunOptions {
        RunOptions {
            job,
            store: flags.store.clone().unwrap_or_else(settings::default_store),
            output: self.output,
            retry_failed: self.retry_failed,
            cache: self.cache,
            dry_run: self.dry_run,
            quiet: flags.quiet,
            json: flags.json,
            grace: Duration::from_secs_f64(self.grace.max(0.0)),
            history: !self.no_history,
            shared_limits: self.shared_limits,
            queue: self.queue,
        }
    }
}

fn read_prompt_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read prompt file {}", path.display()))
        .map_err(|e| Refusal(e).into())
}

fn default_job_name(input: &Path) -> String {
    let stem = input.file_stem().and_then(|s| s.to_str()).filter(|s| *s != "-").unwrap_or("stdin");
    format!("{stem}-{}", fanout_store::now())
}

/// Runs (or resumes) the job the arguments describe.
pub async fn command(flags: &Flags, args: BatchArgs) -> Result<ExitCode> {
    let settings = Settings::resolve(flags).map_err(Refusal)?;
    let prompt = match &args.prompt_file {
        Some(path) => Some(read_prompt_file(path)?),
        None => args.prompt.clone(),
    };
    let format = input::detect(&args.input, args.format).map_err(Refusal)?;
    let input = if crate::input::is_stdin(&args.input) {
        args.input.clone()
    } else {
        std::path::absolute(&args.input).unwrap_or(args.input.clone())
    };
    let output_format = args.output_format.unwrap_or(match format {
        input::Format::OpenaiBatch => OutputFormat::OpenaiBatch,
        _ => OutputFormat::Jsonl,
    });
    let via = args.via()?;
    if args.shard.is_some() && crate::input::is_stdin(&args.input) {
        // Standard input is read once and not kept: no shard could be run
        // again, nor checked against the others.
        let why = "--shard needs an input file: every shard reads the same one";
        return Err(Refusal(anyhow::anyhow!(why)).into());
    }
    if args.run.queue.is_some() && via.is_some() {
        let why = "--queue sends the rows to workers; --via batch-api to the provider's Batch API: choose one";
        return Err(Refusal(anyhow::anyhow!(why)).into());
    }
    if args.run.queue.is_some() && crate::input::is_stdin(&args.input) {
        let why = "--queue needs an input file: a producer that stops is resumed from it";
        return Err(Refusal(anyhow::anyhow!(why)).into());
    }
    let spec = Spec {
        via,
        queued: args.run.queue.is_some(),
        shard: args.shard,
        input,
        format,
        prompt,
        system: args.system,
        id_field: args.id_field,
        output_format,
        keep: args.keep,
        images: args.images,
        schema: args.schema.as_deref().map(crate::schema::read).transpose().map_err(Refusal)?,
        settings,
    };
    let job = args.job.unwrap_or_else(|| default_job_name(&args.input));
    super::run(spec, args.run.options(job, flags)).await
}
