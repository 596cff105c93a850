//! Every proxied call is a record in the store before its client gets the
//! answer, so a proxy restart loses no finished call.
//!
//! One thread owns the store and commits in groups: a handler sends its
//! record and waits; the thread takes every record waiting, writes them in
//! one transaction and answers them all. Under load a commit serves many
//! calls, so the wait stays about one commit long.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc as channel;

use anyhow::{Context, Result};
use fanout_store::{Fingerprint, Record, Store};
use tokio::sync::oneshot;

/// What a proxy job names as its input: its calls come from clients, not a file.
const PROXY_INPUT: &str = "(proxy)";

/// A record for `job` (none: only whether the job can take records), and
/// who waits for it to be written.
struct Pending {
    job: String,
    record: Option<Record>,
    written: oneshot::Sender<Result<(), WriteError>>,
}

/// Why a record was not written.
#[derive(Clone, Debug)]
pub enum WriteError {
    /// The job is not the proxy's (a batch job of that name).
    NotTheProxys(String),
    /// The store failed (or the writer stopped).
    Store(String),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotTheProxys(why) | Self::Store(why) => f.write_str(why),
        }
    }
}

/// The sending side of the record writer.
pub struct Records {
    sender: channel::Sender<Pending>,
    /// Jobs known to take the proxy's records, so that checking a job
    /// before its call costs no trip to the writer.
    accepting: Mutex<HashSet<String>>,
}

impl Records {
    /// Starts the writer on the store at `path`; `settings` are stored with
    /// each job it makes (never secrets).
    pub fn start(path: &Path, settings: serde_json::Value) -> Result<Self> {
        let store = Store::open(path)?;
        let (sender, receiver) = channel::channel::<Pending>();
        std::thread::Builder::new()
            .name("fanout-proxy-records".into())
            .spawn(move || write_all(store, receiver, &settings))
            .context("cannot start the record writer")?;
        Ok(Self { sender, accepting: Mutex::default() })
    }

    /// Whether `job` can take the proxy's records (a batch job of that name
    /// cannot), made if it is new: asked before a call, so that none is paid
    /// for that cannot be recorded.
    pub async fn check(&self, job: &str) -> Result<(), WriteError> {
        if self.accepting.lock().expect("never poisoned").contains(job) {
            return Ok(());
        }
        self.send(job, None).await?;
        self.accepting.lock().expect("never poisoned").insert(job.to_owned());
        Ok(())
    }

    /// Writes `record` (its index is given here: after the job's last) and
    /// returns once it is committed.
    pub async fn write(&self, job: &str, record: Record) -> Result<(), WriteError> {
        self.send(job, Some(record)).await
    }

    async fn send(&self, job: &str, record: Option<Record>) -> Result<(), WriteError> {
        let stopped = || WriteError::Store("the record writer stopped".into());
        let (written, done) = oneshot::channel();
        let pending = Pending { job: job.to_owned(), record, written };
        self.sender.send(pending).map_err(|_| stopped())?;
        done.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// The proxy's jobs' ids, by name.
type Jobs = HashMap<String, i64>;

fn write_all(mut store: Store, receiver: channel::Receiver<Pending>, settings: &serde_json::Value) {
    let mut jobs = Jobs::new();
    while let Ok(first) = receiver.recv() {
        let mut batch = vec![first];
        batch.extend(receiver.try_iter());
        let mut by_job: HashMap<String, Vec<Pending>> = HashMap::new();
        for pending in batch {
            by_job.entry(pending.job.clone()).or_default().push(pending);
        }
        for (name, pendings) in by_job {
            let result = job_of(&store, &mut jobs, &name, settings).and_then(|id| {
                let records: Vec<Record> =
                    pendings.iter().filter_map(|pending| pending.record.clone()).collect();
                if records.is_empty() {
                    return Ok(());
                }
                // Indexed after the job's last record as the store has it, so
                // that another proxy writing the same job takes none of them.
                store.append(id, &records).map(drop).map_err(|e| WriteError::Store(e.to_string()))
            });
            for pending in pendings {
                let _ = pending.written.send(result.clone());
            }
        }
    }
}

/// The id of the job named `name`, made on first use.
fn job_of(
    store: &Store,
    jobs: &mut Jobs,
    name: &str,
    settings: &serde_json::Value,
) -> Result<i64, WriteError> {
    if let Some(id) = jobs.get(name) {
        return Ok(*id);
    }
    let error = |e: fanout_store::StoreError| WriteError::Store(e.to_string());
    let job = match store.job(name).map_err(error)? {
        Some(job) if job.input != PROXY_INPUT => {
            let why = format!("job `{name}` is a batch job, not the proxy's: name another");
            return Err(WriteError::NotTheProxys(why));
        }
        Some(job) => job,
        None => {
            let fingerprint = Fingerprint([("proxy".to_owned(), "1".to_owned())].into());
            store.create_job(name, PROXY_INPUT, &fingerprint, settings).map_err(error)?
        }
    };
    jobs.insert(name.to_owned(), job.id);
    Ok(job.id)
}
