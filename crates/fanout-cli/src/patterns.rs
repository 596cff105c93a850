//! The pattern commands: `vote`, `sections`, `map-reduce`, `perspectives`, `run`.
//! Each prints a readable result, or JSON with `--json`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use fanout::pattern::extract::Extractor;
use fanout::pattern::map_reduce::{MapReduceOptions, map_reduce};
use fanout::pattern::perspectives::{self, DEFAULT_SYNTHESIS, Persona, perspectives};
use fanout::pattern::sections::{Section, SectionsResult, sections};
use fanout::pattern::vote::{
    EarlyStop, Rule, Sample, VoteOptions, distinct, most_consistent, vote,
};
use fanout::pattern::workflow::Workflow;
use fanout::{Agent, Executor, Failure, Request};
use serde::Serialize;

use crate::Refusal;
use crate::connect;
use crate::documents;
use crate::exit::{Ending, Exit};
use crate::input::{self, Content};
use crate::live::Live;
use crate::outcome;
use crate::recorded::{self, Recording};
use crate::settings::{self, Flags, Settings};
use crate::template::Prompt;
use crate::tools::ToolArgs;

/// What a pattern command runs with.
struct Run {
    executor: Executor,
    settings: Settings,
    /// The job its calls are recorded in, until it is dropped.
    recording: Option<Recording>,
    /// Its lines on stderr while it runs.
    live: Live,
}

/// The executor of a `command` run reading `source`, recording its calls
/// in a job of its own and showing them live.
async fn start(flags: &Flags, command: &str, source: &str) -> Result<Run> {
    let settings = Settings::resolve(flags).map_err(Refusal)?;
    let provider = connect::provider(&settings, flags.quiet).await.map_err(Refusal)?;
    let recording = Recording::start(flags, &settings, command, source)?;
    let provider = recorded::provider(recording.as_ref(), provider);
    let live = Live::for_command(command, flags.quiet, settings.price);
    let builder = connect::executor(&settings, provider, fanout::Usage::default());
    let executor = recorded::attach(recording.as_ref(), Some(&live), builder).build();
    Ok(Run { executor, settings, recording, live })
}

/// Says every failure on stderr, named (even when stdout is JSON or shows it
/// too); the exit code follows from all of them.
fn conclude<'a>(ending: &mut Ending, failures: impl IntoIterator<Item = (String, &'a Failure)>) {
    for (what, failure) in failures {
        eprintln!("fanout: {what}: {failure}");
        ending.add_failure(failure);
    }
}

/// A vote's exit: no consensus is a failure, or unfinished when samples were
/// cut off; failed samples alone are not (the vote stands on the others)
/// unless they say the job cannot succeed.
fn vote_exit(consensus: bool, samples: &Ending) -> Exit {
    if samples.cannot_succeed.is_some() {
        Exit::CannotSucceed
    } else if samples.unfinished > 0 && !consensus {
        // Cut off (deadline, interrupt) before the vote could be decided.
        Exit::Unfinished
    } else if consensus {
        Exit::Success
    } else {
        Exit::SomeFailed
    }
}

fn sample_failures(samples: &[Sample]) -> impl Iterator<Item = (String, &Failure)> {
    samples.iter().filter_map(|s| Some((format!("sample {}", s.index), s.error.as_ref()?)))
}

fn print_json(value: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn request(settings: &Settings, prompt: String, system: Option<&str>) -> Request {
    let mut request = Request::user(prompt);
    if let Some(system) = system {
        request = request.with_system(system);
    }
    request.temperature = settings.temperature;
    request.max_tokens = settings.max_tokens;
    request
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum StopRule {
    /// Only when the leader cannot be overtaken (always the same winner as all N)
    Certain,
    /// Adaptive-Consistency's Beta rule
    Beta,
    /// Posterior predictive: the chance that all N samples would pick the same winner
    Predictive,
}

#[derive(Debug, clap::Args)]
pub struct VoteArgs {
    /// The prompt (with --input, a template over each row's fields)
    prompt: String,
    #[arg(short = 'n', long, default_value_t = 5)]
    samples: usize,
    /// number, choice, text, json:FIELD or regex:PATTERN
    #[arg(long, default_value = "text")]
    extract: String,
    /// Stop sampling once the vote is decided (see --stop-rule)
    #[arg(long)]
    early_stop: bool,
    #[arg(long, value_enum, default_value = "predictive")]
    stop_rule: StopRule,
    #[arg(long, default_value_t = 0.99)]
    confidence: f64,
    /// Consensus needs at least this many agreeing samples [default: more than
    /// half of the votes cast]
    #[arg(long, conflicts_with = "plurality")]
    at_least: Option<usize>,
    /// The answer with the most votes wins, majority or not
    #[arg(long)]
    plurality: bool,
    /// Answers cut off at --max-tokens vote too (by default they do not: their
    /// last number is often one from the question)
    #[arg(long)]
    count_truncated: bool,
    /// With --distinct: answers at least this similar (token-set Jaccard, 0 to 1)
    /// are near-duplicates
    #[arg(long, default_value_t = 0.8)]
    similarity: f64,
    /// Weights of the samples, in order: 2,1,1
    #[arg(long, value_delimiter = ',')]
    weights: Vec<f64>,
    /// Free text: a judge picks the most consistent answer (universal self-consistency)
    #[arg(long, conflicts_with = "distinct")]
    judge: bool,
    /// Diversity: N distinct answers, near-duplicates replaced
    #[arg(long)]
    distinct: bool,
    /// With --distinct: the most samples to draw [default: 3 x N]
    #[arg(long)]
    max_samples: Option<usize>,
    #[arg(long)]
    system: Option<String>,
    /// Vote once per row of this JSONL/CSV file; one JSON line each
    #[arg(long)]
    input: Option<PathBuf>,
    #[arg(long = "id")]
    id_field: Option<String>,
}

impl VoteArgs {
    fn options(&self) -> Result<VoteOptions> {
        let extractor = Extractor::parse(&self.extract).map_err(|e| Refusal(anyhow!(e)))?;
        let mut options = VoteOptions::new(self.samples, extractor);
        options.weights = self.weights.clone();
        if let Some(k) = self.at_least {
            options.rule = Rule::AtLeast(k);
        } else if self.plurality {
            options.rule = Rule::Plurality;
        }
        options.count_truncated = self.count_truncated;
        if self.early_stop {
            options.early_stop = Some(match self.stop_rule {
                StopRule::Certain => EarlyStop::Certain,
                StopRule::Beta => EarlyStop::Beta(self.confidence),
                StopRule::Predictive => EarlyStop::Predictive(self.confidence),
            });
        }
        Ok(options)
    }
}

/// The samples' temperature when --temperature is not given: samples of one
/// prompt must differ for a vote to mean anything.
const SAMPLE_TEMPERATURE: f32 = 0.7;

pub async fn run_vote(flags: &Flags, args: VoteArgs) -> Result<ExitCode> {
    let source = args.input.as_ref().map_or("-".into(), |p| p.display().to_string());
    let Run { executor, settings, recording, live } = start(flags, "vote", &source).await?;
    let options = args.options()?;
    let temperature = settings.temperature.unwrap_or(SAMPLE_TEMPERATURE);
    if let Some(path) = &args.input {
        let prompt = Prompt::new(&args.prompt, args.system.as_deref()).map_err(Refusal)?;
        let format = input::detect(path, None).map_err(Refusal)?;
        let mut no_consensus = false;
        let mut samples = Ending::default();
        let (mut questions, mut more) = (Vec::new(), 0);
        for row in input::rows(path, format, args.id_field.clone()).map_err(Refusal)? {
            let line = match row.content {
                Content::Fields(fields) => match prompt.render(&fields, row.line) {
                    Ok(request) => {
                        let result = vote(&executor, &request, &options).await;
                        no_consensus |= !result.consensus;
                        if questions.len() < outcome::MAX_QUESTIONS {
                            questions.push(outcome::vote_question(&row.id, &result, args.samples));
                        } else {
                            more += 1;
                        }
                        let failures = sample_failures(&result.samples)
                            .map(|(what, failure)| (format!("{} {what}", row.id), failure));
                        conclude(&mut samples, failures);
                        serde_json::json!({"id": row.id, "winner": result.winner, "consensus": result.consensus,
                            "plurality": result.plurality, "agreement": result.agreement,
                            "distribution": result.distribution, "calls": result.calls})
                    }
                    Err(error) => serde_json::json!({"id": row.id, "error": error}),
                },
                Content::Request(_) => {
                    serde_json::json!({"id": row.id, "error": "OpenAI Batch rows are not votes"})
                }
                Content::Invalid(error) => serde_json::json!({"id": row.id, "error": error}),
            };
            println!("{line}");
        }
        live.finish();
        recorded::keep_outcome(recording.as_ref(), || outcome::votes(questions, more));
        return Ok(vote_exit(!no_consensus, &samples).into());
    }
    let request = request(&settings, args.prompt.clone(), args.system.as_deref());
    if args.judge {
        let result = most_consistent(&executor, &request, args.samples, temperature).await;
        live.finish();
        if flags.json {
            print_json(&result)?;
        } else if let Some(text) = &result.text {
            println!("{text}");
        }
        let mut ending = Ending::default();
        conclude(&mut ending, sample_failures(&result.samples));
        conclude(&mut ending, result.error.iter().map(|e| ("judge".to_owned(), e)));
        return Ok(vote_exit(result.error.is_none(), &ending).into());
    }
    if args.distinct {
        let budget = args.max_samples.unwrap_or(args.samples * 3);
        let result =
            distinct(&executor, &request, args.samples, budget, args.similarity, temperature).await;
        live.finish();
        if flags.json {
            print_json(&result)?;
        } else {
            for option in &result.options {
                println!("- {}", option.replace('\n', " "));
            }
        }
        if result.exhausted {
            eprintln!(
                "fanout: only {} distinct answers within {} calls",
                result.options.len(),
                result.calls
            );
            return Ok(Exit::SomeFailed.into());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let result = vote(&executor, &request, &options).await;
    live.finish();
    recorded::keep_outcome(recording.as_ref(), || {
        outcome::votes(vec![outcome::vote_question(&args.prompt, &result, args.samples)], 0)
    });
    if flags.json {
        print_json(&result)?;
    } else {
        match (&result.winner, &result.plurality) {
            (Some(winner), _) => println!("{winner}"),
            (None, Some(plurality)) => println!("no consensus (plurality: {plurality})"),
            (None, None) => println!("no consensus"),
        }
        if !flags.quiet {
            let answered: usize = result.distribution.iter().map(|c| c.votes).sum();
            eprintln!(
                "agreement {:.0}% of {answered} answers, {} calls{}",
                result.agreement * 100.0,
                result.calls,
                if result.stopped_early { ", stopped early" } else { "" }
            );
            for count in &result.distribution {
                eprintln!("  {:>4}  {}", count.votes, count.answer);
            }
            if !result.tie.is_empty() {
                eprintln!("tie between {}: the first to appear won", result.tie.join(", "));
            }
        }
    }
    let mut samples = Ending::default();
    conclude(&mut samples, sample_failures(&result.samples));
    Ok(vote_exit(result.consensus, &samples).into())
}

fn print_parts(result: &SectionsResult, json: bool) -> Result<ExitCode> {
    if json {
        print_json(result)?;
    } else {
        for part in &result.parts {
            println!(
                "## {} ({})\n{}\n",
                part.name,
                part.id,
                part.text
                    .clone()
                    .or_else(|| part.error.as_ref().map(ToString::to_string))
                    .unwrap_or_default()
            );
        }
        if let Some(synthesis) = &result.synthesis {
            println!(
                "## synthesis\n{}",
                synthesis
                    .text
                    .clone()
                    .or_else(|| synthesis.error.as_ref().map(ToString::to_string))
                    .unwrap_or_default()
            );
        }
    }
    let mut ending = Ending::default();
    let parts =
        result.parts.iter().filter_map(|p| Some((format!("`{}`", p.name), p.error.as_ref()?)));
    let synthesis =
        result.synthesis.iter().filter_map(|s| Some(("synthesis".to_owned(), s.error.as_ref()?)));
    conclude(&mut ending, parts.chain(synthesis));
    Ok(ending.exit().into())
}

#[derive(Debug, clap::Args)]
pub struct SectionsArgs {
    /// name="prompt"; repeat for each section
    #[arg(long = "section", required = true, value_parser = parse_section)]
    sections: Vec<(String, String)>,
    /// Instructions for a synthesizer that receives every section by name
    #[arg(long)]
    synthesize: Option<String>,
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    tools: ToolArgs,
}

fn parse_section(text: &str) -> Result<(String, String), String> {
    let (name, prompt) = text.split_once('=').ok_or(format!("`{text}` is not NAME=PROMPT"))?;
    Ok((name.trim().to_owned(), prompt.to_owned()))
}

/// The agent the tool flags ask for, its MCP servers from the config file.
async fn agent(flags: &Flags, tools: &ToolArgs) -> Result<Option<Agent>> {
    let servers = settings::mcp_servers(flags).map_err(Refusal)?;
    Ok(tools.agent(&servers).await.map_err(Refusal)?)
}

pub async fn run_sections(flags: &Flags, args: SectionsArgs) -> Result<ExitCode> {
    let Run { executor, settings, recording, live } = start(flags, "sections", "-").await?;
    let agent = agent(flags, &args.tools).await?;
    let parts = args
        .sections
        .into_iter()
        .map(|(name, prompt)| Section {
            name,
            request: request(&settings, prompt, args.system.as_deref()),
            agent: agent.clone(),
        })
        .collect();
    let result = sections(&executor, parts, args.synthesize.as_deref()).await;
    live.finish();
    recorded::keep_outcome(recording.as_ref(), || outcome::parts(&result));
    print_parts(&result, flags.json)
}

#[derive(Debug, clap::Args)]
pub struct MapReduceArgs {
    /// Files, folders (read recursively), globs, or JSONL files with --field
    #[arg(required = true)]
    paths: Vec<String>,
    #[arg(long)]
    map: String,
    #[arg(long)]
    reduce: String,
    /// For JSONL inputs: the field that holds each document's text
    #[arg(long)]
    field: Option<String>,
    #[arg(long, default_value_t = 1500)]
    chunk_tokens: usize,
    #[arg(long, default_value_t = 100)]
    overlap_tokens: usize,
    #[arg(long, default_value_t = 3000)]
    reduce_tokens: usize,
}

pub async fn run_map_reduce(flags: &Flags, args: MapReduceArgs) -> Result<ExitCode> {
    let documents = documents::gather(&args.paths, args.field.as_deref())?;
    let source = args.paths.join(" ");
    let Run { executor, recording, live, .. } = start(flags, "map-reduce", &source).await?;
    let options = MapReduceOptions {
        chunk_tokens: args.chunk_tokens,
        overlap_tokens: args.overlap_tokens,
        reduce_tokens: args.reduce_tokens,
        ..MapReduceOptions::new(args.map, args.reduce)
    };
    let result = map_reduce(&executor, &documents, &options).await;
    live.finish();
    recorded::keep_outcome(recording.as_ref(), || outcome::collapse(&result));
    if flags.json {
        print_json(&result)?;
    } else {
        println!("{}", result.answer.as_deref().unwrap_or("(no answer)"));
        if !flags.quiet {
            eprintln!("sources: {}", result.sources.join(", "));
            eprintln!(
                "levels: {} (map, then {} collapse rounds)",
                result.levels.len(),
                result.levels.len().saturating_sub(1)
            );
        }
    }
    let mut ending = Ending::default();
    conclude(&mut ending, result.failures.iter().map(|(ids, failure)| (ids.join(", "), failure)));
    if result.answer.is_none() && result.failures.is_empty() {
        eprintln!("fanout: no answer");
        ending.failed += 1;
    }
    Ok(ending.exit().into())
}

#[derive(Debug, clap::Args)]
pub struct PerspectivesArgs {
    /// The file to review (`-` for stdin)
    input: PathBuf,
    /// Built-in persona: skeptic, optimist, realist, security, end-user, expert, devil
    #[arg(long = "persona")]
    personas: Vec<String>,
    /// Custom personas: TOML ([[persona]] name, prompt) or JSON
    #[arg(long)]
    personas_file: Option<PathBuf>,
    /// Instructions for the synthesis [default: a balanced, attributed synthesis]
    #[arg(long)]
    synthesize: Option<String>,
    #[arg(long)]
    no_synthesis: bool,
    #[command(flatten)]
    tools: ToolArgs,
}

pub async fn run_perspectives(flags: &Flags, args: PerspectivesArgs) -> Result<ExitCode> {
    let input = if crate::input::is_stdin(&args.input) {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(&args.input)
            .with_context(|| format!("cannot read {}", args.input.display()))
            .map_err(Refusal)?
    };
    let mut personas: Vec<Persona> = Vec::new();
    for name in &args.personas {
        let names: Vec<&str> = perspectives::BUILTIN.iter().map(|(n, _)| *n).collect();
        personas.push(perspectives::builtin(name).ok_or_else(|| {
            Refusal(anyhow!("unknown persona `{name}`: the built-in ones are {}", names.join(", ")))
        })?);
    }
    if let Some(file) = &args.personas_file {
        personas.extend(perspectives::load(file).map_err(|e| Refusal(anyhow!(e)))?);
    }
    if personas.is_empty() {
        personas = ["skeptic", "optimist", "realist"]
            .iter()
            .filter_map(|n| perspectives::builtin(n))
            .collect();
    }
    let source = args.input.display().to_string();
    let Run { executor, recording, live, .. } = start(flags, "perspectives", &source).await?;
    let agent = agent(flags, &args.tools).await?;
    let synthesis =
        (!args.no_synthesis).then(|| args.synthesize.as_deref().unwrap_or(DEFAULT_SYNTHESIS));
    let result = perspectives(&executor, &input, &personas, synthesis, agent.as_ref()).await;
    live.finish();
    recorded::keep_outcome(recording.as_ref(), || outcome::parts(&result));
    print_parts(&result, flags.json)
}

#[derive(Debug, clap::Args)]
pub struct WorkflowArgs {
    /// The workflow file (TOML)
    workflow: PathBuf,
    /// NAME=VALUE for the workflow's variables; repeatable
    #[arg(long = "var", value_parser = parse_section)]
    vars: Vec<(String, String)>,
    /// Folders, bounds and extra tool sets for the steps that use tools
    #[command(flatten)]
    tools: ToolArgs,
}

pub async fn run_workflow(flags: &Flags, args: WorkflowArgs) -> Result<ExitCode> {
    let text = std::fs::read_to_string(&args.workflow)
        .with_context(|| format!("cannot read {}", args.workflow.display()))
        .map_err(Refusal)?;
    let vars: BTreeMap<String, String> = args.vars.into_iter().collect();
    let workflow =
        Workflow::parse(&text).map_err(|e| Refusal(anyhow!("{}: {e}", args.workflow.display())))?;
    let plan = workflow.plan(&vars).map_err(|errors| {
        Refusal(anyhow!("{} is not valid:\n  {}", args.workflow.display(), errors.join("\n  ")))
    })?;
    // Every tool set a step names is connected (each server once) before any call.
    let mut servers = settings::mcp_servers(flags).map_err(Refusal)?;
    servers.extend(plan.mcp().clone());
    let mut names: Vec<String> = plan.step_tools().flat_map(|(_, t)| t.iter().cloned()).collect();
    names.extend(args.tools.named());
    names.sort();
    names.dedup();
    let mut tools = args.tools.clone();
    let folder = args.workflow.parent().unwrap_or(std::path::Path::new("."));
    tools.allow_dirs.extend(plan.allow_dirs().iter().map(|dir| folder.join(dir)));
    let sets = tools
        .connect(&names, &servers)
        .await
        .map_err(|e| Refusal(anyhow!("{}: {e}", args.workflow.display())))?;
    for (step, names) in plan.step_tools() {
        let mut tools = fanout::Toolbox::new();
        for name in names {
            let set = sets.sets.get(name).map_or(&[][..], Vec::as_slice);
            tools
                .add_set(name, set)
                .map_err(|e| Refusal(anyhow!("{}: step `{step}`: {e}", args.workflow.display())))?;
        }
    }
    let source = args.workflow.display().to_string();
    let Run { executor, recording, live, .. } = start(flags, "run", &source).await?;
    let result = plan.run(&executor, &sets).await;
    live.finish();
    recorded::keep_outcome(recording.as_ref(), || outcome::workflow(&plan.needs(), &result));
    if flags.json {
        print_json(&result)?;
    } else {
        for step in &result.steps {
            if !result.outputs.contains(&step.name) || flags.quiet {
                continue;
            }
            println!(
                "{}",
                step.text
                    .clone()
                    .or_else(|| step.error.as_ref().map(ToString::to_string))
                    .unwrap_or_default()
            );
        }
    }
    let mut ending = Ending::default();
    let failures =
        result.steps.iter().filter_map(|s| Some((format!("step `{}`", s.name), s.error.as_ref()?)));
    conclude(&mut ending, failures);
    Ok(ending.exit().into())
}
