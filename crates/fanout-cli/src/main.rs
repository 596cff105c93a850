//! `fanout`: run LLM work in parallel from the shell.
//!
//! stdout carries results, stderr progress and logs. Exit codes: 0 every task
//! succeeded; 1 an unexpected error; 2 bad usage, settings or input found before
//! any call; 3 some tasks failed; 4 the run stopped before every task finished
//! (interrupted, deadline); 5 the job cannot succeed (bad key, unknown model, no
//! quota).

mod batch;
mod cache;
mod exit;
mod fingerprint;
mod input;
mod jobs;
mod models;
mod output;
mod patterns;
mod progress;
mod record;
mod settings;
mod template;

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fanout::Request;

use exit::{Ending, Exit};
use settings::{Flags, Settings};

/// An error in what the user asked for, found before any call: exit code 2.
#[derive(Debug)]
pub struct Refusal(pub anyhow::Error);

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Refusal {}

/// Run LLM work in parallel and bring every result back.
#[derive(Debug, Parser)]
#[command(
    name = "fanout",
    version,
    after_help = "Exit codes: 0 all succeeded, 1 error, 2 bad usage or input, \
    3 some tasks failed, 4 stopped before finishing, 5 the job cannot succeed (key, model, quota)."
)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ask one question and print the answer
    Ask {
        prompt: String,
        #[arg(long)]
        system: Option<String>,
    },
    /// Run a prompt template over every row of a JSONL, CSV or OpenAI Batch file
    Batch(BatchArgs),
    /// List, show, export, remove or resume batch jobs
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Sample one prompt N times and take the consensus (or N distinct answers)
    Vote(patterns::VoteArgs),
    /// Run named subtasks in parallel, then an optional synthesis
    Sections(patterns::SectionsArgs),
    /// Summarize many documents in parallel, then reduce to one answer citing sources
    MapReduce(patterns::MapReduceArgs),
    /// Several personas review one input, then an attributed synthesis
    Perspectives(patterns::PerspectivesArgs),
    /// Run a workflow file of templated, parallel steps
    Run(patterns::RunArgs),
    /// Fetch or locate the embedded local model
    #[command(subcommand)]
    Models(models::ModelsCommand),
}

#[derive(Debug, clap::Args)]
struct BatchArgs {
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
    output_format: Option<output::OutputFormat>,
    /// Job name: running the same job again resumes it [default: the input's name and the time]
    #[arg(long)]
    job: Option<String>,
    #[command(flatten)]
    run: RunArgs,
}

/// How a job runs this time (`batch` and `jobs resume`).
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Output file [default: stdout]
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// On resume, run the failed tasks again too
    #[arg(long)]
    retry_failed: bool,
    /// Reuse stored answers for identical requests
    #[arg(long)]
    cache: bool,
    /// Seconds in-flight calls may take to finish after Ctrl-C
    #[arg(long, default_value_t = 30.0)]
    grace: f64,
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
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
        output_format: Option<output::OutputFormat>,
    },
    /// Remove a job and its results
    Rm { name: String },
    /// Run the unfinished tasks of a job
    Resume {
        name: String,
        #[command(flatten)]
        run: RunArgs,
    },
}

fn read_prompt_file(path: &PathBuf) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read prompt file {}", path.display()))
        .map_err(|e| Refusal(e).into())
}

fn default_job_name(input: &std::path::Path) -> String {
    let stem = input.file_stem().and_then(|s| s.to_str()).filter(|s| *s != "-").unwrap_or("stdin");
    format!("{stem}-{}", fanout_store::now())
}

async fn ask(flags: &Flags, prompt: String, system: Option<String>) -> Result<ExitCode> {
    let settings = Settings::resolve(flags).map_err(Refusal)?;
    let provider = settings.provider(flags.quiet).await.map_err(Refusal)?;
    let mut request = Request::user(prompt);
    if let Some(system) = system {
        request = request.with_system(system);
    }
    request.temperature = settings.temperature;
    request.max_tokens = settings.max_tokens;
    let report = settings.executor(provider).build().run([request]).await;
    let result = &report.results[0];
    if flags.json {
        println!("{}", output::result_line(result));
    } else if let Some(text) = result.outcome.text() {
        println!("{text}");
    }
    if let Some(message) = result.outcome.describe() {
        eprintln!("fanout: {message}");
    }
    let mut ending = Ending::default();
    ending.add(&result.outcome);
    Ok(ending.exit().into())
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let flags = &cli.flags;
    let store = flags.store.clone().unwrap_or_else(settings::default_store);
    let options = |job: String, run: RunArgs| batch::RunOptions {
        job,
        store: store.clone(),
        output: run.output,
        retry_failed: run.retry_failed,
        cache: run.cache,
        quiet: flags.quiet,
        json: flags.json,
        grace: Duration::from_secs_f64(run.grace.max(0.0)),
    };
    match cli.command {
        Command::Ask { prompt, system } => ask(flags, prompt, system).await,
        Command::Batch(args) => {
            let settings = Settings::resolve(flags).map_err(Refusal)?;
            let prompt = match &args.prompt_file {
                Some(path) => Some(read_prompt_file(path)?),
                None => args.prompt.clone(),
            };
            let format = input::detect(&args.input, args.format).map_err(Refusal)?;
            let input = if args.input.as_os_str() == "-" {
                args.input.clone()
            } else {
                std::path::absolute(&args.input).unwrap_or(args.input.clone())
            };
            let output_format = args.output_format.unwrap_or(match format {
                input::Format::OpenaiBatch => output::OutputFormat::OpenaiBatch,
                _ => output::OutputFormat::Jsonl,
            });
            let spec = batch::Spec {
                input,
                format,
                prompt,
                system: args.system,
                id_field: args.id_field,
                output_format,
                settings,
            };
            let job = args.job.unwrap_or_else(|| default_job_name(&args.input));
            batch::run(spec, options(job, args.run)).await
        }
        Command::Vote(args) => patterns::run_vote(flags, args).await,
        Command::Sections(args) => patterns::run_sections(flags, args).await,
        Command::MapReduce(args) => patterns::run_map_reduce(flags, args).await,
        Command::Perspectives(args) => patterns::run_perspectives(flags, args).await,
        Command::Run(args) => patterns::run_workflow(flags, args).await,
        Command::Models(command) => {
            let settings = Settings::resolve(flags).map_err(Refusal)?;
            models::command(command, &settings).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Jobs(command) => match command {
            JobsCommand::List => jobs::list(&store, flags.json),
            JobsCommand::Show { name } => jobs::show(&store, &name),
            JobsCommand::Export { name, output, output_format } => {
                jobs::export(&store, &name, output.as_deref(), output_format)
            }
            JobsCommand::Rm { name } => jobs::remove(&store, &name),
            JobsCommand::Resume { name, run } => jobs::resume(options(name, run), flags).await,
        },
    }
}

/// mimalloc: glibc's malloc took about a seventh of each call's CPU in
/// `fanout batch` at thousands of calls a second (bench/stragglers.py overhead).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            let refused = error.downcast_ref::<Refusal>().is_some();
            eprintln!("fanout: {error:#}");
            (if refused { Exit::Refused } else { Exit::Error }).into()
        }
    }
}
