//! The `fanout-mock` binary: prints the port it picked, serves, and answers
//! 429s with the headers and body that OpenAI clients expect.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

struct Server(Child, String);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fanout-mock"))
        .args(["--port", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .expect("the first line names the address")
        .to_owned();
    assert!(!url.ends_with(":0"), "port 0 was replaced by the real port: {url}");
    Server(child, url)
}

fn client() -> reqwest::Client {
    // reqwest is built without a default TLS crypto provider; plain HTTP still needs one installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

#[tokio::test]
async fn serves_on_the_port_it_prints_and_rate_limits_like_openai() {
    let server = start(&["--rpm", "60", "--rpm-burst", "1", "--model", "grader-1"]);
    let client = client();
    let models: serde_json::Value =
        client.get(format!("{}/v1/models", server.1)).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "grader-1");

    let chat = |content: &str| {
        client
            .post(format!("{}/v1/chat/completions", server.1))
            .body(serde_json::json!({"model": "m", "messages": [{"role": "user", "content": content}]}).to_string())
            .send()
    };
    let ok = chat("first").await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["x-ratelimit-remaining-requests"], "0");
    let limited = chat("second").await.unwrap();
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "1");
    assert!(limited.headers().contains_key("retry-after-ms"));
    assert!(limited.headers().contains_key("x-ratelimit-reset-requests"));
    let body: serde_json::Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");

    let stats: serde_json::Value =
        client.get(format!("{}/stats", server.1)).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        (stats["requests"].as_u64(), stats["by_status"]["429"].as_u64()),
        (Some(2), Some(1))
    );
    let reset: serde_json::Value = client
        .post(format!("{}/stats/reset", server.1))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reset["requests"], 0);
}

#[test]
fn bad_options_are_refused_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_fanout-mock"))
        .args(["--error-rate", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--error-rate must be between 0 and 1"));
    let out = Command::new(env!("CARGO_BIN_EXE_fanout-mock"))
        .args(["--answers", "A=x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`x` is not a number"));
}
