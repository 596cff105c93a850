//! Every proxied call is a record in the store before its client gets the
//! answer, so a proxy restart loses no finished call.
//!
//! One thread owns the store and commits in groups: a handler sends its
//! record and waits; the thread takes every record waiting, writes them in
//! one transaction and answers them all. Under load a commit serves many
//! calls, so the wait stays about one commit long.
//!
//! What happened to a lane meanwhile (429 pauses, concurrency changes) goes
//! into every job that lane's calls were recorded in during this run, since
//! it held those calls back: each job's report shows the pauses its calls
//! waited out, and no other key's.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::mpsc as channel;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use fanout::Event;
use fanout_store::{Fingerprint, Record, RunEvent, Store};
use tokio::sync::oneshot;

use crate::history;

/// The most events a lane keeps before any of its calls is recorded.
const MOST_UNPLACED_EVENTS: usize = 1_000;

/// The lanes' run events (429 pauses, concurrency changes), by lane, until
/// the writer takes them (cheap to clone).
#[derive(Clone, Debug, Default)]
pub struct LaneEvents(Arc<Mutex<Vec<(String, RunEvent)>>>);

impl LaneEvents {
    /// Keeps what concerns the lane named `lane` as a whole.
    pub fn observe(&self, lane: &str, event: &Event) {
        if let Some(event) = history::run_event(event) {
            self.0.lock().expect("never poisoned").push((lane.to_owned(), event));
        }
    }

    fn take(&self) -> Vec<(String, RunEvent)> {
        std::mem::take(&mut *self.0.lock().expect("never poisoned"))
    }
}

/// What a proxy job names as its input: its calls come from clients, not a file.
const PROXY_INPUT: &str = "(proxy)";

/// A record for `job` (none: only whether the job can take records), and
/// who waits for it to be written.
struct Pending {
    job: String,
    /// The lane the record's call went through.
    lane: String,
    record: Option<Record>,
    written: oneshot::Sender<Result<(), WriteError>>,
}

/// What the writer is asked to do.
enum Message {
    Write(Box<Pending>),
    /// The proxy stops: the run's last events are written, then the sender told.
    Finish(oneshot::Sender<()>),
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
    sender: channel::Sender<Message>,
    /// Jobs known to take the proxy's records, so that checking a job
    /// before its call costs no trip to the writer.
    accepting: Mutex<HashSet<String>>,
}

impl Records {
    /// Starts the writer on the store at `path`; `settings` are stored with
    /// each job it makes (never secrets). The events `lane_events` gathers go
    /// into the jobs their lane's calls are recorded in; each job's run
    /// starts with an event at `concurrency`.
    pub fn start(
        path: &Path,
        settings: serde_json::Value,
        lane_events: LaneEvents,
        concurrency: usize,
    ) -> Result<Self> {
        let store = Store::open(path)?;
        let (sender, receiver) = channel::channel::<Message>();
        let writer = Writer {
            store,
            settings,
            lane_events,
            concurrency,
            jobs: Jobs::new(),
            served: HashMap::new(),
            unplaced: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("fanout-proxy-records".into())
            .spawn(move || writer.write_all(&receiver))
            .context("cannot start the record writer")?;
        Ok(Self { sender, accepting: Mutex::default() })
    }

    /// Ends the run in every job it wrote, once the records sent before are written.
    pub async fn finish(&self) {
        let (done, finished) = oneshot::channel();
        if self.sender.send(Message::Finish(done)).is_ok() {
            let _ = finished.await;
        }
    }

    /// Whether `job` can take the proxy's records (a batch job of that name
    /// cannot), made if it is new: asked before a call, so that none is paid
    /// for that cannot be recorded.
    pub async fn check(&self, job: &str) -> Result<(), WriteError> {
        if self.accepting.lock().expect("never poisoned").contains(job) {
            return Ok(());
        }
        self.send(job, String::new(), None).await?;
        self.accepting.lock().expect("never poisoned").insert(job.to_owned());
        Ok(())
    }

    /// Writes `record` of a call through the lane named `lane` (its index is
    /// given here: after the job's last) and returns once it is committed.
    pub async fn write(&self, job: &str, lane: &str, record: Record) -> Result<(), WriteError> {
        self.send(job, lane.to_owned(), Some(record)).await
    }

    async fn send(
        &self,
        job: &str,
        lane: String,
        record: Option<Record>,
    ) -> Result<(), WriteError> {
        let stopped = || WriteError::Store("the record writer stopped".into());
        let (written, done) = oneshot::channel();
        let pending = Pending { job: job.to_owned(), lane, record, written };
        self.sender.send(Message::Write(Box::new(pending))).map_err(|_| stopped())?;
        done.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// The proxy's jobs' ids, by name.
type Jobs = HashMap<String, i64>;

/// The thread that owns the store.
struct Writer {
    store: Store,
    settings: serde_json::Value,
    lane_events: LaneEvents,
    concurrency: usize,
    /// The jobs this run wrote or checked.
    jobs: Jobs,
    /// The jobs each lane's calls were recorded in.
    served: HashMap<String, HashSet<i64>>,
    /// Events of lanes none of whose calls is recorded yet (a pause before
    /// the first answer): they go with its first record.
    unplaced: HashMap<String, Vec<RunEvent>>,
}

impl Writer {
    fn write_all(mut self, receiver: &channel::Receiver<Message>) {
        while let Ok(first) = receiver.recv() {
            let mut writes = Vec::new();
            let mut finished = Vec::new();
            for message in std::iter::once(first).chain(receiver.try_iter()) {
                match message {
                    Message::Write(pending) => writes.push(*pending),
                    Message::Finish(done) => finished.push(done),
                }
            }
            self.write(writes);
            if !finished.is_empty() {
                let end = [history::event_now(history::kind::END, 0.0, None)];
                let jobs: Vec<i64> = self.jobs.values().copied().collect();
                self.add_to(jobs, &end);
            }
            for done in finished {
                let _ = done.send(());
            }
        }
    }

    /// Writes a group of records, each job's in one transaction with the run
    /// events that concern it.
    fn write(&mut self, writes: Vec<Pending>) {
        self.gather_events();
        let mut by_job: HashMap<String, Vec<Pending>> = HashMap::new();
        for pending in writes {
            by_job.entry(pending.job.clone()).or_default().push(pending);
        }
        let mut groups = Vec::new();
        for (name, pendings) in by_job {
            match self.job_of(&name) {
                Ok(id) => {
                    for pending in pendings.iter().filter(|pending| pending.record.is_some()) {
                        self.served.entry(pending.lane.clone()).or_default().insert(id);
                    }
                    groups.push((id, pendings));
                }
                Err(error) => {
                    for pending in pendings {
                        let _ = pending.written.send(Err(error.clone()));
                    }
                }
            }
        }
        let mut events_of = self.placed_events();
        for (id, pendings) in groups {
            let records: Vec<Record> =
                pendings.iter().filter_map(|pending| pending.record.clone()).collect();
            let events = events_of.remove(&id).unwrap_or_default();
            let result = match records.is_empty() {
                true => {
                    self.add_to(vec![id], &events);
                    Ok(())
                }
                // Indexed after the job's last record as the store has it, so
                // that another proxy writing the same job takes none of them.
                false => self
                    .store
                    .append(id, &records, &events)
                    .map(drop)
                    .map_err(|e| WriteError::Store(e.to_string())),
            };
            for pending in pendings {
                let _ = pending.written.send(result.clone());
            }
        }
        // Events of jobs with no record in this group.
        for (id, events) in events_of {
            self.add_to(vec![id], &events);
        }
    }

    /// Takes the lanes' new events in, beside those not placed yet.
    fn gather_events(&mut self) {
        for (lane, event) in self.lane_events.take() {
            let unplaced = self.unplaced.entry(lane).or_default();
            if unplaced.len() == MOST_UNPLACED_EVENTS {
                unplaced.remove(0);
            }
            unplaced.push(event);
        }
    }

    /// The events of every lane whose calls were recorded, by the jobs they
    /// go into (each job its lanes'); the others' stay until theirs are.
    fn placed_events(&mut self) -> HashMap<i64, Vec<RunEvent>> {
        let mut events_of: HashMap<i64, Vec<RunEvent>> = HashMap::new();
        let placed: Vec<String> =
            self.unplaced.keys().filter(|lane| self.served.contains_key(*lane)).cloned().collect();
        for lane in placed {
            let events = self.unplaced.remove(&lane).unwrap_or_default();
            for id in &self.served[&lane] {
                events_of.entry(*id).or_default().extend(events.iter().cloned());
            }
        }
        events_of
    }

    /// Adds `events` to `jobs`. They only explain the records, so one that
    /// cannot be stored is said and dropped.
    fn add_to(&mut self, jobs: Vec<i64>, events: &[RunEvent]) {
        if events.is_empty() {
            return;
        }
        for id in jobs {
            if let Err(error) = self.store.commit(id, &[], events) {
                eprintln!("fanout proxy: the run's events were not saved: {error}");
            }
        }
    }

    /// The id of the job named `name`, made on first use; the run's start is
    /// its first event.
    fn job_of(&mut self, name: &str) -> Result<i64, WriteError> {
        if let Some(id) = self.jobs.get(name) {
            return Ok(*id);
        }
        let error = |e: fanout_store::StoreError| WriteError::Store(e.to_string());
        let job = match self.store.job(name).map_err(error)? {
            Some(job) if job.input != PROXY_INPUT => {
                let why = format!("job `{name}` is a batch job, not the proxy's: name another");
                return Err(WriteError::NotTheProxys(why));
            }
            Some(job) => job,
            None => {
                let fingerprint = Fingerprint([("proxy".to_owned(), "1".to_owned())].into());
                let made = self.store.create_job(name, PROXY_INPUT, &fingerprint, &self.settings);
                made.map_err(error)?
            }
        };
        let start = history::event_now(history::kind::START, self.concurrency as f64, None);
        self.store.commit(job.id, &[], &[start]).map_err(error)?;
        self.jobs.insert(name.to_owned(), job.id);
        Ok(job.id)
    }
}
