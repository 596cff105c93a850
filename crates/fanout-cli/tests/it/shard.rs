//! Static sharding: `batch --shard K/N` in stores of their own, as the tasks
//! of an array job run, and `jobs merge` putting them back in order.

use fanout_mock::{Config, MockServer};

use crate::{Home, read_lines, run, stderr};

const ROWS: usize = 10;
const SHARDS: usize = 3;

/// Shard `k` of the job `essays`, in a store of its own (`s{k}.db`), written
/// to `out-{k}.jsonl`.
fn shard(home: &Home, server: &MockServer, k: usize) -> std::process::Command {
    shard_in(home, server, &format!("s{k}.db"), k, &format!("out-{k}.jsonl"))
}

fn shard_in(
    home: &Home,
    server: &MockServer,
    store: &str,
    k: usize,
    output: &str,
) -> std::process::Command {
    let mut command = home.fanout();
    command
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "-q", "--store"])
        .arg(home.path(store))
        .arg("batch")
        .arg(home.path("rows.jsonl"))
        .args(["--prompt", "Grade: {{ essay }}", "--id", "id", "--job", "essays"])
        .args(["--shard", &format!("{k}/{SHARDS}"), "-o", output]);
    command
}

/// `jobs resume essays` in the merged store, written to `output`.
fn resume_merged(home: &Home, output: &str) -> std::process::Command {
    let mut command = home.fanout();
    command.args(["-q", "--store"]).arg(home.path("all.db"));
    command.args(["jobs", "resume", "essays", "-o", output]);
    command
}

fn ids(rows: &[serde_json::Value]) -> Vec<String> {
    rows.iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect()
}

fn row_ids(indices: impl Iterator<Item = usize>) -> Vec<String> {
    indices.map(|i| format!("row-{i}")).collect()
}

/// Merges `sources` into `all.db` with the extra arguments.
fn merge(home: &Home, sources: &[&str], extra: &[&str]) -> std::process::Command {
    let mut command = home.fanout();
    command.arg("--store").arg(home.path("all.db")).args(["jobs", "merge"]);
    for source in sources {
        command.arg(home.path(source));
    }
    command.args(extra);
    command
}

/// Every row is asked once across the shards, each shard's output holds its
/// rows in order, and merging the stores (or the outputs) gives the whole
/// input's results in input order, as one job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_run_every_row_once_and_merge_back_in_input_order() {
    let server =
        MockServer::start(Config { count_prompts: true, ..Config::default() }).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(ROWS));
    for k in 1..=SHARDS {
        let output = run(shard(&home, &server, k)).await;
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let rows = read_lines(&home.path(&format!("out-{k}.jsonl")));
        assert_eq!(ids(&rows), row_ids((k - 1..ROWS).step_by(SHARDS)), "shard {k}");
    }
    let prompts = server.stats().prompts;
    for i in 0..ROWS {
        assert_eq!(prompts.get(&format!("Grade: essay number {i}")), Some(&1), "row {i}");
    }

    let merged = run(merge(&home, &["s2.db", "s1.db", "s3.db"], &["-o", "all.jsonl"])).await;
    assert_eq!(merged.status.code(), Some(0), "{}", stderr(&merged));
    let all = read_lines(&home.path("all.jsonl"));
    assert_eq!(ids(&all), row_ids(0..ROWS));
    assert!(all.iter().all(|r| r["status"] == "succeeded"));
    for (i, row) in all.iter().enumerate() {
        assert!(
            row["answer"].as_str().unwrap().contains(&format!("essay number {i}")),
            "row {i}: {row}"
        );
    }

    // One job over the whole input: nothing left to run, and shown whole.
    let mut show = home.fanout();
    show.arg("--store").arg(home.path("all.db")).args(["jobs", "show", "essays"]);
    let show = run(show).await;
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(shown["total"], ROWS);
    assert_eq!(shown["finished"], ROWS);
    assert!(shown["fingerprint"].get("shard").is_none(), "{shown}");
    let resumed = run(resume_merged(&home, "again.jsonl")).await;
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    assert_eq!(server.stats().prompts, prompts, "the merged job asked again");
    assert_eq!(read_lines(&home.path("again.jsonl")), all);

    // The outputs, given in shard order, interleave to the same file.
    let outputs = run(merge(
        &home,
        &["out-1.jsonl", "out-2.jsonl", "out-3.jsonl"],
        &["-o", "from-outputs.jsonl"],
    ))
    .await;
    assert_eq!(outputs.status.code(), Some(0), "{}", stderr(&outputs));
    assert_eq!(
        std::fs::read(home.path("from-outputs.jsonl")).unwrap(),
        std::fs::read(home.path("all.jsonl")).unwrap()
    );
    // Out of order, the counts (4, 3, 3) tell.
    let wrong = run(merge(&home, &["out-2.jsonl", "out-1.jsonl", "out-3.jsonl"], &[])).await;
    assert_eq!(wrong.status.code(), Some(2));
    assert!(stderr(&wrong).contains("give them in shard order"), "{}", stderr(&wrong));
}

/// A missing shard is said, and its rows are what resuming the merged job
/// runs; a shard given twice, or run again as another shard, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_shard_is_left_for_resume_and_mixed_shards_are_refused() {
    let server =
        MockServer::start(Config { count_prompts: true, ..Config::default() }).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(ROWS));
    for k in [1, 3] {
        let output = run(shard(&home, &server, k)).await;
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    }
    // The same job as another shard is another job.
    let refused = run(shard_in(&home, &server, "s1.db", 2, "out-2.jsonl")).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(stderr(&refused).contains("different shard"), "{}", stderr(&refused));
    let twice = run(merge(&home, &["s1.db", "s1.db"], &[])).await;
    assert_eq!(twice.status.code(), Some(2));
    assert!(stderr(&twice).contains("shard 1/3 is given twice"), "{}", stderr(&twice));

    let merged = run(merge(&home, &["s1.db", "s3.db"], &[])).await;
    assert_eq!(merged.status.code(), Some(0), "{}", stderr(&merged));
    assert!(
        stderr(&merged)
            .contains("shard 2/3 missing: its rows are left for `fanout jobs resume essays`"),
        "{}",
        stderr(&merged)
    );
    let before = server.stats().prompts;
    let resumed = run(resume_merged(&home, "all.jsonl")).await;
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    let after = server.stats().prompts;
    for i in 0..ROWS {
        let prompt = format!("Grade: essay number {i}");
        let asked_now =
            after.get(&prompt).copied().unwrap_or(0) - before.get(&prompt).copied().unwrap_or(0);
        assert_eq!(asked_now, u64::from(i % SHARDS == 1), "row {i}");
    }
    assert_eq!(ids(&read_lines(&home.path("all.jsonl"))), row_ids(0..ROWS));
}

/// `--shard` that names no shard is refused before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_is_not_k_of_n_is_refused() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(ROWS));
    for (shard, said) in
        [("0/3", "K counts from 1 to 3"), ("4/3", "K counts from 1 to 3"), ("3", "expected K/N")]
    {
        let mut command = shard_command(&home, &server);
        command.args(["--shard", shard]);
        let output = run(command).await;
        assert_eq!(output.status.code(), Some(2), "{shard}");
        assert!(stderr(&output).contains(said), "{shard}: {}", stderr(&output));
    }
    assert_eq!(server.stats().requests, 0);
}

fn shard_command(home: &Home, server: &MockServer) -> std::process::Command {
    let mut command = home.fanout();
    command
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "-q", "batch"])
        .arg(home.path("rows.jsonl"))
        .args(["--prompt", "Grade: {{ essay }}"]);
    command
}

/// CSV outputs, whose records may span lines (a kept field with a newline),
/// merge record by record under one header, as the stores' merge writes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_outputs_merge_record_by_record_under_one_header() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let rows: String = (0..7)
        .map(|i| format!("{{\"id\":\"row-{i}\",\"essay\":\"line one of {i}\\nline two\"}}\n"))
        .collect();
    home.write("rows.jsonl", rows);
    for k in 1..=SHARDS {
        let mut command = shard_in(&home, &server, &format!("s{k}.db"), k, &format!("out-{k}.csv"));
        command.args(["--output-format", "csv", "--keep", "essay"]);
        let output = run(command).await;
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    }
    let sources = ["out-1.csv", "out-2.csv", "out-3.csv"];
    let outputs = run(merge(&home, &sources, &["-o", "from-outputs.csv"])).await;
    assert_eq!(outputs.status.code(), Some(0), "{}", stderr(&outputs));
    let stores = run(merge(&home, &["s1.db", "s2.db", "s3.db"], &["-o", "from-stores.csv"])).await;
    assert_eq!(stores.status.code(), Some(0), "{}", stderr(&stores));
    let merged = std::fs::read_to_string(home.path("from-outputs.csv")).unwrap();
    assert_eq!(merged, std::fs::read_to_string(home.path("from-stores.csv")).unwrap());
    let mut reader = csv::Reader::from_reader(merged.as_bytes());
    let ids: Vec<String> = reader.records().map(|r| r.unwrap()[0].to_owned()).collect();
    assert_eq!(ids, row_ids(0..7));
    assert_eq!(merged.matches("id,status").count(), 1, "one header");
}

/// A shard whose rows are still at a Batch API is not merged (the merged job
/// would send them again); once its batch is given up, it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_with_rows_still_at_a_batch_api_is_not_merged() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(ROWS));
    let output = run(shard(&home, &server, 1)).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let mut store = fanout_store::Store::open(&home.path("s1.db")).unwrap();
    let job = store.job("essays").unwrap().unwrap();
    let mut batch = store.add_remote_batch(job.id, "openai", "fanout", &[0, 99]).unwrap();
    let refused = run(merge(&home, &["s1.db"], &[])).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(stderr(&refused).contains("rows still at the Batch API"), "{}", stderr(&refused));
    batch.state = fanout_store::remote_state::ABANDONED.into();
    store.update_remote_batch(&batch).unwrap();
    let merged = run(merge(&home, &["s1.db"], &[])).await;
    assert_eq!(merged.status.code(), Some(0), "{}", stderr(&merged));
}
