//! `--limits redis://…`: separate `fanout batch` processes sharing one rate
//! limit and one in-flight cap through a real `redis-server`.

use std::time::Duration;

use fanout_mock::{Config, Limit, MockServer};

use crate::{Home, read_lines, run, stderr};

const PROCESSES: usize = 3;
const ROWS: usize = 40;

/// One process's run: its own input, store and output, the shared limits.
fn batch(home: &Home, server: &MockServer, p: usize, limits: &str) -> std::process::Command {
    let mut command = home.fanout();
    command
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "-q"])
        .args(["--rpm", "1200", "-c", "16", "--store"])
        .arg(home.path(&format!("s{p}.db")))
        .arg("batch")
        .arg(home.path(&format!("rows-{p}.jsonl")))
        .args(["--prompt", "Grade: {{ essay }}", "--id", "id", "--job", "shared"])
        .args(["--limits", limits, "--global-concurrency", "4"])
        .args(["-o", &format!("out-{p}.jsonl")]);
    command
}

/// Three processes against a server limited to 1,200 requests a minute that
/// says nothing of it in its headers: each alone would send 16 at once; with
/// the limits shared they stay within the server's rate together (429s under
/// 1% of requests, by the server's own count), never have more than the
/// global 4 calls in flight, and every row is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_sharing_limits_stay_within_the_servers_rate_together() {
    let Some(redis) = fanout_queue::server::for_test() else { return };
    let config = Config {
        latency: Duration::from_millis(50),
        rpm: Some(Limit::per_minute(1_200)),
        rate_limit_headers: false,
        ..Config::default()
    };
    let server = MockServer::start(config).await.unwrap();
    let home = Home::new();
    for p in 0..PROCESSES {
        home.write(&format!("rows-{p}.jsonl"), crate::rows(ROWS));
    }
    let children: Vec<_> =
        (0..PROCESSES).map(|p| batch(&home, &server, p, &redis.url()).spawn().unwrap()).collect();
    let outputs = tokio::task::spawn_blocking(move || {
        children.into_iter().map(|child| child.wait_with_output().unwrap()).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for output in &outputs {
        assert_eq!(output.status.code(), Some(0), "{}", stderr(output));
    }
    for p in 0..PROCESSES {
        let rows = read_lines(&home.path(&format!("out-{p}.jsonl")));
        assert_eq!(rows.len(), ROWS);
        assert!(rows.iter().all(|r| r["status"] == "succeeded"), "process {p}");
    }
    let stats = server.stats();
    let limited = stats.by_status.get(&429).copied().unwrap_or(0);
    assert!(limited * 100 <= stats.requests, "{limited} 429s in {} requests", stats.requests);
    assert!(stats.max_in_flight <= 4, "{} calls in flight at once", stats.max_in_flight);
}

/// An unreachable Redis stops the run before any call, naming it (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_stops_the_run_before_any_call() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    home.write("rows-0.jsonl", crate::rows(3));
    // A port nothing listens on: bound, then let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("redis://:secret-password@127.0.0.1:{port}/0");
    let output = run(batch(&home, &server, 0, &url)).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let said = stderr(&output);
    assert!(
        said.contains(&format!("cannot reach Redis at redis://***@127.0.0.1:{port}/0")),
        "{said}"
    );
    assert!(!said.contains("secret-password"), "{said}");
    assert_eq!(server.stats().requests, 0);
}

/// The address in FANOUT_LIMITS (which may hold a password) is never shown
/// by `--help`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_never_shows_the_limits_address() {
    let home = Home::new();
    let mut command = home.fanout();
    command
        .env("FANOUT_LIMITS", "redis://:secret-password@127.0.0.1:6379/0")
        .args(["batch", "--help"]);
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("--limits <URL>"), "{help}");
    assert!(!help.contains("secret-password"), "{help}");
}
