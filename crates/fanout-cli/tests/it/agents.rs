//! Parts that work as agents, from the command line: the shipped examples on
//! `fanout-mock` (which calls the tools it is offered), an MCP server from the
//! config file, and the refusals that come before any call.

use std::path::PathBuf;

use fanout_mock::{Config, MockServer};
use serde_json::Value;

use crate::{Home, run, stderr};

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
        .canonicalize()
        .unwrap()
}

fn json(output: &std::process::Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(output)))
}

fn step<'a>(result: &'a Value, name: &str) -> &'a Value {
    result["steps"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()
}

/// What the first tool call of a step's agent gave back.
fn first_tool_output(step: &Value) -> &str {
    step["transcript"]["turns"][0]["tools"][0]["output"].as_str().unwrap_or_default()
}

/// `examples/research_agents.toml` as shipped: three agents read the library
/// with the file tools at once, then the report cites them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_research_example_runs_as_shipped() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let mut command = home.fanout();
    command
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "--json", "run"])
        .arg(example("research_agents.toml"));
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let result = json(&output);
    for (agent, found) in [("history", "Gutenberg"), ("economy", "industry"), ("culture", "Luther")]
    {
        let step = step(&result, agent);
        assert_eq!(step["transcript"]["turns"][0]["tools"][0]["call"]["name"], "read_file");
        assert!(first_tool_output(step).contains(found), "{agent}: {step}");
        assert!(step["text"].as_str().unwrap().contains(found), "the answer quotes what it read");
    }
    assert!(step(&result, "report")["text"].is_string());
    assert_eq!(result["outputs"], serde_json::json!(["report"]));
    // Two turns per agent (the tool call, then the answer), one for the report.
    assert_eq!(server.stats().requests, 7);
}

/// `examples/fact_check.toml` as shipped: five claims checked at once, then a table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fact_check_example_runs_as_shipped() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let mut command = home.fanout();
    command
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "--json", "run"])
        .arg(example("fact_check.toml"));
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let result = json(&output);
    for claim in 1..=5 {
        let step = step(&result, &format!("claim_{claim}"));
        assert!(first_tool_output(step).contains("42-line Bible"), "claim {claim}: {step}");
    }
    assert!(step(&result, "verdicts")["text"].is_string());
    assert_eq!(server.stats().requests, 11);
}

/// `--tools NAME` starts the config file's `[mcp.NAME]` server once and gives
/// its tools to every section.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sections_use_an_mcp_server_of_the_config_file() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let test_server = concat!(env!("CARGO_MANIFEST_DIR"), "/../fanout/tests/mcp/test_server.py");
    let config = home.write(
        "fanout.toml",
        format!("[mcp.notes]\ncommand = \"python3\"\nargs = [\"{test_server}\", \"stdio\"]\n"),
    );
    let mut command = home.fanout();
    command
        .args(["--config"])
        .arg(&config)
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "--json"])
        .args(["sections", "--tools", "notes", "--section", "a=Call echo with text=hello"])
        .args(["--section", "b=Call echo with text=world"]);
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let result = json(&output);
    for (part, word) in result["parts"].as_array().unwrap().iter().zip(["hello", "world"]) {
        assert!(
            part["text"].as_str().unwrap().ends_with(&format!("| from tools: {word}")),
            "{part}"
        );
        assert_eq!(part["transcript"]["turns"][0]["tools"][0]["call"]["name"], "echo");
    }
}

/// Tool sets that do not exist, file tools without a folder, and folders that
/// do not exist are refused (exit 2) before any call, saying what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tool_settings_are_refused_before_any_call() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let refused = |args: &'static [&'static str], says: &'static str| {
        let mut command = home.fanout();
        command
            .args(["--provider", "openai", "--base-url", &server.openai_base_url()])
            .args(["sections", "--section", "a=q"])
            .args(args);
        async move {
            let output = run(command).await;
            assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
            assert!(stderr(&output).contains(says), "{args:?}: {}", stderr(&output));
        }
    };
    refused(&["--tools", "docs"], "no tool set `docs`: declare it as [mcp.docs]").await;
    refused(&["--tools", "files"], "the `files` tools need --allow-dir FOLDER").await;
    refused(&["--allow-dir", "no-such-folder"], "--allow-dir no-such-folder:").await;
    let workflow =
        home.write("flow.toml", "[[step]]\nname = \"a\"\nprompt = \"q\"\ntools = [\"web\"]\n");
    let mut command = home.fanout();
    command
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "run"])
        .arg(&workflow);
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("no tool set `web`"), "{}", stderr(&output));
    assert_eq!(server.stats().requests, 0);
}

/// A workflow declares its own MCP server (`[mcp.NAME]`) and a step names it
/// in `tools`; steps without tools stay single calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_step_uses_the_mcp_server_it_declares() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let test_server = concat!(env!("CARGO_MANIFEST_DIR"), "/../fanout/tests/mcp/test_server.py");
    let workflow = home.write(
        "flow.toml",
        format!(
            "[mcp.notes]\ncommand = \"python3\"\nargs = [\"{test_server}\", \"stdio\"]\n\n\
             [[step]]\nname = \"look\"\ntools = [\"notes\"]\nprompt = \"Call echo with text=found-it\"\n\n\
             [[step]]\nname = \"tell\"\nprompt = \"Tell: {{{{ steps.look }}}}\"\n"
        ),
    );
    let mut command = home.fanout();
    command
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "--json", "run"])
        .arg(&workflow);
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let result = json(&output);
    let look = step(&result, "look");
    assert_eq!(first_tool_output(look), "found-it");
    assert!(look["text"].as_str().unwrap().ends_with("| from tools: found-it"), "{look}");
    assert!(step(&result, "tell")["transcript"].is_null(), "a step without tools is one call");
    assert_eq!(server.stats().requests, 3);
}
