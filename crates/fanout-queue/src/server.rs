//! A throwaway `redis-server` on 127.0.0.1, for tests and trials: started on
//! a free port with nothing saved to disk, stopped when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server` of its own.
#[derive(Debug)]
pub struct LocalRedis {
    child: Child,
    port: u16,
}

impl LocalRedis {
    /// Starts `redis-server` (from `PATH`, or `FANOUT_REDIS_SERVER`) and waits
    /// until it answers; `None` when there is none to start.
    pub fn start() -> Option<Self> {
        let port = free_port();
        Self::start_on(port)
    }

    /// Starts one on `port` (to bring a stopped server back where it was).
    pub fn start_on(port: u16) -> Option<Self> {
        Self::launch(port, &["--save", "", "--appendonly", "no"])
    }

    /// Starts one on `port` that writes every change to `dir` before
    /// answering (append-only file, synced at each write), as a Redis set up
    /// to survive restarts does: stopped and started again on the same port
    /// and folder, it has everything it had.
    pub fn start_saving_on(port: u16, dir: &std::path::Path) -> Option<Self> {
        let dir = dir.to_str()?;
        Self::launch(
            port,
            &["--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", dir],
        )
    }

    fn launch(port: u16, persistence: &[&str]) -> Option<Self> {
        let program =
            std::env::var_os("FANOUT_REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
        let child = Command::new(program)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(persistence)
            .args(["--protected-mode", "yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let server = Self { child, port };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                panic!("redis-server did not listen on 127.0.0.1:{port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(server)
    }

    /// Its address: `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops it at once, as a crash would (`kill -9`).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("a free port on 127.0.0.1");
    listener.local_addr().expect("a bound address").port()
}

/// A server for a test: CI (`CI` set) must have `redis-server` (`.ci/run`
/// installs it); elsewhere its absence is said and the test does not run.
pub fn for_test() -> Option<LocalRedis> {
    if let Some(server) = LocalRedis::start() {
        return Some(server);
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI must install redis-server (apt-get install redis-server)");
    }
    eprintln!(
        "no redis-server: the Redis part of this test does not run (apt-get install redis-server)"
    );
    None
}
