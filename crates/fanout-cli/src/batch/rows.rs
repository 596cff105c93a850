//! Input rows become tasks: restored from the store, invalid (failed on their
//! own, naming the line and field), or a request to call.

use std::sync::Arc;

use anyhow::Result;
use std::path::PathBuf;

use fanout::{ErrorKind, Image, Outcome, ProviderError, Request, Task};
use fanout_store::{Finished, Store};
use serde_json::{Map, Value};

use super::Spec;
use super::keep::KeptFields;
use crate::input::{self, Content};
use crate::record::to_outcome;
use crate::template::Prompt;

/// `--image FIELD`: fields whose values (a path, URL or data URI, or a list
/// of them) become images of the row's user message. Files are only named
/// here, and read when the call is sent.
struct ImageFields {
    fields: Vec<String>,
    /// Relative paths are the input file's neighbours.
    base: PathBuf,
}

impl ImageFields {
    fn new(spec: &Spec) -> Self {
        let base = spec.input.parent().filter(|_| !input::is_stdin(&spec.input));
        Self { fields: spec.images.clone(), base: base.map(PathBuf::from).unwrap_or_default() }
    }

    fn attach(
        &self,
        row: &Map<String, Value>,
        line: u64,
        request: &mut Request,
    ) -> Result<(), String> {
        for field in &self.fields {
            let named = |why: &str| format!("line {line}, field `{field}`: {why}");
            let references: Vec<&str> = match row.get(field) {
                None | Some(Value::Null) => return Err(named("no image (the field is missing)")),
                Some(Value::String(one)) => vec![one],
                Some(Value::Array(many)) => many
                    .iter()
                    .map(|v| v.as_str().ok_or_else(|| named("a list of images holds a non-string")))
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(named("an image is a path, a URL or a data URI")),
            };
            for reference in references {
                let image = match Image::from_reference(reference).map_err(|e| named(&e))? {
                    Image::File(path) if path.is_relative() => Image::File(self.base.join(path)),
                    image => image,
                };
                // A file that is not there fails its row now, before any
                // call (and a dry run counts it); its bytes are read at send.
                if let Image::File(path) = &image {
                    match std::fs::metadata(path) {
                        Ok(meta) if meta.is_file() => {}
                        Ok(_) => {
                            return Err(named(&format!("image {}: not a file", path.display())));
                        }
                        Err(e) => return Err(named(&format!("image {}: {e}", path.display()))),
                    }
                }
                let message = request.messages.last_mut().expect("a rendered prompt is a message");
                message.images.push(image);
            }
        }
        Ok(())
    }
}

/// The job's tasks (a shard's: its rows), in input order, read lazily from
/// the input file.
pub fn tasks(
    spec: &Spec,
    prompt: Option<Arc<Prompt>>,
    restore: Store,
    job: i64,
    finished: Finished,
    kept: KeptFields,
) -> Result<impl Iterator<Item = Task> + Send + 'static> {
    let rows = crate::shard::rows(
        spec.shard,
        input::rows(&spec.input, spec.format, spec.id_field.clone())?,
    );
    let keep = spec.keep.clone();
    let (temperature, max_tokens) = (spec.settings.temperature, spec.settings.max_tokens);
    let schema = spec.schema.clone();
    let images = ImageFields::new(spec);
    Ok(rows.map(move |row| {
        // Put aside before anything else, so restored and invalid rows keep theirs too.
        if let (Some(keep), Content::Fields(fields)) = (&keep, &row.content) {
            kept.put(row.index, keep.select(fields));
        }
        let invalid = |message: String| {
            let error = ProviderError::new(ErrorKind::BadRequest, message);
            Outcome::failed(error, 0)
        };
        if finished.contains(row.index) {
            let outcome = match restore.record_at(job, row.index) {
                Ok(Some(record)) => to_outcome(record),
                Ok(None) => invalid(format!("line {}: the stored result disappeared", row.line)),
                Err(e) => invalid(format!("line {}: {e}", row.line)),
            };
            return Task::settled(row.id, outcome);
        }
        let request = match row.content {
            Content::Invalid(message) => return Task::settled(row.id, invalid(message)),
            Content::Request(request) => *request,
            Content::Fields(fields) => match prompt.as_ref().map(|p| p.render(&fields, row.line)) {
                Some(Ok(mut request)) => {
                    if let Err(message) = images.attach(&fields, row.line, &mut request) {
                        return Task::settled(row.id, invalid(message));
                    }
                    request
                }
                Some(Err(message)) => return Task::settled(row.id, invalid(message)),
                None => {
                    return Task::settled(
                        row.id,
                        invalid(format!("line {}: no prompt template", row.line)),
                    );
                }
            },
        };
        let mut request = request;
        request.temperature = temperature.or(request.temperature);
        request.max_tokens = max_tokens.or(request.max_tokens);
        if schema.is_some() {
            request.response_format.clone_from(&schema);
        }
        Task::with_id(row.id, request)
    }))
}
