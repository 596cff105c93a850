//! fanout's job store: SQLite through rusqlite (bundled), in WAL mode.
//!
//! - a **job** has a unique name, the fingerprint of what it was started with
//!   (input file, prompt template, settings), and the settings needed to resume it;
//! - a **task record** is one finished task of a job (succeeded or failed), keyed
//!   by the task's index in the input, written before the result is shown anywhere;
//! - the **cache** maps a request's key to a stored answer.
//!
//! Everything is plain columns, so `sqlite3 fanout.db "select status, count(*)
//! from tasks group by 1"` works. The store knows nothing of fanout's types: the
//! command converts.

#![warn(missing_docs)]

mod remote;
mod schema;

pub use remote::{RemoteBatch, state as remote_state};

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

pub use rusqlite::Error as SqlError;

/// A store error, naming what it was doing.
#[derive(Debug)]
pub struct StoreError {
    context: String,
    source: SqlError,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.source)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

trait Context<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, SqlError> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, StoreError> {
        self.map_err(|source| StoreError { context: context(), source })
    }
}

/// The store's result: its errors are [`StoreError`]s.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Named hashes of what a job was started with; comparing two says what changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(pub BTreeMap<String, String>);

impl Fingerprint {
    /// The names of the parts that differ (present in one and not the other too).
    pub fn differences(&self, other: &Self) -> Vec<String> {
        let mut names: Vec<&String> = self.0.keys().chain(other.0.keys()).collect();
        names.sort();
        names.dedup();
        names.into_iter().filter(|n| self.0.get(*n) != other.0.get(*n)).cloned().collect()
    }

    fn to_json(&self) -> String {
        serde_json::to_string(&self.0).expect("a map of strings serializes")
    }

    fn from_json(text: &str) -> Self {
        Self(serde_json::from_str(text).unwrap_or_default())
    }
}

/// A job as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// The row id (`jobs.id`): the `job` that the store's methods take.
    pub id: i64,
    /// The unique name it is resumed by.
    pub name: String,
    /// What it reads: the input file's path, or `-` for standard input.
    pub input: String,
    /// What it was started with, stored as JSON.
    pub fingerprint: Fingerprint,
    /// The settings of the job's latest run, to resume it (never secrets).
    pub settings: serde_json::Value,
    /// Tasks in the input; `None` until a run has counted them ([`Store::set_total`]).
    pub total: Option<u64>,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// Seconds since the Unix epoch, when records or the total were last written.
    pub updated_at: i64,
    /// The totals of the job's last run (calls, retries, 429s, hedges, rates),
    /// as JSON; `None` before a run has ended.
    pub last_run: Option<serde_json::Value>,
}

/// A job with its tasks counted by status.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSummary {
    /// The job counted.
    pub job: Job,
    /// Finished tasks by status (`succeeded`, `failed`, `timed_out`); a status
    /// with none is absent.
    pub counts: BTreeMap<String, u64>,
    /// Input tokens of the finished tasks, summed.
    pub input_tokens: u64,
    /// Output tokens of the finished tasks, summed.
    pub output_tokens: u64,
    /// Cached input tokens of the finished tasks, summed (part of `input_tokens`).
    pub cached_input_tokens: u64,
    /// The costs of the tasks priced one by one ([`Record::cost`]), summed;
    /// `None` when none was.
    pub priced_cost: Option<f64>,
    /// Finished tasks that used tokens and carry no cost of their own: in a
    /// job priced per call, those whose model's price is unknown.
    pub unpriced: u64,
}

impl JobSummary {
    /// Tasks finished, whatever their status.
    pub fn finished(&self) -> u64 {
        self.counts.values().sum()
    }
}

/// One finished task. Serialized field by field (its names are its form on
/// a queue's wire: a worker's result travels as one).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Record {
    /// The task's index in the input (column `idx`).
    pub index: u64,
    /// The task's id: given in the input, or its index.
    pub task_id: String,
    /// `succeeded`, `failed` or `timed_out`.
    pub status: String,
    /// The answer's text; `None` unless succeeded.
    pub answer: Option<String>,
    /// The error's kind in snake case (`rate_limited`, `timeout`, ...); `None`
    /// unless failed.
    pub error_kind: Option<String>,
    /// The error's message; `None` unless failed.
    pub error_message: Option<String>,
    /// The HTTP status the error came with; `None` when it came without an
    /// answer, or did not fail.
    pub error_status: Option<u16>,
    /// Input (prompt) tokens paid for: the answer's, or a failed task's refused answers.
    pub input_tokens: u64,
    /// Output tokens paid for, like `input_tokens`.
    pub output_tokens: u64,
    /// Milliseconds from the task's first launch to its answer, retries
    /// included; `None` unless succeeded.
    pub latency_ms: Option<f64>,
    /// Attempts sent for the task; 0 when it was never sent.
    pub attempts: u32,
    /// Why generation stopped (`stop`, `length`, ...), as the provider said;
    /// `None` when it did not say, or the task did not succeed.
    pub finish_reason: Option<String>,
    /// The model that answered, as the provider reported it; `None` when it
    /// did not, or the task did not succeed.
    pub model: Option<String>,
    /// The provider's id for the call (its `x-request-id` or `request-id`
    /// header), success or failure; `None` when it sent none.
    pub request_id: Option<String>,
    /// Seconds since the Unix epoch.
    pub finished_at: i64,
    /// Whether the token counts are estimates: the provider reported none.
    pub usage_estimated: bool,
    /// The part of `input_tokens` read from the provider's prompt cache.
    pub cached_input_tokens: u64,
    /// The input fields kept beside the answer (`--keep`), as a JSON object.
    pub kept: Option<String>,
    /// The history of the task's calls (attempts, hedges), in the compact
    /// form its writer chose; `None` when none was kept.
    pub calls: Option<String>,
    /// A hash of the request the task sent, for the jobs that replay their
    /// answers on a rerun (pattern jobs); `None` for the others.
    pub request_hash: Option<String>,
    /// What the task cost, for the jobs that price each call at its own
    /// model's price (the proxy's, whose clients name their models); `None`
    /// where the job's one price applies, or the model's price is unknown.
    pub cost: Option<f64>,
}

/// Something that happened to a job's run as a whole, rather than to one task.
#[derive(Clone, Debug, PartialEq)]
pub struct RunEvent {
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// What happened: the writer's name for it (`limit`, `pause`, ...).
    pub kind: String,
    /// Its measure: a new limit, a pause's milliseconds.
    pub value: f64,
    /// What caused it, in words; `None` when nothing needs saying.
    pub detail: Option<String>,
}

impl Record {
    /// Whether the status is `succeeded`.
    pub fn succeeded(&self) -> bool {
        self.status == "succeeded"
    }
}

/// Which indices of a job are finished, as a bit set: a million tasks take 125 KB.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Finished {
    bits: Vec<u64>,
    count: u64,
}

impl Finished {
    /// Marks `index` finished; marking it again changes nothing.
    pub fn insert(&mut self, index: u64) {
        let (word, bit) = ((index / 64) as usize, index % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & (1 << bit) == 0 {
            self.bits[word] |= 1 << bit;
            self.count += 1;
        }
    }

    /// Whether `index` is finished.
    pub fn contains(&self, index: u64) -> bool {
        self.bits.get((index / 64) as usize).is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    /// How many indices are finished.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether no index is finished.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Seconds since the Unix epoch, as the store writes times (0 if the clock is
/// before it).
pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A connection to the store. Open one per thread that needs it: SQLite in WAL
/// mode lets readers work while one writer commits.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

const JOB_COLUMNS: &str =
    "id, name, input, fingerprint, settings, total, created_at, updated_at, last_run";
const RECORD_COLUMNS: &str = "idx, task_id, status, answer, error_kind, error_message, error_status, \
     input_tokens, output_tokens, latency_ms, attempts, finish_reason, model, request_id, finished_at, \
     usage_estimated, cached_input_tokens, kept, calls, request_hash, cost";

fn job_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    let settings: String = row.get(4)?;
    Ok(Job {
        id: row.get(0)?,
        name: row.get(1)?,
        input: row.get(2)?,
        fingerprint: Fingerprint::from_json(&row.get::<_, String>(3)?),
        settings: serde_json::from_str(&settings).unwrap_or(serde_json::Value::Null),
        total: row.get::<_, Option<i64>>(5)?.map(|t| t as u64),
        created_at: row.get(6)?,
        updated_at: row.get(7)?,
        last_run: row
            .get::<_, Option<String>>(8)?
            .and_then(|text| serde_json::from_str(&text).ok()),
    })
}

fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        index: row.get::<_, i64>(0)? as u64,
        task_id: row.get(1)?,
        status: row.get(2)?,
        answer: row.get(3)?,
        error_kind: row.get(4)?,
        error_message: row.get(5)?,
        error_status: row.get(6)?,
        input_tokens: row.get::<_, i64>(7)? as u64,
        output_tokens: row.get::<_, i64>(8)? as u64,
        latency_ms: row.get(9)?,
        attempts: row.get(10)?,
        finish_reason: row.get(11)?,
        model: row.get(12)?,
        request_id: row.get(13)?,
        finished_at: row.get(14)?,
        usage_estimated: row.get(15)?,
        cached_input_tokens: row.get::<_, i64>(16)? as u64,
        kept: row.get(17)?,
        calls: row.get(18)?,
        request_hash: row.get(19)?,
        cost: row.get(20)?,
    })
}

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let at = || format!("cannot open the job store {}", path.display());
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| SqlError::ToSqlConversionFailure(Box::new(e)))
                .context(at)?;
        }
        let conn = Connection::open(path).context(at)?;
        schema::prepare(&conn).context(at)?;
        Ok(Self { conn })
    }

    /// The job named `name`; `None` when there is none.
    pub fn job(&self, name: &str) -> Result<Option<Job>> {
        self.conn
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE name = ?1"),
                [name],
                job_from_row,
            )
            .optional()
            .context(|| format!("cannot read job `{name}`"))
    }

    /// Creates a job with no task records; fails when `name` is taken.
    pub fn create_job(
        &self,
        name: &str,
        input: &str,
        fingerprint: &Fingerprint,
        settings: &serde_json::Value,
    ) -> Result<Job> {
        let now = now();
        self.conn
            .execute(
                "INSERT INTO jobs (name, input, fingerprint, settings, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                params![name, input, fingerprint.to_json(), settings.to_string(), now],
            )
            .context(|| format!("cannot create job `{name}`"))?;
        Ok(self.job(name)?.expect("the job was just created"))
    }

    /// Stores the number of tasks in a job's input ([`Job::total`]).
    pub fn set_total(&self, job: i64, total: u64) -> Result<()> {
        self.conn
            .execute(
                "UPDATE jobs SET total = ?2, updated_at = ?3 WHERE id = ?1",
                params![job, total as i64, now()],
            )
            .context(|| "cannot update the job's task count".into())?;
        Ok(())
    }

    /// Removes the job's records that did not succeed, so that a rerun
    /// leaves one record per call it makes; returns how many went.
    pub fn forget_unsucceeded(&self, job: i64) -> Result<u64> {
        self.conn
            .execute("DELETE FROM tasks WHERE job_id = ?1 AND status != 'succeeded'", [job])
            .map(|n| n as u64)
            .context(|| format!("cannot clear the failed records of job {job}"))
    }

    /// Removes the job named `name` with its task records; `false` when there
    /// was none.
    pub fn remove_job(&self, name: &str) -> Result<bool> {
        let removed = self
            .conn
            .execute("DELETE FROM jobs WHERE name = ?1", [name])
            .context(|| format!("cannot remove job `{name}`"))?;
        Ok(removed > 0)
    }

    /// Every job with its counts, oldest first.
    pub fn jobs(&self) -> Result<Vec<JobSummary>> {
        let context = || "cannot list jobs".to_string();
        let mut statement = self
            .conn
            .prepare(&format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_at, id"))
            .context(context)?;
        let jobs: Vec<Job> = statement
            .query_map([], job_from_row)
            .context(context)?
            .collect::<rusqlite::Result<_>>()
            .context(context)?;
        jobs.into_iter().map(|job| self.summary(job)).collect()
    }

    /// Counts `job`'s finished tasks by status and sums their tokens.
    pub fn summary(&self, job: Job) -> Result<JobSummary> {
        let context = || format!("cannot count the tasks of job `{}`", job.name);
        let mut statement = self
            .conn
            .prepare(
                "SELECT status, count(*), sum(input_tokens), sum(output_tokens), \
                 sum(cached_input_tokens), sum(cost), \
                 sum(cost IS NULL AND input_tokens + output_tokens > 0) FROM tasks \
                 WHERE job_id = ?1 GROUP BY status",
            )
            .context(context)?;
        let mut summary = JobSummary {
            counts: BTreeMap::new(),
            input_tokens: 0,
            output_tokens: 0,
            cached_input_tokens: 0,
            priced_cost: None,
            unpriced: 0,
            job: job.clone(),
        };
        let rows = statement
            .query_map([job.id], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, i64>(4)?,
                    row.get::<_, Option<f64>>(5)?,
                    row.get::<_, i64>(6)?,
                ))
            })
            .context(context)?;
        for row in rows {
            let (status, count, input, output, cached, cost, unpriced) = row.context(context)?;
            summary.counts.insert(status, count as u64);
            summary.input_tokens += input as u64;
            summary.output_tokens += output as u64;
            summary.cached_input_tokens += cached as u64;
            if let Some(cost) = cost {
                *summary.priced_cost.get_or_insert(0.0) += cost;
            }
            summary.unpriced += unpriced as u64;
        }
        Ok(summary)
    }

    /// The finished indices of a job; failed ones only when `include_failed`.
    pub fn finished(&self, job: i64, include_failed: bool) -> Result<Finished> {
        let context = || "cannot read which tasks are finished".to_string();
        let sql = if include_failed {
            "SELECT idx FROM tasks WHERE job_id = ?1"
        } else {
            "SELECT idx FROM tasks WHERE job_id = ?1 AND status = 'succeeded'"
        };
        let mut statement = self.conn.prepare(sql).context(context)?;
        let mut finished = Finished::default();
        for index in statement.query_map([job], |row| row.get::<_, i64>(0)).context(context)? {
            finished.insert(index.context(context)? as u64);
        }
        Ok(finished)
    }

    /// Records finished tasks in one transaction (a record replaces an earlier
    /// one for the same index: a retried failure).
    pub fn record(&mut self, job: i64, records: &[Record]) -> Result<()> {
        self.commit(job, records, &[])
    }

    /// Records finished tasks and what happened to the run meanwhile, in one
    /// transaction.
    pub fn commit(&mut self, job: i64, records: &[Record], events: &[RunEvent]) -> Result<()> {
        let context = || format!("cannot save {} results", records.len());
        let transaction = self.conn.transaction().context(context)?;
        insert_records(&transaction, job, records.iter().map(|r| (r, r.index))).context(context)?;
        insert_events(&transaction, job, events).context(context)?;
        transaction.commit().context(context)
    }

    /// Calls `each` with a job's run events, oldest first.
    pub fn each_event<E: From<StoreError>>(
        &self,
        job: i64,
        each: impl FnMut(RunEvent) -> Result<(), E>,
    ) -> Result<(), E> {
        self.each_row(
            "SELECT at_ms, kind, value, detail FROM run_events WHERE job_id = ?1 \
             ORDER BY at_ms, rowid",
            [job],
            || "cannot read the job's run events".to_string(),
            |row| {
                Ok(RunEvent {
                    at_ms: row.get(0)?,
                    kind: row.get(1)?,
                    value: row.get(2)?,
                    detail: row.get(3)?,
                })
            },
            each,
        )
    }

    /// Adds `records` after the job's last, whatever indexes they carry, and
    /// `events` of its run, in one transaction, and returns the first index
    /// given. The write lock is taken before the last index is read, so two
    /// writers on one job (two proxies) never give two records one index.
    pub fn append(&mut self, job: i64, records: &[Record], events: &[RunEvent]) -> Result<u64> {
        let context = || format!("cannot save {} results", records.len());
        let transaction = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .context(context)?;
        let next = next_index_of(&transaction, job).context(context)?;
        insert_records(&transaction, job, records.iter().zip(next..)).context(context)?;
        insert_events(&transaction, job, events).context(context)?;
        transaction.commit().context(context)?;
        Ok(next)
    }

    /// Stores the totals of the job's run that just ended ([`Job::last_run`]).
    pub fn set_last_run(&self, job: i64, totals: &serde_json::Value) -> Result<()> {
        self.conn
            .execute(
                "UPDATE jobs SET last_run = ?2 WHERE id = ?1",
                params![job, totals.to_string()],
            )
            .context(|| "cannot store the run's totals".into())?;
        Ok(())
    }

    /// Stores the settings of a job's latest run ([`Job::settings`]): a resume
    /// with a larger budget or more concurrency keeps them for the next one.
    pub fn set_settings(&self, job: i64, settings: &serde_json::Value) -> Result<()> {
        self.conn
            .execute(
                "UPDATE jobs SET settings = ?2, updated_at = ?3 WHERE id = ?1",
                params![job, settings.to_string(), now()],
            )
            .map(drop)
            .context(|| format!("cannot update the settings of job {job}"))
    }

    /// Stores a job's fingerprint anew (written by an older version of the program).
    pub fn set_fingerprint(&self, job: i64, fingerprint: &Fingerprint) -> Result<()> {
        self.conn
            .execute(
                "UPDATE jobs SET fingerprint = ?2 WHERE id = ?1",
                params![job, fingerprint.to_json()],
            )
            .map(drop)
            .context(|| format!("cannot update the fingerprint of job {job}"))
    }

    /// The record of a job's task at `index`; `None` when it has not finished.
    pub fn record_at(&self, job: i64, index: u64) -> Result<Option<Record>> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {RECORD_COLUMNS} FROM tasks WHERE job_id = ?1 AND idx = ?2"
            ))
            .and_then(|mut s| s.query_row(params![job, index as i64], record_from_row).optional())
            .context(|| format!("cannot read the result of task {index}"))
    }

    /// Calls `each` with the records of a job whose index is in `from..to`, in
    /// index order.
    pub fn each_record_between<E: From<StoreError>>(
        &self,
        job: i64,
        from: u64,
        to: u64,
        each: impl FnMut(Record) -> Result<(), E>,
    ) -> Result<(), E> {
        self.each_row(
            &format!(
                "SELECT {RECORD_COLUMNS} FROM tasks WHERE job_id = ?1 AND idx >= ?2 AND idx < ?3 \
                 ORDER BY idx"
            ),
            params![job, from as i64, to as i64],
            || format!("cannot read the results of tasks {from} to {to}"),
            record_from_row,
            each,
        )
    }

    /// Calls `each` with every record of a job, in index order, without holding
    /// them all in memory.
    pub fn each_record<E: From<StoreError>>(
        &self,
        job: i64,
        each: impl FnMut(Record) -> Result<(), E>,
    ) -> Result<(), E> {
        self.each_row(
            &format!("SELECT {RECORD_COLUMNS} FROM tasks WHERE job_id = ?1 ORDER BY idx"),
            [job],
            || "cannot read the job's results".to_string(),
            record_from_row,
            each,
        )
    }

    /// Calls `each` with every row `sql` selects, mapped by `map`, one at a
    /// time; errors name what was being read (`context`).
    fn each_row<T, E: From<StoreError>>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        context: impl Fn() -> String,
        map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
        mut each: impl FnMut(T) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut statement = self.conn.prepare_cached(sql).context(&context)?;
        let rows = statement.query_map(params, map).context(&context)?;
        for row in rows {
            each(row.context(&context)?)?;
        }
        Ok(())
    }

    /// The response cached under `key`; `None` when there is none.
    pub fn cache_get(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .prepare_cached("SELECT response FROM cache WHERE key = ?1")
            .and_then(|mut s| s.query_row([key], |row| row.get(0)).optional())
            .context(|| "cannot read the response cache".into())
    }

    /// Caches `response` under `key`, replacing what was there.
    pub fn cache_put(&self, key: &str, response: &str) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO cache (key, response, created_at) VALUES (?1, ?2, ?3)",
            )
            .and_then(|mut s| s.execute(params![key, response, now()]))
            .context(|| "cannot write the response cache".into())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;

fn next_index_of(conn: &Connection, job: i64) -> rusqlite::Result<u64> {
    conn.query_row("SELECT COALESCE(MAX(idx) + 1, 0) FROM tasks WHERE job_id = ?1", [job], |row| {
        row.get::<_, i64>(0)
    })
    .map(|next| next as u64)
}

/// Writes records at the indexes paired with them, and marks the job updated.
fn insert_records<'a>(
    conn: &Connection,
    job: i64,
    records: impl Iterator<Item = (&'a Record, u64)>,
) -> rusqlite::Result<()> {
    let mut insert = conn.prepare_cached(&format!(
        "INSERT OR REPLACE INTO tasks (job_id, {RECORD_COLUMNS}) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)"
    ))?;
    for (r, index) in records {
        insert.execute(params![
            job,
            index as i64,
            r.task_id,
            r.status,
            r.answer,
            r.error_kind,
            r.error_message,
            r.error_status,
            r.input_tokens as i64,
            r.output_tokens as i64,
            r.latency_ms,
            r.attempts,
            r.finish_reason,
            r.model,
            r.request_id,
            r.finished_at,
            r.usage_estimated,
            r.cached_input_tokens as i64,
            r.kept,
            r.calls,
            r.request_hash,
            r.cost,
        ])?;
    }
    conn.prepare_cached("UPDATE jobs SET updated_at = ?2 WHERE id = ?1")
        .and_then(|mut update| update.execute(params![job, now()]))?;
    Ok(())
}

fn insert_events(conn: &Connection, job: i64, events: &[RunEvent]) -> rusqlite::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut insert = conn.prepare_cached(
        "INSERT INTO run_events (job_id, at_ms, kind, value, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for event in events {
        insert.execute(params![job, event.at_ms, event.kind, event.value, event.detail])?;
    }
    Ok(())
}
