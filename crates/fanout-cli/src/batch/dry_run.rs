//! `fanout batch --dry-run`: every request rendered and counted, no call made.
//!
//! It streams the input once, as a run would, so a million rows take the
//! memory of a few: per row it keeps only sums, and the first few invalid
//! rows' messages. Token counts are exact where the model's tokenizer is known
//! (tiktoken for OpenAI's models, the GGUF's own for the local model) and a
//! labelled estimate elsewhere.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use fanout::{Provider, Request, tokens};
use fanout_store::{Finished, Store};
use serde::Serialize;

use super::keep::KeptFields;
use super::{RunOptions, Spec, rows};
use crate::Refusal;
use crate::connect;
use crate::settings::ProviderKind;

/// Invalid rows named in the report; the rest are counted.
const NAMED_INVALID: usize = 10;

/// How the prompt tokens are counted.
enum Counter {
    /// OpenAI's tokenizer for the model, through tiktoken.
    Tiktoken(String),
    /// The local model's own tokenizer.
    Local(Arc<dyn Provider>),
    /// About four characters a token.
    Estimate,
}

impl Counter {
    fn count(&self, request: &Request) -> u64 {
        match self {
            Self::Tiktoken(model) => tokens::count_prompt(Some(model), request),
            Self::Local(provider) => provider.estimate_prompt_tokens(request),
            Self::Estimate => tokens::estimate_prompt(request),
        }
    }

    fn how(&self) -> &'static str {
        match self {
            Self::Tiktoken(_) => "exact (the model's tokenizer, tiktoken)",
            Self::Local(_) => "exact (the local model's tokenizer)",
            Self::Estimate => "estimated (about 4 characters a token; no tokenizer for this model)",
        }
    }
}

/// What a run would send, counted.
#[derive(Debug, Default, Serialize)]
struct DryRun {
    job: String,
    rows: u64,
    /// Rows a run would call.
    calls: u64,
    /// Rows already finished in the job: restored, not called.
    finished: u64,
    /// Rows that would fail without a call (bad JSON, a missing field).
    invalid: u64,
    /// The first invalid rows' messages, naming their line.
    invalid_rows: Vec<String>,
    input_tokens: u64,
    tokens_counted: String,
    /// Output tokens: none, up to every call's `max_tokens`.
    output_tokens_max: u64,
    /// From the job's finished answers (when resuming): their mean, per call.
    output_tokens_likely: Option<u64>,
    model: String,
    /// Dollars: input alone, and with every call's maximum output.
    cost_min: Option<f64>,
    cost_max: Option<f64>,
    cost_likely: Option<f64>,
    prices_checked: Option<String>,
}

/// The mean output of the job's finished answers, if it has any.
fn finished_answers(options: &RunOptions) -> Result<(Finished, Option<u64>)> {
    let store = Store::open(&options.store)?;
    let Some(job) = store.job(&options.job)? else { return Ok((Finished::default(), None)) };
    let finished = store.finished(job.id, !options.retry_failed)?;
    let summary = store.summary(job)?;
    let answered = summary.counts.get("succeeded").copied().unwrap_or(0);
    let mean = (answered > 0).then(|| summary.output_tokens.div_ceil(answered));
    Ok((finished, mean))
}

async fn counter(spec: &Spec, quiet: bool) -> Result<Counter> {
    let settings = &spec.settings;
    Ok(match settings.provider {
        ProviderKind::Openai if tokens::has_tokenizer(&settings.model) => {
            Counter::Tiktoken(settings.model.clone())
        }
        ProviderKind::Local => {
            Counter::Local(connect::provider(settings, quiet).await.map_err(Refusal)?)
        }
        _ => Counter::Estimate,
    })
}

/// Counts what running `spec` would send and prints it (JSON with `--json`).
pub async fn run(spec: &Spec, options: &RunOptions) -> Result<ExitCode> {
    let prompt = super::prompt(spec)?;
    let (finished, likely_output) = finished_answers(options)?;
    let counter = counter(spec, options.quiet).await?;
    // What the provider asks for when a request sets no max_tokens.
    let default_output = match spec.settings.provider {
        ProviderKind::Anthropic => fanout::ANTHROPIC_DEFAULT_MAX_TOKENS,
        _ => tokens::DEFAULT_OUTPUT_ESTIMATE,
    };
    // Finished rows are only counted: nothing is restored, so a scratch store will do.
    let scratch = Store::open(std::path::Path::new(":memory:"))?;
    // Kept fields are for output rows, and a dry run writes none.
    let counted = Spec { keep: None, ..spec.clone() };
    let tasks =
        rows::tasks(&counted, prompt, scratch, 0, Finished::default(), KeptFields::default())
            .map_err(Refusal)?;
    let mut report = DryRun {
        job: options.job.clone(),
        tokens_counted: match spec.images.is_empty() {
            true => counter.how().to_owned(),
            false => format!(
                "{}; images estimated at {} tokens each",
                counter.how(),
                tokens::IMAGE_TOKENS_ESTIMATE
            ),
        },
        model: spec.settings.model.clone(),
        ..DryRun::default()
    };
    for (index, task) in tasks.enumerate() {
        report.rows += 1;
        if finished.contains(index as u64) {
            report.finished += 1;
            continue;
        }
        let Some(request) = task.request() else {
            report.invalid += 1;
            if report.invalid_rows.len() < NAMED_INVALID {
                let said = task.settled_outcome().and_then(fanout::Outcome::describe);
                report.invalid_rows.push(said.unwrap_or_default());
            }
            continue;
        };
        report.calls += 1;
        report.input_tokens += counter.count(request);
        report.output_tokens_max += u64::from(request.max_tokens.unwrap_or(default_output));
    }
    report.output_tokens_likely = likely_output.map(|mean| mean * report.calls);
    if let Some(price) = spec.settings.price {
        let cost = |output| price.cost(fanout::Usage::new(report.input_tokens, output));
        report.cost_min = Some(cost(0));
        report.cost_max = Some(cost(report.output_tokens_max));
        report.cost_likely = report.output_tokens_likely.map(cost);
        // Said only when the price is the table's, not one given as a flag.
        let table = fanout::prices::PriceTable::builtin();
        report.prices_checked = table
            .lookup(&spec.settings.model)
            .filter(|listed| listed.price == price)
            .map(|_| table.checked.clone());
    }
    if options.json {
        println!("{}", serde_json::to_string(&report).expect("the report serializes"));
    } else {
        print!("{}", said(&report));
    }
    Ok(ExitCode::SUCCESS)
}

fn said(report: &DryRun) -> String {
    let mut text = format!("dry run of job `{}`: no calls made\n", report.job);
    let mut line = |name: &str, value: String| text.push_str(&format!("  {name:<22}{value}\n"));
    line("rows", report.rows.to_string());
    line("would be called", report.calls.to_string());
    if report.finished > 0 {
        line("already finished", report.finished.to_string());
    }
    line("would fail (invalid)", report.invalid.to_string());
    line("input tokens", format!("{} {}", report.input_tokens, report.tokens_counted));
    let likely = report
        .output_tokens_likely
        .map(|l| format!(", likely {l} (the job's finished answers)"))
        .unwrap_or_default();
    line(
        "output tokens",
        format!("0 to {} (every call's max_tokens){likely}", report.output_tokens_max),
    );
    match (report.cost_min, report.cost_max) {
        (Some(min), Some(max)) => {
            let likely =
                report.cost_likely.map(|l| format!(", likely ${l:.4}")).unwrap_or_default();
            let checked = report
                .prices_checked
                .as_deref()
                .map(|date| format!(", prices of {date}"))
                .unwrap_or_default();
            line("cost", format!("${min:.4} to ${max:.4}{likely} ({}{checked})", report.model));
        }
        _ => line(
            "cost",
            format!("unknown: no price for `{}` (give --price-in and --price-out)", report.model),
        ),
    }
    for invalid in &report.invalid_rows {
        text.push_str(&format!("  invalid: {invalid}\n"));
    }
    if report.invalid as usize > report.invalid_rows.len() {
        text.push_str(&format!(
            "  invalid: ... and {} more\n",
            report.invalid as usize - report.invalid_rows.len()
        ));
    }
    text
}
