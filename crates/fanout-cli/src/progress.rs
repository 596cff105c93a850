//! Progress on stderr while a batch runs, and the summary table after it.
//! Hidden when stderr is not a terminal, or with --quiet.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use fanout::{Event, Price, Status, TaskResult, Totals};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Default)]
struct Counts {
    succeeded: AtomicU64,
    failed: AtomicU64,
    retrying: AtomicU64,
    tokens: AtomicU64,
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
}

pub struct Progress {
    bar: ProgressBar,
    counts: Arc<Counts>,
    started: Instant,
    price: Option<Price>,
}

impl Progress {
    pub fn new(total: Option<u64>, quiet: bool, price: Option<Price>) -> Self {
        let bar = if quiet || !std::io::stderr().is_terminal() {
            ProgressBar::hidden()
        } else {
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr_with_hz(5));
            let template = match total {
                Some(_) => "{bar:30.cyan/blue} {pos}/{len} {msg} ETA {eta}",
                None => "{spinner} {pos} done {msg}",
            };
            bar.set_style(ProgressStyle::with_template(template).expect("a valid template"));
            bar
        };
        Self { bar, counts: Arc::default(), started: Instant::now(), price }
    }

    /// Counts retries as the executor reports them.
    pub fn events(&self) -> impl Fn(&Event) + Send + Sync + 'static {
        let counts = Arc::clone(&self.counts);
        move |event| match event {
            Event::Retrying { .. } => {
                counts.retrying.fetch_add(1, Ordering::Relaxed);
            }
            Event::Started { attempt, .. } if *attempt > 1 => {
                counts.retrying.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    pub fn record(&self, result: &TaskResult) {
        let counts = &self.counts;
        match result.outcome.status() {
            Status::Succeeded => counts.succeeded.fetch_add(1, Ordering::Relaxed),
            Status::Failed | Status::TimedOut => counts.failed.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        let usage = result.outcome.usage();
        counts.tokens.fetch_add(usage.total(), Ordering::Relaxed);
        counts.input_tokens.fetch_add(usage.input_tokens, Ordering::Relaxed);
        counts.output_tokens.fetch_add(usage.output_tokens, Ordering::Relaxed);
        self.bar.inc(1);
        if self.bar.is_hidden() {
            return;
        }
        let done = self.bar.position() as f64;
        let rate = done / self.started.elapsed().as_secs_f64().max(1e-3);
        let mut message = format!(
            "ok {} failed {} retrying {} | {rate:.0}/s | {} tokens",
            counts.succeeded.load(Ordering::Relaxed),
            counts.failed.load(Ordering::Relaxed),
            counts.retrying.load(Ordering::Relaxed),
            counts.tokens.load(Ordering::Relaxed),
        );
        if let Some(price) = self.price {
            let usage = fanout::Usage {
                input_tokens: counts.input_tokens.load(Ordering::Relaxed),
                output_tokens: counts.output_tokens.load(Ordering::Relaxed),
            };
            message.push_str(&format!(" | ${:.4}", price.cost(usage)));
        }
        self.bar.set_message(message);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn millis(duration: Duration) -> String {
    format!("{:.0} ms", duration.as_secs_f64() * 1000.0)
}

/// The end-of-run summary, for stderr.
pub fn summary(totals: &Totals) -> String {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    let mut row = |name: &str, value: String| {
        table.add_row(vec![name.to_string(), value]);
    };
    row("tasks", totals.tasks.to_string());
    row("succeeded", totals.succeeded.to_string());
    row("failed", totals.failed.to_string());
    if totals.timed_out > 0 {
        row("timed out", totals.timed_out.to_string());
    }
    if totals.cancelled + totals.not_run > 0 {
        row("not finished", (totals.cancelled + totals.not_run).to_string());
    }
    row(
        "tokens in / out",
        format!("{} / {}", totals.usage.input_tokens, totals.usage.output_tokens),
    );
    if let Some(cost) = totals.cost {
        row("cost", format!("${cost:.4}"));
    }
    row("wall time", format!("{:.1} s", totals.wall.as_secs_f64()));
    if let Some(latency) = totals.latency {
        row("latency p50 / p99", format!("{} / {}", millis(latency.p50), millis(latency.p99)));
    }
    row(
        "calls / retries / 429s",
        format!("{} / {} / {}", totals.calls, totals.retries, totals.rate_limited),
    );
    row("hedges sent / won", format!("{} / {}", totals.hedges, totals.hedges_won));
    if totals.estimated_usage.total() > 0 {
        row(
            "tokens estimated",
            format!(
                "{} / {} (the provider reported no usage)",
                totals.estimated_usage.input_tokens, totals.estimated_usage.output_tokens
            ),
        );
    }
    table.to_string()
}
