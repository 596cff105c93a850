//! Reading batch input one row at a time: JSONL (an object a line), CSV (with a
//! header row), or the OpenAI Batch input format (`custom_id`, `method`, `url`,
//! `body`). Rows are streamed, never all held. A row that cannot be read —
//! malformed JSON, invalid UTF-8, the wrong number of CSV fields, a line over
//! [`MAX_ROW_BYTES`] — becomes a row whose content is the error, naming its line
//! (and field), so the rest of the input goes on.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{Context, Result};
use fanout::{Message, Request, Role};
use serde_json::{Map, Value};

/// The longest row accepted; longer lines fail on their own, unread past this.
pub const MAX_ROW_BYTES: usize = 8 << 20;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Jsonl,
    Csv,
    OpenaiBatch,
}

/// One input row.
#[derive(Debug)]
pub struct Row {
    /// Position among the rows, from 0.
    pub index: u64,
    /// Line in the file, from 1 (for CSV, where the record starts).
    pub line: u64,
    pub id: String,
    pub content: Content,
}

#[derive(Debug)]
pub enum Content {
    /// A row's fields, for the prompt template.
    Fields(Map<String, Value>),
    /// A ready request (OpenAI Batch input).
    Request(Box<Request>),
    /// Why the row could not be read.
    Invalid(String),
}

/// Whether `path` names standard input (`-`).
pub fn is_stdin(path: &Path) -> bool {
    path.as_os_str() == "-"
}

fn open(path: &Path) -> Result<Box<dyn Read + Send>> {
    if is_stdin(path) {
        return Ok(Box::new(io::stdin()));
    }
    Ok(Box::new(File::open(path).with_context(|| format!("cannot open input {}", path.display()))?))
}

/// The format named, or guessed from the extension and then the first line.
pub fn detect(path: &Path, named: Option<Format>) -> Result<Format> {
    if let Some(format) = named {
        return Ok(format);
    }
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if extension == "csv" {
        return Ok(Format::Csv);
    }
    if is_stdin(path) {
        return Ok(Format::Jsonl);
    }
    let mut first = Vec::new();
    let mut reader = BufReader::new(open(path)?);
    while first.iter().all(u8::is_ascii_whitespace) {
        first.clear();
        if read_limited(&mut reader, &mut first, 1 << 20)?.is_none() {
            break;
        }
    }
    let text = String::from_utf8_lossy(&first);
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{')
        && !trimmed.is_empty()
        && extension != "jsonl"
        && extension != "json"
    {
        return Ok(Format::Csv);
    }
    let batch = serde_json::from_str::<Value>(trimmed).ok().is_some_and(|v| {
        v.get("custom_id").is_some() && v.get("body").is_some_and(Value::is_object)
    });
    Ok(if batch { Format::OpenaiBatch } else { Format::Jsonl })
}

/// Reads one line into `line` (without its newline), keeping at most `limit`
/// bytes. Returns the line's full length, or `None` at the end of input.
fn read_limited(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    limit: usize,
) -> io::Result<Option<usize>> {
    line.clear();
    let mut length = 0;
    let mut any = false;
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(any.then_some(length));
        }
        any = true;
        let (chunk, done) = match available.iter().position(|b| *b == b'\n') {
            Some(end) => (&available[..end], Some(end + 1)),
            None => (available, None),
        };
        let room = limit.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        length += chunk.len();
        let used = done.unwrap_or(available.len());
        reader.consume(used);
        if done.is_some() {
            if line.last() == Some(&b'\r') {
                line.pop();
                length -= 1;
            }
            return Ok(Some(length));
        }
    }
}

fn megabytes(bytes: usize) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// The id a row is known by: `--id FIELD`, else `custom_id`, else its line.
fn row_id(
    fields: &Map<String, Value>,
    id_field: Option<&str>,
    line: u64,
) -> Result<String, String> {
    let Some(field) = id_field else {
        return Ok(match fields.get("custom_id") {
            Some(Value::String(id)) => id.clone(),
            _ => line.to_string(),
        });
    };
    match fields.get(field) {
        Some(Value::String(id)) => Ok(id.clone()),
        Some(Value::Number(id)) => Ok(id.to_string()),
        Some(other) => Err(format!(
            "line {line}: field `{field}` (the row id) is {other}, not a string or number"
        )),
        None => Err(format!("line {line}: no field `{field}` for the row id")),
    }
}

/// Every row of the input, lazily.
pub fn rows(
    path: &Path,
    format: Format,
    id_field: Option<String>,
) -> Result<Box<dyn Iterator<Item = Row> + Send>> {
    let reader = open(path)?;
    Ok(match format {
        Format::Jsonl | Format::OpenaiBatch => Box::new(JsonlRows {
            reader: BufReader::with_capacity(1 << 16, reader),
            batch: format == Format::OpenaiBatch,
            id_field,
            line: 0,
            index: 0,
            buffer: Vec::new(),
        }),
        Format::Csv => Box::new(CsvRows::new(reader, id_field, path)?),
    })
}

struct JsonlRows {
    reader: BufReader<Box<dyn Read + Send>>,
    batch: bool,
    id_field: Option<String>,
    line: u64,
    index: u64,
    buffer: Vec<u8>,
}

impl JsonlRows {
    fn content(&self, line: u64, length: usize) -> (Option<String>, Content) {
        if length > MAX_ROW_BYTES {
            let message = format!(
                "line {line} is {}, longer than the {} a row may have",
                megabytes(length),
                megabytes(MAX_ROW_BYTES)
            );
            return (None, Content::Invalid(message));
        }
        let text = match std::str::from_utf8(&self.buffer) {
            Ok(text) => text,
            Err(e) => {
                return (
                    None,
                    Content::Invalid(format!(
                        "line {line}: not valid UTF-8 (at byte {})",
                        e.valid_up_to()
                    )),
                );
            }
        };
        let fields = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(fields)) => fields,
            Ok(other) => {
                let kind = match other {
                    Value::Array(_) => "an array",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    _ => "not an object",
                };
                return (
                    None,
                    Content::Invalid(format!("line {line}: expected a JSON object, found {kind}")),
                );
            }
            Err(e) => return (None, Content::Invalid(format!("line {line}: invalid JSON: {e}"))),
        };
        let id = match row_id(&fields, self.id_field.as_deref(), line) {
            Ok(id) => id,
            Err(message) => return (None, Content::Invalid(message)),
        };
        if !self.batch {
            return (Some(id), Content::Fields(fields));
        }
        match batch_request(fields, line) {
            Ok(request) => (Some(id), Content::Request(Box::new(request))),
            Err(message) => (Some(id), Content::Invalid(message)),
        }
    }
}

impl Iterator for JsonlRows {
    type Item = Row;

    fn next(&mut self) -> Option<Row> {
        loop {
            let length = match read_limited(&mut self.reader, &mut self.buffer, MAX_ROW_BYTES + 1) {
                Ok(Some(length)) => length,
                Ok(None) => return None,
                Err(e) => {
                    self.line += 1;
                    let row = Row {
                        index: self.index,
                        line: self.line,
                        id: self.line.to_string(),
                        content: Content::Invalid(format!(
                            "line {}: cannot read the input: {e}",
                            self.line
                        )),
                    };
                    self.index += 1;
                    // A read error ends the input: what follows cannot be trusted.
                    self.buffer.clear();
                    self.reader = BufReader::new(Box::new(io::empty()));
                    return Some(row);
                }
            };
            self.line += 1;
            if self.buffer.iter().all(u8::is_ascii_whitespace) && length <= MAX_ROW_BYTES {
                continue;
            }
            let line = self.line;
            let (id, content) = self.content(line, length);
            let row = Row {
                index: self.index,
                line,
                id: id.unwrap_or_else(|| line.to_string()),
                content,
            };
            self.index += 1;
            return Some(row);
        }
    }
}

fn string_list(value: &Value) -> Option<Vec<String>> {
    match value {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(items) => items.iter().map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => None,
    }
}

/// A request from an OpenAI Batch line's `body`; fields fanout does not model
/// are passed through.
fn batch_request(mut fields: Map<String, Value>, line: u64) -> Result<Request, String> {
    let Some(Value::Object(mut body)) = fields.remove("body") else {
        return Err(format!("line {line}: an OpenAI Batch line needs a `body` object"));
    };
    let messages = match body.shift_remove("messages") {
        Some(Value::Array(messages)) => messages,
        _ => return Err(format!("line {line}: field `body.messages` is missing or not an array")),
    };
    let mut request = Request::default();
    for (i, message) in messages.iter().enumerate() {
        let role = match message.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            other => {
                return Err(format!("line {line}: field `body.messages[{i}].role` is {other:?}"));
            }
        };
        let content = match message.get("content") {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Array(parts)) => {
                parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect()
            }
            _ => return Err(format!("line {line}: field `body.messages[{i}].content` is missing")),
        };
        request.messages.push(Message::new(role, content));
    }
    let number = |v: Option<Value>| v.and_then(|v| v.as_f64());
    request.model = body.shift_remove("model").and_then(|v| v.as_str().map(str::to_owned));
    request.temperature = number(body.shift_remove("temperature")).map(|t| t as f32);
    request.top_p = number(body.shift_remove("top_p")).map(|t| t as f32);
    request.max_tokens = number(
        body.shift_remove("max_tokens").or_else(|| body.shift_remove("max_completion_tokens")),
    )
    .map(|t| t as u32);
    request.seed = body.shift_remove("seed").and_then(|v| v.as_u64());
    request.n = body.shift_remove("n").and_then(|v| v.as_u64()).map(|n| n as u32);
    if let Some(stop) = body.shift_remove("stop") {
        request.stop = string_list(&stop)
            .ok_or(format!("line {line}: field `body.stop` is not a string or list of strings"))?;
    }
    request.extra = body;
    Ok(request)
}

struct CsvRows {
    reader: csv::Reader<Box<dyn Read + Send>>,
    headers: Vec<String>,
    id_field: Option<String>,
    index: u64,
    record: csv::ByteRecord,
}

impl CsvRows {
    fn new(reader: Box<dyn Read + Send>, id_field: Option<String>, path: &Path) -> Result<Self> {
        let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(reader);
        let headers = reader
            .headers()
            .with_context(|| format!("cannot read the header row of {}", path.display()))?
            .iter()
            .map(str::to_owned)
            .collect();
        Ok(Self { reader, headers, id_field, index: 0, record: csv::ByteRecord::new() })
    }

    fn content(&self, line: u64) -> (Option<String>, Content) {
        let bytes = self.record.as_slice().len();
        if bytes > MAX_ROW_BYTES {
            let message = format!(
                "line {line} is {}, longer than the {} a row may have",
                megabytes(bytes),
                megabytes(MAX_ROW_BYTES)
            );
            return (None, Content::Invalid(message));
        }
        if self.record.len() != self.headers.len() {
            let message = format!(
                "line {line}: {} fields, but the header has {}",
                self.record.len(),
                self.headers.len()
            );
            return (None, Content::Invalid(message));
        }
        let mut fields = Map::new();
        for (name, value) in self.headers.iter().zip(self.record.iter()) {
            match std::str::from_utf8(value) {
                Ok(text) => fields.insert(name.clone(), Value::String(text.to_owned())),
                Err(_) => {
                    return (
                        None,
                        Content::Invalid(format!("line {line}, field `{name}`: not valid UTF-8")),
                    );
                }
            };
        }
        match row_id(&fields, self.id_field.as_deref(), line) {
            Ok(id) => (Some(id), Content::Fields(fields)),
            Err(message) => (None, Content::Invalid(message)),
        }
    }
}

impl Iterator for CsvRows {
    type Item = Row;

    fn next(&mut self) -> Option<Row> {
        let outcome = self.reader.read_byte_record(&mut self.record);
        let line = self.record.position().map_or(self.index + 2, |p| p.line());
        let (id, content) = match outcome {
            Ok(false) => return None,
            Ok(true) => self.content(line),
            Err(e) => {
                let line = e.position().map_or(line, |p| p.line());
                (None, Content::Invalid(format!("line {line}: {e}")))
            }
        };
        let row =
            Row { index: self.index, line, id: id.unwrap_or_else(|| line.to_string()), content };
        self.index += 1;
        Some(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limited_lines_keep_the_length_but_not_the_bytes() {
        let mut reader = BufReader::with_capacity(4, &b"short\r\nmuch too long line\nlast"[..]);
        let mut line = Vec::new();
        assert_eq!(read_limited(&mut reader, &mut line, 8).unwrap(), Some(5));
        assert_eq!(line, b"short");
        assert_eq!(read_limited(&mut reader, &mut line, 8).unwrap(), Some(18));
        assert_eq!(line, b"much too");
        assert_eq!(read_limited(&mut reader, &mut line, 8).unwrap(), Some(4));
        assert_eq!(read_limited(&mut reader, &mut line, 8).unwrap(), None);
    }

    /// Fields of an OpenAI Batch body that fanout does not model pass through
    /// in the order the line wrote them, whatever fanout took out before them.
    #[test]
    fn unmodelled_body_fields_pass_through_in_their_order() {
        let line = r#"{"custom_id":"a","body":{"zeta":1,"model":"m","messages":[{"role":"user",
            "content":"hi"}],"temperature":0.5,"logprobs":true,"alpha":{"b":1,"a":2},"max_tokens":9}}"#;
        let request = batch_request(serde_json::from_str(line).unwrap(), 1).unwrap();
        assert_eq!((request.model.as_deref(), request.max_tokens), (Some("m"), Some(9)));
        let extra: Vec<&str> = request.extra.keys().map(String::as_str).collect();
        assert_eq!(extra, ["zeta", "logprobs", "alpha"]);
        assert_eq!(serde_json::to_string(&request.extra["alpha"]).unwrap(), r#"{"b":1,"a":2}"#);
    }
}
