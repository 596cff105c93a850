//! The llama-family transformer, written for continuous batching.
//!
//! One forward pass takes a list of *rows*: each row is one token of one
//! sequence at that sequence's own position. Prompt chunks of new sequences
//! and single decode tokens of running ones share the pass, so every weight
//! matrix is read once per step for the whole batch. Each sequence keeps its
//! own KV cache; attention is computed row by row against that cache.

use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::{D, DType, Device, Tensor};
use rayon::prelude::*;

use crate::LocalError;
use crate::gguf::{GgufFile, ModelConfig};
use crate::linear::Linear;

/// One token to run: the sequence (index into the cache slice) and its position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub token: u32,
    pub sequence: usize,
    pub position: usize,
}

/// Keys and values of one sequence, for every layer, in position order.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    pub fn new(config: &ModelConfig) -> Self {
        Self { keys: vec![Vec::new(); config.layers], values: vec![Vec::new(); config.layers], len: 0 }
    }

    /// Positions cached so far: the position of the sequence's next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
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
    embedding: Tensor,
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
        let mut tensor = |name: &str| read_f32(&gguf.content, &mut file, path, name);
        let embedding = tensor("token_embd.weight")?;
        let layers = (0..config.layers)
            .map(|i| {
                let mut weight = |part: &str| tensor(&format!("blk.{i}.{part}.weight"));
                Ok(Layer {
                    attn_norm: weight("attn_norm")?,
                    q: Linear::new(weight("attn_q")?),
                    k: Linear::new(weight("attn_k")?),
                    v: Linear::new(weight("attn_v")?),
                    o: Linear::new(weight("attn_output")?),
                    ffn_norm: weight("ffn_norm")?,
                    gate: Linear::new(weight("ffn_gate")?),
                    up: Linear::new(weight("ffn_up")?),
                    down: Linear::new(weight("ffn_down")?),
                })
            })
            .collect::<Result<Vec<_>, LocalError>>()?;
        let norm = tensor("output_norm.weight")?;
        // Small models tie the output projection to the embedding table.
        let output = if gguf.content.tensor_infos.contains_key("output.weight") {
            Linear::new(tensor("output.weight")?)
        } else {
            Linear::new(embedding.clone())
        };
        let model = Self { rope: Rope::new(&config), config, embedding, layers, norm, output };
        model.check_shapes().map_err(|message| gguf.format_error(message))?;
        Ok(model)
    }

    fn check_shapes(&self) -> Result<(), String> {
        let c = &self.config;
        let kv = c.kv_heads * c.head_dim;
        let expect = |what: &str, got: &[usize], want: &[usize]| {
            if got == want { Ok(()) } else { Err(format!("{what} has shape {got:?}, expected {want:?}")) }
        };
        expect("token_embd.weight", self.embedding.dims(), &[c.vocab_size, c.hidden])?;
        let layer = &self.layers[0];
        expect("attn_q", layer.q.shape(), &[c.hidden, c.hidden])?;
        expect("attn_k", layer.k.shape(), &[kv, c.hidden])?;
        expect("attn_v", layer.v.shape(), &[kv, c.hidden])?;
        expect("ffn_gate", layer.gate.shape(), &[c.feed_forward, c.hidden])?;
        expect("ffn_down", layer.down.shape(), &[c.hidden, c.feed_forward])?;
        Ok(())
    }

    /// Runs `rows` through the model, appending their keys and values to the
    /// caches, and returns the next-token logits of the rows listed in `logits_for`.
    pub fn forward(
        &self,
        rows: &[Row],
        caches: &mut [KvCache],
        logits_for: &[usize],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let ids: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let ids = Tensor::from_vec(ids, rows.len(), &Device::Cpu)?;
        let mut x = self.embedding.index_select(&ids, 0)?;
        for (index, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let mut q = layer.q.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let mut k = layer.k.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let v = layer.v.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let kv_width = c.kv_heads * c.head_dim;
            for ((row, q), k) in rows.iter().zip(q.chunks_exact_mut(c.hidden)).zip(k.chunks_exact_mut(kv_width)) {
                self.rope.apply(q, row.position);
                self.rope.apply(k, row.position);
            }
            for (i, row) in rows.iter().enumerate() {
                let cache = &mut caches[row.sequence];
                debug_assert_eq!(cache.keys[index].len(), row.position * kv_width, "rows must follow their cache");
                cache.keys[index].extend_from_slice(&k[i * kv_width..][..kv_width]);
                cache.values[index].extend_from_slice(&v[i * kv_width..][..kv_width]);
            }
            let attended = self.attention(index, rows, caches, &q);
            let attended = Tensor::from_vec(attended, (rows.len(), c.hidden), &Device::Cpu)?;
            x = (x + layer.o.forward(&attended)?)?;
            let h = rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gated = (layer.gate.forward(&h)?.silu()? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&gated)?)?;
        }
        for row in rows {
            caches[row.sequence].len = caches[row.sequence].len.max(row.position + 1);
        }
        if logits_for.is_empty() {
            return Ok(Vec::new());
        }
        let picked: Vec<u32> = logits_for.iter().map(|&i| i as u32).collect();
        let picked = Tensor::from_vec(picked, logits_for.len(), &Device::Cpu)?;
        let last = rms_norm(&x.index_select(&picked, 0)?, &self.norm, c.rms_eps)?;
        self.output.forward(&last)?.to_vec2::<f32>()
    }

    /// Causal attention of each row against its own sequence's cache, which
    /// already holds this step's keys and values.
    fn attention(&self, layer: usize, rows: &[Row], caches: &[KvCache], q: &[f32]) -> Vec<f32> {
        let c = &self.config;
        let (d, group) = (c.head_dim, c.heads / c.kv_heads);
        let kv_width = c.kv_heads * d;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; rows.len() * c.hidden];
        out.par_chunks_mut(c.hidden).zip(q.par_chunks(c.hidden)).zip(rows).for_each(|((out, q), row)| {
            let cache = &caches[row.sequence];
            let (keys, values) = (&cache.keys[layer], &cache.values[layer]);
            let seen = row.position + 1;
            let mut scores = vec![0f32; seen];
            for head in 0..c.heads {
                let kv_offset = (head / group) * d;
                let q = &q[head * d..][..d];
                for (t, score) in scores.iter_mut().enumerate() {
                    *score = dot(q, &keys[t * kv_width + kv_offset..][..d]) * scale;
                }
                softmax_in_place(&mut scores);
                let out = &mut out[head * d..][..d];
                for (t, &weight) in scores.iter().enumerate() {
                    let value = &values[t * kv_width + kv_offset..][..d];
                    for (o, &v) in out.iter_mut().zip(value) {
                        *o += weight * v;
                    }
                }
            }
        });
        out
    }
}

fn read_f32(content: &Content, file: &mut std::fs::File, path: &Path, name: &str) -> Result<Tensor, LocalError> {
    let format = |message: String| LocalError::Format { path: path.to_path_buf(), message };
    let tensor = content.tensor(file, name, &Device::Cpu).map_err(|e| format(format!("tensor `{name}`: {e}")))?;
    tensor
        .dequantize(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .map_err(|e| format(format!("tensor `{name}` cannot be dequantized: {e}")))
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(mean_square + f64::from(eps))?.sqrt()?)?.broadcast_mul(weight)
}

/// A dot product with eight running sums, which the compiler turns into SIMD.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            sums[i] += x[i] * y[i];
        }
    }
    sums.iter().sum::<f32>() + tail
}

fn softmax_in_place(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    for s in scores.iter_mut() {
        *s /= total;
    }
}
