//! The llama-family transformer, written for continuous batching.
//!
//! One forward pass takes a list of *rows*: each row is one token of one
//! sequence at that sequence's own position. Prompt chunks of new sequences
//! and single decode tokens of running ones share the pass, so every weight
//! matrix is read once per step for the whole batch. Each sequence's keys and
//! values live in blocks of the shared pool (`kv`), listed by its block
//! table; attention is computed row by row against those blocks.

use std::path::{Path, PathBuf};

use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::Content;
use candle_core::{D, DType, Device, Tensor};
use rayon::prelude::*;

use crate::LocalError;
use crate::attention;
use crate::gguf::{GgufFile, ModelConfig};
use crate::kv::{BlockId, KvPool};
use crate::linear::Linear;

/// One token to run: the sequence (index into the block tables) and its position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub token: u32,
    pub sequence: usize,
    pub position: usize,
}

#[derive(Debug)]
struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Rotary embedding angles for every position of the context.
#[derive(Debug)]
struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    fn new(config: &ModelConfig) -> Self {
        let half = config.head_dim / 2;
        let mut cos = Vec::with_capacity(config.context_length * half);
        let mut sin = Vec::with_capacity(config.context_length * half);
        for position in 0..config.context_length {
            for i in 0..half {
                let freq = config.rope_base.powf(-2.0 * i as f32 / config.head_dim as f32);
                let angle = position as f32 * freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { half, cos, sin }
    }

    /// Rotates adjacent pairs of every head in `vector` (GGUF's llama layout).
    fn apply(&self, vector: &mut [f32], position: usize) {
        let cos = &self.cos[position * self.half..][..self.half];
        let sin = &self.sin[position * self.half..][..self.half];
        for head in vector.chunks_exact_mut(self.half * 2) {
            for (pair, (&c, &s)) in head.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * c - b * s;
                pair[1] = a * s + b * c;
            }
        }
    }
}

#[derive(Debug)]
pub struct Model {
    pub config: ModelConfig,
    embedding: Linear,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Linear,
    rope: Rope,
}

impl Model {
    pub fn load(gguf: &GgufFile) -> Result<Self, LocalError> {
        let config = ModelConfig::read(gguf)?;
        let path = gguf.path.as_path();
        let mut file = std::fs::File::open(path).map_err(|e| LocalError::io(path, e))?;
        let mut read = |name: &str| read_tensor(&gguf.content, &mut file, path, name);
        let embedding = read("token_embd.weight")?;
        let layers = (0..config.layers)
            .map(|i| {
                let mut weight = |part: &str| read(&format!("blk.{i}.{part}.weight"));
                Ok(Layer {
                    attn_norm: weight("attn_norm")?.vector()?,
                    q: weight("attn_q")?.linear()?,
                    k: weight("attn_k")?.linear()?,
                    v: weight("attn_v")?.linear()?,
                    o: weight("attn_output")?.linear()?,
                    ffn_norm: weight("ffn_norm")?.vector()?,
                    gate: weight("ffn_gate")?.linear()?,
                    up: weight("ffn_up")?.linear()?,
                    down: weight("ffn_down")?.linear()?,
                })
            })
            .collect::<Result<Vec<_>, LocalError>>()?;
        let norm = read("output_norm.weight")?.vector()?;
        let embedding = embedding.linear()?;
        // Small models tie the output projection to the embedding table.
        let output = if gguf.content.tensor_infos.contains_key("output.weight") {
            read("output.weight")?.linear()?
        } else {
            embedding.clone()
        };
        let model = Self { rope: Rope::new(&config), config, embedding, layers, norm, output };
        model.check_shapes().map_err(|message| gguf.format_error(message))?;
        Ok(model)
    }

    fn check_shapes(&self) -> Result<(), String> {
        let c = &self.config;
        let kv = c.kv_heads * c.head_dim;
        let expect = |what: &str, got: &[usize], want: &[usize]| {
            if got == want {
                Ok(())
            } else {
                Err(format!("{what} has shape {got:?}, expected {want:?}"))
            }
        };
        expect("token_embd.weight", &self.embedding.shape(), &[c.vocab_size, c.hidden])?;
        for layer in &self.layers {
            expect("attn_q", &layer.q.shape(), &[c.hidden, c.hidden])?;
            expect("attn_k", &layer.k.shape(), &[kv, c.hidden])?;
            expect("attn_v", &layer.v.shape(), &[kv, c.hidden])?;
            expect("attn_output", &layer.o.shape(), &[c.hidden, c.hidden])?;
            expect("ffn_gate", &layer.gate.shape(), &[c.feed_forward, c.hidden])?;
            expect("ffn_up", &layer.up.shape(), &[c.feed_forward, c.hidden])?;
            expect("ffn_down", &layer.down.shape(), &[c.hidden, c.feed_forward])?;
            expect("attn_norm", layer.attn_norm.dims(), &[c.hidden])?;
            expect("ffn_norm", layer.ffn_norm.dims(), &[c.hidden])?;
        }
        expect("output", &self.output.shape(), &[c.vocab_size, c.hidden])?;
        Ok(())
    }

    /// Runs `rows` through the model, writing their keys and values into their
    /// sequences' blocks (`tables[row.sequence]`, which must already hold a
    /// block for each row's position), and returns the next-token logits of
    /// the rows listed in `logits_for`. A row attends to every earlier
    /// position of its sequence: computed in an earlier step, shared from
    /// another sequence, or earlier in this pass.
    pub fn forward(
        &self,
        rows: &[Row],
        pool: &mut KvPool,
        tables: &[&[BlockId]],
        logits_for: &[usize],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let ids: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let mut x = self.embedding.rows(&ids)?;
        for (index, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let mut q = layer.q.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let mut k = layer.k.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let v = layer.v.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let kv_width = c.kv_heads * c.head_dim;
            for ((row, q), k) in
                rows.iter().zip(q.chunks_exact_mut(c.hidden)).zip(k.chunks_exact_mut(kv_width))
            {
                self.rope.apply(q, row.position);
                self.rope.apply(k, row.position);
            }
            let block_tokens = pool.block_tokens();
            for (i, row) in rows.iter().enumerate() {
                let block = tables[row.sequence][row.position / block_tokens];
                let (key, value) = (&k[i * kv_width..][..kv_width], &v[i * kv_width..][..kv_width]);
                pool.write(block, index, row.position % block_tokens, key, value);
            }
            let attended = self.attention(index, rows, pool, tables, &q);
            let attended = Tensor::from_vec(attended, (rows.len(), c.hidden), &Device::Cpu)?;
            x = (x + layer.o.forward(&attended)?)?;
            let h = rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gated = (layer.gate.forward(&h)?.silu()? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&gated)?)?;
        }
        if logits_for.is_empty() {
            return Ok(Vec::new());
        }
        let picked: Vec<u32> = logits_for.iter().map(|&i| i as u32).collect();
        let picked = Tensor::from_vec(picked, logits_for.len(), &Device::Cpu)?;
        let last = rms_norm(&x.index_select(&picked, 0)?, &self.norm, c.rms_eps)?;
        self.output.forward(&last)?.to_vec2::<f32>()
    }

    /// Causal attention of each row against its own sequence's blocks, which
    /// already hold this step's keys and values.
    fn attention(
        &self,
        layer: usize,
        rows: &[Row],
        pool: &KvPool,
        tables: &[&[BlockId]],
        q: &[f32],
    ) -> Vec<f32> {
        let c = &self.config;
        let shape = attention::Shape { heads: c.heads, kv_heads: c.kv_heads, head_dim: c.head_dim };
        // This layer's slice of every block, per sequence: looked up once per
        // pass, not once per row.
        let blocks: Vec<Vec<&[f32]>> = tables
            .iter()
            .map(|table| table.iter().map(|&id| pool.layer(id, layer)).collect())
            .collect();
        let mut out = vec![0f32; rows.len() * c.hidden];
        out.par_chunks_mut(c.hidden).zip(q.par_chunks(c.hidden)).zip(rows).for_each(
            |((out, q), row)| {
                let cached = attention::Cached {
                    blocks: &blocks[row.sequence],
                    block_tokens: pool.block_tokens(),
                    seen: row.position + 1,
                };
                attention::attend(shape, q, cached, out);
            },
        );
        out
    }
}

/// A tensor read from the file, with its name for error messages.
struct Named {
    tensor: QTensor,
    name: String,
    path: PathBuf,
}

impl Named {
    fn error(&self, e: candle_core::Error) -> LocalError {
        LocalError::Format {
            path: self.path.clone(),
            message: format!("tensor `{}`: {e}", self.name),
        }
    }

    fn linear(self) -> Result<Linear, LocalError> {
        Linear::from_qtensor(&self.tensor).map_err(|e| self.error(e))
    }

    /// Norm weights: small, kept as f32.
    fn vector(self) -> Result<Tensor, LocalError> {
        self.tensor
            .dequantize(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| self.error(e))
    }
}

fn read_tensor(
    content: &Content,
    file: &mut std::fs::File,
    path: &Path,
    name: &str,
) -> Result<Named, LocalError> {
    let tensor = content.tensor(file, name, &Device::Cpu).map_err(|e| LocalError::Format {
        path: path.to_path_buf(),
        message: format!("tensor `{name}`: {e}"),
    })?;
    Ok(Named { tensor, name: name.to_owned(), path: path.to_path_buf() })
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(mean_square + f64::from(eps))?.sqrt()?)?.broadcast_mul(weight)
}
