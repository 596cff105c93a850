//! The embedded model as the default provider, on a tiny random GGUF.

use fanout_mock::{Config, MockServer};

use crate::{Home, run, stderr};

fn tiny(home: &Home) -> std::path::PathBuf {
    let path = home.path("tiny.gguf");
    fanout_local::tiny::write_tiny_gguf(&path, 7).unwrap();
    path
}

#[test]
fn with_nothing_configured_the_local_model_answers() {
    let home = Home::new();
    let model = tiny(&home);
    let output =
        home.fanout().env("FANOUT_MODEL", &model).args(["--json", "ask", "hi"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["model"], "tiny-random-llama");
    assert!(result["usage"]["input_tokens"].as_u64().unwrap() > 5, "{result}");

    // A batch over every row, in parallel, with the row's fields in the prompt.
    home.write("essays.jsonl", "{\"id\":\"a\",\"essay\":\"Trees help.\"}\n{\"id\":\"b\",\"essay\":\"Cats nap.\"}\n{\"id\":\"c\",\"essay\":\"Rain falls.\"}\n");
    let output = home
        .fanout()
        .args(["--model", model.to_str().unwrap(), "--threads", "1", "--max-tokens", "6", "-q"])
        .args([
            "batch",
            "essays.jsonl",
            "--prompt",
            "Grade: {{ essay }}",
            "--id",
            "id",
            "-o",
            "out.jsonl",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(home.path("out.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.iter().map(|r| r["id"].as_str().unwrap()).collect::<Vec<_>>(), ["a", "b", "c"]);
    for row in &rows {
        assert_eq!(row["status"], "succeeded", "{row}");
        assert!((1..=6).contains(&row["usage"]["output_tokens"].as_u64().unwrap()), "{row}");
    }
}

#[test]
fn patterns_run_on_the_local_model() {
    let home = Home::new();
    let model = tiny(&home);
    let output = home
        .fanout()
        .env("FANOUT_MODEL", &model)
        .args([
            "--json",
            "--max-tokens",
            "4",
            "vote",
            "Pick a letter",
            "-n",
            "5",
            "--temperature",
            "1.0",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let vote: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(vote["calls"], 5, "{vote}");
}

/// `--kv-memory` bounds the local model's KV cache: a row that cannot fit is
/// refused with its token count and the budget, and the rows that fit go on.
#[test]
fn kv_memory_bounds_the_cache_and_a_row_too_large_fails_alone() {
    let home = Home::new();
    let model = tiny(&home);
    // The tiny model keeps 512 bytes per position: 64 KiB holds 128 positions.
    let long = "word ".repeat(150);
    home.write(
        "rows.jsonl",
        format!("{{\"id\":\"short\",\"text\":\"hi\"}}\n{{\"id\":\"long\",\"text\":\"{long}\"}}\n"),
    );
    let output = home
        .fanout()
        .env("FANOUT_MODEL", &model)
        .args(["--kv-memory", "64KiB", "--threads", "1", "--max-tokens", "4", "-q"])
        .args(["batch", "rows.jsonl", "--prompt", "{{ text }}", "--id", "id", "-o", "out.jsonl"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(home.path("out.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows[0]["status"], "succeeded", "{}", rows[0]);
    assert_eq!(rows[1]["status"], "failed", "{}", rows[1]);
    let error = rows[1]["error"]["message"].as_str().unwrap();
    assert!(error.contains("KV memory budget of 64.0 KiB holds (128 tokens)"), "{error}");
    // A size that is not one is refused before anything runs.
    let output = home.fanout().args(["--kv-memory", "lots", "ask", "hi"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("--kv-memory"), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_in_the_environment_chooses_that_provider() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let mut command = home.fanout();
    command
        .env("OPENAI_API_KEY", "sk-test")
        .env("OPENAI_BASE_URL", server.openai_base_url())
        .args(["--json", "ask", "hi"]);
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["model"], "gpt-4o-mini");
}

#[test]
fn models_path_and_pull_report_where_the_model_is() {
    let home = Home::new();
    // Nothing anywhere: one message with the command that fixes it.
    let output = home.fanout().args(["models", "path"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("Run `fanout models pull`"), "{}", stderr(&output));
    let output = home.fanout().args(["models", "pull"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(message.contains("from the hub") && message.contains("through pip"), "{message}");

    // In the cache: found there, and pull has nothing to do.
    std::fs::create_dir_all(home.path("models")).unwrap();
    let cached = home.path("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    fanout_local::tiny::write_tiny_gguf(&cached, 1).unwrap();
    let output = home.fanout().args(["models", "path"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("{}\tthe cache", cached.display())
    );
    let output = home.fanout().args(["models", "pull"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(stderr(&output).contains("already"), "{}", stderr(&output));

    // A --model path that does not exist is named.
    let output =
        home.fanout().args(["--model", "nowhere/model.gguf", "ask", "hi"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("nowhere/model.gguf does not exist"), "{}", stderr(&output));
}

/// The README's first command, as written, on a tiny model: it must keep working.
#[test]
fn the_readme_first_command_runs() {
    let readme = include_str!("../../../../README.md");
    let line = readme
        .lines()
        .find(|l| l.starts_with("cargo run -q -p fanout-cli -- "))
        .expect("the first command");
    let args: Vec<&str> =
        line.trim_start_matches("cargo run -q -p fanout-cli -- ").split_whitespace().collect();
    let home = Home::new();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    std::fs::create_dir_all(home.path("examples")).unwrap();
    for file in ["essays.jsonl", "grade.jinja"] {
        std::fs::copy(format!("{examples}/{file}"), home.path(&format!("examples/{file}")))
            .unwrap();
    }
    let output = home.fanout().env("FANOUT_MODEL", tiny(&home)).args(&args).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let graded = std::fs::read_to_string(home.path("grades.jsonl")).unwrap();
    let essays = std::fs::read_to_string(home.path("examples/essays.jsonl")).unwrap();
    assert_eq!(graded.lines().count(), essays.lines().count());
    assert!(graded.lines().all(|l| l.contains("\"status\":\"succeeded\"")), "{graded}");
}

/// A dry run on the embedded model counts prompts with the GGUF's own
/// tokenizer and chat template, and prices them at nothing.
#[test]
fn a_dry_run_counts_with_the_models_own_tokenizer() {
    let home = Home::new();
    let model = tiny(&home);
    home.write("essays.jsonl", "{\"essay\":\"Trees help.\"}\n{\"essay\":\"Cats nap.\"}\n");
    let output = home
        .fanout()
        .env("FANOUT_MODEL", &model)
        .args(["--json", "--max-tokens", "8", "batch", "essays.jsonl", "--prompt", "{{ essay }}"])
        .arg("--dry-run")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(report["tokens_counted"].as_str().unwrap().contains("the local model's tokenizer"));
    assert!(report["input_tokens"].as_u64().unwrap() > 2 * 3, "{report}");
    assert_eq!(
        (report["cost_max"].as_f64(), report["output_tokens_max"].as_u64()),
        (Some(0.0), Some(16))
    );
}

/// `--schema` on the local model constrains its decoding: even the tiny
/// random model's answers parse and follow the schema, with no repairs.
#[test]
fn a_schema_constrains_the_local_models_answers() {
    let home = Home::new();
    let model = tiny(&home);
    home.write(
        "rows.jsonl",
        "{\"essay\":\"The sea\"}\n{\"essay\":\"Robots\"}\n{\"essay\":\"Rain\"}\n",
    );
    let schema = r#"{"type": "object",
        "properties": {"grade": {"type": "integer", "minimum": 1, "maximum": 5},
                       "verdict": {"enum": ["pass", "fail"]}},
        "required": ["grade", "verdict"], "additionalProperties": false}"#;
    home.write("grade.json", schema);
    let output = home
        .fanout()
        .env("FANOUT_MODEL", &model)
        .args(["--threads", "1", "--temperature", "1.0", "--max-tokens", "40", "--json"])
        .args(["batch", "rows.jsonl", "--prompt", "Grade: {{ essay }}", "--schema", "grade.json"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let rows = crate::lines(&output.stdout);
    assert_eq!(rows.len(), 3);
    for row in &rows {
        let answer = &row["output"];
        assert!((1..=5).contains(&answer["grade"].as_i64().unwrap()), "{row}");
        assert!(["pass", "fail"].contains(&answer["verdict"].as_str().unwrap()), "{row}");
    }
    let said = stderr(&output);
    let totals: serde_json::Value =
        serde_json::from_str(said.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
    assert_eq!((&totals["succeeded"], &totals["repairs"]), (&3.into(), &0.into()), "{totals}");
}
