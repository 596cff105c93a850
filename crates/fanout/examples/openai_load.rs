//! Load driver for `bench/providers.py`: N chat completions through the real
//! OpenAI provider, printing one JSON line of results.
//!
//! ```text
//! cargo run --release -p fanout --example openai_load -- \
//!     --base-url http://127.0.0.1:8080/v1 --n 10000 --concurrency 500 [--rpm 6000] \
//!     [--attempt-timeout-ms 2000] [--max-attempts 5] [--no-probe] [--bare]
//! ```
//!
//! `--bare` sends the same requests with reqwest alone (a semaphore, no
//! executor, no retries): the floor any reqwest-based client pays on this
//! machine, against which `bench/stragglers.py` measures fanout's overhead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fanout::{Executor, HttpOptions, OpenAi, Request};

struct Args {
    base_url: String,
    n: usize,
    concurrency: usize,
    rpm: Option<u64>,
    attempt_timeout: Option<Duration>,
    max_attempts: u32,
    probe: bool,
    bare: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        base_url: String::new(),
        n: 1000,
        concurrency: 100,
        rpm: None,
        attempt_timeout: Some(Duration::from_secs(120)),
        max_attempts: 5,
        probe: true,
        bare: false,
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        if flag == "--no-probe" || flag == "--bare" {
            args.probe &= flag != "--no-probe";
            args.bare |= flag == "--bare";
            continue;
        }
        let value = words.next().ok_or(format!("{flag} needs a value"))?;
        let number =
            |v: &str| v.parse::<u64>().map_err(|_| format!("{flag}: `{v}` is not a number"));
        match flag.as_str() {
            "--base-url" => args.base_url = value,
            "--n" => args.n = number(&value)? as usize,
            "--concurrency" => args.concurrency = number(&value)? as usize,
            "--rpm" => args.rpm = Some(number(&value)?),
            "--attempt-timeout-ms" => {
                args.attempt_timeout = Some(Duration::from_millis(number(&value)?))
            }
            "--max-attempts" => args.max_attempts = number(&value)? as u32,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if args.base_url.is_empty() {
        return Err("--base-url is required".into());
    }
    Ok(args)
}

#[tokio::main]
async fn main() {
    let args = parse().unwrap_or_else(|message| {
        eprintln!("openai_load: {message}");
        std::process::exit(2);
    });
    if args.bare {
        return bare(&args).await;
    }
    let http = HttpOptions { max_idle_connections: args.concurrency, ..HttpOptions::default() };
    let provider = OpenAi::builder("mock-1")
        .base_url(&args.base_url)
        .api_key("sk-mock")
        .http(http)
        .build()
        .unwrap();
    let mut builder = Executor::builder(provider)
        .concurrency(args.concurrency)
        .attempt_timeout(args.attempt_timeout)
        .max_attempts(args.max_attempts)
        .probe(args.probe);
    if let Some(rpm) = args.rpm {
        builder = builder.rpm(rpm);
    }
    let requests =
        (0..args.n).map(|i| Request::user(format!("Summarize item {i} in one sentence.")));
    let totals = builder.build().run(requests).await.totals;
    let line = serde_json::json!({
        "succeeded": totals.succeeded,
        "failed": totals.tasks - totals.succeeded,
        "wall_s": totals.wall.as_secs_f64(),
        "calls": totals.calls,
        "retries": totals.retries,
        "rate_limited": totals.rate_limited,
    });
    println!("{line}");
}

/// The same calls with reqwest alone: each waits for one of `concurrency`
/// slots, posts, reads and parses the answer.
async fn bare(args: &Args) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = reqwest::Url::parse(&format!("{}/chat/completions", args.base_url)).unwrap();
    let slots = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let start = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..args.n {
        let (client, url, slots) = (client.clone(), url.clone(), Arc::clone(&slots));
        calls.spawn(async move {
            let _slot = slots.acquire_owned().await.unwrap();
            let body = serde_json::json!({
                "model": "mock-1",
                "messages": [{"role": "user", "content": format!("Summarize item {i} in one sentence.")}],
            });
            let answer = client
                .post(url)
                .bearer_auth("sk-mock")
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&body).unwrap())
                .send()
                .await
                .ok()?;
            let bytes = answer.error_for_status().ok()?.bytes().await.ok()?;
            serde_json::from_slice::<serde_json::Value>(&bytes).ok()
        });
    }
    let succeeded = calls.join_all().await.into_iter().flatten().count();
    let line = serde_json::json!({
        "succeeded": succeeded,
        "failed": args.n - succeeded,
        "wall_s": start.elapsed().as_secs_f64(),
        "calls": args.n,
    });
    println!("{line}");
}
