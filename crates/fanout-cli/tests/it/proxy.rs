//! `fanout proxy`, run as a user runs it, with real HTTP clients in front
//! and the mock server (or wiremock, to see what arrives) behind.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use fanout_mock::{Config, Limit, MockServer};
use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::Home;

/// A proxy running in the background, stopped when dropped.
struct Running {
    child: Child,
    /// `http://127.0.0.1:PORT`: clients add `/v1/...`.
    root: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn start(home: &Home, upstream: &str, flags: &[&str], args: &[&str]) -> Self {
        Self::start_with(home.fanout(), upstream, flags, args)
    }

    fn start_with(
        mut command: std::process::Command,
        upstream: &str,
        flags: &[&str],
        args: &[&str],
    ) -> Self {
        let provider = if upstream.ends_with("/v1") { "openai" } else { "anthropic" };
        let mut child = command
            .args(["--provider", provider, "--base-url", upstream])
            .args(flags)
            .args(["proxy", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut said = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        said.read_line(&mut line).unwrap();
        // "fanout proxy: http://127.0.0.1:PORT/v1/chat/completions -> ..."
        let url = line.split_whitespace().nth(2).unwrap_or_else(|| panic!("said: {line}"));
        let root = url.trim_end_matches("/v1/chat/completions").trim_end_matches("/v1/messages");
        let root = root.to_owned();
        // Drained, so the proxy never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut said, &mut std::io::sink()));
        Self { child, root }
    }

    fn completions(&self) -> String {
        format!("{}/v1/chat/completions", self.root)
    }

    /// Stops the proxy as Ctrl-C does, and waits for it to end.
    fn interrupt(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap();
        assert!(sent.success());
        self.child.wait().unwrap()
    }

    async fn stats(&self) -> Value {
        let url = format!("{}/fanout/stats", self.root);
        client().get(url).send().await.unwrap().json().await.unwrap()
    }
}

/// An HTTP client (with the TLS crypto reqwest needs installed, though
/// every server here is plain HTTP on 127.0.0.1).
fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn chat(prompt: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]})
}

async fn post(client: &reqwest::Client, url: &str, key: &str, body: &Value) -> (u16, Value) {
    let response = client.post(url).bearer_auth(key).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Many clients at once against an upstream that allows 3,000 requests a
/// minute: the proxy takes the upstream's 429s (it was told no limit) and
/// retries them, and no client ever sees one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_under_an_upstream_limit_see_no_429() {
    let config = Config { rpm: Some(Limit::per_minute(3_000)), ..Config::default() };
    let upstream = MockServer::start(config).await.unwrap();
    let home = Home::new();
    let proxy =
        Running::start(&home, &upstream.openai_base_url(), &["-c", "100"], &["--job", "load"]);
    let client = client();
    let calls = (0..150).map(|i| {
        let (client, url) = (client.clone(), proxy.completions());
        tokio::spawn(async move { post(&client, &url, "sk-client", &chat(&format!("q{i}"))).await })
    });
    let answers = futures_util::future::join_all(calls).await;
    let statuses: Vec<u16> = answers.into_iter().map(|a| a.unwrap().0).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let stats = proxy.stats().await;
    assert_eq!(stats["succeeded"], 150, "{stats}");
    let rate_limited = upstream.stats().count(429);
    assert_eq!(stats["upstream"]["rate_limited"], rate_limited, "{stats}");
    assert!(rate_limited > 0, "the upstream's limit was reached");
    // Every call is a record, written before its client had the answer: a
    // kill -9 now loses none.
    drop(proxy);
    let shown = home.fanout().args(["jobs", "show", "load"]).output().unwrap();
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["by_status"]["succeeded"], 150, "{shown}");
    // gpt-4o-mini's price from the table: the job's cost is known.
    assert!(shown["cost"].as_f64().unwrap() > 0.0, "{shown}");
    // The 429s paused the lane: the job's report shows the pauses its calls waited out.
    let report = home.fanout().args(["report", "load", "-o", "-"]).output().unwrap();
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let html = String::from_utf8(report.stdout).unwrap();
    assert!(html.contains("class=\"pause-row\""), "no pause in the report");
    assert!(html.contains("429"), "the pause says its cause");
}

/// A lane's 429 pause goes into the jobs its own calls are recorded in, not
/// into another key's: one key's report shows the pause its calls waited out,
/// the other's none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_pauses_are_recorded_in_its_own_jobs_only() {
    let upstream = wiremock::MockServer::start().await;
    let limited = json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}});
    Mock::given(method("POST"))
        .and(header("authorization", "Bearer sk-limited"))
        .respond_with(
            ResponseTemplate::new(429).insert_header("retry-after", "1").set_body_json(limited),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&upstream)
        .await;
    let answer = json!({"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1}});
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(answer))
        .mount(&upstream)
        .await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "gpt-4o-mini", "object": "model"})),
        )
        .mount(&upstream)
        .await;
    let home = Home::new();
    let proxy = Running::start(&home, &format!("{}/v1", upstream.uri()), &[], &[]);
    let client = client();
    for (key, job) in [("sk-limited", "limited"), ("sk-free", "free")] {
        let sent = client.post(proxy.completions()).bearer_auth(key).header("x-fanout-job", job);
        assert_eq!(sent.json(&chat("hi")).send().await.unwrap().status().as_u16(), 200);
    }
    assert!(proxy.interrupt().success());
    let pauses = |job: &str| {
        let report = home.fanout().args(["report", job, "-o", "-"]).output().unwrap();
        assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
        String::from_utf8(report.stdout).unwrap().matches("class=\"pause-row\"").count()
    };
    assert_eq!((pauses("limited"), pauses("free")), (1, 0));
}

/// Clients name their own models: each call is costed at its model's price
/// (the built-in table's), in its record, the job's cost and the live
/// counters; a call of a model with no known price is counted apart, not
/// costed at another model's price.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_call_is_costed_at_its_own_models_price() {
    let upstream = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let proxy = Running::start(&home, &upstream.openai_base_url(), &[], &["--job", "mixed"]);
    let client = client();
    for (job, model) in [("mini", "gpt-4o-mini"), ("big", "gpt-4o"), ("mixed", "my-finetune")] {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "Same words"}]});
        let response =
            client.post(proxy.completions()).header("x-fanout-job", job).json(&body).send();
        assert_eq!(response.await.unwrap().status().as_u16(), 200);
    }
    let stats = proxy.stats().await;
    // Ctrl-C: the run's end is written into each of its jobs.
    assert!(proxy.interrupt().success());
    // Per million tokens, from the table: gpt-4o-mini 0.15 in, 0.60 out; gpt-4o 2.50, 10.00.
    let expected = |job: &str, input: f64, output: f64| {
        let exported = home.fanout().args(["jobs", "export", job]).output().unwrap();
        let line: Value = serde_json::from_slice(&exported.stdout).unwrap();
        let usage = &line["usage"];
        let (tokens_in, tokens_out) =
            (usage["input_tokens"].as_f64().unwrap(), usage["output_tokens"].as_f64().unwrap());
        assert!(tokens_in > 0.0 && tokens_out > 0.0, "{line}");
        (tokens_in * input + tokens_out * output) / 1e6
    };
    let (mini, big) = (expected("mini", 0.15, 0.60), expected("big", 2.50, 10.00));
    let cost = |job: &str| shown(&home, job)["cost"].as_f64();
    assert!((cost("mini").unwrap() - mini).abs() < 1e-12, "{:?} vs {mini}", cost("mini"));
    assert!((cost("big").unwrap() - big).abs() < 1e-12, "{:?} vs {big}", cost("big"));
    let mixed = shown(&home, "mixed");
    assert_eq!((mixed["cost"].as_f64(), mixed["unpriced_calls"].as_u64()), (None, Some(1)));
    assert_eq!(mixed["command"], "proxy");
    let resumed = home.fanout().args(["jobs", "resume", "mixed"]).output().unwrap();
    assert_eq!(resumed.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("records a proxy's calls"));
    assert!((stats["cost"].as_f64().unwrap() - (mini + big)).abs() < 1e-12, "{stats}");
    assert_eq!(stats["unpriced_calls"], 1, "{stats}");
    // Each job's run starts and ends in its events (the report's limit line and span).
    let report = home.fanout().args(["report", "big", "-o", "-"]).output().unwrap();
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
}

/// `--budget` bounds what all the proxy's calls spend together, each at its
/// model's price: calls go through until the next could pass it, then every
/// client gets OpenAI's exhausted-quota 429, and nothing more is paid. A model
/// without a known price cannot be counted, so its calls are refused first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_bounds_every_clients_spending_together() {
    let upstream = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let flags = ["--budget", "0.0001"];
    let proxy = Running::start(&home, &upstream.openai_base_url(), &flags, &["--job", "paid"]);
    let client = client();
    let mut body = chat("Say something short");
    body["max_tokens"] = json!(20);
    body["model"] = json!("my-finetune");
    let (status, error) = post(&client, &proxy.completions(), "sk-a", &body).await;
    assert_eq!(status, 400, "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("`my-finetune`"), "{error}");
    body["model"] = json!("gpt-4o-mini");
    let mut statuses = Vec::new();
    for i in 0..40 {
        // Two clients with their own keys, one budget.
        let key = if i % 2 == 0 { "sk-a" } else { "sk-b" };
        let (status, answer) = post(&client, &proxy.completions(), key, &body).await;
        if status == 429 {
            assert_eq!(answer["error"]["code"], "insufficient_quota", "{answer}");
        }
        statuses.push(status);
    }
    let answered = statuses.iter().take_while(|s| **s == 200).count();
    assert!(answered >= 2, "{statuses:?}");
    assert!(statuses[answered..].iter().all(|s| *s == 429), "spent stays spent: {statuses:?}");
    assert!(answered < 40, "the budget ran out: {statuses:?}");
    let stats = proxy.stats().await;
    assert_eq!(stats["succeeded"], answered, "{stats}");
    let spent = stats["spending_limit"]["spent"].as_f64().unwrap();
    assert!(spent > 0.0 && spent <= 0.0001, "{stats}");
    assert!((stats["cost"].as_f64().unwrap() - spent).abs() < 1e-12, "{stats}");
    drop(proxy);
    assert_eq!(shown(&home, "paid")["by_status"]["succeeded"], answered);
}

/// Without `--rpm`, the wait a call would have is told by how fast answers
/// come: at one slot and one answer a second, a call with three ahead of it
/// would wait about three seconds, past a `--max-queue` of 2.5, and is
/// refused at once with a `Retry-After` of what is too much (rounded up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_rpm_the_queue_is_measured_by_the_answers_pace() {
    let config = Config { latency: Duration::from_secs(1), ..Config::default() };
    let upstream = MockServer::start(config).await.unwrap();
    let home = Home::new();
    let flags = ["-c", "1", "--no-hedge"];
    let proxy = Running::start(&home, &upstream.openai_base_url(), &flags, &["--max-queue", "2.5"]);
    let client = client();
    // The first answer tells the lane its pace.
    let (status, _) = post(&client, &proxy.completions(), "sk-1", &chat("first")).await;
    assert_eq!(status, 200);
    let mut calls = Vec::new();
    for i in 0..6 {
        let request =
            client.post(proxy.completions()).bearer_auth("sk-1").json(&chat(&format!("q{i}")));
        calls.push(tokio::spawn(async move {
            let response = request.send().await.unwrap();
            let retry_after =
                response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            (response.status().as_u16(), retry_after)
        }));
        // In order, each seeing the ones before it in the queue.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answers: Vec<_> =
        futures_util::future::join_all(calls).await.into_iter().map(Result::unwrap).collect();
    let statuses: Vec<u16> = answers.iter().map(|(status, _)| *status).collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429], "{answers:?}");
    let retry_after: Vec<_> = answers[3..].iter().map(|(_, r)| r.clone().unwrap()).collect();
    assert_eq!(retry_after, ["1", "1", "1"], "{answers:?}");
}

/// The client's body reaches the upstream as it was sent, unknown fields
/// included, and the answer comes back as the upstream sent it; keys are
/// forwarded and kept apart: a bad key fails its own calls, not another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_pass_through_and_each_key_has_its_own_lane() {
    let upstream = wiremock::MockServer::start().await;
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}],
                      "n": 2, "tools": [{"type": "function", "function": {"name": "f"}}],
                      "a_field_from_next_year": {"x": [1, 2]}});
    let answer = r#"{"id":"c1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"},{"index":1,"message":{"role":"assistant","content":"Hey"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2},"system_fingerprint":"fp_new"}"#;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header("authorization", "Bearer sk-good"))
        .and(header("openai-organization", "org-graders"))
        .and(wiremock::matchers::body_json(&body))
        .respond_with(ResponseTemplate::new(200).set_body_string(answer))
        .expect(2)
        .mount(&upstream)
        .await;
    Mock::given(method("POST"))
        .and(header("authorization", "Bearer sk-bad"))
        .respond_with(ResponseTemplate::new(401).set_body_json(
            json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}),
        ))
        .expect(1)
        .mount(&upstream)
        .await;
    let home = Home::new();
    let proxy = Running::start(&home, &format!("{}/v1", upstream.uri()), &[], &[]);
    let client = client();
    let sent = client
        .post(proxy.completions())
        .bearer_auth("sk-good")
        .header("openai-organization", "org-graders")
        .json(&body)
        .send();
    let text = sent.await.unwrap().text().await.unwrap();
    assert_eq!(text, answer, "the answer comes back byte for byte");
    let (status, error) = post(&client, &proxy.completions(), "sk-bad", &body).await;
    assert_eq!(status, 401, "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("Incorrect API key"), "{error}");
    // The bad key's lane is broken; the good key's is not.
    let again = client.post(proxy.completions()).bearer_auth("sk-good");
    let again = again.header("openai-organization", "org-graders").json(&body).send();
    assert_eq!(again.await.unwrap().status().as_u16(), 200);
    let stats = proxy.stats().await;
    assert_eq!(stats["keys"], 2, "{stats}");
    let store = std::fs::read(home.store()).unwrap();
    let needle = b"sk-good";
    assert!(!store.windows(needle.len()).any(|w| w == needle), "no key is stored");
}

/// A streamed answer comes back as the same events the upstream sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_answers_come_back_event_for_event() {
    let upstream = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let proxy = Running::start(&home, &upstream.openai_base_url(), &[], &[]);
    let client = client();
    let mut body = chat("Tell me about the sea");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let direct = format!("{}/chat/completions", upstream.openai_base_url());
    let events = |text: String| -> Vec<Value> {
        text.split("\n\n")
            .filter_map(|event| event.strip_prefix("data: "))
            .map(|data| match serde_json::from_str::<Value>(data) {
                // The ids count the mock's calls: the rest must be equal.
                Ok(mut chunk) => {
                    chunk.as_object_mut().unwrap().remove("id");
                    chunk
                }
                Err(_) => Value::String(data.to_owned()),
            })
            .collect()
    };
    let read = |url: String| {
        let request = client.post(url).bearer_auth("sk-x").json(&body).send();
        async move {
            let response = request.await.unwrap();
            let kind = response.headers()["content-type"].to_str().unwrap().to_owned();
            (kind, response.text().await.unwrap())
        }
    };
    let (direct_kind, direct_text) = read(direct).await;
    let (proxied_kind, proxied_text) = read(proxy.completions()).await;
    assert_eq!(proxied_kind, "text/event-stream");
    assert!(direct_kind.starts_with("text/event-stream"));
    let (direct, proxied) = (events(direct_text), events(proxied_text));
    assert!(direct.len() > 3, "{direct:?}");
    assert_eq!(proxied, direct);
    assert_eq!(proxied.last(), Some(&Value::String("[DONE]".into())));
}

/// SDKs close the connection as soon as they read the stream's last event,
/// while the proxy still records the call: such a client had the whole
/// answer, and its call is recorded as answered, never as cancelled. (The
/// test holds the store's write lock meanwhile, so the record is written only
/// after the client has gone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_closes_after_the_last_event_is_recorded_answered() {
    let config = Config { tokens_per_second: Some(50.0), ..Config::default() };
    let upstream = MockServer::start(config).await.unwrap();
    let home = Home::new();
    let proxy = Running::start(&home, &upstream.openai_base_url(), &[], &["--job", "closers"]);
    let client = client();
    for i in 0..3 {
        let mut body = chat(&format!("Tell me about the sea, {i}"));
        body["stream"] = json!(true);
        let mut response = client.post(proxy.completions()).json(&body).send().await.unwrap();
        let mut read = response.chunk().await.unwrap().unwrap().to_vec();
        let store = rusqlite::Connection::open(home.store()).unwrap();
        store.execute_batch("BEGIN IMMEDIATE").unwrap();
        while !read.windows(12).any(|w| w == b"data: [DONE]") {
            read.extend_from_slice(&response.chunk().await.unwrap().expect("more events"));
        }
        // Closed at once, the answer's body not read to its end.
        drop(response);
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.execute_batch("ROLLBACK").unwrap();
    }
    // Each record is written just after its client left.
    let mut recorded = Value::Null;
    for _ in 0..200 {
        recorded = shown(&home, "closers");
        if recorded["finished"] == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(recorded["by_status"], json!({"succeeded": 3}), "{recorded}");
}

/// What `fanout jobs show NAME` says of a job.
fn shown(home: &Home, job: &str) -> Value {
    let shown = home.fanout().args(["jobs", "show", job]).output().unwrap();
    serde_json::from_slice(&shown.stdout).unwrap_or(Value::Null)
}

/// A streamed answer reaches its client as it arrives: the first events come
/// while the upstream stalls in the middle of its answer for ten minutes. The
/// client then going away cancels the call, which is recorded as cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_reaches_the_client_as_it_arrives() {
    let config = Config { stall_rate: 1.0, hang: Duration::from_secs(600), ..Config::default() };
    let upstream = MockServer::start(config).await.unwrap();
    let home = Home::new();
    let args = ["--job", "live"];
    let proxy = Running::start(&home, &upstream.openai_base_url(), &["--no-hedge"], &args);
    let mut body = chat("Tell me about the sea");
    body["stream"] = json!(true);
    let mut response = client().post(proxy.completions()).json(&body).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert!(response.headers().contains_key("x-request-id"), "{:?}", response.headers());
    // Buffered until complete, nothing would come for ten minutes.
    let first = tokio::time::timeout(Duration::from_secs(60), response.chunk()).await;
    let first = first.expect("the first events come at once").unwrap().unwrap();
    assert!(first.starts_with(b"data: {"), "{first:?}");
    drop(response);
    let mut recorded = shown(&home, "live");
    for _ in 0..200 {
        if recorded["by_status"]["cancelled"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        recorded = shown(&home, "live");
    }
    assert_eq!(recorded["by_status"]["cancelled"], 1, "{recorded}");
    assert_eq!(proxy.stats().await["in_flight"], 0);
}

/// A stream that breaks off after its first bytes reached the client (here:
/// no byte for longer than the attempt timeout) is not asked again, since the
/// client would see the answer twice: it ends with an error event in the
/// API's shape, which the SDKs raise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_broken_after_its_first_bytes_ends_with_an_error_event() {
    let config = Config { stall_rate: 1.0, hang: Duration::from_secs(600), ..Config::default() };
    let upstream = MockServer::start(config.clone()).await.unwrap();
    let home = Home::new();
    let flags = ["--no-hedge", "--attempt-timeout", "1"];
    let proxy = Running::start(&home, &upstream.openai_base_url(), &flags, &[]);
    let mut body = chat("Tell me about the sea");
    body["stream"] = json!(true);
    let response = client().post(proxy.completions()).json(&body).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.len() >= 2, "{text}");
    let last: Value = serde_json::from_str(events.last().unwrap().strip_prefix("data: ").unwrap())
        .unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(last["error"]["type"], "server_error", "{last}");
    assert!(last["error"]["message"].as_str().unwrap().contains("no sign of an answer"), "{last}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert_eq!(upstream.stats().requests, 1, "asked once");

    // Anthropic's stream ends with its own `event: error` framing.
    let upstream = MockServer::start(config).await.unwrap();
    let proxy = Running::start(&home, &upstream.anthropic_base_url(), &flags, &[]);
    let body = json!({"model": "claude-x", "max_tokens": 50, "stream": true,
                      "messages": [{"role": "user", "content": "Tell me about the sea"}]});
    let url = format!("{}/v1/messages", proxy.root);
    let response = client().post(url).header("x-api-key", "sk-ant").json(&body).send().await;
    let text = response.unwrap().text().await.unwrap();
    assert!(text.starts_with("event: message_start"), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let data = last.strip_prefix("event: error\ndata: ").unwrap_or_else(|| panic!("{text}"));
    let error: Value = serde_json::from_str(data).unwrap();
    assert_eq!(
        (error["type"].as_str(), error["error"]["type"].as_str()),
        (Some("error"), Some("api_error"))
    );
    assert_eq!(upstream.stats().requests, 1, "asked once");
}

/// The upstream's own error (its code and param, its Retry-After) reaches
/// the client as it came; a job that cannot take the proxy's records (a
/// batch job's name) is refused before any call is paid for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_pass_through_and_a_wrong_job_is_refused_first() {
    let upstream = wiremock::MockServer::start().await;
    let error = json!({"error": {"message": "n must be at most 8", "type": "invalid_request_error",
                                 "param": "n", "code": "integer_above_max_value"}});
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(400).set_body_json(&error).insert_header("retry-after", "7"),
        )
        .expect(1)
        .mount(&upstream)
        .await;
    let home = Home::new();
    let rows = home.write("rows.jsonl", "{\"q\": \"a\"}\n");
    let batch = home
        .fanout()
        .args(["--provider", "mock", "-q", "batch"])
        .arg(&rows)
        .args(["--prompt", "Say {{ q }}", "--job", "nightly"])
        .output()
        .unwrap();
    assert!(batch.status.success(), "{}", String::from_utf8_lossy(&batch.stderr));
    let proxy = Running::start(&home, &format!("{}/v1", upstream.uri()), &[], &[]);
    let client = client();
    let answer = client.post(proxy.completions()).json(&chat("many")).send().await.unwrap();
    let retry_after = answer.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!((answer.status().as_u16(), retry_after.as_deref()), (400, Some("7")));
    assert_eq!(answer.json::<Value>().await.unwrap(), error);
    let wrong = client.post(proxy.completions()).header("x-fanout-job", "nightly").json(&chat("x"));
    let wrong = wrong.send().await.unwrap();
    assert_eq!(wrong.status().as_u16(), 400);
    let said: Value = wrong.json().await.unwrap();
    assert!(said["error"]["message"].as_str().unwrap().contains("batch job"), "{said}");
}

/// A client that goes away cancels its upstream call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_upstream_call() {
    let config = Config { latency: Duration::from_secs(30), ..Config::default() };
    let upstream = MockServer::start(config).await.unwrap();
    let home = Home::new();
    let proxy = Running::start(&home, &upstream.openai_base_url(), &["--no-hedge"], &[]);
    let impatient = {
        client();
        reqwest::Client::builder().timeout(Duration::from_millis(500)).build().unwrap()
    };
    let gone = impatient.post(proxy.completions()).json(&chat("slow")).send().await;
    assert!(gone.is_err(), "the client gave up");
    // The proxy drops the call, which closes the upstream connection.
    for _ in 0..100 {
        if upstream.stats().requests == 1 && upstream.stats().in_flight == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = upstream.stats();
    assert_eq!((stats.requests, stats.in_flight), (1, 0), "{stats:?}");
    assert_eq!(proxy.stats().await["in_flight"], 0);
}

/// Beyond loopback a client token is required; with one, clients must send
/// it, and the proxy calls upstream with its own key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_token_guards_the_proxy_and_its_own_key_goes_upstream() {
    let home = Home::new();
    let open = home
        .fanout()
        .args(["--provider", "openai", "--base-url", "http://127.0.0.1:9/v1"])
        .args(["proxy", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(open.status.code(), Some(2));
    assert!(crate::stderr(&open).contains("--client-token"), "{}", crate::stderr(&open));

    let upstream = wiremock::MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("authorization", "Bearer sk-proxy-own"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1}})))
        .expect(1)
        .mount(&upstream)
        .await;
    let mut command = home.fanout();
    command.env("OPENAI_API_KEY", "sk-proxy-own");
    let url = format!("{}/v1", upstream.uri());
    let proxy = Running::start_with(command, &url, &[], &["--client-token", "let-me-in"]);
    let client = client();
    let (status, error) = post(&client, &proxy.completions(), "sk-someone", &chat("hi")).await;
    assert_eq!(status, 401, "{error}");
    assert_eq!(error["error"]["type"], "authentication_error");
    let (status, answer) = post(&client, &proxy.completions(), "let-me-in", &chat("hi")).await;
    assert_eq!(status, 200, "{answer}");
    // The counters are the token holders' too.
    let stats = format!("{}/fanout/stats", proxy.root);
    assert_eq!(client.get(&stats).send().await.unwrap().status().as_u16(), 401);
    let shown = client.get(&stats).bearer_auth("let-me-in").send().await.unwrap();
    assert_eq!(shown.json::<Value>().await.unwrap()["succeeded"], 1);
}

/// Bodies that are not a request get the API's own 400 without an upstream
/// call, whatever their bytes; the proxy goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_are_refused_without_a_call_and_never_crash_it() {
    let upstream = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let proxy = Running::start(&home, &upstream.openai_base_url(), &[], &[]);
    let client = client();
    let mut bodies: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"null".to_vec(),
        b"{\"messages\": \"hi\"}".to_vec(),
        vec![0xff, 0xfe, 0x00, 0x7b],
        "[".repeat(100_000).into_bytes(),
        b"{\"messages\": [{\"role\": \"user\", \"content\": 5}]".to_vec(),
    ];
    // And random bytes, from a fixed seed.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for length in [1, 7, 64, 1_000, 20_000] {
        bodies.push(
            (0..length)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect(),
        );
    }
    for body in bodies {
        let odd = reqwest::header::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap();
        let response = client
            .post(proxy.completions())
            .header("content-type", "application/json")
            .header("x-fanout-sample", "not a number")
            .header("x-fanout-job", odd.clone())
            .header("authorization", odd)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 400);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    }
    // Past the largest body taken (32 MiB): the API's shape too.
    let huge = client.post(proxy.completions()).body(vec![b' '; 33 << 20]).send().await.unwrap();
    assert_eq!(huge.status().as_u16(), 413);
    // Its connection, with the rest of the body unread, is not reused: the
    // next request gets a connection of its own.
    assert_eq!(huge.headers().get("connection").map(|v| v.as_bytes()), Some(&b"close"[..]));
    let error: Value = huge.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    assert_eq!(upstream.stats().requests, 0, "no call went upstream");
    let (status, _) = post(&client, &proxy.completions(), "sk-x", &chat("still here?")).await;
    assert_eq!(status, 200);
    let stats = proxy.stats().await;
    assert_eq!(stats["refused"]["bad_request"], 12, "{stats}");
}

/// Calls wait their turn; only one whose wait would pass `--max-queue` (by
/// the lane's RPM) is refused, with a 429 that says how long to wait. Calls
/// are recorded in the job their `X-Fanout-Job` header names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_longer_than_max_queue_gets_an_honest_429() {
    let upstream = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let flags = ["-c", "1", "--rpm", "60"];
    let proxy = Running::start(&home, &upstream.openai_base_url(), &flags, &["--max-queue", "2"]);
    let client = client();
    let calls = (0..8).map(|i| {
        let request = client
            .post(proxy.completions())
            .header("x-fanout-job", "queued")
            .json(&chat(&format!("q{i}")))
            .send();
        tokio::spawn(async move {
            let response = request.await.unwrap();
            let retry_after =
                response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            let status = response.status().as_u16();
            (status, retry_after, response.json::<Value>().await.unwrap())
        })
    });
    let answers: Vec<_> =
        futures_util::future::join_all(calls).await.into_iter().map(Result::unwrap).collect();
    let refused: Vec<_> = answers.iter().filter(|(status, ..)| *status == 429).collect();
    let answered = answers.iter().filter(|(status, ..)| *status == 200).count();
    assert_eq!(refused.len() + answered, 8, "{answers:?}");
    assert!((3..=6).contains(&answered), "about 3 s of calls at 1 a second: {answers:?}");
    for (_, retry_after, body) in &refused {
        let seconds: u64 = retry_after.as_deref().unwrap().parse().unwrap();
        assert!((1..=6).contains(&seconds), "{retry_after:?}");
        assert_eq!(body["error"]["type"], "rate_limit_exceeded");
    }
    assert_eq!(proxy.stats().await["refused"]["queue_full"], refused.len());
    let shown = home.fanout().args(["jobs", "show", "queued"]).output().unwrap();
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["by_status"]["succeeded"], answered, "{shown}");
    // `fanout report` works on a proxy's job as on a batch.
    let report = home.fanout().args(["report", "queued", "-o"]).arg(home.path("q.html")).output();
    let report = report.unwrap();
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let html = std::fs::read_to_string(home.path("q.html")).unwrap();
    assert!(html.contains(&format!("succeeded<b>{answered}</b>")), "{html}");
    assert!(html.contains("p50 latency") && html.contains("(proxy)"), "{html}");
}

/// The Python with the `openai` SDK that `.ci/run` installs in `target/python`
/// (or `FANOUT_PYTHON`). CI must have it; a developer without it is told how
/// to get it and the test does not run.
fn python_with_openai() -> Option<std::path::PathBuf> {
    let python =
        std::env::var_os("FANOUT_PYTHON").map(std::path::PathBuf::from).unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/python/bin/python")
        });
    let has_openai = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_openai {
        return Some(python);
    }
    let how = "python3 -m venv target/python && target/python/bin/pip install openai";
    if std::env::var_os("CI").is_some() {
        panic!("CI must install the openai SDK: {how}");
    }
    eprintln!("no openai SDK at {}: skipped (run `{how}`)", python.display());
    None
}

/// The seed's code, unchanged (`bench/peer.py`: `asyncio.gather` over the
/// `openai` SDK, 100 at once), against an upstream allowing 100 requests a
/// second: through the proxy, not one call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_through_the_proxy_loses_no_call_at_a_rate_limit() {
    let Some(python) = python_with_openai() else { return };
    let config = Config { rpm: Some(Limit::per_minute(6_000)), ..Config::default() };
    let upstream = MockServer::start(config).await.unwrap();
    let home = Home::new();
    let proxy = Running::start(&home, &upstream.openai_base_url(), &["-c", "100"], &[]);
    let peer = concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/peer.py");
    let mut command = std::process::Command::new(python);
    command.arg(peer).args(["--base-url", &format!("{}/v1", proxy.root)]);
    command.args(["--n", "400", "--concurrency", "100"]);
    let output = crate::run(command).await;
    assert!(output.status.success(), "{}", crate::stderr(&output));
    let said: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (said["succeeded"].as_u64(), said["failed"].as_u64()),
        (Some(400), Some(0)),
        "{said}"
    );
    let stats = proxy.stats().await;
    assert_eq!(stats["refused"]["queue_full"], 0, "{stats}");
}

/// The `openai` SDK streams through the proxy as it would from the API: the
/// text arrives event by event, and a stream that breaks off after its first
/// bytes raises the SDK's `APIError` with the proxy's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_streams_through_the_proxy_and_raises_a_break_off() {
    let Some(python) = python_with_openai() else { return };
    const SCRIPT: &str = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-x", max_retries=0)
text = ""
try:
    stream = client.chat.completions.create(model="gpt-4o-mini", stream=True,
        messages=[{"role": "user", "content": "Tell me about the sea"}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    print("done", text)
except openai.APIError as error:
    print("raised", error.message)
"#;
    let home = Home::new();
    for (config, flags, said) in [
        (Config::default(), &["--no-hedge"][..], "done Mock answer"),
        (
            Config { stall_rate: 1.0, hang: Duration::from_secs(600), ..Config::default() },
            &["--no-hedge", "--attempt-timeout", "1"][..],
            "raised no sign of an answer",
        ),
    ] {
        let upstream = MockServer::start(config).await.unwrap();
        let proxy = Running::start(&home, &upstream.openai_base_url(), flags, &[]);
        let mut command = std::process::Command::new(&python);
        command.args(["-c", SCRIPT, &format!("{}/v1", proxy.root)]);
        let output = crate::run(command).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.starts_with(said), "{stdout} {}", crate::stderr(&output));
    }
}

/// Anthropic's Messages API is served the same way, the key read from
/// `x-api-key`; a body without `max_tokens` is refused as Anthropic refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_are_proxied_too() {
    let upstream = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    let proxy = Running::start(&home, &upstream.anthropic_base_url(), &[], &[]);
    let url = format!("{}/v1/messages", proxy.root);
    let body = json!({"model": "claude-x", "max_tokens": 50,
                      "messages": [{"role": "user", "content": "Bonjour"}]});
    let send = |body: Value| {
        client()
            .post(&url)
            .header("x-api-key", "sk-ant-client")
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
    };
    let answer: Value = send(body.clone()).await.unwrap().json().await.unwrap();
    assert_eq!(answer["type"], "message", "{answer}");
    assert!(answer["content"][0]["text"].as_str().unwrap().contains("Bonjour"), "{answer}");
    let mut missing = body;
    missing.as_object_mut().unwrap().remove("max_tokens");
    let refused = send(missing).await.unwrap();
    assert_eq!(refused.status().as_u16(), 400);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(
        (error["type"].as_str(), error["error"]["type"].as_str()),
        (Some("error"), Some("invalid_request_error"))
    );
    assert_eq!(upstream.stats().requests, 1);
}

/// A key whose answers show it cannot succeed has its calls refused at once
/// (not paid for) for `--cool-down`, then tried anew: fixed keys work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_lane_is_tried_anew_after_its_cool_down() {
    let upstream = wiremock::MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_json(
            json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}),
        ))
        .mount(&upstream)
        .await;
    let home = Home::new();
    let url = format!("{}/v1", upstream.uri());
    let proxy = Running::start(&home, &url, &[], &["--cool-down", "1"]);
    let client = client();
    // Calls only: a new lane also checks the key (GET /models/...).
    let sent = || async {
        let received = upstream.received_requests().await.unwrap();
        received.iter().filter(|r| r.method == wiremock::http::Method::POST).count()
    };
    for _ in 0..6 {
        let (status, _) = post(&client, &proxy.completions(), "sk-wrong", &chat("hi")).await;
        assert_eq!(status, 401);
    }
    let before = sent().await;
    assert!(before < 6, "the breaker refused some without a call: {before}");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (status, _) = post(&client, &proxy.completions(), "sk-wrong", &chat("hi")).await;
    assert_eq!(status, 401);
    assert_eq!(sent().await, before + 1, "after the cool-down the key is tried again");
}
