//! An embedded language model for fanout: a llama-family GGUF model (by
//! default SmolLM2-135M-Instruct) running in-process on the CPU, so fanout
//! works offline with nothing else installed.
//!
//! [`LocalModel`] implements [`fanout::Provider`]: the executor, every pattern
//! and `fanout batch` run on it unchanged. Concurrent requests share one
//! forward pass per step (continuous batching, see [`engine`]), so running
//! eight requests at once is several times faster than running them in turn.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use fanout::{Provider, Request};
//! use fanout_local::{LocalModel, LocalOptions, Locations, ModelSpec};
//!
//! let (path, _) = fanout_local::resolve(None, &ModelSpec::default(), &Locations::from_env())?;
//! let model = LocalModel::load(&path, LocalOptions::default())?;
//! let answer = model.complete(&Request::user("What is the capital of France?")).await?;
//! println!("{}", answer.text);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod attention;
mod chat;
pub mod engine;
mod error;
mod gguf;
mod grammar;
mod kv;
mod lanes;
mod linear;
mod model;
mod provider;
mod quant;
mod resolve;
pub mod sampling;
#[cfg(feature = "fixtures")]
pub mod tiny;
mod tokenizer;

pub use engine::{EngineOptions, EngineStats, FinishReason, Generation, GenerationRequest};
pub use error::LocalError;
pub use gguf::ModelConfig;
pub use grammar::OutputFormat;
pub use provider::{LocalModel, LocalOptions};
pub use resolve::{Locations, ModelSource, ModelSpec, find, pull, resolve};
pub use tokenizer::ChatTokenizer;
