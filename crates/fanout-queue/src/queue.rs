//! A job's rows as a queue in Redis, for workers on any number of machines.
//!
//! A job is three keys under `fanout:queue:JOB:`:
//! - `meta`, a hash: what workers need to run the job (its settings, never a
//!   key), its fingerprint and format version, and how far the producer has
//!   enqueued (`enqueued`, written in the same transaction as the entries, so a
//!   producer that dies and comes back never enqueues a row twice);
//! - `tasks`, a stream of rendered requests read by the consumer group
//!   `workers`. A worker acknowledges an entry and deletes it in the same
//!   transaction that adds its result, so an entry leaves the queue exactly
//!   when its result is in. Entries a dead worker held stay pending and are
//!   claimed by another worker once idle long enough (`XAUTOCLAIM`);
//! - `results`, a stream read by the producer's group `producer`, which
//!   acknowledges and deletes each result once its own store has committed it.
//!
//! The set `fanout:queue:jobs` names the jobs workers may find. Payloads are
//! JSON strings this module does not read: the CLI decides what a request and
//! a result are.

use std::collections::HashMap;
use std::time::Duration;

use redis::Value;
use redis::aio::ConnectionManager;

use crate::limits::{LimitsError, connect, described, redacted};

/// The set of jobs workers may find.
pub const JOBS: &str = "fanout:queue:jobs";
/// The version of what a job's entries hold; a worker of another refuses the job.
pub const FORMAT: u32 = 1;
const WORKERS: &str = "workers";
const PRODUCER: &str = "producer";

/// What workers need to know of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobMeta {
    /// [`FORMAT`] of the producer that made it.
    pub format: u32,
    /// The job's fingerprint, as the producer's store has it.
    pub fingerprint: String,
    /// The job's settings as JSON (provider, model, endpoint, parameters,
    /// limits; the name of the variable holding the key, never the key).
    pub settings: String,
}

/// A row waiting for a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedTask {
    /// The stream entry (empty until enqueued).
    pub entry: String,
    /// The row's place in the job.
    pub index: u64,
    pub id: String,
    /// The rendered request, as JSON.
    pub request: String,
}

/// A worker's result for the row of task entry `entry`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub entry: String,
    pub index: u64,
    /// The result as JSON.
    pub record: String,
}

/// A row's result on its way back to the producer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedResult {
    pub entry: String,
    pub index: u64,
    /// The result as JSON.
    pub record: String,
}

/// Why the queue cannot be used.
pub type QueueError = LimitsError;

/// One job's queue.
#[derive(Clone)]
pub struct JobQueue {
    connection: ConnectionManager,
    /// For the reads that wait (`BLOCK`): Redis answers a connection's
    /// commands in order, so a waiting read would hold every other command
    /// sent behind it on the same connection.
    waiting_reads: ConnectionManager,
    job: String,
    location: String,
    meta: String,
    tasks: String,
    results: String,
}

impl std::fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobQueue").field("job", &self.job).field("at", &self.location).finish()
    }
}

impl JobQueue {
    /// Connects to `url` (an unreachable Redis is an error now) for `job`.
    pub async fn connect(url: &str, job: &str) -> Result<Self, QueueError> {
        let connection = connect(url).await?;
        let waiting_reads = connect(url).await?;
        let mut queue = Self {
            connection,
            waiting_reads,
            job: String::new(),
            location: redacted(url),
            meta: String::new(),
            tasks: String::new(),
            results: String::new(),
        };
        queue.name(job);
        Ok(queue)
    }

    /// The queue of another job in the same Redis, on the same connections.
    pub fn of_job(&self, job: &str) -> Self {
        let mut queue = self.clone();
        queue.name(job);
        queue
    }

    fn name(&mut self, job: &str) {
        let prefix = format!("fanout:queue:{job}:");
        self.job = job.to_owned();
        self.meta = format!("{prefix}meta");
        self.tasks = format!("{prefix}tasks");
        self.results = format!("{prefix}results");
    }

    /// The names of the jobs in this Redis that workers may find.
    pub async fn jobs(&self) -> Result<Vec<String>, QueueError> {
        self.query(redis::cmd("SMEMBERS").arg(JOBS)).await
    }

    pub fn job(&self) -> &str {
        &self.job
    }

    fn failed(&self, error: &redis::RedisError) -> QueueError {
        LimitsError::new(format!("Redis at {}: {}", self.location, described(error)))
    }

    async fn query_waiting<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
    ) -> Result<T, QueueError> {
        let mut connection = self.waiting_reads.clone();
        command.query_async(&mut connection).await.map_err(|e| self.failed(&e))
    }

    async fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, QueueError> {
        let mut connection = self.connection.clone();
        command.query_async(&mut connection).await.map_err(|e| self.failed(&e))
    }

    /// Makes the job known to workers, or finds it again: returns how many rows
    /// were enqueued before. A job of the same name with another fingerprint
    /// is refused.
    pub async fn announce(&self, meta: &JobMeta) -> Result<u64, QueueError> {
        if let Some(existing) = self.meta().await?
            && existing.fingerprint != meta.fingerprint
        {
            return Err(LimitsError::new(format!(
                "the queue at {} already holds a different job named `{}` (another input, \
                 prompt or model); finish or remove it first",
                self.location, self.job
            )));
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSETNX")
            .arg(&self.meta)
            .arg("enqueued")
            .arg(0)
            .ignore()
            .cmd("HSET")
            .arg(&self.meta)
            .arg("format")
            .arg(meta.format)
            .arg("fingerprint")
            .arg(&meta.fingerprint)
            .arg("settings")
            .arg(&meta.settings)
            .arg("all_enqueued")
            .arg(0)
            .ignore()
            .cmd("SADD")
            .arg(JOBS)
            .arg(&self.job)
            .ignore();
        for (stream, group) in [(&self.tasks, WORKERS), (&self.results, PRODUCER)] {
            // BUSYGROUP when it exists already: that is the point of announcing again.
            let created: Result<(), _> = self
                .query(
                    redis::cmd("XGROUP")
                        .arg("CREATE")
                        .arg(stream)
                        .arg(group)
                        .arg("0")
                        .arg("MKSTREAM"),
                )
                .await;
            if let Err(error) = created
                && !error.to_string().contains("BUSYGROUP")
            {
                return Err(error);
            }
        }
        let mut connection = self.connection.clone();
        pipe.query_async::<()>(&mut connection).await.map_err(|e| self.failed(&e))?;
        self.enqueued().await
    }

    /// The job as the producer announced it; `None` when there is none.
    pub async fn meta(&self) -> Result<Option<JobMeta>, QueueError> {
        let fields: HashMap<String, String> =
            self.query(redis::cmd("HGETALL").arg(&self.meta)).await?;
        let (Some(format), Some(fingerprint), Some(settings)) =
            (fields.get("format"), fields.get("fingerprint"), fields.get("settings"))
        else {
            return Ok(None);
        };
        Ok(Some(JobMeta {
            format: format.parse().unwrap_or(0),
            fingerprint: fingerprint.clone(),
            settings: settings.clone(),
        }))
    }

    /// How many rows the producer has enqueued (in input order, settled rows counted).
    pub async fn enqueued(&self) -> Result<u64, QueueError> {
        let count: Option<u64> =
            self.query(redis::cmd("HGET").arg(&self.meta).arg("enqueued")).await?;
        Ok(count.unwrap_or(0))
    }

    /// Adds `tasks` and moves the producer's mark to `enqueued`, in one
    /// transaction: either both happen or neither.
    pub async fn enqueue(&self, tasks: &[QueuedTask], enqueued: u64) -> Result<(), QueueError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for task in tasks {
            pipe.cmd("XADD")
                .arg(&self.tasks)
                .arg("*")
                .arg("index")
                .arg(task.index)
                .arg("id")
                .arg(&task.id)
                .arg("request")
                .arg(&task.request)
                .ignore();
        }
        pipe.cmd("HSET").arg(&self.meta).arg("enqueued").arg(enqueued).ignore();
        let mut connection = self.connection.clone();
        pipe.query_async::<()>(&mut connection).await.map_err(|e| self.failed(&e))
    }

    /// Says every row is enqueued: workers serving only this job may stop once
    /// its queue is empty.
    pub async fn finish_enqueuing(&self) -> Result<(), QueueError> {
        self.query(redis::cmd("HSET").arg(&self.meta).arg("all_enqueued").arg(1)).await
    }

    /// Whether the job needs no more work: the producer has enqueued every row
    /// and none waits or runs, or the job is gone (its producer stored every
    /// row and removed it).
    pub async fn is_drained(&self) -> Result<bool, QueueError> {
        let all: Option<u8> =
            self.query(redis::cmd("HGET").arg(&self.meta).arg("all_enqueued")).await?;
        match all {
            None => Ok(true),
            Some(1) => {
                let left: u64 = self.query(redis::cmd("XLEN").arg(&self.tasks)).await?;
                Ok(left == 0)
            }
            Some(_) => Ok(false),
        }
    }

    /// Up to `count` new rows for `consumer`, waiting up to `block` for one.
    pub async fn take(
        &self,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<QueuedTask>, QueueError> {
        let reply: Value = self
            .query_waiting(
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(WORKERS)
                    .arg(consumer)
                    .arg("COUNT")
                    .arg(count.max(1))
                    .arg("BLOCK")
                    .arg(block.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&self.tasks)
                    .arg(">"),
            )
            .await?;
        Ok(read_reply_entries(&reply).into_iter().filter_map(task_of).collect())
    }

    /// Up to `count` rows that other workers took and have not answered for
    /// `idle` (a worker that died), now `consumer`'s.
    pub async fn claim(
        &self,
        consumer: &str,
        idle: Duration,
        count: usize,
    ) -> Result<Vec<QueuedTask>, QueueError> {
        let reply: Value = self
            .query(
                redis::cmd("XAUTOCLAIM")
                    .arg(&self.tasks)
                    .arg(WORKERS)
                    .arg(consumer)
                    .arg(idle.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(count.max(1)),
            )
            .await?;
        // [next start, [entries], [deleted ids]]
        let entries = match &reply {
            Value::Array(parts) => parts.get(1).map(entries_of).unwrap_or_default(),
            _ => Vec::new(),
        };
        Ok(entries.into_iter().filter_map(task_of).collect())
    }

    /// Says `consumer` is still working on `entries`: their idle time starts
    /// again, so no other worker takes them over while this one lives.
    pub async fn touch(&self, consumer: &str, entries: &[String]) -> Result<(), QueueError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut command = redis::cmd("XCLAIM");
        command.arg(&self.tasks).arg(WORKERS).arg(consumer).arg(0).arg(entries).arg("JUSTID");
        self.query::<Value>(&command).await.map(|_| ())
    }

    /// Hands results back, each for the row of its task entry: every result
    /// is added and its entry acknowledged and deleted, all in one transaction.
    pub async fn answer(&self, answers: &[Answer]) -> Result<(), QueueError> {
        if answers.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for answer in answers {
            // NOMKSTREAM: a late answer to a job already finished and removed
            // (its row was taken over and answered) leaves nothing behind.
            pipe.cmd("XADD")
                .arg(&self.results)
                .arg("NOMKSTREAM")
                .arg("*")
                .arg("index")
                .arg(answer.index)
                .arg("record")
                .arg(&answer.record)
                .ignore()
                .cmd("XACK")
                .arg(&self.tasks)
                .arg(WORKERS)
                .arg(&answer.entry)
                .ignore()
                .cmd("XDEL")
                .arg(&self.tasks)
                .arg(&answer.entry)
                .ignore();
        }
        let mut connection = self.connection.clone();
        pipe.query_async::<()>(&mut connection).await.map_err(|e| self.failed(&e))
    }

    /// Up to `count` results for the producer: with `pending_after`, those it
    /// was given before and has not acknowledged (after a crash), past that
    /// entry (`"0"` for the first); else new ones, waiting up to `block`.
    pub async fn results(
        &self,
        pending_after: Option<&str>,
        count: usize,
        block: Duration,
    ) -> Result<Vec<QueuedResult>, QueueError> {
        let mut command = redis::cmd("XREADGROUP");
        command.arg("GROUP").arg(PRODUCER).arg(PRODUCER).arg("COUNT").arg(count.max(1));
        if pending_after.is_none() {
            command.arg("BLOCK").arg(block.as_millis() as u64);
        }
        command.arg("STREAMS").arg(&self.results).arg(pending_after.unwrap_or(">"));
        let reply: Value = self.query_waiting(&command).await?;
        Ok(read_reply_entries(&reply)
            .into_iter()
            .filter_map(|(entry, fields)| {
                let index = fields.get("index")?.parse().ok()?;
                Some(QueuedResult { entry, index, record: fields.get("record")?.clone() })
            })
            .collect())
    }

    /// The producer has stored these results: they leave the queue.
    pub async fn acknowledge(&self, entries: &[String]) -> Result<(), QueueError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XACK")
            .arg(&self.results)
            .arg(PRODUCER)
            .arg(entries)
            .ignore()
            .cmd("XDEL")
            .arg(&self.results)
            .arg(entries)
            .ignore();
        let mut connection = self.connection.clone();
        pipe.query_async::<()>(&mut connection).await.map_err(|e| self.failed(&e))
    }

    /// Removes the job from Redis: every row is stored by the producer.
    pub async fn remove(&self) -> Result<(), QueueError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("DEL")
            .arg(&self.meta)
            .arg(&self.tasks)
            .arg(&self.results)
            .ignore()
            .cmd("SREM")
            .arg(JOBS)
            .arg(&self.job)
            .ignore();
        let mut connection = self.connection.clone();
        pipe.query_async::<()>(&mut connection).await.map_err(|e| self.failed(&e))
    }
}

type Entry = (String, HashMap<String, String>);

fn task_of((entry, fields): Entry) -> Option<QueuedTask> {
    Some(QueuedTask {
        index: fields.get("index")?.parse().ok()?,
        id: fields.get("id")?.clone(),
        request: fields.get("request")?.clone(),
        entry,
    })
}

/// The entries of an XREADGROUP reply for one stream (none on a timeout).
fn read_reply_entries(reply: &Value) -> Vec<Entry> {
    // RESP2: [[stream, entries]]; RESP3: {stream: entries}.
    match reply {
        Value::Array(streams) => streams
            .iter()
            .filter_map(|stream| match stream {
                Value::Array(pair) => pair.get(1),
                _ => None,
            })
            .flat_map(entries_of)
            .collect(),
        Value::Map(streams) => {
            streams.iter().flat_map(|(_, entries)| entries_of(entries)).collect()
        }
        _ => Vec::new(),
    }
}

/// `[[id, [field, value, …]], …]`; an entry deleted while pending has no
/// fields and is left out.
fn entries_of(entries: &Value) -> Vec<Entry> {
    let Value::Array(entries) = entries else { return Vec::new() };
    entries
        .iter()
        .filter_map(|entry| {
            let Value::Array(parts) = entry else { return None };
            let id = text(parts.first()?)?;
            let Some(Value::Array(flat)) = parts.get(1) else { return None };
            let fields = flat
                .chunks(2)
                .filter_map(|pair| Some((text(pair.first()?)?, text(pair.get(1)?)?)))
                .collect();
            Some((id, fields))
        })
        .collect()
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}
