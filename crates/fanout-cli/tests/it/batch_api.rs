//! `fanout batch --via batch-api` against the mock's Batch APIs on 127.0.0.1:
//! every row once, in input order, each submitted exactly once (the mock's own
//! counters), through crashes, splits, errors, expiry and cancellation.

use std::process::Command;
use std::time::Duration;

use fanout_mock::{Config, MockServer};
use serde_json::Value;

use crate::{Home, read_lines, run, stderr};

/// The batch command over `rows.jsonl`, as job `halfprice`, through `api`'s Batch API.
fn via_batch(home: &Home, server: &MockServer, api: &str, extra: &[&str]) -> Command {
    let mut command = home.fanout();
    let base =
        if api == "anthropic" { server.anthropic_base_url() } else { server.openai_base_url() };
    command
        .env("OPENAI_API_KEY", "sk-batch-secret-key")
        .env("ANTHROPIC_API_KEY", "sk-ant-batch-secret-key")
        .args(["--provider", api, "--base-url", &base, "-q"])
        .args(["batch", "rows.jsonl", "--prompt", "Grade: {{ essay }}", "--id", "id"])
        .args(["--job", "halfprice", "-o", "out.jsonl", "--via", "batch-api"])
        .args(["--poll-interval", "0.05"])
        .args(extra);
    command
}

/// `fanout jobs resume halfprice`, with the key.
fn resume(home: &Home) -> Command {
    let mut resume = home.fanout();
    resume.env("OPENAI_API_KEY", "sk-batch-secret-key");
    resume.args(["-q", "jobs", "resume", "halfprice", "-o", "out.jsonl"]);
    resume
}

/// Every row has its answer, in input order.
fn assert_all_answered(home: &Home, rows: usize) {
    let results = read_lines(&home.path("out.jsonl"));
    assert_eq!(results.len(), rows);
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result["id"], format!("row-{i}"), "{result}");
        assert_eq!(result["status"], "succeeded", "{result}");
        let answer = result["answer"].as_str().unwrap();
        assert!(answer.ends_with(&format!("to: Grade: essay number {i}")), "{answer}");
    }
}

fn show(home: &Home) -> Value {
    let output = home.fanout().args(["jobs", "show", "halfprice"]).output().unwrap();
    serde_json::from_slice(&output.stdout).unwrap()
}

/// A thousand rows through OpenAI's Batch API, split at 300 a batch: every
/// answer in input order, every row submitted once, no online call, and the
/// key in no stored byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_rows_through_openais_batch_api_come_back_in_order() {
    let config = Config { batch_time: Duration::from_millis(300), ..Config::default() };
    let server = MockServer::start(config).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(1000));
    let prices = ["--price-in", "1", "--price-out", "2"];
    let mut command = via_batch(&home, &server, "openai", &["--batch-max-requests", "300"]);
    command.args(prices);
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_all_answered(&home, 1000);
    let stats = server.stats();
    assert_eq!((stats.batches.files, stats.batches.created), (4, 4), "{stats:?}");
    assert_eq!((stats.batches.requests, stats.batches.resubmitted), (1000, 0));
    assert_eq!(stats.requests, 0, "nothing was asked online");
    // At half the online price, every row a batch's.
    let shown = show(&home);
    let online = shown["input_tokens"].as_f64().unwrap() * 1e-6
        + shown["output_tokens"].as_f64().unwrap() * 2e-6;
    assert!((shown["cost"].as_f64().unwrap() - online / 2.0).abs() < 1e-9, "{shown}");
    let batches = shown["batches"].as_array().unwrap().clone();
    assert_eq!(batches.len(), 4);
    let held: u64 = batches.iter().map(|b| b["requests"].as_u64().unwrap()).sum();
    assert_eq!(held, 1000);
    assert!(batches.iter().all(|b| b["state"] == "ended" && b["status"] == "completed"));
    let wal = home.path("home/fanout.db-wal");
    let written = [home.store(), wal, home.path("out.jsonl")];
    for file in written.iter().filter(|f| f.exists()) {
        let bytes = std::fs::read(file).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("batch-secret"), "{}", file.display());
    }
    assert!(!stderr(&output).contains("batch-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropics_message_batches_answer_every_row_once() {
    let config = Config { batch_time: Duration::from_millis(200), ..Config::default() };
    let server = MockServer::start(config).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(250));
    let command = via_batch(&home, &server, "anthropic", &["--batch-max-requests", "100"]);
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_all_answered(&home, 250);
    let stats = server.stats();
    assert_eq!((stats.batches.created, stats.batches.requests), (3, 250), "{stats:?}");
    assert_eq!((stats.batches.files, stats.batches.resubmitted, stats.requests), (0, 0, 0));
}

/// Rows a batch answers with a server error, or leaves unrun when it
/// expires, go into a following batch; with `--then online`, online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errored_and_expired_rows_are_sent_again_or_finished_online() {
    let config = Config { batch_error_rate: 0.1, batch_expire_rate: 0.1, ..Config::default() };
    let server = MockServer::start(config.clone()).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(300));
    let output = run(via_batch(&home, &server, "openai", &["--retries", "10"])).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_all_answered(&home, 300);
    let stats = server.stats();
    assert!(stats.batches.created >= 2, "{stats:?}");
    // Only what came back unanswered went again: ~20%, then ~20% of that...
    assert!(stats.batches.resubmitted > 20 && stats.batches.resubmitted < 150, "{stats:?}");
    assert_eq!(stats.requests, 0);

    let server = MockServer::start(config).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(300));
    let extra = ["--then", "online", "--price-in", "1", "--price-out", "1"];
    let output = run(via_batch(&home, &server, "anthropic", &extra)).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_all_answered(&home, 300);
    // Rows answered online cost the full price, the batch's half: between the two.
    let shown = show(&home);
    let tokens = shown["input_tokens"].as_f64().unwrap() + shown["output_tokens"].as_f64().unwrap();
    let cost = shown["cost"].as_f64().unwrap();
    assert!(
        cost > tokens * 0.5e-6 * 1.1 && cost < tokens * 0.5e-6 * 1.6,
        "{cost} for {tokens} tokens"
    );
    let stats = server.stats();
    assert_eq!((stats.batches.created, stats.batches.resubmitted), (1, 0), "{stats:?}");
    assert!(stats.requests > 20 && stats.requests < 120, "the unanswered ones online: {stats:?}");
}

/// `kill -9` while the batch runs, then `jobs resume`: the batch is found and
/// collected, and no row is submitted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_polling_then_resume_submits_nothing_again() {
    let config = Config { batch_time: Duration::from_secs(2), ..Config::default() };
    let server = MockServer::start(config).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(400));
    let mut child = via_batch(&home, &server, "openai", &[]).spawn().unwrap();
    while server.stats().batches.created == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let output = run(resume(&home)).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_all_answered(&home, 400);
    let stats = server.stats();
    assert_eq!((stats.batches.created, stats.batches.requests), (1, 400), "{stats:?}");
}

/// A crash after the batch was made but before its id was stored: the
/// resumed job finds it by its tag and submits nothing again. A batch that
/// was never made (a crash during the upload) is made on resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_creation_was_not_recorded_is_found_not_made_again() {
    let config = Config { batch_time: Duration::from_millis(500), ..Config::default() };
    let server = MockServer::start(config).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(200));
    let mut child = via_batch(&home, &server, "openai", &[]).spawn().unwrap();
    while server.stats().batches.created == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // What the store holds had the kill come before the batch's id was written.
    let db = rusqlite::Connection::open(home.store()).unwrap();
    db.execute("UPDATE remote_batches SET remote_id = NULL, state = 'uploaded'", []).unwrap();
    let output = run(resume(&home)).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_all_answered(&home, 200);
    assert_eq!(server.stats().batches.created, 1, "found, not made again");

    // Never made: the tag is not at the service, so it is sent.
    let home_two = Home::new();
    home_two.write("rows.jsonl", crate::rows(50));
    let mut child = via_batch(&home_two, &server, "openai", &[]).spawn().unwrap();
    while server.stats().batches.created == 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let db = rusqlite::Connection::open(home_two.store()).unwrap();
    db.execute("UPDATE remote_batches SET remote_id = NULL, state = 'preparing', tag = 'lost'", [])
        .unwrap();
    let output = run(resume(&home_two)).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_all_answered(&home_two, 50);
    assert_eq!(server.stats().batches.created, 3);
}

/// `fanout jobs cancel` cancels the running batch: what it answered is kept,
/// the rest is left unfinished for a resume, and the run says so (exit 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_cancel_cancels_the_remote_batch_and_keeps_what_it_answered() {
    let config = Config { batch_time: Duration::from_secs(4), ..Config::default() };
    let server = MockServer::start(config).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(400));
    let running = via_batch(&home, &server, "openai", &[]);
    let running = tokio::task::spawn_blocking(move || {
        let mut running = running;
        running.output().unwrap()
    });
    while server.stats().batches.created == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut cancel = home.fanout();
    cancel.env("OPENAI_API_KEY", "sk-batch-secret-key").args(["jobs", "cancel", "halfprice"]);
    let cancelled = run(cancel).await;
    assert_eq!(cancelled.status.code(), Some(0), "{}", stderr(&cancelled));
    assert!(stderr(&cancelled).contains("cancelled"), "{}", stderr(&cancelled));
    let output = running.await.unwrap();
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    let answered = read_lines(&home.path("out.jsonl"));
    let answered = answered.iter().filter(|r| r["status"] == "succeeded").count();
    assert!(answered > 0 && answered < 400, "{answered} answered before the cancel");
    let batches = show(&home)["batches"].clone();
    assert_eq!(batches[0]["status"], "cancelled", "{batches}");
    let again = home.fanout().args(["jobs", "cancel", "halfprice"]).output().unwrap();
    assert_eq!(again.status.code(), Some(2), "nothing left to cancel");
    // Resumed, the cancelled rows go in a new batch, and only they.
    let resumed = run(resume(&home)).await;
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    assert_all_answered(&home, 400);
    let stats = server.stats();
    assert_eq!((stats.batches.created, stats.batches.requests), (2, 400 + 400 - answered as u64));
    assert_eq!(stats.batches.most_submissions, 2);
}

/// A spending limit cannot bound a batch, which is paid for whole once made:
/// refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spending_limit_is_refused_with_the_batch_api() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(5));
    let output = run(via_batch(&home, &server, "openai", &["--budget", "1"])).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("--via batch-api"), "{}", stderr(&output));
    assert_eq!(server.stats().batches.created, 0);
}

/// A row too large for a batch fails alone, naming itself; the others go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_too_large_for_a_batch_fails_alone() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let mut rows = crate::rows(20);
    rows.push_str(&format!("{{\"id\":\"row-20\",\"essay\":\"{}\"}}\n", "x".repeat(5000)));
    home.write("rows.jsonl", rows);
    let command = via_batch(&home, &server, "openai", &["--batch-max-bytes", "2000"]);
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let results = read_lines(&home.path("out.jsonl"));
    assert_eq!(results.len(), 21);
    assert!(results[..20].iter().all(|r| r["status"] == "succeeded"));
    let message = results[20]["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("row row-20: its request is"), "{message}");
    let stats = server.stats();
    assert!(stats.batches.created >= 2, "split by bytes: {stats:?}");
    assert_eq!(stats.batches.requests, 20);
}
