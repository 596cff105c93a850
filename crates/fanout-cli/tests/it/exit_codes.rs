//! One exit code per outcome, for every command family: `ask`, `batch` and a
//! pattern command (`sections`) each exit 4 when the deadline cuts them, 5 when
//! the key is bad, 3 when a call fails, and say every failure on stderr.

use fanout_mock::{Config, MockServer};
use std::time::Duration;
use wiremock::matchers::any;
use wiremock::{Mock, ResponseTemplate};

use crate::{Home, run, stderr};

/// A server that refuses every call with `status` and an OpenAI error body.
async fn refusing(status: u16, message: &str) -> wiremock::MockServer {
    let server = wiremock::MockServer::start().await;
    let body = serde_json::json!({"error": {"message": message, "type": "invalid_request_error"}});
    Mock::given(any())
        .respond_with(ResponseTemplate::new(status).set_body_json(body))
        .mount(&server)
        .await;
    server
}

fn against(home: &Home, base_url: &str, args: &[&str]) -> std::process::Command {
    let mut command = home.fanout();
    command
        .env("OPENAI_API_KEY", "sk-test")
        .args(["-q", "--provider", "openai", "--base-url", &format!("{base_url}/v1")])
        .args(args);
    command
}

const COMMANDS: [&[&str]; 3] = [
    &["ask", "hello"],
    &["batch", "rows.jsonl", "--prompt", "{{ essay }}"],
    &["sections", "--section", "a=one", "--section", "b=two", "--synthesize", "join them"],
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_exits_4_for_every_command() {
    let slow = Config { latency: Duration::from_secs(5), ..Config::default() };
    let server = MockServer::start(slow).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(3));
    for command in COMMANDS {
        let mut args = vec!["--deadline", "0.2"];
        args.extend_from_slice(command);
        let output = run(against(&home, &format!("http://{}", server.addr()), &args)).await;
        assert_eq!(output.status.code(), Some(4), "{command:?}: {}", stderr(&output));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_key_exits_5_for_every_command() {
    let server = refusing(401, "Incorrect API key provided").await;
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(3));
    for command in COMMANDS {
        let output = run(against(&home, &server.uri(), command)).await;
        assert_eq!(output.status.code(), Some(5), "{command:?}: {}", stderr(&output));
        assert!(stderr(&output).contains("Incorrect API key"), "{command:?}: {}", stderr(&output));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_exits_3_and_is_said_on_stderr() {
    let server = refusing(400, "context too long").await;
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(3));
    for command in COMMANDS {
        let output = run(against(&home, &server.uri(), command)).await;
        assert_eq!(output.status.code(), Some(3), "{command:?}: {}", stderr(&output));
        if command[0] != "batch" {
            assert!(
                stderr(&output).contains("context too long"),
                "{command:?}: {}",
                stderr(&output)
            );
        }
    }
    // The synthesis's own failure is named on stderr, not only inside stdout.
    let output = run(against(&home, &server.uri(), COMMANDS[2])).await;
    assert!(stderr(&output).contains("fanout: synthesis:"), "{}", stderr(&output));
}
