//! Opening a batch job: the input checked and fingerprinted, the job found (and
//! a changed one refused) or created, and which of its tasks are finished.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use fanout_store::{Finished, Job, Store};
use sha2::{Digest, Sha256};

use super::{RunOptions, Spec};
use crate::Refusal;
use crate::fingerprint;

/// A job ready to run.
pub struct OpenJob {
    pub job: Job,
    /// The store connection that writes the job's results.
    pub store: Store,
    /// Tasks already finished, which are restored rather than called.
    pub finished: Finished,
    /// The input's line count (a shard's part of it), when it is a file.
    pub lines: Option<u64>,
}

/// What opening found.
pub enum Opened {
    Ready(Box<OpenJob>),
    /// The input is empty: nothing to do.
    Empty,
}

/// The input's hash and its number of lines, in one streaming pass.
fn scan_input(path: &Path) -> Result<(String, u64)> {
    let mut file =
        File::open(path).with_context(|| format!("cannot open input {}", path.display()))?;
    let (mut hash, mut lines, mut buffer) = (Sha256::new(), 0u64, vec![0u8; 1 << 16]);
    let mut last = b'\n';
    loop {
        let read = file
            .read(&mut buffer)
            .with_context(|| format!("cannot read input {}", path.display()))?;
        if read == 0 {
            break;
        }
        hash.update(&buffer[..read]);
        lines += buffer[..read].iter().filter(|b| **b == b'\n').count() as u64;
        last = buffer[read - 1];
    }
    Ok((format!("{:x}", hash.finalize()), lines + u64::from(last != b'\n')))
}

/// Finds or creates the job; refuses (exit 2) a job whose input, template or
/// settings changed, naming what changed.
pub fn open(spec: &Spec, options: &RunOptions) -> Result<Opened> {
    let stdin = crate::input::is_stdin(&spec.input);
    let (input_hash, lines) = if stdin {
        ("stdin".to_string(), None)
    } else {
        let (hash, lines) = scan_input(&spec.input).map_err(Refusal)?;
        (hash, Some(spec.shard.map_or(lines, |shard| shard.rows_of(lines))))
    };
    if lines == Some(0) {
        return Ok(Opened::Empty);
    }
    let store = Store::open(&options.store)?;
    let settings = serde_json::to_value(spec).expect("the spec serializes");
    let job = match store.job(&options.job)? {
        Some(mut job) => {
            let (changed, upgrade) = fingerprint::job_changes(&job.fingerprint, spec, input_hash);
            if let Some(current) = upgrade {
                // Written by an older version: the same job, stored anew under this one.
                store.set_fingerprint(job.id, &current)?;
                job.fingerprint = current;
            }
            if !changed.is_empty() && !stdin {
                return Err(Refusal(anyhow::anyhow!(
                    "job `{}` was started with a different {}; run it with the same ones, or start a new job with another --job name",
                    job.name,
                    changed.join(", ")
                ))
                .into());
            }
            // The same job: the limits it runs under now (a raised budget,
            // another concurrency) are the ones the next resume starts from.
            if job.settings != settings {
                store.set_settings(job.id, &settings)?;
                job.settings = settings;
            }
            job
        }
        None => store.create_job(
            &options.job,
            &spec.input.display().to_string(),
            &fingerprint::job(spec, input_hash),
            &settings,
        )?,
    };
    let finished = store.finished(job.id, !options.retry_failed)?;
    Ok(Opened::Ready(Box::new(OpenJob { job, store, finished, lines })))
}
