//! Prices, budgets and the cost figures, as a user meets them.

use crate::{Home, lines, rows, stderr};

/// `--provider mock` with a price of $1,000 per million tokens either way:
/// a token costs a tenth of a cent, so a budget of cents allows a few calls.
fn priced_batch(home: &Home, job: &str, extra: &[&str]) -> std::process::Output {
    let path = home.write("essays.jsonl", rows(30));
    home.fanout()
        .args(["--provider", "mock", "--price-in", "1000", "--price-out", "1000", "-c", "4"])
        .args(["--max-tokens", "20", "--json", "batch"])
        .arg(&path)
        .args(["--prompt", "Grade: {{ essay }}", "--id", "id", "--job", job])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn a_budget_stops_new_calls_and_a_resume_with_more_goes_on() {
    let home = Home::new();
    let output = priced_batch(&home, "graded", &["--budget", "0.3"]);
    let said = stderr(&output);
    assert_eq!(output.status.code(), Some(4), "{said}");
    assert!(said.contains("the spending limit is reached: $0.2"), "{said}");
    assert!(
        said.contains("resume with a larger limit: fanout jobs resume graded --budget DOLLARS"),
        "{said}"
    );
    let first: Vec<_> =
        lines(&output.stdout).into_iter().filter(|r| r["status"] == "succeeded").collect();
    assert!((5..30).contains(&first.len()), "{} rows within $0.30", first.len());
    let totals: serde_json::Value =
        serde_json::from_str(said.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
    let spent = totals["cost"].as_f64().unwrap();
    assert!(spent <= 0.3, "never past the budget: {spent}");

    // A dry run of the rest counts the finished rows apart and projects the
    // output from their answers.
    let dry =
        home.fanout().args(["--json", "jobs", "resume", "graded", "--dry-run"]).output().unwrap();
    let dry: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(dry["finished"].as_u64().unwrap() as usize, first.len(), "{dry}");
    assert_eq!(dry["calls"].as_u64().unwrap() as usize, 30 - first.len());
    assert!(
        dry["output_tokens_likely"].as_u64().unwrap() < dry["output_tokens_max"].as_u64().unwrap()
    );

    // The same budget again: already spent, nothing is called.
    let again = home
        .fanout()
        .args(["--json", "jobs", "resume", "graded", "--budget", "0.3"])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(4), "{}", stderr(&again));
    // More budget: the rest runs, and nothing finished is asked again.
    let resumed = home
        .fanout()
        .args(["--json", "jobs", "resume", "graded", "--budget", "10"])
        .output()
        .unwrap();
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    let all = lines(&resumed.stdout);
    assert_eq!(all.iter().filter(|r| r["status"] == "succeeded").count(), 30);
    let resumed_totals: serde_json::Value =
        serde_json::from_str(stderr(&resumed).lines().find(|l| l.starts_with('{')).unwrap())
            .unwrap();
    assert_eq!(resumed_totals["calls"].as_u64().unwrap() as usize, 30 - first.len());

    let shown = home.fanout().args(["jobs", "show", "graded"]).output().unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert!(shown["cost"].as_f64().unwrap() > spent, "{shown}");
    assert_eq!(shown["last_run"]["calls"], resumed_totals["calls"]);
    // The raised budget is the job's now: a later resume starts from it.
    assert_eq!(shown["settings"]["settings"]["budget"], 10.0, "{shown}");
}

#[test]
fn a_budget_below_one_call_or_without_a_price_is_refused_before_any_call() {
    let home = Home::new();
    let output = priced_batch(&home, "tiny", &["--budget", "0.001"]);
    let said = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{said}");
    assert!(said.contains("--budget 0.001 is less than one call"), "{said}");
    assert!(said.contains("tokens in and 20 out, $0.0"), "{said}");
    assert!(output.stdout.is_empty());

    let path = home.write("one.jsonl", rows(1));
    let unpriced = home
        .fanout()
        .args(["--provider", "mock", "--budget", "1", "batch"])
        .arg(&path)
        .args(["--prompt", "{{ essay }}"])
        .output()
        .unwrap();
    let said = stderr(&unpriced);
    assert_eq!(unpriced.status.code(), Some(2), "{said}");
    assert!(
        said.contains("--budget needs a price, and none is known for model `mock-1`"),
        "{said}"
    );
}

#[test]
fn a_token_limit_stops_the_run_like_a_budget() {
    let home = Home::new();
    let output = priced_batch(&home, "tokens", &["--max-total-tokens", "200"]);
    let said = stderr(&output);
    assert_eq!(output.status.code(), Some(4), "{said}");
    assert!(said.contains("of the 200 tokens allowed"), "{said}");
}

#[test]
fn known_models_are_priced_from_the_table_and_unknown_ones_say_so() {
    let home = Home::new();
    let path = home.write("essays.jsonl", rows(3));
    let priced = home
        .fanout()
        .args(["--provider", "mock", "--model", "gpt-4o-mini", "--json", "batch"])
        .arg(&path)
        .args(["--prompt", "{{ essay }}"])
        .output()
        .unwrap();
    let said = stderr(&priced);
    let totals: serde_json::Value =
        serde_json::from_str(said.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
    let usage = &totals["usage"];
    let expected = usage["input_tokens"].as_f64().unwrap() * 0.15 / 1e6
        + usage["output_tokens"].as_f64().unwrap() * 0.60 / 1e6;
    assert!((totals["cost"].as_f64().unwrap() - expected).abs() < 1e-12, "{totals}");

    let unknown = home
        .fanout()
        .args(["--provider", "mock", "batch"])
        .arg(&path)
        .args(["--prompt", "{{ essay }}", "--job", "unknown"])
        .output()
        .unwrap();
    let said = stderr(&unknown);
    assert_eq!(said.matches("no price for this model").count(), 1, "said once: {said}");
}

/// A dry run calls nothing, names the rows that would fail, and counts the
/// prompt tokens of an OpenAI model with its tokenizer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_counts_without_calling() {
    let server = fanout_mock::MockServer::start(fanout_mock::Config::default()).await.unwrap();
    let home = Home::new();
    let path = home.write(
        "rows.jsonl",
        "{\"q\":\"Hello world\"}\n{\"q\":\"Hello world\"}\n{\"other\":1}\n{broken\n",
    );
    let mut command = home.fanout();
    command
        .args(["--provider", "openai", "--base-url", &server.openai_base_url()])
        .args(["--model", "gpt-4o-mini", "--max-tokens", "100", "--json", "batch"])
        .arg(&path)
        .args(["--prompt", "{{ q }}", "--dry-run", "--job", "dry"]);
    let output = crate::run(command).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(server.stats().requests, 0, "a dry run calls nothing");
    assert_eq!((report["rows"].as_u64(), report["calls"].as_u64()), (Some(4), Some(2)));
    assert_eq!(report["invalid"], 2);
    assert!(report["invalid_rows"][0].as_str().unwrap().contains("line 3"), "{report}");
    // o200k_base: "Hello world" is 2 tokens; a chat prompt adds 3 per message,
    // 1 for the role and 3 to prime the reply: 9 a row.
    assert_eq!(report["input_tokens"], 18);
    assert!(report["tokens_counted"].as_str().unwrap().starts_with("exact"));
    assert_eq!(report["output_tokens_max"], 200);
    let max = 18.0 * 0.15 / 1e6 + 200.0 * 0.60 / 1e6;
    assert!((report["cost_max"].as_f64().unwrap() - max).abs() < 1e-12, "{report}");
    assert_eq!(report["prices_checked"], "2026-12-01");
    let jobs = home.fanout().args(["--json", "jobs", "list"]).output().unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&jobs.stdout).unwrap(),
        serde_json::json!([]),
        "no job is made"
    );
}

/// Without a tokenizer the count is an estimate, said so; without
/// --max-tokens, the output bound is what the provider asks for (Anthropic
/// sends 1,024); no key is needed to count.
#[test]
fn a_dry_run_without_a_tokenizer_says_it_estimates() {
    let home = Home::new();
    let path = home.write("essays.jsonl", rows(3));
    let output = home
        .fanout()
        .args(["--provider", "anthropic", "--json", "batch"])
        .arg(&path)
        .args(["--prompt", "{{ essay }}", "--dry-run"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(report["tokens_counted"].as_str().unwrap().starts_with("estimated"), "{report}");
    assert_eq!(report["output_tokens_max"], 3 * 1024);
    assert_eq!(report["model"], "claude-3-5-haiku-latest");
    assert!(report["cost_max"].as_f64().unwrap() > 0.0, "priced from the table");
}
