//! A job's batches at a provider's Batch API: each is written here with the
//! rows it holds *before* it is made remotely, then with its file and batch
//! ids as they are given, so a resumed job finds every batch it made and
//! submits no row twice.

use rusqlite::{OptionalExtension, params};

use super::{Context, Result, Store, now};

/// How far a batch has got.
pub mod state {
    /// Its rows are chosen; nothing is at the service yet (or its creation's
    /// answer was lost).
    pub const PREPARING: &str = "preparing";
    /// Its input file is uploaded (OpenAI); the batch is not created yet.
    pub const UPLOADED: &str = "uploaded";
    /// The service has it: it is known by its remote id.
    pub const SUBMITTED: &str = "submitted";
    /// The service says it has ended: its answers can be read.
    pub const ENDED: &str = "ended";
    /// It was never made: its rows went back to be sent again.
    pub const ABANDONED: &str = "abandoned";
    /// `fanout jobs cancel` cancelled it; it stays so whatever a running job
    /// writes after, and a resume sends its cancelled rows again.
    pub const CANCELLED: &str = "cancelled";
}

/// One batch of a job at a Batch API.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RemoteBatch {
    /// The local id (`remote_batches.id`).
    pub id: i64,
    /// Which API (`openai`, `anthropic`).
    pub api: String,
    /// What it is marked with at the service, to be found by it.
    pub tag: String,
    /// One of [`state`].
    pub state: String,
    /// The uploaded input file's id (OpenAI).
    pub file_id: Option<String>,
    /// The service's id for the batch.
    pub remote_id: Option<String>,
    /// The service's own word for its state, as last seen.
    pub remote_status: Option<String>,
    /// Rows it holds.
    pub requests: u64,
    /// Answered, as the service last counted.
    pub succeeded: u64,
    /// Errored, expired or cancelled, as the service last counted.
    pub failed: u64,
    /// The service's last description of it, as JSON (where its answers are).
    pub described: Option<String>,
    /// What went wrong last, in words.
    pub detail: Option<String>,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// Seconds since the Unix epoch.
    pub updated_at: i64,
}

const COLUMNS: &str = "id, api, tag, state, file_id, remote_id, remote_status, requests, \
     succeeded, failed, described, detail, created_at, updated_at";

fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RemoteBatch> {
    Ok(RemoteBatch {
        id: row.get(0)?,
        api: row.get(1)?,
        tag: row.get(2)?,
        state: row.get(3)?,
        file_id: row.get(4)?,
        remote_id: row.get(5)?,
        remote_status: row.get(6)?,
        requests: row.get::<_, i64>(7)? as u64,
        succeeded: row.get::<_, i64>(8)? as u64,
        failed: row.get::<_, i64>(9)? as u64,
        described: row.get(10)?,
        detail: row.get(11)?,
        created_at: row.get(12)?,
        updated_at: row.get(13)?,
    })
}

impl Store {
    /// Writes a new batch of `rows` for `job` in state `preparing`, in one
    /// transaction, and returns it; `tag` is completed with its local id.
    pub fn add_remote_batch(
        &mut self,
        job: i64,
        api: &str,
        tag: &str,
        rows: &[u64],
    ) -> Result<RemoteBatch> {
        let context = || format!("cannot save a batch of {} rows", rows.len());
        let transaction = self.conn.transaction().context(context)?;
        let at = now();
        transaction
            .execute(
                "INSERT INTO remote_batches (job_id, api, tag, state, requests, created_at, updated_at) \
                 VALUES (?1, ?2, '', ?3, ?4, ?5, ?5)",
                params![job, api, state::PREPARING, rows.len() as i64, at],
            )
            .context(context)?;
        let id = transaction.last_insert_rowid();
        let tag = format!("{tag}-{id}");
        transaction
            .execute("UPDATE remote_batches SET tag = ?2 WHERE id = ?1", params![id, tag])
            .context(context)?;
        {
            let mut insert = transaction
                .prepare_cached("INSERT INTO remote_rows (batch_id, idx) VALUES (?1, ?2)")
                .context(context)?;
            for row in rows {
                insert.execute(params![id, *row as i64]).context(context)?;
            }
        }
        transaction.commit().context(context)?;
        Ok(RemoteBatch {
            id,
            api: api.to_owned(),
            tag,
            state: state::PREPARING.to_owned(),
            requests: rows.len() as u64,
            created_at: at,
            updated_at: at,
            ..RemoteBatch::default()
        })
    }

    /// Stores what is now known of `batch` (its state, ids, counts, description).
    pub fn update_remote_batch(&self, batch: &RemoteBatch) -> Result<()> {
        self.conn
            .execute(
                "UPDATE remote_batches SET \
                 state = CASE state WHEN 'cancelled' THEN state ELSE ?2 END, file_id = ?3, remote_id = ?4, \
                 remote_status = ?5, succeeded = ?6, failed = ?7, described = ?8, detail = ?9, \
                 updated_at = ?10 WHERE id = ?1",
                params![
                    batch.id,
                    batch.state,
                    batch.file_id,
                    batch.remote_id,
                    batch.remote_status,
                    batch.succeeded as i64,
                    batch.failed as i64,
                    batch.described,
                    batch.detail,
                    now(),
                ],
            )
            .context(|| format!("cannot save batch {}", batch.tag))?;
        Ok(())
    }

    /// A job's batches, oldest first.
    pub fn remote_batches(&self, job: i64) -> Result<Vec<RemoteBatch>> {
        let context = || "cannot read the job's batches".to_string();
        let mut statement = self
            .conn
            .prepare(&format!("SELECT {COLUMNS} FROM remote_batches WHERE job_id = ?1 ORDER BY id"))
            .context(context)?;
        let batches = statement.query_map([job], from_row).context(context)?;
        batches.collect::<rusqlite::Result<_>>().context(context)
    }

    /// One batch, by its local id.
    pub fn remote_batch(&self, id: i64) -> Result<Option<RemoteBatch>> {
        self.conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM remote_batches WHERE id = ?1"),
                [id],
                from_row,
            )
            .optional()
            .context(|| format!("cannot read batch {id}"))
    }

    /// The rows a batch holds, in input order.
    pub fn remote_rows(&self, batch: i64) -> Result<Vec<u64>> {
        let context = || format!("cannot read the rows of batch {batch}");
        let mut statement = self
            .conn
            .prepare("SELECT idx FROM remote_rows WHERE batch_id = ?1 ORDER BY idx")
            .context(context)?;
        let rows = statement.query_map([batch], |row| row.get::<_, i64>(0)).context(context)?;
        rows.map(|r| r.map(|i| i as u64)).collect::<rusqlite::Result<_>>().context(context)
    }
}
