//! Live lines on stderr while a pattern command runs: one per step, section
//! or persona (`run`, `sections`, `perspectives`) saying whether it is
//! running, retrying and why, hedged, paused by a 429, or done and how long
//! it took; votes and map-reduce, with many like calls, get the batch's one
//! line of counts instead. Hidden when stderr is not a terminal, or with
//! --quiet; what a line says is kept apart from drawing it, for the tests.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fanout::{Event, Status, TaskResult};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::progress::Progress;

/// How a step stands.
#[derive(Clone, Debug, PartialEq)]
enum State {
    Running { attempt: u32 },
    Retrying { after: String, delay: Duration },
    Done { status: Status, latency: Option<Duration> },
}

#[derive(Debug)]
struct Step {
    state: State,
    hedged: bool,
    calls: u32,
    bar: ProgressBar,
}

/// The live display of a pattern command.
#[derive(Clone)]
pub enum Live {
    /// A line per step.
    Steps(Arc<StepLines>),
    /// One line of counts for many like calls.
    Counts(Progress),
}

impl Live {
    /// The display `command` gets: a line per step for the commands made of
    /// named steps, the batch's line of counts for the others.
    pub fn for_command(command: &str, quiet: bool, price: Option<fanout::Price>) -> Self {
        match command {
            "run" | "sections" | "perspectives" => Self::Steps(Arc::new(StepLines::new(quiet))),
            _ => Self::Counts(Progress::new(None, quiet, price)),
        }
    }

    pub fn observe(&self, event: &Event) {
        match self {
            Self::Steps(lines) => lines.observe(event),
            Self::Counts(progress) => progress.observe(event),
        }
    }

    pub fn finished(&self, result: &TaskResult) {
        match self {
            Self::Steps(lines) => lines.finished(result),
            Self::Counts(progress) => progress.record(result),
        }
    }

    /// Ends the display: step lines stay as they ended, a count line goes.
    pub fn finish(&self) {
        match self {
            Self::Steps(lines) => lines.finish(),
            Self::Counts(progress) => progress.finish(),
        }
    }
}

/// A line per step, in the order the steps first started.
pub struct StepLines {
    multi: Option<MultiProgress>,
    steps: Mutex<HashMap<String, Step>>,
    /// When the latest 429 pause of every call ends.
    paused_until: Mutex<Option<Instant>>,
}

impl StepLines {
    fn new(quiet: bool) -> Self {
        let shown = !quiet && std::io::stderr().is_terminal();
        let multi =
            shown.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(5)));
        Self { multi, steps: Mutex::default(), paused_until: Mutex::default() }
    }

    fn bar(&self, name: &str) -> ProgressBar {
        let Some(multi) = &self.multi else { return ProgressBar::hidden() };
        let bar = multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix:.bold} {msg} {elapsed}")
                .expect("valid"),
        );
        bar.set_prefix(name.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }

    fn observe(&self, event: &Event) {
        let (id, state) = match event {
            Event::Started { id, attempt, .. } => (id, State::Running { attempt: *attempt }),
            Event::Retrying { id, error, delay, .. } => {
                (id, State::Retrying { after: error.kind().as_str().to_owned(), delay: *delay })
            }
            Event::Hedged { id, .. } => {
                let mut steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(step) = steps.get_mut(id.as_str()) {
                    step.hedged = true;
                    self.draw(step);
                }
                return;
            }
            Event::Finished { id, status, latency, .. } => {
                (id, State::Done { status: *status, latency: *latency })
            }
            Event::Paused { duration, .. } => {
                let until = Instant::now() + *duration;
                let mut paused = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
                *paused = Some(paused.map_or(until, |p| p.max(until)));
                drop(paused);
                let mut steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
                for step in steps.values_mut() {
                    self.draw(step);
                }
                return;
            }
            _ => return,
        };
        let mut steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        let step = steps.entry(id.as_str().to_owned()).or_insert_with(|| Step {
            state: state.clone(),
            hedged: false,
            calls: 0,
            bar: self.bar(id.as_str()),
        });
        step.calls += u32::from(matches!(state, State::Running { .. }));
        step.state = state;
        self.draw(step);
    }

    /// A result ends its step's line: an agent's calls send no `Finished`
    /// event, but each of its results comes here.
    fn finished(&self, result: &TaskResult) {
        let latency = result.outcome.success().map(|success| success.latency);
        let state = State::Done { status: result.outcome.status(), latency };
        let mut steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(step) = steps.get_mut(result.id.as_str()) {
            step.state = state;
            self.draw(step);
        }
    }

    fn paused_for(&self) -> Option<Duration> {
        let paused = *self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        paused.and_then(|until| until.checked_duration_since(Instant::now()))
    }

    fn draw(&self, step: &Step) {
        if step.bar.is_hidden() {
            return;
        }
        let text = describe(step, self.paused_for());
        if let State::Done { .. } = step.state {
            step.bar
                .set_style(ProgressStyle::with_template("{prefix:.bold} {msg}").expect("valid"));
        }
        step.bar.set_message(text);
    }

    fn finish(&self) {
        let steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        for step in steps.values() {
            step.bar.finish();
        }
    }

    /// What each step's line says now, by step.
    #[cfg(test)]
    fn said(&self) -> Vec<(String, String)> {
        let steps = self.steps.lock().unwrap();
        let mut said: Vec<_> = steps
            .iter()
            .map(|(id, step)| (id.clone(), describe(step, self.paused_for())))
            .collect();
        said.sort();
        said
    }
}

/// A step's line after its name.
fn describe(step: &Step, paused: Option<Duration>) -> String {
    let mut line = match &step.state {
        State::Running { attempt: 1 } => "running".to_owned(),
        State::Running { attempt } => format!("running, attempt {attempt}"),
        State::Retrying { after, delay } => {
            format!("retrying in {:.1} s after {after}", delay.as_secs_f64())
        }
        State::Done { status: Status::Succeeded, latency } => match latency {
            Some(latency) => format!("✓ done in {:.1} s", latency.as_secs_f64()),
            None => "✓ done".to_owned(),
        },
        State::Done { status, .. } => format!("✗ {}", status_name(*status)),
    };
    if step.calls > 1 {
        line.push_str(&format!(" ({} calls)", step.calls));
    }
    if step.hedged {
        line.push_str(", hedged");
    }
    if let (Some(paused), State::Running { .. } | State::Retrying { .. }) = (paused, &step.state) {
        line.push_str(&format!(" | paused {:.1} s (429)", paused.as_secs_f64()));
    }
    line
}

fn status_name(status: Status) -> &'static str {
    match status {
        Status::Succeeded => "succeeded",
        Status::Failed => "failed",
        Status::TimedOut => "timed out",
        Status::Cancelled => "cancelled",
        Status::NotRun => "not run",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fanout::{ProviderError, TaskId, Usage};

    fn said(lines: &StepLines) -> Vec<(String, String)> {
        lines.said()
    }

    fn line(id: &str, text: &str) -> (String, String) {
        (id.to_owned(), text.to_owned())
    }

    #[test]
    fn each_step_says_how_it_stands() {
        let lines = StepLines::new(true);
        let id = |s: &str| TaskId::from(s);
        lines.observe(&Event::Started { index: 0, id: id("outline"), attempt: 1 });
        lines.observe(&Event::Started { index: 1, id: id("facts"), attempt: 1 });
        assert_eq!(said(&lines), [line("facts", "running"), line("outline", "running")]);
        let error = ProviderError::from_status(500, "boom");
        let delay = Duration::from_millis(1500);
        lines.observe(&Event::Retrying { index: 1, id: id("facts"), attempt: 1, error, delay });
        lines.observe(&Event::Hedged { index: 0, id: id("outline"), attempt: 1 });
        assert_eq!(
            said(&lines),
            [
                line("facts", "retrying in 1.5 s after server error"),
                line("outline", "running, hedged")
            ]
        );
        lines.observe(&Event::Started { index: 1, id: id("facts"), attempt: 2 });
        let done = |index, name: &str, status, latency| Event::Finished {
            index,
            id: id(name),
            status,
            attempts: 1,
            usage: Usage::default(),
            latency,
        };
        lines.observe(&done(0, "outline", Status::Succeeded, Some(Duration::from_millis(2300))));
        lines.observe(&done(1, "facts", Status::Failed, None));
        assert_eq!(
            said(&lines),
            [line("facts", "✗ failed (2 calls)"), line("outline", "✓ done in 2.3 s, hedged")]
        );
    }

    #[test]
    fn a_pause_shows_on_the_steps_still_waiting() {
        let lines = StepLines::new(true);
        lines.observe(&Event::Started { index: 0, id: TaskId::from("a"), attempt: 1 });
        let error = ProviderError::from_status(429, "slow down");
        lines.observe(&Event::Paused { duration: Duration::from_secs(30), error });
        let [(_, text)] = &said(&lines)[..] else { panic!() };
        assert!(
            text.starts_with("running | paused 29.") || text.starts_with("running | paused 30.0"),
            "{text}"
        );
    }
}
