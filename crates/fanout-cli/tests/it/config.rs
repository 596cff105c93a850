use fanout_mock::{Config, MockServer};

use crate::{Home, run, stderr};

/// Flags override the environment, which overrides the config file's profile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_override_env_override_profile() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    std::fs::create_dir_all(home.path("config/fanout")).unwrap();
    home.write(
        "config/fanout/config.toml",
        "default_profile = \"local\"\n\n[profiles.local]\nprovider = \"openai\"\nmodel = \"m-file\"\n\
         base_url = \"http://127.0.0.1:9/v1\"\nconcurrency = 4\n",
    );
    let model = |extra: &[&str], env: &[(&str, &str)]| {
        let mut command = home.fanout();
        command
            .env("OPENAI_BASE_URL", server.openai_base_url())
            .args(["--json"])
            .args(extra)
            .args(["ask", "hi"]);
        for (name, value) in env {
            command.env(name, value);
        }
        async move {
            let output = run(command).await;
            assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
            let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            result["model"].as_str().unwrap().to_owned()
        }
    };
    // OPENAI_BASE_URL (env) beats the profile's unreachable base_url.
    assert_eq!(model(&[], &[]).await, "m-file");
    assert_eq!(model(&[], &[("FANOUT_MODEL", "m-env")]).await, "m-env");
    assert_eq!(model(&["--model", "m-flag"], &[("FANOUT_MODEL", "m-env")]).await, "m-flag");
}

#[test]
fn missing_provider_and_profile_errors_are_clear() {
    let home = Home::new();
    // No provider and no key: the local model, which is not here and cannot be fetched.
    let output = home.fanout().args(["ask", "hi"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("fanout models pull"), "{}", stderr(&output));
    let output = home.fanout().args(["--profile", "nope", "ask", "hi"]).output().unwrap();
    assert!(stderr(&output).contains("no profile `nope`"), "{}", stderr(&output));
    let output = home.fanout().args(["--provider", "openai", "ask", "hi"]).output().unwrap();
    assert!(stderr(&output).contains("OPENAI_API_KEY is not set"), "{}", stderr(&output));
}

/// A bad key stops the job after the probe: exit code 5, every other row kept for resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_key_stops_the_job_with_its_own_exit_code() {
    use wiremock::{Mock, MockServer, ResponseTemplate, matchers::any};
    let server = MockServer::start().await;
    let body = serde_json::json!({"error": {"message": "Incorrect API key provided: sk-wrong",
        "type": "invalid_request_error", "code": "invalid_api_key"}});
    Mock::given(any())
        .respond_with(ResponseTemplate::new(401).set_body_json(body))
        .mount(&server)
        .await;
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(200));
    let mut command = home.fanout();
    command.env("OPENAI_API_KEY", "sk-wrong").args([
        "--provider",
        "openai",
        "--base-url",
        &format!("{}/v1", server.uri()),
    ]);
    command.args(["-q", "batch", "rows.jsonl", "--prompt", "{{ essay }}"]);
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(5), "{}", stderr(&output));
    assert!(stderr(&output).contains("the job cannot succeed"), "{}", stderr(&output));
    assert!(
        !stderr(&output).contains("sk-wrong")
            && !String::from_utf8_lossy(&output.stdout).contains("sk-wrong"),
        "the key leaked"
    );
    // The probe sends 3; on a multi-thread runtime up to 2 more can leave while
    // the third refusal is on its way back. Never more: a handful, not 200.
    // (Beside them, the provider's check may have asked for the model once, and
    // been refused; the run can end before it is sent.)
    let received = server.received_requests().await.unwrap();
    let checks = received.iter().filter(|r| r.method == wiremock::http::Method::GET).count();
    assert!(checks <= 1, "at most one check of the key: {checks}");
    let calls = received.len() - checks;
    assert!((3..=5).contains(&calls), "{calls} calls");
}
