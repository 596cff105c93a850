//! The tables, created on first open.

use rusqlite::Connection;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    input       TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    settings    TEXT NOT NULL,
    total       INTEGER,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    last_run    TEXT
);
CREATE TABLE IF NOT EXISTS tasks (
    job_id        INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx           INTEGER NOT NULL,
    task_id       TEXT NOT NULL,
    status        TEXT NOT NULL,
    answer        TEXT,
    error_kind    TEXT,
    error_message TEXT,
    error_status  INTEGER,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    latency_ms    REAL,
    attempts      INTEGER NOT NULL,
    finish_reason TEXT,
    model         TEXT,
    request_id    TEXT,
    finished_at   INTEGER NOT NULL,
    usage_estimated INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens INTEGER NOT NULL DEFAULT 0,
    kept          TEXT,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_events (
    job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    at_ms  INTEGER NOT NULL,
    kind   TEXT NOT NULL,
    value  REAL NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS run_events_by_job ON run_events (job_id, at_ms);
CREATE TABLE IF NOT EXISTS remote_batches (
    id            INTEGER PRIMARY KEY,
    job_id        INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    api           TEXT NOT NULL,
    tag           TEXT NOT NULL,
    state         TEXT NOT NULL,
    file_id       TEXT,
    remote_id     TEXT,
    remote_status TEXT,
    requests      INTEGER NOT NULL,
    succeeded     INTEGER NOT NULL DEFAULT 0,
    failed        INTEGER NOT NULL DEFAULT 0,
    described     TEXT,
    detail        TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS remote_batches_by_job ON remote_batches (job_id, id);
CREATE TABLE IF NOT EXISTS remote_rows (
    batch_id INTEGER NOT NULL REFERENCES remote_batches(id) ON DELETE CASCADE,
    idx      INTEGER NOT NULL,
    PRIMARY KEY (batch_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cache (
    key        TEXT PRIMARY KEY,
    response   TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
";

/// WAL lets readers (resume, export, cache lookups) work beside the writer;
/// `synchronous = NORMAL` keeps every commit safe from a killed process (the
/// WAL is written before commit returns) while sparing an fsync per commit.
pub(crate) fn prepare(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.execute_batch(SCHEMA)?;
    add_missing_columns(conn)
}

/// Columns added after the first release (table, column, definition), added
/// to stores made before them.
const ADDED_COLUMNS: [(&str, &str, &str); 7] = [
    ("tasks", "usage_estimated", "INTEGER NOT NULL DEFAULT 0"),
    ("tasks", "cached_input_tokens", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "last_run", "TEXT"),
    ("tasks", "kept", "TEXT"),
    ("tasks", "calls", "TEXT"),
    ("tasks", "request_hash", "TEXT"),
    ("tasks", "cost", "REAL"),
];

fn add_missing_columns(conn: &Connection) -> rusqlite::Result<()> {
    for (table, name, definition) in ADDED_COLUMNS {
        let present: bool = conn.query_row(
            "SELECT count(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
            [table, name],
            |row| row.get(0),
        )?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {name} {definition}"))?;
        }
    }
    Ok(())
}
