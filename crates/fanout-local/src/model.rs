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
use candle_core::{DType, Device};
use rayon::prelude::*;

use crate::LocalError;
use crate::attention;
use crate::gguf::{GgufFile, ModelConfig};
use crate::kv::{BlockId, KvPool};
use crate::linear::{Linear, Stacked};

/// One token to run: the sequence (index into the block tables) and its position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub token: u32,
    pub sequence: usize,
    pub position: usize,
}

#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    /// attn_q, attn_k and attn_v: each row's query, key and value side by side.
    qkv: Stacked,
    o: Linear,
    ffn_norm: Vec<f32>,
    /// ffn_gate and ffn_up, side by side.
    gate_up: Stacked,
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
    norm: Vec<f32>,
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
                    qkv: Stacked::new(vec![
                        weight("attn_q")?.linear()?,
                        weight("attn_k")?.linear()?,
                        weight("attn_v")?.linear()?,
                    ]),
                    o: weight("attn_output")?.linear()?,
                    ffn_norm: weight("ffn_norm")?.vector()?,
                    gate_up: Stacked::new(vec![
                        weight("ffn_gate")?.linear()?,
                        weight("ffn_up")?.linear()?,
                    ]),
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
            let [q, k, v] = layer.qkv.shapes() else { unreachable!("three parts") };
            expect("attn_q", q, &[c.hidden, c.hidden])?;
            expect("attn_k", k, &[kv, c.hidden])?;
            expect("attn_v", v, &[kv, c.hidden])?;
            expect("attn_output", &layer.o.shape(), &[c.hidden, c.hidden])?;
            let [gate, up] = layer.gate_up.shapes() else { unreachable!("two parts") };
            expect("ffn_gate", gate, &[c.feed_forward, c.hidden])?;
            expect("ffn_up", up, &[c.feed_forward, c.hidden])?;
            expect("ffn_down", &layer.down.shape(), &[c.hidden, c.feed_forward])?;
            expect("attn_norm", &[layer.attn_norm.len()], &[c.hidden])?;
            expect("ffn_norm", &[layer.ffn_norm.len()], &[c.hidden])?;
        }
        expect("output", &self.output.shape(), &[c.vocab_size, c.hidden])?;
        expect("output_norm", &[self.norm.len()], &[c.hidden])?;
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
        let n = rows.len();
        let ids: Vec<u32> = rows.iter().map(|r| r.token).collect();
        // The residual stream: one row of `hidden` floats per token.
        let mut x = self.embedding.rows(&ids)?;
        let kv_width = c.kv_heads * c.head_dim;
        let qkv_width = c.hidden + 2 * kv_width;
        for (index, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, c.rms_eps);
            let mut qkv = layer.qkv.forward(&h, n)?;
            let block_tokens = pool.block_tokens();
            for (row, values) in rows.iter().zip(qkv.chunks_exact_mut(qkv_width)) {
                let (q, kv) = values.split_at_mut(c.hidden);
                let (key, value) = kv.split_at_mut(kv_width);
                self.rope.apply(q, row.position);
                self.rope.apply(key, row.position);
                let block = tables[row.sequence][row.position / block_tokens];
                pool.write(block, index, row.position % block_tokens, key, value);
            }
            let attended = self.attention(index, rows, pool, tables, &qkv, qkv_width);
            add(&mut x, &layer.o.forward(&attended, n)?);
            let h = rms_norm(&x, &layer.ffn_norm, c.rms_eps);
            let gate_up = layer.gate_up.forward(&h, n)?;
            let gated: Vec<f32> = gate_up
                .chunks_exact(2 * c.feed_forward)
                .flat_map(|row| {
                    let (gate, up) = row.split_at(c.feed_forward);
                    gate.iter().zip(up).map(|(&g, &u)| silu(g) * u)
                })
                .collect();
            add(&mut x, &layer.down.forward(&gated, n)?);
        }
        if logits_for.is_empty() {
            return Ok(Vec::new());
        }
        let last: Vec<f32> =
            logits_for.iter().flat_map(|&i| &x[i * c.hidden..][..c.hidden]).copied().collect();
        let last = rms_norm(&last, &self.norm, c.rms_eps);
        let logits = self.output.forward(&last, logits_for.len())?;
        Ok(logits.chunks_exact(c.vocab_size).map(<[f32]>::to_vec).collect())
    }

    /// Causal attention of each row against its own sequence's blocks, which
    /// already hold this step's keys and values.
    fn attention(
        &self,
        layer: usize,
        rows: &[Row],
        pool: &KvPool,
        tables: &[&[BlockId]],
        qkv: &[f32],
        qkv_width: usize,
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
        out.par_chunks_mut(c.hidden).zip(qkv.par_chunks(qkv_width)).zip(rows).for_each(
            |((out, qkv), row)| {
                let q = &qkv[..c.hidden];
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
    fn vector(self) -> Result<Vec<f32>, LocalError> {
        self.tensor
            .dequantize(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1())
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

/// Each row of `x` scaled to a root mean square of one, times `weight`.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    x.chunks_exact(weight.len())
        .flat_map(|row| {
            let mean_square = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            let scale = 1.0 / (mean_square + eps).sqrt();
            row.iter().zip(weight).map(move |(v, w)| v * scale * w)
        })
        .collect()
}

/// SiLU, `v · sigmoid(v)`, written as candle writes it.
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// `x += delta`, element by element.
fn add(x: &mut [f32], delta: &[f32]) {
    for (x, d) in x.iter_mut().zip(delta) {
        *x += d;
    }
}
