use fanout_mock::{Config, MockServer};

use crate::{Home, lines, read_lines, run, stderr};

/// Bad input never stops the job: each bad row fails alone, naming its line.
#[test]
fn bad_rows_fail_alone_and_name_their_line() {
    let home = Home::new();
    let mut input = String::new();
    input.push_str("{\"essay\":\"The sea\"}\n");
    input.push_str("{broken\n");
    input.push('\n');
    input.push_str("{\"title\":\"no essay field\"}\n");
    input.push_str("[1, 2]\n");
    input.push_str(&format!("{{\"essay\":\"{}\"}}\n", "x".repeat(10_000_000)));
    input.push_str("{\"essay\":\"last\"}\n");
    let mut bytes = input.into_bytes();
    bytes.extend_from_slice(b"{\"essay\":\"\xff\xfe\"}\n");
    let path = home.write("essays.jsonl", bytes);
    let output = home
        .fanout()
        .args(["--provider", "mock", "-q", "batch"])
        .arg(&path)
        .args(["--prompt", "Grade: {{ essay }}"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let results = lines(&output.stdout);
    let summary: Vec<(String, String)> = results
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_owned(), r["status"].as_str().unwrap().to_owned()))
        .collect();
    let expected = [
        ("1", "succeeded"),
        ("2", "failed"),
        ("4", "failed"),
        ("5", "failed"),
        ("6", "failed"),
        ("7", "succeeded"),
        ("8", "failed"),
    ];
    assert_eq!(summary, expected.map(|(a, b)| (a.to_owned(), b.to_owned())));
    let message = |i: usize| results[i]["error"]["message"].as_str().unwrap().to_owned();
    assert!(message(1).starts_with("line 2: invalid JSON"), "{}", message(1));
    assert_eq!(message(2), "line 4: the template uses `essay`, which this row does not have");
    assert_eq!(message(3), "line 5: expected a JSON object, found an array");
    assert!(message(4).starts_with("line 6 is 10.0 MB, longer than"), "{}", message(4));
    assert!(message(6).starts_with("line 8: not valid UTF-8"), "{}", message(6));
    assert_eq!(results[5]["answer"], "mock answer: Grade: last");
}

#[test]
fn csv_in_csv_out_with_ids_from_a_field() {
    let home = Home::new();
    let mut input = b"student,essay\nana,The sea\nben,Robots,extra\n".to_vec();
    input.extend_from_slice(b"cy,\xff\n\"dee\",\"Multi\nline\"\n");
    let path = home.write("essays.csv", input);
    let output = home
        .fanout()
        .args(["--provider", "mock", "-q", "batch"])
        .arg(&path)
        .args(["--prompt", "{{ essay }}", "--id", "student", "--output-format", "csv"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let mut reader = csv::Reader::from_reader(&output.stdout[..]);
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    let column = |i: usize, c: usize| records[i].get(c).unwrap().to_owned();
    assert_eq!(records.len(), 4);
    assert_eq!(
        (column(0, 0), column(0, 1), column(0, 2)),
        ("ana".into(), "succeeded".into(), "mock answer: The sea".into())
    );
    assert!(column(1, 3).contains("line 3: 3 fields, but the header has 2"), "{}", column(1, 3));
    assert!(column(2, 3).contains("line 4, field `essay`: not valid UTF-8"), "{}", column(2, 3));
    assert_eq!((column(3, 0), column(3, 2)), ("dee".into(), "mock answer: Multi\nline".into()));
}

/// OpenAI Batch files in, OpenAI Batch results out, through a real endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_batch_format_round_trip() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let line = |id: &str, text: &str| {
        serde_json::json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": "gpt-batch", "max_tokens": 20, "messages": [
                {"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]}})
        .to_string()
    };
    let input = format!(
        "{}\n{}\n{{\"custom_id\":\"bad\",\"body\":{{}}}}\n",
        line("q1", "Capital of France?"),
        line("q2", "Capital of Peru?")
    );
    let path = home.write("requests.jsonl", input);
    let mut command = home.fanout();
    command
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "-q", "batch"])
        .arg(&path);
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let results = lines(&output.stdout);
    assert_eq!(results[0]["custom_id"], "q1");
    assert_eq!(results[0]["response"]["status_code"], 200);
    assert_eq!(results[0]["response"]["body"]["model"], "gpt-batch");
    let answer =
        results[1]["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.ends_with("to: Capital of Peru?"), "{answer}");
    assert_eq!(results[2]["custom_id"], "bad");
    assert!(
        results[2]["error"]["message"].as_str().unwrap().contains("body.messages"),
        "{}",
        results[2]
    );
    assert_eq!(server.stats().requests, 2);
}

/// A template with a syntax error is reported before any call is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_errors_stop_before_any_call() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let path = home.write("rows.jsonl", crate::rows(5));
    let mut command = home.fanout();
    command
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "batch"])
        .arg(&path)
        .args(["--prompt", "{% for x in %}"]);
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("the prompt template is not valid"), "{}", stderr(&output));
    assert_eq!(server.stats().requests, 0);
}

#[test]
fn empty_input_is_a_clear_no_op() {
    let home = Home::new();
    let path = home.write("empty.jsonl", "");
    let output = home
        .fanout()
        .args(["--provider", "mock", "batch"])
        .arg(&path)
        .args(["--prompt", "x"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(stderr(&output).contains("is empty: there is nothing to do"));
}

/// `--cache` answers identical requests from the store, across jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_reuses_answers_for_identical_requests() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let path = home.write("rows.jsonl", crate::rows(20));
    for (job, expected_requests) in [("first", 20), ("second", 20)] {
        let mut command = home.fanout();
        command
            .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "-q", "batch"])
            .arg(&path)
            .args(["--prompt", "{{ essay }}", "--cache", "--job", job, "-o"])
            .arg(home.path(&format!("{job}.jsonl")));
        let output = run(command).await;
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        assert_eq!(
            server.stats().requests,
            expected_requests,
            "the second job was answered from the cache"
        );
    }
    let answers = |name: &str| -> Vec<serde_json::Value> {
        read_lines(&home.path(name)).into_iter().map(|r| r["answer"].clone()).collect()
    };
    assert_eq!(answers("first.jsonl"), answers("second.jsonl"));
}

#[test]
fn ask_prints_the_answer_or_json() {
    let home = Home::new();
    let output = home.fanout().args(["--provider", "mock", "ask", "hello"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), "mock answer: hello\n");
    let output =
        home.fanout().args(["--provider", "mock", "--json", "ask", "hello"]).output().unwrap();
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (result["status"].as_str(), result["attempts"].as_u64()),
        (Some("succeeded"), Some(1))
    );
    // batch's schema: the latency in milliseconds, named so.
    assert!(result["latency_ms"].is_number() && result.get("latency").is_none(), "{result}");
    assert_eq!(result["answer"], "mock answer: hello");
}

/// Results go to stdout only; off a terminal stderr has the summary, no progress bar.
#[test]
fn stdout_carries_results_and_stderr_the_summary() {
    let home = Home::new();
    let path = home.write("rows.jsonl", crate::rows(30));
    let output = home
        .fanout()
        .args(["--provider", "mock", "batch"])
        .arg(&path)
        .args(["--prompt", "{{ essay }}"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(lines(&output.stdout).len(), 30, "every stdout line is a result");
    let message = stderr(&output);
    assert!(message.contains("succeeded") && message.contains("30"), "{message}");
    assert!(
        !message.contains("ETA") && !message.contains('\r'),
        "no progress bar off a terminal: {message}"
    );
}

/// `fanout batch ... | head -1`: when the reader goes, the run ends quietly
/// with 0, launches nothing more, and what finished is in the store.
#[test]
fn a_closed_pipe_ends_quietly_and_keeps_what_finished() {
    use std::io::BufRead;
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(20_000));
    let mut child = home
        .fanout()
        .args(["--provider", "mock", "-q", "batch", "rows.jsonl", "--prompt", "Grade: {{ essay }}"])
        .args(["--id", "id", "--job", "piped"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.contains("\"id\":\"row-0\""), "{first}");
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stderr(&output), "", "a quiet end");
    let db = rusqlite::Connection::open(home.store()).unwrap();
    let stored: i64 = db.query_row("SELECT count(*) FROM tasks", [], |row| row.get(0)).unwrap();
    assert!((1..20_000).contains(&stored), "{stored} stored: the run stopped launching");
}

/// `--keep` carries input fields beside each answer in JSONL (as `input`),
/// CSV (a column each) and the export, for answered and failed rows alike.
#[test]
fn kept_fields_travel_beside_the_answers() {
    let home = Home::new();
    let input = "{\"id\":\"a\",\"name\":\"Ann\",\"grade\":5,\"essay\":\"The sea\"}\n\
                 {\"id\":\"b\",\"name\":\"Ben\",\"grade\":6}\n";
    let path = home.write("essays.jsonl", input);
    let batch = |extra: &[&str]| {
        home.fanout()
            .args(["--provider", "mock", "-q", "batch"])
            .arg(&path)
            .args(["--prompt", "{{ essay }}", "--id", "id"])
            .args(extra)
            .output()
            .unwrap()
    };
    let output = batch(&["--keep", "name,grade", "--job", "kept"]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let results = lines(&output.stdout);
    assert_eq!(results[0]["input"], serde_json::json!({"name": "Ann", "grade": 5}));
    assert_eq!(results[0]["finish_reason"], "stop");
    assert_eq!(results[1]["status"], "failed", "no essay field");
    assert_eq!(results[1]["input"], serde_json::json!({"name": "Ben", "grade": 6}));

    let all = batch(&["--keep", "*", "--output-format", "csv", "--job", "all"]);
    let mut reader = csv::Reader::from_reader(&all.stdout[..]);
    let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_owned).collect();
    // The kept fields in the row's own order.
    assert_eq!(header[8..], ["finish_reason", "model", "input.id", "name", "grade", "essay"]);
    let first = reader.records().next().unwrap().unwrap();
    assert_eq!((&first[13], &first[12], &first[11]), ("The sea", "5", "Ann"));

    let exported = home.fanout().args(["jobs", "export", "kept"]).output().unwrap();
    let exported = lines(&exported.stdout);
    assert_eq!(exported[1]["input"], serde_json::json!({"name": "Ben", "grade": 6}));
}

/// `--image FIELD`: a row's image path (beside the input file) is sent as an
/// image; a missing file or field fails that row alone, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_rows_send_their_pictures_and_bad_ones_fail_alone() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    home.write("pixel.png", [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 0x0D]);
    let path = home.write(
        "photos.jsonl",
        "{\"photo\":\"pixel.png\"}\n{\"photo\":\"gone.png\"}\n{\"caption\":\"no photo\"}\n",
    );
    let mut command = home.fanout();
    command
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "-q", "batch"])
        .arg(&path)
        .args(["--prompt", "Describe the photo.", "--image", "photo"]);
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let results = lines(&output.stdout);
    assert_eq!(results[0]["status"], "succeeded", "{}", results[0]);
    let message = |i: usize| results[i]["error"]["message"].as_str().unwrap().to_owned();
    assert!(message(1).starts_with("line 2, field `photo`: image "), "{}", message(1));
    assert!(message(1).contains("gone.png"), "{}", message(1));
    assert_eq!(message(2), "line 3, field `photo`: no image (the field is missing)");
    assert_eq!(server.stats().requests, 1, "only the readable image was sent");
}
