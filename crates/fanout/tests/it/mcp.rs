//! MCP tools against real servers: the reference filesystem server from npm
//! (installed by `.ci/run`), and the suite's own (`tests/mcp/test_server.py`)
//! for the faults, over stdio and streamable HTTP on 127.0.0.1. Real
//! processes, so real time: the only waits are the short tool timeouts.

use std::path::PathBuf;
use std::time::Duration;

use fanout::agent::mcp::McpServer;
use fanout::{
    Agent, Behavior, Branch, Ending, Executor, MockProvider, Request, Response, Role, ToolCall,
    Toolbox, Usage,
};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

const START: Duration = Duration::from_secs(60);

/// The reference filesystem server's entry point (`FANOUT_MCP_SERVERS`, or
/// `target/mcp-servers` where `.ci/run` installs it). CI must have it; a
/// developer without it is told how to get it and the test does not run.
fn filesystem_server() -> Option<PathBuf> {
    let root = std::env::var_os("FANOUT_MCP_SERVERS").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/mcp-servers")
    });
    let entry = root.join("node_modules/@modelcontextprotocol/server-filesystem/dist/index.js");
    if entry.exists() {
        return Some(entry);
    }
    let how = "npm install --prefix target/mcp-servers @modelcontextprotocol/server-filesystem";
    if std::env::var_os("CI").is_some() {
        panic!("CI must install the reference MCP server: {how}");
    }
    eprintln!("reference MCP server not found at {}: skipped (run `{how}`)", entry.display());
    None
}

fn test_server() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/test_server.py").to_owned()
}

async fn stdio_test_server(name: &str) -> McpServer {
    McpServer::stdio(name, "python3", &[test_server(), "stdio".into()], &[], START).await.unwrap()
}

fn call(name: &str, arguments: serde_json::Value) -> ToolCall {
    ToolCall { id: format!("call-{name}"), name: name.into(), arguments: arguments.to_string() }
}

fn toolbox(server: &McpServer) -> Toolbox {
    let mut tools = Toolbox::new().timeout(Duration::from_secs(2)).max_output(10_000);
    for tool in server.tools() {
        tools.add(tool);
    }
    tools
}

/// An agent reads a file through the reference server, which refuses a path
/// outside the folder it was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_filesystem_server_serves_an_agent() {
    let Some(entry) = filesystem_server() else { return };
    let docs = tempfile::tempdir().unwrap();
    std::fs::write(docs.path().join("notes.txt"), "The harbour opened in 1854.").unwrap();
    let folder = docs.path().canonicalize().unwrap().display().to_string();
    let server = McpServer::stdio(
        "docs",
        "node",
        &[entry.display().to_string(), folder.clone()],
        &[],
        START,
    )
    .await
    .unwrap();
    let names: Vec<&str> = server.specs().iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"read_text_file") && names.contains(&"list_directory"), "{names:?}");
    let tools = toolbox(&server);

    let path = format!("{folder}/notes.txt");
    let model = MockProvider::new().with_rule(move |call| {
        let request = call.request;
        let response = match request.messages.last().map(|m| m.role) {
            Some(Role::Tool) => Response::new(
                format!("found: {}", request.messages.last().unwrap().content),
                Usage::default(),
            ),
            _ => Response::new("", Usage::default())
                .with_tool_calls(vec![self::call("read_text_file", json!({"path": path}))]),
        };
        Some(Behavior::respond(response))
    });
    let executor = Executor::builder(model).probe(false).hedge(None).build();
    let agent = Agent::new(tools.clone());
    let report = executor
        .branches([Branch::new("reader", move |calls| async move {
            agent.run(&calls, Request::user("When did the harbour open?")).await
        })])
        .await;
    let run = report.results[0].outcome.value().unwrap();
    assert_eq!(run.ending, Ending::Answered);
    assert!(run.answer().unwrap().contains("The harbour opened in 1854."), "{:?}", run.answer());

    let outside = tools.run(&call("read_text_file", json!({"path": "/etc/hostname"}))).await;
    assert!(outside.is_error, "{outside:?}");
    assert!(outside.output.contains("Access denied"), "{}", outside.output);
}

/// The suite's server over both transports: its tools are listed, answers
/// and error results come back, and an unknown tool is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_server_over_stdio_and_streamable_http() {
    let mut process = tokio::process::Command::new("python3")
        .args([test_server(), "http".into()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(process.stdout.take().unwrap()).lines();
    let ready = lines.next_line().await.unwrap().unwrap();
    let url = ready.strip_prefix("listening on ").unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let servers =
        [stdio_test_server("local").await, McpServer::http("remote", &url, START).await.unwrap()];
    for server in &servers {
        assert_eq!(server.specs().len(), 7, "{}", server.name());
        let tools = toolbox(server);
        let echoed = tools.run(&call("echo", json!({"text": "héllo"}))).await;
        assert_eq!(
            (echoed.output.as_str(), echoed.is_error),
            ("héllo", false),
            "{}",
            server.name()
        );
        let failed = tools.run(&call("fail", json!({}))).await;
        assert_eq!((failed.output.as_str(), failed.is_error), ("the tool failed on purpose", true));
        let big = tools.run(&call("big", json!({}))).await;
        assert!(big.truncated && !big.is_error && big.output.len() < 10_100, "{}", server.name());
    }
}

/// Faults of a server are tool errors for the model, never a failed run: a
/// malformed answer or a hang is cut by the tool timeout, a crash fails that
/// call and the later ones (its last words kept for the user); a server that
/// cannot start is a clear error naming it and quoting its stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_faults_are_clear_tool_errors() {
    let server = stdio_test_server("flaky").await;
    let tools = toolbox(&server);
    let garbled = tools.run(&call("garble", json!({}))).await;
    assert!(garbled.is_error, "{garbled:?}");
    let hung = tools.run(&call("slow", json!({"seconds": 30}))).await;
    assert!(hung.is_error && hung.output.contains("did not answer within 2.0s"), "{}", hung.output);
    let still = tools.run(&call("echo", json!({"text": "still here"}))).await;
    assert_eq!(still.output, "still here", "one bad answer does not end the server");

    let crashed = tools.run(&call("crash", json!({}))).await;
    assert!(crashed.is_error, "{crashed:?}");
    let after = tools.run(&call("echo", json!({"text": "anyone?"}))).await;
    assert!(after.is_error, "{after:?}");
    assert!(after.output.contains("the MCP server `flaky` failed"), "{}", after.output);
    assert!(!after.output.contains("crashing on purpose"), "its stderr is not the model's to read");
    assert!(
        server.stderr_tail().iter().any(|l| l.contains("crashing on purpose")),
        "but the user's"
    );

    let error =
        McpServer::stdio("db", "python3", &[test_server(), "fail-start".into()], &[], START)
            .await
            .unwrap_err();
    let message = error.to_string();
    assert!(message.starts_with("MCP server `db`: it did not start"), "{message}");
    assert!(message.contains("cannot open the database (on purpose)"), "{message}");
    let missing =
        McpServer::stdio("gone", "no-such-command-here", &[], &[], START).await.unwrap_err();
    assert!(missing.to_string().contains("could not start `no-such-command-here`"), "{missing}");
}

/// A stdio server sees `PATH` and its own `env`, never the rest of fanout's
/// environment (where the provider keys are): cargo's own variables, set for
/// this test process, stand in for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdio_server_inherits_only_a_safe_environment() {
    assert!(std::env::var_os("CARGO_PKG_NAME").is_some(), "cargo sets it for tests");
    let env = [("NOTES_TOKEN".to_owned(), "given".to_owned())];
    let server = McpServer::stdio("env", "python3", &[test_server(), "stdio".into()], &env, START)
        .await
        .unwrap();
    let tools = toolbox(&server);
    let seen = |name: &str| {
        let call = call("env_var", json!({"name": name}));
        let tools = tools.clone();
        async move { tools.run(&call).await.output }
    };
    assert_eq!(seen("NOTES_TOKEN").await, "given");
    assert_eq!(seen("CARGO_PKG_NAME").await, "<unset>");
    assert_ne!(seen("PATH").await, "<unset>");
}
