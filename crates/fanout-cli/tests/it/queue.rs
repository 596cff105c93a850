//! `fanout batch --queue redis://…` and `fanout worker`: rows through a real
//! `redis-server` to worker processes, and back to the producer's store and
//! output. Hedging is off (`--no-hedge`) where a test counts calls exactly:
//! hedges are extra calls by design.

use std::process::{Child, Command};
use std::time::Duration;

use fanout_mock::{Config, Limit, MockServer};

use crate::{Home, read_lines, run, stderr};

/// The producer of job `job` over `rows.jsonl`, writing `out.jsonl`.
fn producer(home: &Home, server: &MockServer, url: &str, job: &str) -> Command {
    let mut command = home.fanout();
    command
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "-q"])
        .args(["--no-hedge", "-c", "8"])
        .args(["batch", "rows.jsonl", "--prompt", "Grade: {{ essay }}", "--id", "id"])
        .args(["--job", job, "--queue", url, "-o", "out.jsonl"]);
    command
}

/// Worker `n`, serving job `job` only, with a store of its own (it writes none).
fn worker(home: &Home, server: &MockServer, url: &str, job: &str, n: usize) -> Command {
    let mut command = home.fanout();
    command
        .args(["--provider", "openai", "--base-url", &server.openai_base_url(), "-q"])
        .arg("--store")
        .arg(home.path(&format!("worker-{n}.db")))
        .args(["worker", url, "--job", job]);
    command
}

/// A process of the test's, killed if the test ends first: a failed
/// assertion must leave no worker behind to hold the test run open.
struct Running(Option<Child>);

impl Running {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("not waited for yet")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn(mut command: Command) -> Running {
    Running(Some(command.stderr(std::process::Stdio::piped()).spawn().unwrap()))
}

/// Its output once it exits; a process still running after a minute is
/// killed and the test fails (a queue that never drains would hang it).
async fn wait(mut running: Running) -> std::process::Output {
    let mut child = running.0.take().expect("waited for once");
    let pid = child.id();
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if waited.is_err() {
        let _ = child.kill();
        let output = child.wait_with_output().unwrap();
        panic!("process {pid} still ran after a minute: {}", stderr(&output));
    }
    child.wait_with_output().unwrap()
}

/// Waits for each of `processes`, which must all end with exit 0.
async fn exit_0(processes: impl IntoIterator<Item = Running>) {
    for process in processes {
        let output = wait(process).await;
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    }
}

fn counting(config: Config) -> Config {
    Config { count_prompts: true, ..config }
}

/// Every row of `rows` answered once, in input order, and asked once.
fn every_row_once(home: &Home, server: &MockServer, rows: usize) {
    let output = read_lines(&home.path("out.jsonl"));
    assert_eq!(output.len(), rows);
    for (i, row) in output.iter().enumerate() {
        assert_eq!(row["id"], format!("row-{i}"), "in input order");
        assert_eq!(row["status"], "succeeded", "{row}");
    }
    let prompts = server.stats().prompts;
    assert_eq!(prompts.len(), rows, "every row asked");
    let twice: Vec<_> = prompts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "{} rows asked more than once, such as {:?}",
        twice.len(),
        &twice[..twice.len().min(3)]
    );
}

/// Everything Redis holds, as text: to look for what must never be there.
async fn redis_contents(url: &str) -> String {
    let client = redis::Client::open(url).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut connection).await.unwrap();
    let mut contents = String::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut connection).await.unwrap();
        let value: redis::Value = match kind.as_str() {
            "hash" => redis::cmd("HGETALL").arg(&key).query_async(&mut connection).await.unwrap(),
            "stream" => redis::cmd("XRANGE")
                .arg(&key)
                .arg("-")
                .arg("+")
                .query_async(&mut connection)
                .await
                .unwrap(),
            "set" => redis::cmd("SMEMBERS").arg(&key).query_async(&mut connection).await.unwrap(),
            _ => redis::Value::Nil,
        };
        contents.push_str(&format!("{key}: {value:?}\n"));
    }
    contents
}

async fn job_keys(url: &str) -> Vec<String> {
    let client = redis::Client::open(url).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("KEYS").arg("fanout:queue:*").query_async(&mut connection).await.unwrap()
}

/// Three workers and a producer against a server limited to 1,200 requests
/// a minute that says nothing of it in its headers: every row is asked once
/// and answered once, in input order; the workers keep the job's --rpm
/// together (429s under 1% by the server's own count); the key each worker
/// reads from its environment never reaches Redis; and the job leaves Redis
/// once every row is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_answer_every_row_once_within_the_servers_rate() {
    const ROWS: usize = 90;
    let Some(redis) = fanout_queue::server::for_test() else { return };
    let config = Config {
        latency: Duration::from_millis(20),
        rpm: Some(Limit::per_minute(1_200)),
        rate_limit_headers: false,
        ..Config::default()
    };
    let server = MockServer::start(counting(config)).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(ROWS));
    let key = "sk-never-in-redis-4242";
    let mut command = producer(&home, &server, &redis.url(), "essays");
    command.args(["--rpm", "1200"]).env("OPENAI_API_KEY", key);
    let producing = spawn(command);
    // The rows are queued before any worker runs: nothing secret among them.
    for _ in 0..200 {
        if !job_keys(&redis.url()).await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let contents = redis_contents(&redis.url()).await;
    assert!(contents.contains("Grade: essay number 0"), "{contents}");
    assert!(!contents.contains(key), "the key reached Redis: {contents}");
    let workers: Vec<_> = (0..3)
        .map(|n| {
            let mut command = worker(&home, &server, &redis.url(), "essays", n);
            command.env("OPENAI_API_KEY", key);
            spawn(command)
        })
        .collect();
    let produced = wait(producing).await;
    assert_eq!(produced.status.code(), Some(0), "{}", stderr(&produced));
    exit_0(workers).await;
    every_row_once(&home, &server, ROWS);
    let stats = server.stats();
    let limited = stats.count(429);
    assert!(limited * 100 <= stats.requests, "{limited} 429s in {} requests", stats.requests);
    assert!(job_keys(&redis.url()).await.is_empty(), "the finished job is gone from Redis");
    // The producer's store has the job, as for any run.
    let mut show = home.fanout();
    show.args(["jobs", "show", "essays"]);
    let shown = run(show).await;
    assert!(String::from_utf8_lossy(&shown.stdout).contains("succeeded"), "{shown:?}");
}

/// Three workers given no --rpm against a server that states its limit in
/// its rate-limit headers: the limit one worker learns from them becomes the
/// rate all of them share through Redis, so together they keep to it (429s
/// under 1% by the server's own count) instead of each spending what it reads
/// as left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_the_limit_the_server_states() {
    const ROWS: usize = 120;
    let Some(redis) = fanout_queue::server::for_test() else { return };
    let config = Config {
        latency: Duration::from_millis(20),
        rpm: Some(Limit::per_minute(1_200)),
        ..Config::default()
    };
    let server = MockServer::start(counting(config)).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(ROWS));
    let producing = spawn(producer(&home, &server, &redis.url(), "stated"));
    let workers: Vec<_> =
        (0..3).map(|n| spawn(worker(&home, &server, &redis.url(), "stated", n))).collect();
    let produced = wait(producing).await;
    assert_eq!(produced.status.code(), Some(0), "{}", stderr(&produced));
    exit_0(workers).await;
    let stats = server.stats();
    let limited = stats.count(429);
    assert!(limited * 100 <= stats.requests, "{limited} 429s in {} requests", stats.requests);
    every_row_once(&home, &server, ROWS);
}

/// A worker killed with `kill -9` mid-run leaves its rows taken and
/// unanswered; once they have been idle for --claim-after another worker
/// takes them over. Every row ends with one result, and the calls paid
/// twice are at most what the dead worker had in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_leaves_its_rows_to_the_others() {
    const ROWS: usize = 200;
    let Some(redis) = fanout_queue::server::for_test() else { return };
    let config = Config { latency: Duration::from_millis(150), ..Config::default() };
    let server = MockServer::start(config).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(ROWS));
    let producing = spawn(producer(&home, &server, &redis.url(), "killed"));
    let with_claims = |n| {
        let mut command = worker(&home, &server, &redis.url(), "killed", n);
        command.args(["--claim-after", "1", "-c", "8"]);
        spawn(command)
    };
    let mut doomed = with_claims(0);
    let survivor = with_claims(1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(doomed.child().try_wait().unwrap().is_none(), "killed mid-run");
    let _ = doomed.child().kill(); // SIGKILL
    let _ = doomed.child().wait();
    let produced = wait(producing).await;
    assert_eq!(produced.status.code(), Some(0), "{}", stderr(&produced));
    let output = wait(survivor).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let rows = read_lines(&home.path("out.jsonl"));
    assert_eq!(rows.len(), ROWS);
    assert!(rows.iter().all(|r| r["status"] == "succeeded"));
    let requests = server.stats().requests;
    assert!(requests <= ROWS as u64 + 8, "{requests} requests for {ROWS} rows");
}

/// A producer killed with `kill -9` mid-run, then resumed with `fanout jobs
/// resume --queue`: rows it had enqueued are not enqueued again, results it
/// had been given but not stored are given again, and every row is asked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_mid_run_resumes_without_enqueuing_twice() {
    // More rows than the producer keeps enqueued at once (1,024 at -c 8).
    const ROWS: usize = 1_500;
    let Some(redis) = fanout_queue::server::for_test() else { return };
    let config = Config { latency: Duration::from_millis(5), ..Config::default() };
    let server = MockServer::start(counting(config)).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(ROWS));
    let workers: Vec<_> = (0..2)
        .map(|n| {
            let mut command = worker(&home, &server, &redis.url(), "resumed", n);
            command.args(["-c", "16", "--no-hedge"]);
            spawn(command)
        })
        .collect();
    let mut first = spawn(producer(&home, &server, &redis.url(), "resumed"));
    // Killed once some rows are answered and others are still to be enqueued.
    for _ in 0..400 {
        if server.stats().requests >= 300 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(first.child().try_wait().unwrap().is_none(), "killed mid-run");
    assert!(server.stats().requests < ROWS as u64, "killed with rows left");
    let _ = first.child().kill();
    let _ = first.child().wait();
    // The workers answer every row that was enqueued: hundreds of results
    // wait, unread or read and not stored, for the resumed producer.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    for _ in 0..500 {
        let left: u64 = redis::cmd("XLEN")
            .arg("fanout:queue:resumed:tasks")
            .query_async(&mut connection)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waiting: u64 = redis::cmd("XLEN")
        .arg("fanout:queue:resumed:results")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(waiting > 100, "{waiting} results wait for the resume");
    let mut resume = home.fanout();
    resume.args(["-q", "jobs", "resume", "resumed", "--queue", &redis.url(), "-o", "out.jsonl"]);
    let resumed = run(resume).await;
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    exit_0(workers).await;
    every_row_once(&home, &server, ROWS);
}

/// Redis killed mid-run and started again (with its data, as one set up to
/// keep it is): workers keep their finished results and hand them back when
/// it returns, the producer goes on collecting, and every row is answered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_run_loses_nothing() {
    const ROWS: usize = 200;
    if fanout_queue::server::for_test().is_none() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let redis = fanout_queue::server::LocalRedis::start_saving_on(port, data.path()).unwrap();
    let url = redis.url();
    let config = Config { latency: Duration::from_millis(100), ..Config::default() };
    let server = MockServer::start(counting(config)).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(ROWS));
    let mut producing = spawn(producer(&home, &server, &url, "outage"));
    let workers: Vec<_> = (0..2)
        .map(|n| {
            let mut command = worker(&home, &server, &url, "outage", n);
            // Longer than the outage and a keep-alive together, so no row
            // being worked on is taken over; a row whose taking Redis did
            // not get to answer is taken over after it.
            command.args(["-c", "4", "--no-hedge", "--claim-after", "5"]);
            spawn(command)
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(producing.child().try_wait().unwrap().is_none(), "Redis stopped mid-run");
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let _back = fanout_queue::server::LocalRedis::start_saving_on(port, data.path()).unwrap();
    let produced = wait(producing).await;
    assert_eq!(produced.status.code(), Some(0), "{}", stderr(&produced));
    exit_0(workers).await;
    every_row_once(&home, &server, ROWS);
}

/// What cannot work is said before any call (exit 2): an unreachable Redis
/// (its password never shown), for the producer and for a worker; a worker
/// told another model than the job's; a queued job resumed without its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_work_is_refused_before_any_call() {
    let server = MockServer::start(Config::default()).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(3));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nowhere = format!("redis://:secret-password@127.0.0.1:{port}/0");
    for command in
        [producer(&home, &server, &nowhere, "j"), worker(&home, &server, &nowhere, "j", 0)]
    {
        let output = run(command).await;
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        let said = stderr(&output);
        assert!(said.contains(&format!("redis://***@127.0.0.1:{port}/0")), "{said}");
        assert!(!said.contains("secret-password"), "{said}");
    }
    assert_eq!(server.stats().requests, 0);

    let Some(redis) = fanout_queue::server::for_test() else { return };
    let producing = spawn(producer(&home, &server, &redis.url(), "j"));
    let mut other_model = worker(&home, &server, &redis.url(), "j", 1);
    other_model.args(["--model", "another-model"]);
    let refused = run(other_model).await;
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("another-model"), "{}", stderr(&refused));
    // Stopped with rows still queued, the job resumes only through its queue.
    let mut producing = producing;
    let _ = producing.child().kill();
    let _ = producing.child().wait();
    let mut resume = home.fanout();
    resume.args(["jobs", "resume", "j"]);
    let output = run(resume).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("--queue"), "{}", stderr(&output));
    assert_eq!(server.stats().requests, 0);
}

/// A row answered twice — a slow worker finishing a row another worker took
/// over — is stored and written once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_answered_twice_is_stored_once() {
    const ROWS: usize = 4;
    let Some(redis) = fanout_queue::server::for_test() else { return };
    let config = Config { latency: Duration::from_millis(2_500), ..Config::default() };
    let server = MockServer::start(counting(config)).await.unwrap();
    let home = Home::new();
    home.write("rows.jsonl", crate::rows(ROWS));
    let mut producing = producer(&home, &server, &redis.url(), "twice");
    producing.arg("--json");
    let producing = spawn(producing);
    // The slow one takes every row, runs two at a time and says it is at
    // work every 10 s; the impatient one takes over rows silent for 1 s and
    // runs all four at once, so it answers rows 0 and 1 again while the
    // producer still waits for rows 2 and 3.
    let mut slow = worker(&home, &server, &redis.url(), "twice", 0);
    slow.args(["-c", "2", "--no-hedge", "--claim-after", "30"]);
    let slow = spawn(slow);
    for _ in 0..200 {
        if server.stats().requests >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut impatient = worker(&home, &server, &redis.url(), "twice", 1);
    impatient.args(["-c", "4", "--no-hedge", "--claim-after", "1"]);
    let impatient = spawn(impatient);
    let produced = wait(producing).await;
    assert_eq!(produced.status.code(), Some(0), "{}", stderr(&produced));
    let said = stderr(&produced);
    let totals: serde_json::Value = serde_json::from_str(said.lines().last().unwrap()).unwrap();
    assert_eq!(
        (totals["tasks"].as_u64(), totals["succeeded"].as_u64()),
        (Some(4), Some(4)),
        "{said}"
    );
    exit_0([slow, impatient]).await;
    let prompts = server.stats().prompts;
    assert!(prompts.values().all(|n| *n == 2), "every row was run twice: {prompts:?}");
    let output = read_lines(&home.path("out.jsonl"));
    let ids: Vec<_> = output.iter().map(|row| row["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, (0..ROWS).map(|i| format!("row-{i}")).collect::<Vec<_>>());
    let db = rusqlite::Connection::open(home.store()).unwrap();
    let stored: i64 = db.query_row("SELECT COUNT(*) FROM tasks", [], |row| row.get(0)).unwrap();
    assert_eq!(stored, ROWS as i64);
    assert!(job_keys(&redis.url()).await.is_empty(), "late answers leave nothing in Redis");
}
