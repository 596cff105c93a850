//! Writing results: JSONL (the default), CSV, or the OpenAI Batch output format.

use std::io::{self, Write};

use fanout::{Outcome, TaskResult};
use serde_json::{Map, Value, json};

/// Input fields kept beside a row's answer (`--keep`).
pub type Kept = Map<String, Value>;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormat {
    Jsonl,
    Csv,
    OpenaiBatch,
}

pub struct Output {
    format: OutputFormat,
    sink: Sink,
    columns: Columns,
}

/// What an output row carries besides the result's own fields.
#[derive(Clone, Debug, Default)]
pub struct Columns {
    /// Input fields kept beside the answer (`--keep`).
    pub kept: Vec<String>,
    /// With a schema: the answer parsed (`"output"` in JSONL), and in CSV a
    /// column for each of these top-level fields.
    pub answer: Option<Vec<String>>,
}

enum Sink {
    Lines(Box<dyn Write + Send>),
    /// Boxed: one output per run, and the writer carries its own buffer.
    Csv(Box<csv::Writer<Box<dyn Write + Send>>>),
}

const CSV_HEADER: [&str; 10] = [
    "id",
    "status",
    "answer",
    "error",
    "input_tokens",
    "output_tokens",
    "attempts",
    "latency_ms",
    "finish_reason",
    "model",
];

/// A CSV column for `field`, under `prefix` when `taken` already has the name.
fn column_name(field: &str, prefix: &str, taken: &[String]) -> String {
    if taken.iter().any(|t| t == field) { format!("{prefix}.{field}") } else { field.to_owned() }
}

/// A kept value as CSV text: strings as they are, anything else as JSON.
fn csv_text(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

fn status_name(outcome: &Outcome) -> String {
    serde_json::to_value(outcome.status())
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A result as one JSON object: the schema of `batch`'s JSONL output, and of
/// every other command's `--json` result.
pub fn result_line(result: &TaskResult) -> Value {
    let outcome = &result.outcome;
    let error = match outcome {
        Outcome::Failed { error, .. } => json!({
            "kind": error.kind(), "message": error.message(), "status": error.status(),
        }),
        other => other.describe().map_or(Value::Null, |message| json!({"message": message})),
    };
    json!({
        "id": result.id,
        "status": status_name(outcome),
        "answer": outcome.text(),
        "error": error,
        "model": outcome.success().and_then(|s| s.response.model.as_deref()),
        "finish_reason": outcome.success().and_then(|s| s.response.finish_reason.as_deref()),
        "usage": outcome.usage(),
        "attempts": outcome.attempts(),
        "latency_ms": latency_ms(outcome),
    })
}

/// A success's latency in milliseconds, to a tenth.
fn latency_ms(outcome: &Outcome) -> Option<f64> {
    outcome.success().map(|s| (s.latency.as_secs_f64() * 1e4).round() / 10.0)
}

impl Output {
    /// `columns`: what rows carry besides the result (and, in CSV, the header's).
    pub fn new(
        format: OutputFormat,
        sink: Box<dyn Write + Send>,
        columns: Columns,
    ) -> io::Result<Self> {
        let sink = match format {
            OutputFormat::Csv => {
                let mut header: Vec<String> = CSV_HEADER.map(str::to_owned).to_vec();
                for field in columns.answer.iter().flatten() {
                    header.push(column_name(field, "output", &header));
                }
                for field in &columns.kept {
                    header.push(column_name(field, "input", &header));
                }
                let mut writer = csv::Writer::from_writer(sink);
                writer.write_record(&header)?;
                Sink::Csv(Box::new(writer))
            }
            OutputFormat::Jsonl | OutputFormat::OpenaiBatch => Sink::Lines(sink),
        };
        Ok(Self { format, sink, columns })
    }

    fn line(&mut self, value: &Value) -> io::Result<()> {
        let Sink::Lines(sink) = &mut self.sink else { unreachable!("line formats write lines") };
        serde_json::to_writer(&mut *sink, value)?;
        sink.write_all(b"\n")
    }

    /// Writes one result, with the input fields kept beside it (as `input`,
    /// or CSV columns).
    pub fn write(&mut self, result: &TaskResult, kept: Option<&Kept>) -> io::Result<()> {
        let outcome = &result.outcome;
        // With a schema, a success's answer is JSON that passed it.
        let parsed = self
            .columns
            .answer
            .as_ref()
            .and(outcome.text())
            .and_then(|text| fanout::answer_json(text).ok());
        let with_kept = |mut line: Value| {
            if let Some(parsed) = &parsed {
                line["output"] = parsed.clone();
            }
            if let Some(kept) = kept {
                line["input"] = Value::Object(kept.clone());
            }
            line
        };
        match self.format {
            OutputFormat::Jsonl => self.line(&with_kept(result_line(result))),
            OutputFormat::Csv => {
                let Sink::Csv(writer) = &mut self.sink else {
                    unreachable!("made with the CSV format")
                };
                let usage = outcome.usage();
                let response = outcome.success().map(|s| &s.response);
                let own = [
                    result.id.to_string(),
                    status_name(outcome),
                    outcome.text().unwrap_or_default().to_owned(),
                    outcome.describe().unwrap_or_default(),
                    usage.input_tokens.to_string(),
                    usage.output_tokens.to_string(),
                    outcome.attempts().to_string(),
                    latency_ms(outcome).map(|l| l.to_string()).unwrap_or_default(),
                    response.and_then(|r| r.finish_reason.clone()).unwrap_or_default(),
                    response.and_then(|r| r.model.clone()).unwrap_or_default(),
                ];
                let answer = self
                    .columns
                    .answer
                    .iter()
                    .flatten()
                    .map(|field| csv_text(parsed.as_ref().and_then(|p| p.get(field))));
                let kept = self.columns.kept.iter().map(|c| csv_text(kept.and_then(|k| k.get(c))));
                writer.write_record(own.into_iter().chain(answer).chain(kept))?;
                Ok(())
            }
            OutputFormat::OpenaiBatch => self.line(&with_kept(openai_batch_line(result))),
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            Sink::Lines(sink) => sink.flush(),
            Sink::Csv(writer) => writer.flush(),
        }
    }
}

/// A line of the OpenAI Batch output format.
fn openai_batch_line(result: &TaskResult) -> Value {
    let id = format!("batch_req_{}", result.index);
    match &result.outcome {
        Outcome::Succeeded(success) => {
            let response = &success.response;
            let usage = response.usage;
            json!({
                "id": id,
                "custom_id": result.id,
                "response": {
                    "status_code": 200,
                    "request_id": response.request_id,
                    "body": {
                        "object": "chat.completion",
                        "model": response.model,
                        "choices": [{
                            "index": 0,
                            "message": {"role": "assistant", "content": response.text},
                            "finish_reason": response.finish_reason,
                        }],
                        "usage": {
                            "prompt_tokens": usage.input_tokens,
                            "completion_tokens": usage.output_tokens,
                            "total_tokens": usage.total(),
                        },
                    },
                },
                "error": null,
            })
        }
        Outcome::Failed { error, .. } if error.status().is_some() => json!({
            "id": id,
            "custom_id": result.id,
            "response": {
                "status_code": error.status(),
                "request_id": error.request_id(),
                "body": {"error": {"message": error.message(), "type": error.kind(), "code": null}},
            },
            "error": null,
        }),
        other => {
            let code = match other {
                Outcome::Failed { error, .. } => {
                    serde_json::to_value(error.kind()).unwrap_or(Value::Null)
                }
                _ => Value::String(status_name(other)),
            };
            json!({
                "id": id,
                "custom_id": result.id,
                "response": null,
                "error": {"code": code, "message": other.describe()},
            })
        }
    }
}
