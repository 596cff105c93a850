//! The committer: the one owner of the job's store writes, the output file and
//! the progress line, on a thread of its own (SQLite blocks).
//!
//! Results arrive as they finish — the executor never waits for a slow row —
//! and are committed at once, in groups: whatever finished while the previous
//! commit ran goes into the next one, so the window a crash can lose is one
//! commit, and throughput is the store's, not a timer's. Each result keeps its
//! call's concurrency slot until it is committed, so a `kill -9` loses at most
//! `concurrency` calls in all, in flight or finished.
//!
//! The store is the reorder buffer: the output is written in input order as its
//! prefix completes. Results ahead of a slow row stay in memory up to a budget;
//! past it, the stored ones are dropped from memory and read back from the store
//! when the prefix reaches them. Memory is bounded whatever the head's lag.

use std::collections::BTreeMap;
use std::io::ErrorKind;

use anyhow::{Context, Result};
use fanout::{CancellationToken, HeldResult, HeldResults, TaskResult, Totals};
use fanout_store::{Finished, Store};
use futures_util::{FutureExt, StreamExt};

use super::job::OpenJob;
use super::keep::KeptFields;
use crate::exit::Ending;
use crate::history::{self, RunLog};
use crate::output::{Kept, Output};
use crate::progress::Progress;
use crate::record::{kept_of, to_record, to_result};

/// The most results committed in one transaction.
const MAX_GROUP: usize = 4096;
/// The most results written out per read from the store.
const MAX_READ_BACK: u64 = 4096;

/// Where a run's results come from: the executor's calls, or a driver of
/// its own — a Batch API's batches (which bring online results along, with
/// `--then online`), or the workers of a Redis queue.
pub enum RunResults {
    Online(HeldResults),
    Driven(DrivenResults),
}

impl RunResults {
    async fn totals(self) -> Totals {
        match self {
            Self::Online(results) => results.totals().await,
            Self::Driven(results) => results.totals().await,
        }
    }
}

impl futures_util::Stream for RunResults {
    type Item = HeldResult;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<HeldResult>> {
        match self.get_mut() {
            Self::Online(results) => results.poll_next_unpin(cx),
            Self::Driven(results) => results.poll_next_unpin(cx),
        }
    }
}

/// Results a task of its own sends as they come, and its totals at the end.
pub struct DrivenResults {
    receiver: tokio::sync::mpsc::Receiver<HeldResult>,
    driver: tokio::task::JoinHandle<Totals>,
    /// What drives them, for the message should it fail.
    what: &'static str,
}

impl DrivenResults {
    /// Spawns `drive` with the sender its results go to.
    pub fn spawn<F>(
        what: &'static str,
        drive: impl FnOnce(tokio::sync::mpsc::Sender<HeldResult>) -> F,
    ) -> Self
    where
        F: std::future::Future<Output = Totals> + Send + 'static,
    {
        let (sender, receiver) = tokio::sync::mpsc::channel(4096);
        Self { receiver, driver: tokio::spawn(drive(sender)), what }
    }

    pub async fn totals(mut self) -> Totals {
        while self.receiver.recv().await.is_some() {}
        self.driver.await.unwrap_or_else(|error| {
            eprintln!("fanout: {} failed: {error}", self.what);
            Totals::default()
        })
    }
}

impl futures_util::Stream for DrivenResults {
    type Item = HeldResult;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<HeldResult>> {
        self.receiver.poll_recv(cx)
    }
}

pub struct Committer {
    store: Store,
    job: i64,
    /// Results restored from an earlier run: already stored, never again.
    restored: Finished,
    output: Output,
    /// Each task's kept input fields, until its result is committed.
    kept: KeptFields,
    progress: Progress,
    ending: Ending,
    order: StoreOrder,
    /// Cancelled when the output's reader has gone: no new calls start.
    drain: CancellationToken,
    output_closed: bool,
    /// The run's events, committed with the results; `None` when no history is kept.
    run_log: Option<RunLog>,
    /// Each record's own cost, for a Batch API job (whose rows cost the
    /// batch price, or the online one where they finished online).
    costs: Option<RecordCosts>,
    /// Told the indices of each group once it is committed (a queue's
    /// results leave Redis only then).
    committed: Option<tokio::sync::mpsc::UnboundedSender<Vec<u64>>>,
}

/// What a Batch API job's records cost: a result that held a call's slot
/// was answered online; one without came from a batch.
#[derive(Clone, Copy, Debug)]
pub struct RecordCosts {
    pub online: fanout::Price,
    pub batch: fanout::Price,
}

impl RecordCosts {
    fn of(&self, held: &HeldResult) -> f64 {
        let price = if held.slot.is_some() { self.online } else { self.batch };
        price.cost(held.result.outcome.usage())
    }
}

/// What ends a committer's work.
pub struct Committed {
    pub ending: Ending,
    pub totals: Totals,
    /// The output was a pipe whose reader left (`| head`): the run stopped
    /// launching, and what finished is in the store.
    pub output_closed: bool,
}

impl Committer {
    /// `in_memory`: how many results ahead of the first unwritten one to keep
    /// in memory before reading them back from the store instead.
    /// `drain` stops new calls when the output's reader goes away.
    pub fn new(
        open: OpenJob,
        output: Output,
        kept: KeptFields,
        progress: Progress,
        in_memory: usize,
        drain: CancellationToken,
    ) -> Self {
        Self {
            store: open.store,
            job: open.job.id,
            restored: open.finished,
            output,
            kept,
            progress,
            ending: Ending::default(),
            order: StoreOrder::new(in_memory),
            drain,
            output_closed: false,
            run_log: None,
            costs: None,
            committed: None,
        }
    }

    /// Tells `committed` the indices of each group once it is committed.
    pub fn with_committed(
        mut self,
        committed: Option<tokio::sync::mpsc::UnboundedSender<Vec<u64>>>,
    ) -> Self {
        self.committed = committed;
        self
    }

    /// Prices each record on its own (a Batch API job's).
    pub fn with_costs(mut self, costs: Option<RecordCosts>) -> Self {
        self.costs = costs;
        self
    }

    /// Commits the run's events (pauses, limit changes) with the results.
    pub fn with_run_log(mut self, run_log: Option<RunLog>) -> Self {
        self.run_log = run_log;
        self
    }

    /// Commits and writes every result of `results` on a thread of its own.
    pub async fn run(self, results: RunResults) -> Result<Committed> {
        let runtime = tokio::runtime::Handle::current();
        let (done, finished) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("fanout-committer".into())
            .spawn(move || {
                let _ = done.send(self.commit_all(&runtime, results));
            })
            .context("cannot start the committer thread")?;
        finished.await.context("the committer thread stopped")?
    }

    fn commit_all(
        mut self,
        runtime: &tokio::runtime::Handle,
        mut results: RunResults,
    ) -> Result<Committed> {
        let mut group = Vec::new();
        while let Some(first) = runtime.block_on(results.next()) {
            group.push(first);
            // Whatever else has finished meanwhile joins this commit.
            while group.len() < MAX_GROUP {
                match results.next().now_or_never() {
                    Some(Some(next)) => group.push(next),
                    _ => break,
                }
            }
            self.commit(&mut group)?;
        }
        let totals = runtime.block_on(results.totals());
        if let Some(run_log) = &self.run_log {
            run_log.push(history::kind::END, 0.0, None);
            self.store.commit(self.job, &[], &run_log.take())?;
        }
        self.write_out()?;
        self.store.set_total(self.job, totals.tasks as u64)?;
        self.progress.finish();
        Ok(Committed { ending: self.ending, totals, output_closed: self.output_closed })
    }

    fn commit(&mut self, group: &mut Vec<HeldResult>) -> Result<()> {
        let mut stored = Vec::with_capacity(group.len());
        let mut kept = Vec::with_capacity(group.len());
        let records: Vec<_> = group
            .iter()
            .filter_map(|held| {
                let index = held.result.index as u64;
                let fields = self.kept.take(index);
                let restored = self.restored.contains(index);
                let record = (!restored).then(|| to_record(&held.result)).flatten().map(|mut r| {
                    r.kept =
                        fields.as_ref().map(|f| serde_json::Value::Object(f.clone()).to_string());
                    r.cost = self.costs.map(|costs| costs.of(held));
                    r
                });
                stored.push(restored || record.is_some());
                kept.push(fields);
                record
            })
            .collect();
        let events = self.run_log.as_ref().map(RunLog::take).unwrap_or_default();
        if !records.is_empty() || !events.is_empty() {
            self.store.commit(self.job, &records, &events)?;
        }
        if let Some(committed) = &self.committed {
            let _ = committed.send(group.iter().map(|held| held.result.index as u64).collect());
        }
        for ((held, stored), kept) in group.drain(..).zip(stored).zip(kept) {
            // Safe now: the slot may go to the next call.
            let HeldResult { result, slot } = held;
            drop(slot);
            self.progress.record(&result);
            self.ending.add(&result.outcome);
            self.order.insert(result, kept, stored);
        }
        self.write_out()
    }

    /// Writes what is ready. A reader that went away (a closed pipe) is no
    /// error: nothing more is written or launched, and results go on being stored.
    fn write_out(&mut self) -> Result<()> {
        if self.output_closed {
            return Ok(());
        }
        let written = self
            .order
            .write_ready(&self.store, self.job, &mut self.output)
            .and_then(|()| self.output.flush().context("cannot write the output"));
        match written {
            Err(error) if is_broken_pipe(&error) => {
                self.output_closed = true;
                self.drain.cancel();
                Ok(())
            }
            other => other,
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == ErrorKind::BrokenPipe)
    })
}

/// Writes results in input order, reading back from the store those it did
/// not keep in memory.
struct StoreOrder {
    /// The first index not yet written out.
    next: u64,
    /// Indices that have a result, kept or stored.
    done: Finished,
    kept: BTreeMap<u64, (TaskResult, Option<Kept>)>,
    in_memory: usize,
}

impl StoreOrder {
    fn new(in_memory: usize) -> Self {
        Self { next: 0, done: Finished::default(), kept: BTreeMap::new(), in_memory }
    }

    /// `stored`: whether the result can be read back from the store. Results
    /// that cannot (runs cut short) are always kept: there are at most as many
    /// as were in flight when the run stopped.
    fn insert(&mut self, result: TaskResult, fields: Option<Kept>, stored: bool) {
        let index = result.index as u64;
        self.done.insert(index);
        let next_up = index == self.next;
        if next_up || !stored || self.kept.len() < self.in_memory {
            self.kept.insert(index, (result, fields));
        }
    }

    fn write_ready(&mut self, store: &Store, job: i64, output: &mut Output) -> Result<()> {
        while self.done.contains(self.next) {
            if let Some((result, fields)) = self.kept.remove(&self.next) {
                output.write(&result, fields.as_ref()).context("cannot write the output")?;
                self.next += 1;
                continue;
            }
            // A run of results that were committed but not kept.
            let mut end = self.next;
            while end - self.next < MAX_READ_BACK
                && self.done.contains(end)
                && !self.kept.contains_key(&end)
            {
                end += 1;
            }
            store.each_record_between(job, self.next, end, |record| -> Result<()> {
                let fields = kept_of(&record);
                output.write(&to_result(record), fields.as_ref()).context("cannot write the output")
            })?;
            self.next = end;
        }
        Ok(())
    }
}

/// How many results to keep in memory ahead of the output: a few rounds of
/// the concurrency, and never so few that reading back dominates.
pub fn memory_budget(concurrency: usize) -> usize {
    concurrency.saturating_mul(4).max(1024)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use fanout::{Outcome, Response, Success, TaskId, Usage};
    use fanout_store::Fingerprint;

    use super::*;
    use crate::output::OutputFormat;

    /// Output that the test can read back.
    #[derive(Clone, Default)]
    struct Written(Arc<Mutex<Vec<u8>>>);

    impl Write for Written {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Written {
        fn ids(&self) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].to_string())
                .map(|id| id.trim_matches('"').to_owned())
                .collect()
        }
    }

    fn succeeded(index: usize) -> TaskResult {
        let response = Response::new(format!("answer {index}"), Usage::default());
        let success = Success::new(response, Duration::from_millis(5), 1);
        TaskResult::new(index, TaskId::from(format!("row-{index}")), Outcome::Succeeded(success))
    }

    /// The head row hangs while 5,000 later rows finish: at most the memory
    /// budget of them is held, the rest are read back from the store, and the
    /// output comes out whole and in input order once the head is in.
    #[test]
    fn a_slow_head_is_reordered_through_the_store_in_bounded_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("fanout.db")).unwrap();
        let job =
            store.create_job("j", "in", &Fingerprint::default(), &serde_json::json!({})).unwrap();
        let written = Written::default();
        let mut output =
            Output::new(OutputFormat::Jsonl, Box::new(written.clone()), Default::default())
                .unwrap();
        let mut order = StoreOrder::new(100);
        for index in 1..=5_000 {
            let result = succeeded(index);
            store.record(job.id, &[to_record(&result).unwrap()]).unwrap();
            order.insert(result, None, true);
            order.write_ready(&store, job.id, &mut output).unwrap();
            assert!(order.kept.len() <= 100, "kept {} at row {index}", order.kept.len());
        }
        assert!(written.ids().is_empty(), "nothing passes the slow head");
        let head = succeeded(0);
        store.record(job.id, &[to_record(&head).unwrap()]).unwrap();
        order.insert(head, None, true);
        order.write_ready(&store, job.id, &mut output).unwrap();
        output.flush().unwrap();
        let expected: Vec<String> = (0..=5_000).map(|i| format!("row-{i}")).collect();
        assert_eq!(written.ids(), expected);
        assert!(order.kept.is_empty());
    }

    /// Results that are not stored (a run cut short) are always kept, so they
    /// still reach the output in their place.
    #[test]
    fn unstored_results_are_kept_in_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("fanout.db")).unwrap();
        let written = Written::default();
        let mut output =
            Output::new(OutputFormat::Jsonl, Box::new(written.clone()), Default::default())
                .unwrap();
        let mut order = StoreOrder::new(1);
        for index in [3, 2, 1] {
            let cut = Outcome::Cancelled { attempts: 1 };
            order.insert(
                TaskResult::new(index, TaskId::from(format!("row-{index}")), cut),
                None,
                false,
            );
        }
        let head = TaskResult::new(0, TaskId::from("row-0"), Outcome::Cancelled { attempts: 0 });
        order.insert(head, None, false);
        order.write_ready(&store, 1, &mut output).unwrap();
        output.flush().unwrap();
        assert_eq!(written.ids(), ["row-0", "row-1", "row-2", "row-3"]);
    }
}
