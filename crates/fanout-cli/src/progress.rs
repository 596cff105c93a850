//! Progress on stderr while a batch runs, and the summary table after it.
//! Hidden when stderr is not a terminal, or with --quiet.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use fanout::{Event, Price, Status, TaskResult, Totals, Usage};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Default)]
struct Counts {
    succeeded: AtomicU64,
    failed: AtomicU64,
    /// Tasks with an attempt sent and not yet ended (hedges not included), by
    /// index: a task that ends while waiting to retry is not counted twice.
    in_flight: Mutex<HashSet<usize>>,
    calls: AtomicU64,
    retries: AtomicU64,
    repairs: AtomicU64,
    rate_limited: AtomicU64,
    hedges: AtomicU64,
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
    cached_input_tokens: AtomicU64,
    /// When the latest 429 pause of every call ends.
    paused_until: Mutex<Option<Instant>>,
}

impl Counts {
    fn usage(&self) -> Usage {
        Usage {
            cached_input_tokens: self.cached_input_tokens.load(Ordering::Relaxed),
            ..Usage::new(
                self.input_tokens.load(Ordering::Relaxed),
                self.output_tokens.load(Ordering::Relaxed),
            )
        }
    }
}

#[derive(Clone)]
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

    /// Counts attempts in flight, retries, 429s and hedges as the executor
    /// reports them.
    pub fn events(&self) -> impl Fn(&Event) + Send + Sync + 'static {
        let progress = self.clone();
        move |event| progress.observe(event)
    }

    /// Counts what `event` says.
    pub fn observe(&self, event: &Event) {
        let counts = &self.counts;
        match event {
            Event::Started { index, .. } => {
                counts.in_flight.lock().expect("never poisoned").insert(*index);
                counts.calls.fetch_add(1, Ordering::Relaxed);
            }
            Event::Retrying { index, error, .. } => {
                counts.in_flight.lock().expect("never poisoned").remove(index);
                counts.retries.fetch_add(1, Ordering::Relaxed);
                if error.is_rate_limited() {
                    counts.rate_limited.fetch_add(1, Ordering::Relaxed);
                }
            }
            Event::Finished { index, .. } => {
                counts.in_flight.lock().expect("never poisoned").remove(index);
            }
            Event::Repairing { index, .. } => {
                counts.in_flight.lock().expect("never poisoned").remove(index);
                counts.repairs.fetch_add(1, Ordering::Relaxed);
            }
            Event::Hedged { .. } => {
                counts.hedges.fetch_add(1, Ordering::Relaxed);
            }
            Event::Paused { duration, .. } => {
                let until = Instant::now() + *duration;
                let mut paused = counts.paused_until.lock().expect("never poisoned");
                *paused = Some(paused.map_or(until, |p| p.max(until)));
                drop(paused);
                // Nothing finishes while every call waits: say so now.
                if !self.bar.is_hidden() {
                    self.bar.set_message(self.line());
                }
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
        counts.input_tokens.fetch_add(usage.input_tokens, Ordering::Relaxed);
        counts.output_tokens.fetch_add(usage.output_tokens, Ordering::Relaxed);
        counts.cached_input_tokens.fetch_add(usage.cached_input_tokens, Ordering::Relaxed);
        self.bar.inc(1);
        if !self.bar.is_hidden() {
            self.bar.set_message(self.line());
        }
    }

    /// The live figures: counts, rates, in flight, 429s, retries, hedges, and
    /// the cost so far with its projection over the whole input.
    fn line(&self) -> String {
        let counts = &self.counts;
        let minutes = self.started.elapsed().as_secs_f64().max(1e-3) / 60.0;
        let usage = counts.usage();
        let per_minute = |n: u64| n as f64 / minutes;
        let mut line = format!(
            "ok {} failed {} | in flight {} | {} req/min {} tok/min | 429s {} retries {} hedges {}",
            counts.succeeded.load(Ordering::Relaxed),
            counts.failed.load(Ordering::Relaxed),
            counts.in_flight.lock().expect("never poisoned").len(),
            compact(per_minute(counts.calls.load(Ordering::Relaxed))),
            compact(per_minute(usage.total())),
            counts.rate_limited.load(Ordering::Relaxed),
            counts.retries.load(Ordering::Relaxed),
            counts.hedges.load(Ordering::Relaxed),
        );
        let repairs = counts.repairs.load(Ordering::Relaxed);
        if repairs > 0 {
            line.push_str(&format!(" repairs {repairs}"));
        }
        let paused_until = *counts.paused_until.lock().expect("never poisoned");
        if let Some(left) = paused_until.and_then(|u| u.checked_duration_since(Instant::now())) {
            line.push_str(&format!(" | paused {:.1} s (429)", left.as_secs_f64()));
        }
        if let Some(price) = self.price {
            let spent = price.cost(usage);
            line.push_str(&format!(" | ${spent:.4}"));
            let done = self.bar.position();
            let total = self.bar.length().filter(|t| *t > done);
            if let Some(projected) = total.and_then(|total| projected(spent, done, total)) {
                line.push_str(&format!(" of ~${projected:.4}"));
            }
        }
        line
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// 1234 → "1.2k", 2_500_000 → "2.5M": rates stay short on the line.
fn compact(value: f64) -> String {
    match value {
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

fn millis(duration: Duration) -> String {
    format!("{:.0} ms", duration.as_secs_f64() * 1000.0)
}

/// The cost, projected over every task when some did not finish; said to be
/// unknown (once, here) for a model without a price.
fn cost_said(totals: &Totals) -> String {
    let Some(cost) = totals.cost else {
        return "unknown: no price for this model (give --price-in and --price-out)".into();
    };
    let unfinished = totals.cancelled + totals.not_run;
    let finished = totals.tasks - unfinished;
    match projected(cost, finished as u64, totals.tasks as u64) {
        Some(all) if unfinished > 0 => {
            format!("${cost:.4} (all {} tasks: ~${all:.4})", totals.tasks)
        }
        _ => format!("${cost:.4}"),
    }
}

/// What `spent` on `finished` tasks comes to over `total`, at the same cost
/// a task; `None` before any finished.
pub fn projected(spent: f64, finished: u64, total: u64) -> Option<f64> {
    (finished > 0).then(|| spent / finished as f64 * total as f64)
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
    if totals.usage.cached_input_tokens > 0 {
        row("cached input tokens", totals.usage.cached_input_tokens.to_string());
    }
    row("cost", cost_said(totals));
    row("wall time", format!("{:.1} s", totals.wall.as_secs_f64()));
    row(
        "requests / tokens per min",
        format!("{} / {}", compact(totals.requests_per_minute), compact(totals.tokens_per_minute)),
    );
    if let Some(latency) = totals.latency {
        row("latency p50 / p99", format!("{} / {}", millis(latency.p50), millis(latency.p99)));
    }
    row(
        "calls / retries / 429s",
        format!("{} / {} / {}", totals.calls, totals.retries, totals.rate_limited),
    );
    row("hedges sent / won", format!("{} / {}", totals.hedges, totals.hedges_won));
    if totals.repairs > 0 {
        row("schema repairs", totals.repairs.to_string());
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A 429 pause shows on the live line while it lasts, with the hedges and 429s.
    #[test]
    fn the_line_says_a_pause_is_on() {
        let progress = Progress::new(Some(10), true, None);
        let events = progress.events();
        assert!(!progress.line().contains("paused"));
        let error = fanout::ProviderError::from_status(429, "slow down");
        events(&Event::Retrying {
            index: 0,
            id: "0".into(),
            attempt: 1,
            error: error.clone(),
            delay: Duration::from_secs(60),
        });
        events(&Event::Paused { duration: Duration::from_secs(60), error });
        events(&Event::Hedged { index: 1, id: "1".into(), attempt: 1 });
        let line = progress.line();
        assert!(line.contains("| paused 6") && line.contains("(429)"), "{line}");
        assert!(line.contains("429s 1 retries 1 hedges 1"), "{line}");
    }
}
