//! kill -9 in the middle of a batch, at several random moments: every row ends
//! with exactly one result, and no row finished before a kill is asked again.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fanout_mock::{Config, MockServer};

use crate::{Home, run, stderr};

const ROWS: usize = 3000;

fn finished_prompts(home: &Home) -> BTreeSet<String> {
    let db = rusqlite::Connection::open(home.store()).unwrap();
    // A kill before the store was first set up leaves it without tables.
    let Ok(mut statement) = db.prepare("SELECT task_id FROM tasks WHERE status = 'succeeded'")
    else {
        return BTreeSet::new();
    };
    let ids = statement.query_map([], |row| row.get::<_, String>(0)).unwrap();
    ids.map(|id| format!("Grade: essay number {}", id.unwrap().trim_start_matches("row-")))
        .collect()
}

fn asked_again(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    finished: &BTreeSet<String>,
) -> Vec<String> {
    finished.iter().filter(|p| after.get(*p) != before.get(*p)).cloned().collect()
}

/// The batch command over `rows.jsonl` against `server`, as job `crash`.
fn batch_command(home: &Home, server: &MockServer, concurrency: &str, extra: &[&str]) -> Command {
    let mut command = home.fanout();
    command
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "-q", "-c"])
        .arg(concurrency)
        .args(extra)
        .args(["batch", "rows.jsonl", "--prompt", "Grade: {{ essay }}", "--id", "id"])
        .args(["--job", "crash", "-o", "out.jsonl"]);
    command
}

/// One `kill -9` at a random moment costs at most the calls that held a slot
/// then: results keep their slot until committed, so in flight and finished
/// but unsaved together never exceed the concurrency. Hedges are extra calls
/// by design (bounded by their budget, tested in the library), so they are off
/// here to count exactly what a crash costs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_kill_9_costs_at_most_the_concurrency_in_requests() {
    let config = Config { latency: Duration::from_millis(50), ..Config::default() };
    let server = MockServer::start(config).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(ROWS));
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    let moment = 300 + seed % 1500;
    let mut child = batch_command(&home, &server, "50", &["--no-hedge"]).spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(moment)).await;
    let _ = child.kill();
    tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    let last = run(batch_command(&home, &server, "50", &["--no-hedge"])).await;
    assert_eq!(last.status.code(), Some(0), "{}", stderr(&last));
    let requests = server.stats().requests;
    assert!(
        requests <= ROWS as u64 + 50,
        "killed at {moment} ms: {requests} requests for {ROWS} rows at -c 50"
    );
    let output = crate::read_lines(&home.path("out.jsonl"));
    assert_eq!(output.len(), ROWS);
    assert!(output.iter().all(|r| r["status"] == "succeeded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_and_repeats_nothing() {
    let config = Config {
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(10),
        count_prompts: true,
        ..Config::default()
    };
    let server = MockServer::start(config).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(ROWS));
    let batch = || batch_command(&home, &server, "64", &[]);
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    let moments: Vec<u64> = (0..3)
        .map(|i| 150 + (seed.wrapping_mul(2_654_435_761).rotate_left(i * 13) % 700))
        .collect();
    let mut finished = BTreeSet::new();
    for moment in &moments {
        let before = server.stats().prompts;
        let mut child = batch().spawn().unwrap();
        tokio::time::sleep(Duration::from_millis(*moment)).await;
        let _ = child.kill(); // SIGKILL; the run may already be over
        tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
        let repeated = asked_again(&before, &server.stats().prompts, &finished);
        assert!(
            repeated.is_empty(),
            "killed at {moments:?}: finished rows asked again: {repeated:?}"
        );
        let now_finished = finished_prompts(&home);
        assert!(now_finished.is_superset(&finished), "a saved result was lost");
        finished = now_finished;
    }
    let before = server.stats().prompts;
    let last = run(batch()).await;
    assert_eq!(last.status.code(), Some(0), "{}", stderr(&last));
    let repeated = asked_again(&before, &server.stats().prompts, &finished);
    assert!(repeated.is_empty(), "killed at {moments:?}: finished rows asked again: {repeated:?}");

    let output = crate::read_lines(&home.path("out.jsonl"));
    let ids: Vec<_> = output.iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(
        ids,
        (0..ROWS).map(|i| format!("row-{i}")).collect::<Vec<_>>(),
        "killed at {moments:?}"
    );
    assert!(output.iter().all(|r| r["status"] == "succeeded"));
    let db = rusqlite::Connection::open(home.store()).unwrap();
    let stored: i64 = db.query_row("SELECT count(*) FROM tasks", [], |row| row.get(0)).unwrap();
    assert_eq!(stored, ROWS as i64, "exactly one result per row");
}
