//! `fanout`: run LLM work in parallel from the shell.
//!
//! stdout carries results, stderr progress and logs. Exit codes: 0 every task
//! succeeded; 1 an unexpected error; 2 bad usage, settings or input found before
//! any call; 3 some tasks failed; 4 the run stopped before every task finished
//! (interrupted, deadline); 5 the job cannot succeed (bad key, unknown model, no
//! quota).

mod ask;
mod batch;
mod cache;
mod connect;
mod documents;
mod exit;
mod fingerprint;
mod history;
mod input;
mod jobs;
mod limits;
mod live;
mod models;
mod outcome;
mod output;
mod patterns;
mod progress;
mod proxy;
mod record;
mod recorded;
mod replay;
mod report;
mod schema;
mod settings;
mod shard;
mod telemetry;
mod template;
mod tools;
mod worker;

use std::fmt;
use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing::Instrument;

use exit::Exit;
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
    #[command(flatten)]
    telemetry: telemetry::TelemetryArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ask one question and print the answer
    Ask(ask::AskArgs),
    /// Run a prompt template over every row of a JSONL, CSV or OpenAI Batch file
    Batch(Box<batch::BatchArgs>),
    /// List, show, export, remove, merge or resume batch jobs
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Sample one prompt N times and take the consensus (or N distinct answers)
    Vote(patterns::VoteArgs),
    /// Run named subtasks in parallel, then an optional synthesis
    Sections(patterns::SectionsArgs),
    /// Summarize many documents in parallel, then reduce to one answer citing sources
    MapReduce(patterns::MapReduceArgs),
    /// Several personas review one input, then an attributed synthesis
    Perspectives(patterns::PerspectivesArgs),
    /// Run a workflow file of templated, parallel steps
    Run(patterns::WorkflowArgs),
    /// Serve an OpenAI- or Anthropic-compatible endpoint that sends every
    /// client's calls through fanout's limits, retries and records
    Proxy(proxy::ProxyArgs),
    /// Write a job's report: one self-contained HTML file
    Report(report::ReportArgs),
    /// Fetch or locate the embedded local model
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Run the rows of jobs sent to a Redis queue (`batch --queue`), beside
    /// any number of other workers
    Worker(worker::WorkerArgs),
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let flags = &cli.flags;
    match cli.command {
        Command::Ask(args) => ask::command(flags, args).await,
        Command::Batch(args) => batch::command(flags, *args).await,
        Command::Jobs(command) => jobs::command(flags, command).await,
        Command::Vote(args) => patterns::run_vote(flags, args).await,
        Command::Sections(args) => patterns::run_sections(flags, args).await,
        Command::MapReduce(args) => patterns::run_map_reduce(flags, args).await,
        Command::Perspectives(args) => patterns::run_perspectives(flags, args).await,
        Command::Run(args) => patterns::run_workflow(flags, args).await,
        Command::Proxy(args) => proxy::command(flags, args).await,
        Command::Report(args) => report::command(flags, args),
        Command::Worker(args) => worker::command(flags, args).await,
        Command::Models(command) => {
            let settings = Settings::resolve(flags).map_err(Refusal)?;
            models::command(command, &settings).await.map(|()| ExitCode::SUCCESS)
        }
    }
}

/// Runs a command line again in this process (`fanout jobs resume` of a
/// pattern job).
/// Boxed: it is reached from `run` itself.
pub fn rerun(argv: Vec<String>) -> std::pin::Pin<Box<dyn Future<Output = Result<ExitCode>>>> {
    Box::pin(async move {
        let cli =
            Cli::try_parse_from(&argv).map_err(|error| Refusal(anyhow::anyhow!("{error}")))?;
        run(cli).await
    })
}

/// mimalloc: glibc's malloc took about a seventh of each call's CPU in
/// `fanout batch` at thousands of calls a second (bench/stragglers.py overhead).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let command = matches.subcommand_name().unwrap_or_default().to_owned();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    // Before the runtime: the exporter's blocking HTTP client brings its own.
    let telemetry = match telemetry::Telemetry::start(&cli.telemetry) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("fanout: {error:#}");
            return Exit::Refused.into();
        }
    };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    let ended = runtime.block_on(run(cli).instrument(telemetry::Telemetry::root(&command)));
    // Sends the spans still batched (outside the runtime: it blocks).
    drop(telemetry);
    match ended {
        Ok(code) => code,
        Err(error) => {
            let refused = error.downcast_ref::<Refusal>().is_some();
            eprintln!("fanout: {error:#}");
            (if refused { Exit::Refused } else { Exit::Error }).into()
        }
    }
}

#[cfg(test)]
mod tests {
    /// No subcommand declares a flag that a global flag already is: clap
    /// lets the subcommand's shadow the global one, and reading it then
    /// panics (`vote --budget` did, beside the global `--budget`).
    #[test]
    fn no_subcommand_shadows_a_global_flag() {
        use clap::CommandFactory;
        let command = super::Cli::command();
        command.clone().debug_assert();
        let global: Vec<_> = command.get_arguments().map(|a| a.get_id().clone()).collect();
        let mut commands: Vec<&clap::Command> = command.get_subcommands().collect();
        while let Some(sub) = commands.pop() {
            for arg in sub.get_arguments() {
                assert!(
                    !global.contains(arg.get_id()),
                    "`{}` redeclares the global --{}",
                    sub.get_name(),
                    arg.get_id()
                );
            }
            commands.extend(sub.get_subcommands());
        }
    }
}
