//! Grades a dozen short essays in parallel and writes one JSON line per essay.
//!
//! Runs offline on the MockProvider, which plays a grader with realistic
//! latency and the occasional 429 and 500, so the executor's retries and the
//! shared rate-limit pause can be watched on stderr.
//!
//! ```text
//! cargo run -p fanout --example grade_essays -- [OUTPUT.jsonl]
//! ```

use std::io::Write;
use std::time::Duration;

use fanout::{Behavior, Event, Executor, MockProvider, Request, Task};

const RUBRIC: &str = "You grade short student essays from 1 to 10 for clarity, argument and \
                      evidence. Answer with the grade and one sentence of feedback.";

const ESSAYS: [(&str, &str); 12] = [
    ("amara", "Cities should plant more trees because shade lowers summer temperatures."),
    ("ben", "Homework is bad."),
    (
        "chloe",
        "Public libraries remain vital: they offer free internet, quiet study space and help.",
    ),
    ("dmitri", "Video games can teach problem solving, as puzzle games reward planning ahead."),
    ("elif", "School should start later since teenagers sleep later, according to studies."),
    ("femi", "Space exploration is expensive but it has given us satellites and weather data."),
    ("greta", "Bikes are good and cars are bad and that is why."),
    ("hiro", "Learning a second language improves memory and opens doors to other cultures."),
    ("ines", "Uniforms reduce bullying about clothes, though they limit self-expression."),
    ("jonas", "Robots will take jobs, but they will also create new ones in maintenance."),
    ("kemi", "Recycling matters because landfills are filling up and plastics last centuries."),
    ("liam", "Dogs are better than cats."),
];

/// A deterministic stand-in for a model's judgement: longer, more specific
/// essays score higher.
fn grade(request: &Request) -> String {
    let essay = request.prompt();
    let words = essay.split_whitespace().count();
    let evidence = ["because", "since", "according", "as", "though"]
        .iter()
        .filter(|w| essay.contains(*w))
        .count();
    let score = (2 + words / 3 + 2 * evidence).min(10);
    let feedback = if score >= 7 { "clear claim with support" } else { "needs evidence" };
    format!("{score}/10: {feedback}.")
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let output = std::env::args().nth(1).unwrap_or_else(|| "grades.jsonl".into());
    let grader = MockProvider::new()
        .with_latency(Duration::from_millis(300))
        .with_jitter(Duration::from_millis(200), 42)
        .with_reply(grade)
        .with_rule(|call| match call.number {
            5 => Some(Behavior::rate_limited(Some(Duration::from_secs(1)))),
            9 => Some(Behavior::server_error()),
            _ => None,
        });
    let executor = Executor::builder(grader)
        .concurrency(4)
        .rpm(600)
        .on_event(|event| match event {
            Event::Finished { id, status, latency, .. } => {
                eprintln!("  {id:<8} {status:?} in {:.0?}", latency.unwrap_or_default());
            }
            Event::Retrying { id, error, delay, .. } => {
                eprintln!("  {id:<8} {error}; retrying in {delay:.1?}");
            }
            Event::Paused { duration, .. } => eprintln!("  all tasks paused for {duration:.1?}"),
            _ => {}
        })
        .build();

    eprintln!("grading {} essays, 4 at a time", ESSAYS.len());
    let tasks = ESSAYS
        .map(|(student, essay)| Task::with_id(student, Request::user(essay).with_system(RUBRIC)));
    let report = executor.run(tasks).await;

    let mut file = std::io::BufWriter::new(std::fs::File::create(&output)?);
    for result in &report.results {
        serde_json::to_writer(&mut file, result)?;
        writeln!(file)?;
    }
    file.flush()?;
    let totals = &report.totals;
    eprintln!(
        "{} succeeded, {} failed in {:.1?} ({} calls, {} retries, {} rate limited); results in {output}",
        totals.succeeded,
        totals.failed,
        totals.wall,
        totals.calls,
        totals.retries,
        totals.rate_limited
    );
    for (student, grade) in report.texts() {
        println!("{student:<8} {grade}");
    }
    if totals.all_succeeded() { Ok(()) } else { std::process::exit(1) }
}
