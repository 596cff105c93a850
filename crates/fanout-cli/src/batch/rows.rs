//! Input rows become tasks: restored from the store, invalid (failed on their
//! own, naming the line and field), or a request to call.

use std::sync::Arc;

use anyhow::Result;
use fanout::{ErrorKind, Outcome, ProviderError, Task};
use fanout_store::{Finished, Store};

use super::Spec;
use super::keep::KeptFields;
use crate::input::{self, Content};
use crate::record::to_outcome;
use crate::template::Prompt;

/// The job's tasks, in input order, read lazily from the input file.
pub fn tasks(
    spec: &Spec,
    prompt: Option<Arc<Prompt>>,
    restore: Store,
    job: i64,
    finished: Finished,
    kept: KeptFields,
) -> Result<impl Iterator<Item = Task> + Send + 'static> {
    let rows = input::rows(&spec.input, spec.format, spec.id_field.clone())?;
    let keep = spec.keep.clone();
    let (temperature, max_tokens) = (spec.settings.temperature, spec.settings.max_tokens);
    let schema = spec.schema.clone();
    Ok(rows.map(move |row| {
        // Put aside before anything else, so restored and invalid rows keep theirs too.
        if let (Some(keep), Content::Fields(fields)) = (&keep, &row.content) {
            kept.put(row.index, keep.select(fields));
        }
        let invalid = |message: String| {
            let error = ProviderError::new(ErrorKind::BadRequest, message);
            Outcome::Failed { error, attempts: 0 }
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
                Some(Ok(request)) => request,
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
