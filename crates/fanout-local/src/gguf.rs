//! Reading a GGUF file: typed metadata look-ups with errors that name the key,
//! and the model's shape as the file describes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};

use crate::LocalError;

/// A GGUF file's header: metadata and tensor directory (the weights stay on disk
/// until [`crate::model::Weights::load`] reads them).
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, LocalError> {
        let mut file = std::fs::File::open(path).map_err(|e| LocalError::io(path, e))?;
        let content = Content::read(&mut file).map_err(|e| LocalError::Format {
            path: path.to_path_buf(),
            message: format!("not a readable GGUF file: {e}"),
        })?;
        Ok(Self { path: path.to_path_buf(), content })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn get(&self, key: &str) -> Result<&Value, LocalError> {
        self.metadata()
            .get(key)
            .ok_or_else(|| self.format_error(format!("metadata key `{key}` is missing")))
    }

    pub fn format_error(&self, message: String) -> LocalError {
        LocalError::Format { path: self.path.clone(), message }
    }

    pub fn string(&self, key: &str) -> Result<&str, LocalError> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            other => Err(self.format_error(format!(
                "metadata key `{key}` is {:?}, not a string",
                other.value_type()
            ))),
        }
    }

    pub fn optional_string(&self, key: &str) -> Option<&str> {
        match self.metadata().get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    pub fn usize(&self, key: &str) -> Result<usize, LocalError> {
        let value = self.get(key)?;
        value
            .to_u64()
            .or_else(|_| value.to_u32().map(u64::from))
            .or_else(|_| value.to_i32().map(|v| v.max(0) as u64))
            .map(|v| v as usize)
            .map_err(|_| {
                self.format_error(format!("metadata key `{key}` is not an unsigned integer"))
            })
    }

    pub fn optional_u32(&self, key: &str) -> Option<u32> {
        let value = self.metadata().get(key)?;
        value.to_u32().ok().or_else(|| value.to_i32().ok().map(|v| v as u32))
    }

    pub fn f32(&self, key: &str) -> Result<f32, LocalError> {
        self.get(key)?
            .to_f32()
            .map_err(|_| self.format_error(format!("metadata key `{key}` is not a float")))
    }

    pub fn array(&self, key: &str) -> Result<&[Value], LocalError> {
        match self.get(key)? {
            Value::Array(items) => Ok(items),
            _ => Err(self.format_error(format!("metadata key `{key}` is not an array"))),
        }
    }

    pub fn optional_bool(&self, key: &str) -> Option<bool> {
        self.metadata().get(key).and_then(|v| v.to_bool().ok())
    }
}

/// The transformer's dimensions, read from `{arch}.*` metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// `general.architecture`: always `llama`, the one family supported.
    pub architecture: String,
    /// Transformer blocks.
    pub layers: usize,
    /// Embedding width (`embedding_length`).
    pub hidden: usize,
    /// Width of the feed-forward block's hidden layer.
    pub feed_forward: usize,
    /// Query attention heads.
    pub heads: usize,
    /// Key/value heads, dividing `heads` (grouped-query attention); `heads` when the
    /// file names none.
    pub kv_heads: usize,
    /// Width of one head: `hidden / heads`, always even.
    pub head_dim: usize,
    /// Most positions a sequence may use, in tokens (2048 when the file names none).
    pub context_length: usize,
    /// RMS norm epsilon (1e-5 when the file names none).
    pub rms_eps: f32,
    /// Rotary embedding base frequency (10000 when the file names none).
    pub rope_base: f32,
    /// Tokens in the vocabulary (`vocab_size`, else the length of `tokenizer.ggml.tokens`).
    pub vocab_size: usize,
}

impl ModelConfig {
    /// Bytes of KV cache one position takes: keys and values of every layer, as f32.
    pub fn kv_bytes_per_token(&self) -> u64 {
        (self.kv_heads * self.head_dim * 2 * self.layers * std::mem::size_of::<f32>()) as u64
    }

    /// Reads and checks the dimensions; a non-llama or inconsistent shape is a format error.
    pub fn read(gguf: &GgufFile) -> Result<Self, LocalError> {
        let arch = gguf.string("general.architecture")?.to_owned();
        if arch != "llama" {
            return Err(gguf.format_error(format!(
                "architecture `{arch}` is not supported (fanout runs llama-family GGUF models)"
            )));
        }
        let key = |name: &str| format!("{arch}.{name}");
        let hidden = gguf.usize(&key("embedding_length"))?;
        let heads = gguf.usize(&key("attention.head_count"))?;
        let kv_heads = gguf.usize(&key("attention.head_count_kv")).unwrap_or(heads);
        if heads == 0 || hidden % heads != 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(gguf.format_error(format!(
                "inconsistent attention shape: {heads} heads, {kv_heads} kv heads, width {hidden}"
            )));
        }
        let head_dim = hidden / heads;
        if head_dim % 2 != 0 {
            return Err(gguf.format_error(format!(
                "head dimension {head_dim} is odd; rotary embeddings need pairs"
            )));
        }
        let vocab_size = match gguf.usize(&key("vocab_size")) {
            Ok(size) => size,
            Err(_) => gguf.array("tokenizer.ggml.tokens")?.len(),
        };
        Ok(Self {
            layers: gguf.usize(&key("block_count"))?,
            feed_forward: gguf.usize(&key("feed_forward_length"))?,
            context_length: gguf.usize(&key("context_length")).unwrap_or(2048),
            rms_eps: gguf.f32(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            rope_base: gguf.f32(&key("rope.freq_base")).unwrap_or(10_000.0),
            architecture: arch,
            hidden,
            heads,
            kv_heads,
            head_dim,
            vocab_size,
        })
    }
}
