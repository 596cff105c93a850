//! Every run is a job: `ask`, `vote`, `sections`, `map-reduce`, `perspectives`
//! and `run` record each call they make in the job store, as `batch` does —
//! its result, usage and call history, and the run's pauses — so that
//! `fanout jobs list/show/export` and `fanout report` work on them too.
//!
//! The executor hands each finished call to a sink ([`fanout::ExecutorBuilder::on_result`]);
//! the sink sends its record to a writer thread that appends them in groups
//! (SQLite blocks, and a call must never wait for the disk). A store that
//! cannot be opened is said once, and the command goes on unrecorded.

use std::path::Path;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use anyhow::Result;
use fanout::{ExecutorBuilder, Provider, TaskResult};
use fanout_store::{Fingerprint, Record, Store};

use crate::Refusal;
use crate::history::{self, RunLog};
use crate::live::Live;
use crate::record::to_record;
use crate::replay::{self, Replay, Replayed};
use crate::settings::{self, Flags, Settings};

/// The most records appended in one transaction.
const MAX_GROUP: usize = 1024;

enum Message {
    Record(Box<Record>),
    /// The run's shape, kept in the job's settings for the report: a vote's
    /// answer distribution, a workflow's step graph, a map-reduce's collapse tree.
    Outcome(serde_json::Value),
    /// Every record sent before it is to be written; then the writer ends.
    End,
}

/// A command's job, recorded while it runs; dropping it writes what is left.
pub struct Recording {
    name: String,
    sender: mpsc::Sender<Message>,
    writer: Option<JoinHandle<Result<u64>>>,
    run_log: RunLog,
    quiet: bool,
    /// The job's answers, when this run resumes it.
    replay: Option<Arc<Replay>>,
    /// What calls are keyed under besides their request (see [`replay::call_key`]).
    scope: String,
}

/// Settings stored for a job that is not a batch: the command that made it,
/// and its arguments and folder, for `fanout jobs resume` to run it again.
#[derive(serde::Serialize)]
struct Made<'a> {
    command: &'a str,
    settings: &'a Settings,
    argv: Option<Vec<String>>,
    cwd: Option<String>,
}

impl Recording {
    /// Starts the job of a `command` run reading `input` (`-` when it reads
    /// none), named after the command and the time; `None`, said on stderr,
    /// when the store cannot take it.
    /// With `--resume-job NAME` (what `fanout jobs resume` runs), the run
    /// goes on in that job instead: its failed records are dropped (they are
    /// asked again) and its answers replayed ([`crate::replay`]); a job that
    /// cannot be resumed is refused, since the run would pay for everything again.
    pub fn start(
        flags: &Flags,
        settings: &Settings,
        command: &str,
        input: &str,
    ) -> Result<Option<Self>> {
        let path = flags.store.clone().unwrap_or_else(settings::default_store);
        if let Some(name) = &flags.resume_job {
            let resumed = Self::resume(&path, name, settings, flags.quiet);
            return resumed
                .map(Some)
                .map_err(|e| Refusal(e.context(format!("cannot resume job `{name}`"))).into());
        }
        match Self::open(&path, settings, command, input, flags.quiet) {
            Ok(recording) => Ok(Some(recording)),
            Err(error) => {
                eprintln!("fanout: this run is not recorded: {error:#}");
                Ok(None)
            }
        }
    }

    fn open(
        path: &Path,
        settings: &Settings,
        command: &str,
        input: &str,
        quiet: bool,
    ) -> Result<Self> {
        let store = Store::open(path)?;
        let stamp = fanout_store::now();
        let mut name = format!("{command}-{stamp}");
        for n in 2.. {
            if store.job(&name)?.is_none() {
                break;
            }
            name = format!("{command}-{stamp}-{n}");
        }
        let fingerprint = Fingerprint([("command".to_owned(), command.to_owned())].into());
        // Kept only when every argument is text: a resume could not give
        // another back as it was.
        let argv: Option<Vec<String>> =
            std::env::args_os().skip(1).map(|arg| arg.into_string().ok()).collect();
        let cwd = std::env::current_dir().ok().map(|dir| dir.display().to_string());
        let made = serde_json::to_value(Made { command, settings, argv, cwd })?;
        let job = store.create_job(&name, input, &fingerprint, &made)?.id;
        Self::record_into(store, job, name, made, 0, settings, quiet, None)
    }

    fn resume(path: &Path, name: &str, settings: &Settings, quiet: bool) -> Result<Self> {
        let store = Store::open(path)?;
        let job = store.job(name)?.ok_or_else(|| anyhow::anyhow!("no job `{name}`"))?;
        store.forget_unsucceeded(job.id)?;
        let replay = Arc::new(Replay::load(&store, job.id)?);
        let kept = store.summary(job.clone())?.finished();
        Self::record_into(
            store,
            job.id,
            name.to_owned(),
            job.settings,
            kept,
            settings,
            quiet,
            Some(replay),
        )
    }

    /// Starts the writer of `job`, which holds `kept` records already.
    #[allow(clippy::too_many_arguments)]
    fn record_into(
        mut store: Store,
        job: i64,
        name: String,
        mut made: serde_json::Value,
        kept: u64,
        settings: &Settings,
        quiet: bool,
        replay: Option<Arc<Replay>>,
    ) -> Result<Self> {
        let (sender, receiver) = mpsc::channel();
        let run_log = RunLog::default();
        run_log.push(history::kind::START, settings.concurrency as f64, None);
        let events = run_log.clone();
        let writer = std::thread::Builder::new()
            .name("fanout-recorder".into())
            .spawn(move || write_all(&mut store, job, &mut made, kept, &receiver, &events))?;
        let scope = replay::scope(settings);
        Ok(Self { name, sender, writer: Some(writer), run_log, quiet, replay, scope })
    }

    /// `provider`, answering first from the job's answers when this run
    /// resumes it.
    pub fn provider(&self, provider: Arc<dyn Provider>) -> Arc<dyn Provider> {
        match &self.replay {
            Some(replay) => {
                if !self.quiet {
                    eprintln!(
                        "fanout: resuming job `{}`: {} answers kept, asked again only if needed",
                        self.name,
                        replay.len()
                    );
                }
                Arc::new(Replayed::new(provider, Arc::clone(replay), self.scope.clone()))
            }
            None => provider,
        }
    }

    /// Keeps the run's shape with the job (see [`Message::Outcome`]).
    pub fn keep_outcome(&self, outcome: serde_json::Value) {
        let _ = self.sender.send(Message::Outcome(outcome));
    }
}

/// `provider`, answering from the job first when the recording resumes one.
pub fn provider(recording: Option<&Recording>, provider: Arc<dyn Provider>) -> Arc<dyn Provider> {
    match recording {
        Some(recording) => recording.provider(provider),
        None => provider,
    }
}

/// Keeps `outcome` with `recording`'s job when there is one.
pub fn keep_outcome(recording: Option<&Recording>, outcome: impl FnOnce() -> serde_json::Value) {
    if let Some(recording) = recording {
        recording.keep_outcome(outcome());
    }
}

/// `builder`, telling every finished call and every event to the command's
/// `recording` (its calls and pauses go in the job) and its `live` lines,
/// those it has.
pub fn attach(
    recording: Option<&Recording>,
    live: Option<&Live>,
    builder: ExecutorBuilder,
) -> ExecutorBuilder {
    let record = recording.map(|r| Recorder {
        sender: r.sender.clone(),
        run_log: r.run_log.clone(),
        scope: r.scope.clone(),
    });
    // The recorder keys each call by its request.
    let builder = builder.keep_requests(record.is_some());
    let observe = record.as_ref().map(|r| r.run_log.clone());
    let (live_results, live_events) = (live.cloned(), live.cloned());
    builder
        .on_result(move |result: &TaskResult| {
            if let Some(record) = &record {
                record.record(result);
            }
            if let Some(live) = &live_results {
                live.finished(result);
            }
        })
        .on_event(move |event| {
            if let Some(run_log) = &observe {
                run_log.observe(event);
            }
            if let Some(live) = &live_events {
                live.observe(event);
            }
        })
}

/// What the executor's sink needs of a [`Recording`].
struct Recorder {
    sender: mpsc::Sender<Message>,
    run_log: RunLog,
    scope: String,
}

impl Recorder {
    fn record(&self, result: &TaskResult) {
        let answer = result.outcome.success().map(|success| &success.response);
        if answer.is_some_and(replay::is_replayed) {
            // Answered from the job, which has it already.
            return;
        }
        // Only an answer a record holds whole is replayed: not one that
        // called tools or came with other choices.
        let whole = answer.is_none_or(|a| a.tool_calls.is_empty() && a.other_choices.is_empty());
        let key =
            result.request.as_deref().filter(|_| whole).map(|r| replay::call_key(&self.scope, r));
        if let Some(mut record) = to_record(result) {
            record.request_hash = key;
            // The writer ends only when the recording is dropped.
            let _ = self.sender.send(Message::Record(Box::new(record)));
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.run_log.push(history::kind::END, 0.0, None);
        let _ = self.sender.send(Message::End);
        let Some(writer) = self.writer.take() else { return };
        match writer.join() {
            Ok(Ok(calls)) if !self.quiet => eprintln!(
                "fanout: {calls} call{} recorded as job `{}` (fanout report {1})",
                if calls == 1 { "" } else { "s" },
                self.name
            ),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                eprintln!("fanout: job `{}` was not fully recorded: {error:#}", self.name)
            }
            Err(_) => eprintln!("fanout: job `{}` was not fully recorded", self.name),
        }
    }
}

/// Appends records as they come, whatever arrived meanwhile in one
/// transaction with the run's events; returns how many were written.
fn write_all(
    store: &mut Store,
    job: i64,
    settings: &mut serde_json::Value,
    kept: u64,
    receiver: &mpsc::Receiver<Message>,
    run_log: &RunLog,
) -> Result<u64> {
    let mut written = 0;
    let mut group = Vec::new();
    let mut ended = false;
    while !ended {
        let mut outcome = None;
        match receiver.recv() {
            Ok(Message::Record(record)) => group.push(*record),
            Ok(Message::Outcome(value)) => outcome = Some(value),
            Ok(Message::End) | Err(_) => ended = true,
        }
        while !ended && group.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok(Message::Record(record)) => group.push(*record),
                Ok(Message::Outcome(value)) => outcome = Some(value),
                Ok(Message::End) => ended = true,
                Err(_) => break,
            }
        }
        if let Some(outcome) = outcome {
            settings["outcome"] = outcome;
            store.set_settings(job, settings)?;
        }
        // The run's events go with the records, in one transaction.
        let events = run_log.take();
        if !group.is_empty() {
            store.append(job, &group, &events)?;
            written += group.len() as u64;
            group.clear();
        } else if !events.is_empty() {
            store.commit(job, &[], &events)?;
        }
    }
    store.set_total(job, kept + written)?;
    Ok(written)
}
