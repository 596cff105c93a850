//! `fanout report NAME`: what a job did, as one self-contained HTML file —
//! no network and no CDN: the styles are inline and the charts are inline
//! SVG drawn here. It shows the counts, answers and failures over time, the
//! latency distribution with p50/p90/p99, tokens and cost, and the slowest
//! and the failed rows. Every figure is folded while the records stream past
//! ([`aggregate`]), so a million-row job gives a page the size of a
//! thousand-row one. Batch and proxy jobs alike.

mod aggregate;
mod calls;
mod chart;
mod shape;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use fanout_store::Store;
use minijinja::Environment;
use serde_json::json;

use crate::Refusal;
use crate::history;
use crate::jobs::{job_cost, when};
use crate::settings::{self, Flags};
use aggregate::Aggregate;
use calls::Calls;

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// The job to report on (`fanout jobs list` names them)
    name: String,
    /// Where to write the HTML; `-` for standard output [default: NAME.html]
    #[arg(short, long)]
    output: Option<PathBuf>,
}

const TEMPLATE: &str = include_str!("report.html");

pub fn command(flags: &Flags, args: ReportArgs) -> Result<ExitCode> {
    let path = flags.store.clone().unwrap_or_else(settings::default_store);
    let store = Store::open(&path)?;
    let Some(job) = store.job(&args.name)? else {
        let message = anyhow!("no job `{}` in {} (fanout jobs list)", args.name, path.display());
        return Err(Refusal(message).into());
    };
    let summary = store.summary(job.clone())?;
    let mut folded = Aggregate::default();
    let mut calls = Calls::default();
    let outcome = job.settings.get("outcome");
    let mut step_times = shape::StepTimes::of(outcome);
    store.each_record::<anyhow::Error>(job.id, |record| {
        folded.add(&record);
        let history = history::decode(record.calls.as_deref());
        for call in &history {
            calls.add(record.index, call);
        }
        step_times.add(&record.task_id, &history);
        Ok(())
    })?;
    store.each_event::<anyhow::Error>(job.id, |event| {
        calls.add_event(&event);
        Ok(())
    })?;
    let pattern = shape::view(outcome, &step_times);
    let html = render(&summary, &mut folded, &calls, &pattern)?;
    let output = args.output.unwrap_or_else(|| PathBuf::from(format!("{}.html", args.name)));
    if output.as_os_str() == "-" {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(html.as_bytes())
            .and_then(|()| stdout.flush())
            .context("cannot write the report")?;
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::write(&output, html).with_context(|| format!("cannot write {}", output.display()))?;
    eprintln!("fanout: the report on job `{}` is in {}", args.name, output.display());
    Ok(ExitCode::SUCCESS)
}

fn render(
    summary: &fanout_store::JobSummary,
    folded: &mut Aggregate,
    calls: &Calls,
    pattern: &serde_json::Value,
) -> Result<String> {
    // The pattern's shape has a section of its own; the command line and
    // its folder are for resuming, not for a page that may be shared.
    let mut settings = summary.job.settings.clone();
    if let Some(settings) = settings.as_object_mut() {
        for kept_for_resume in ["outcome", "argv", "cwd"] {
            settings.shift_remove(kept_for_resume);
        }
    }
    let quantiles: Vec<_> =
        [0.5, 0.9, 0.99].into_iter().filter_map(|q| Some((q, folded.quantile(q)?))).collect();
    let cost = job_cost(summary);
    let finished = summary.finished();
    let row = |row: &aggregate::Row| {
        json!({"index": row.index, "id": row.task_id, "latency": chart::duration(row.micros as f64 / 1000.0),
               "error": row.error})
    };
    let view = json!({
        "name": summary.job.name,
        "input": summary.job.input,
        "created": when(summary.job.created_at),
        "updated": when(summary.job.updated_at),
        "total": summary.job.total,
        "finished": finished,
        "answered": folded.answered(),
        "counts": folded.counts,
        "errors_by_kind": folded.errors_by_kind,
        "tokens": {"input": folded.input_tokens, "output": folded.output_tokens,
                   "cached": folded.cached_input_tokens},
        "cost": cost.map(|(spent, _)| format!("${spent:.4}")),
        "cost_per_row": cost.filter(|_| finished > 0).map(|(spent, _)| format!("${:.6}", spent / finished as f64)),
        "projected": cost.and_then(|(_, projected)| projected).map(|p| format!("${p:.4}")),
        "quantiles": quantiles.iter().map(|(q, ms)| json!({"q": format!("p{}", (q * 100.0).round()), "ms": chart::duration(*ms)})).collect::<Vec<_>>(),
        "over_time": chart::over_time(&folded.over_time(chart::BARS)),
        "latency": chart::latency(&folded.histogram(chart::BINS), &quantiles),
        "slowest": folded.slowest().iter().map(row).collect::<Vec<_>>(),
        "failed": folded.failed.iter().map(row).collect::<Vec<_>>(),
        "failed_more": folded.errors_by_kind.values().sum::<u64>().saturating_sub(folded.failed.len() as u64),
        "settings": serde_json::to_string_pretty(&settings)?,
        "pattern": pattern,
        "calls": {"all": calls.calls, "retries": calls.retries, "hedges": calls.hedges,
                  "repairs": calls.repairs, "rate_limited": calls.rate_limited,
                  "cancelled": calls.cancelled, "drawn": calls.sample.len(),
                  "complete": calls.complete()},
        "timeline": chart::timeline(calls),
        "load": chart::load(&calls.load(chart::BARS), &calls.limits),
        "pauses": calls.pauses.iter().take(aggregate::LISTED).map(|(at, ms, cause)| json!({
            "at": when(at.div_euclid(1000)), "length": chart::duration(*ms), "cause": cause})).collect::<Vec<_>>(),
        "pauses_more": calls.pauses.len().saturating_sub(aggregate::LISTED),
    });
    let mut environment = Environment::new();
    // Named .html, so every value is escaped (a row's id or error is the user's text).
    environment.add_template("report.html", TEMPLATE)?;
    Ok(environment.get_template("report.html")?.render(view)?)
}
