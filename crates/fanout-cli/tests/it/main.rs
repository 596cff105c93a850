//! The `fanout` binary, run as a user runs it: a fresh home and store per test,
//! the in-process mock provider or `fanout-mock` on 127.0.0.1.

mod agents;
mod batch;
mod batch_api;
mod config;
mod costs;
mod crash;
mod exit_codes;
mod jobs;
mod local;
mod patterns;
mod proxy;
mod queue;
mod report;
mod shard;
mod shared_limits;
mod structured;
#[cfg(feature = "otlp")]
mod telemetry;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// A fresh home, store and working directory.
#[derive(Debug)]
pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Default for Home {
    fn default() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }
}

impl Home {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    pub fn store(&self) -> PathBuf {
        self.path("home/fanout.db")
    }

    /// The binary with this home, and no provider settings from the real environment.
    pub fn fanout(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fanout"));
        command
            .current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .env("FANOUT_HOME", self.path("home"))
            .env("XDG_CONFIG_HOME", self.path("config"))
            .env("FANOUT_CACHE_DIR", self.path("models"))
            // The local model is never fetched in tests: the hub address refuses,
            // and no Python (so no installed package, no pip) is found.
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("FANOUT_PYTHON", self.path("no-python"));
        for name in [
            "OPENAI_API_KEY",
            "OPENAI_BASE_URL",
            "ANTHROPIC_API_KEY",
            "ANTHROPIC_BASE_URL",
            "FANOUT_PROVIDER",
            "FANOUT_MODEL",
            "FANOUT_PROFILE",
            "FANOUT_CONFIG",
            "FANOUT_STORE",
            "XDG_DATA_HOME",
            "XDG_CACHE_HOME",
            "FANOUT_THREADS",
        ] {
            command.env_remove(name);
        }
        command
    }
}

/// Runs a command off the async runtime (the mock server lives on it).
pub async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The JSON lines of stdout (or of a file).
pub fn lines(text: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(text).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

pub fn read_lines(path: &Path) -> Vec<Value> {
    lines(&std::fs::read(path).unwrap())
}

pub fn rows(n: usize) -> String {
    (0..n).map(|i| format!("{{\"id\":\"row-{i}\",\"essay\":\"essay number {i}\"}}\n")).collect()
}
