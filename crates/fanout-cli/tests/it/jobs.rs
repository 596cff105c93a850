use std::time::Duration;

use fanout_mock::{Config, MockServer};

use crate::{Home, lines, read_lines, run, stderr};

fn batch(home: &Home, server: &MockServer, job: &str, extra: &[&str]) -> std::process::Command {
    let mut command = home.fanout();
    command
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "-q", "batch"])
        .arg(home.path("rows.jsonl"))
        .args(["--prompt", "Grade: {{ essay }}", "--id", "id", "--job", job])
        .args(extra);
    command
}

/// A run stopped by its deadline keeps what finished; resuming calls only for
/// the rest and writes every row once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_then_resume_finishes_every_row_once() {
    let config =
        Config { latency: Duration::from_millis(100), count_prompts: true, ..Config::default() };
    let server = MockServer::start(config).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(60));
    let first = run(batch(
        &home,
        &server,
        "essays",
        &["-c", "10", "--deadline", "0.35", "-o", "part.jsonl"],
    ))
    .await;
    assert_eq!(first.status.code(), Some(4), "{}", stderr(&first));
    let message = stderr(&first);
    assert!(message.contains("resume with: fanout jobs resume essays"), "{message}");
    let partial = read_lines(&home.path("part.jsonl"));
    assert_eq!(partial.len(), 60, "every row has a line, finished or not");
    let finished: Vec<String> = partial
        .iter()
        .filter(|r| r["status"] == "succeeded")
        .map(|r| format!("Grade: {}", r["id"].as_str().unwrap().replace("row-", "essay number ")))
        .collect();
    assert!(!finished.is_empty() && finished.len() < 60, "{} finished", finished.len());

    let before = server.stats().prompts;
    let mut resume = home.fanout();
    // The job's own deadline would stop this run too; a flag given now replaces it.
    resume.args(["-q", "--deadline", "60", "--store"]).arg(home.store()).args([
        "jobs",
        "resume",
        "essays",
        "-o",
        "all.jsonl",
    ]);
    let second = run(resume).await;
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    let after = server.stats().prompts;
    for prompt in &finished {
        assert_eq!(
            after.get(prompt),
            before.get(prompt),
            "{prompt} finished in the first run and was asked again"
        );
    }
    let all = read_lines(&home.path("all.jsonl"));
    let ids: Vec<_> = all.iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, (0..60).map(|i| format!("row-{i}")).collect::<Vec<_>>());
    assert!(all.iter().all(|r| r["status"] == "succeeded"));
}

/// Resuming with a changed input is refused, naming what changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_input_is_refused_with_what_changed() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(5));
    assert_eq!(run(batch(&home, &server, "essays", &[])).await.status.code(), Some(0));
    home.write("rows.jsonl", crate::rows(6));
    let output = run(batch(&home, &server, "essays", &[])).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("job `essays` was started with a different input file"),
        "{}",
        stderr(&output)
    );
    let mut command = batch(&home, &server, "essays", &[]);
    command.args(["--system", "Be strict."]);
    home.write("rows.jsonl", crate::rows(5));
    let output = run(command).await;
    assert!(stderr(&output).contains("different system prompt"), "{}", stderr(&output));
    assert_eq!(server.stats().requests, 5);
}

/// A job stored by the first version (its fingerprint hashed Rust's `Debug`
/// text and had no version) is the same job to this one: it resumes, and its
/// fingerprint is stored anew under the current version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_stored_by_the_first_version_resumes() {
    use sha2::{Digest, Sha256};
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(5));
    assert_eq!(run(batch(&home, &server, "essays", &[])).await.status.code(), Some(0));
    let db = rusqlite::Connection::open(home.store()).unwrap();
    let read = || -> serde_json::Value {
        let text: String = db
            .query_row("SELECT fingerprint FROM jobs WHERE name = 'essays'", [], |r| r.get(0))
            .unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let mut fingerprint = read();
    assert_eq!(fingerprint["fingerprint version"], "2");
    // What the first version wrote for these settings.
    let debug_text = format!(
        r#"Jsonl|Some("id")|Openai|gpt-4o-mini|Some("{}")|None|None"#,
        server.openai_base_url()
    );
    let object = fingerprint.as_object_mut().unwrap();
    object.remove("fingerprint version");
    object.insert(
        "provider, model or parameters".into(),
        format!("{:x}", Sha256::digest(debug_text.as_bytes())).into(),
    );
    db.execute("UPDATE jobs SET fingerprint = ?1 WHERE name = 'essays'", [fingerprint.to_string()])
        .unwrap();
    let output = run(batch(&home, &server, "essays", &[])).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(server.stats().requests, 5, "nothing was asked again");
    assert_eq!(read()["fingerprint version"], "2");
    // Run again, not quietly: a finished job says there is nothing left to run.
    let mut again = home.fanout();
    again
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "batch"])
        .arg(home.path("rows.jsonl"))
        .args(["--prompt", "Grade: {{ essay }}", "--id", "id", "--job", "essays"]);
    let output = run(again).await;
    assert!(
        stderr(&output).contains("5 tasks already finished; nothing left to run"),
        "{}",
        stderr(&output)
    );
}

/// Failed tasks stay failed on resume unless --retry-failed asks for them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tasks_are_retried_only_on_request() {
    let config = Config { error_rate: 0.5, seed: 3, ..Config::default() };
    let server = MockServer::start(config).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(40));
    let first = run(batch(&home, &server, "flaky", &["--retries", "0", "-c", "4"])).await;
    assert_eq!(first.status.code(), Some(3));
    let failed = lines(&first.stdout).iter().filter(|r| r["status"] == "failed").count() as u64;
    assert!(failed > 5, "{failed}");
    let requests = server.stats().requests;
    let again = run(batch(&home, &server, "flaky", &["--retries", "0"])).await;
    assert_eq!(again.status.code(), Some(3));
    assert_eq!(server.stats().requests, requests, "nothing was asked again");
    let retried = run(batch(&home, &server, "flaky", &["--retries", "20", "--retry-failed"])).await;
    assert_eq!(retried.status.code(), Some(0), "{}", stderr(&retried));
    assert!(server.stats().requests >= requests + failed);
    assert!(lines(&retried.stdout).iter().all(|r| r["status"] == "succeeded"));
}

#[test]
fn list_show_export_and_remove() {
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(3));
    let store = home.store();
    let fanout = || {
        let mut command = home.fanout();
        command.arg("--store").arg(&store);
        command
    };
    let output = fanout()
        .args([
            "--provider",
            "mock",
            "-q",
            "batch",
            "rows.jsonl",
            "--prompt",
            "{{ essay }}",
            "--job",
            "demo",
            "-o",
            "out.jsonl",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let list = fanout().args(["--json", "jobs", "list"]).output().unwrap();
    let jobs: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!((jobs[0]["name"].as_str(), jobs[0]["finished"].as_u64()), (Some("demo"), Some(3)));
    let show: serde_json::Value =
        serde_json::from_slice(&fanout().args(["jobs", "show", "demo"]).output().unwrap().stdout)
            .unwrap();
    assert_eq!(show["settings"]["prompt"], "{{ essay }}");
    assert!(show["fingerprint"]["input file"].is_string());
    let export = fanout().args(["jobs", "export", "demo"]).output().unwrap();
    assert_eq!(lines(&export.stdout), read_lines(&home.path("out.jsonl")));
    let csv = fanout().args(["jobs", "export", "demo", "--output-format", "csv"]).output().unwrap();
    assert!(String::from_utf8_lossy(&csv.stdout).starts_with("id,status,answer,error"));
    assert_eq!(fanout().args(["jobs", "rm", "demo"]).output().unwrap().status.code(), Some(0));
    let missing = fanout().args(["jobs", "show", "demo"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr(&missing).contains("there is no job `demo`"));
}

/// The first Ctrl-C stops launching and lets in-flight calls finish, then says
/// how to resume; everything finished is saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_ctrl_c_drains_saves_and_prints_the_resume_command() {
    let config = Config { latency: Duration::from_millis(400), ..Config::default() };
    let server = MockServer::start(config).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(40));
    let mut command = batch(&home, &server, "stopped", &["-c", "5", "-o", "out.jsonl"]);
    command.stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null());
    let child = command.spawn().unwrap();
    // Interrupt once the whole second wave is in flight (it takes 400 ms),
    // however slowly the process started: its slots free as the first wave's
    // results are committed, so they may launch a few milliseconds apart.
    while server.stats().requests < 10 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let interrupt = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupt.success());
    let output =
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(4), "{message}");
    assert!(message.contains("stopping: no new calls"), "{message}");
    assert!(message.contains("fanout jobs resume stopped"), "{message}");
    let results = read_lines(&home.path("out.jsonl"));
    let succeeded = results.iter().filter(|r| r["status"] == "succeeded").count();
    // The provider check opened all 5 slots at once: two waves of 5; the
    // interrupt while the second was in flight let it finish and launched
    // nothing more.
    assert_eq!(succeeded, 10, "in-flight calls finished and were saved");
    assert_eq!(server.stats().requests, 10, "nothing new was launched");
}
