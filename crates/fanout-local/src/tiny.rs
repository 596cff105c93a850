//! A tiny random llama model written as GGUF with candle's own writer, for
//! tests that need a real model file but not a good one: loading, tokenizing,
//! batching, sampling and resolution all run on it in milliseconds.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::LocalError;
use crate::tokenizer::byte_symbols;

/// Special tokens at ids 0, 1, 2, as in SmolLM2.
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Writes a 2-layer model with a byte-level vocabulary (3 specials, 256 bytes
/// and a few merges) and random weights from `seed`.
pub fn write_tiny_gguf(path: &Path, seed: u64) -> Result<(), LocalError> {
    let io = |e: candle_core::Error| LocalError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let (hidden, heads, kv_heads, ff, layers) = (64usize, 4usize, 2usize, 128usize, 2usize);
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(byte_symbols().into_iter().map(String::from));
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"];
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    let vocab = tokens.len();
    let mut types = vec![3i32; SPECIALS.len()];
    types.resize(vocab, 1);

    let mut rng = fastrand::Rng::with_seed(seed);
    let mut random =
        |shape: &[usize], scale: f32, dtype: GgmlDType| -> Result<QTensor, candle_core::Error> {
            let count = shape.iter().product();
            let values: Vec<f32> = (0..count).map(|_| (rng.f32() * 2.0 - 1.0) * scale).collect();
            QTensor::quantize(&Tensor::from_vec(values, shape, &Device::Cpu)?, dtype)
        };
    let ones = |n: usize| {
        QTensor::quantize(&Tensor::ones(n, candle_core::DType::F32, &Device::Cpu)?, GgmlDType::F32)
    };
    let kv = hidden / heads * kv_heads;
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), random(&[vocab, hidden], 1.0, GgmlDType::Q8_0).map_err(io)?),
        ("output_norm.weight".into(), ones(hidden).map_err(io)?),
    ];
    for layer in 0..layers {
        let name = |part: &str| format!("blk.{layer}.{part}.weight");
        let q4 = GgmlDType::Q4_1;
        tensors.push((name("attn_norm"), ones(hidden).map_err(io)?));
        tensors.push((name("ffn_norm"), ones(hidden).map_err(io)?));
        tensors.push((name("attn_q"), random(&[hidden, hidden], 0.3, q4).map_err(io)?));
        tensors.push((name("attn_k"), random(&[kv, hidden], 0.3, q4).map_err(io)?));
        tensors.push((name("attn_v"), random(&[kv, hidden], 0.3, q4).map_err(io)?));
        tensors.push((name("attn_output"), random(&[hidden, hidden], 0.3, q4).map_err(io)?));
        tensors.push((name("ffn_gate"), random(&[ff, hidden], 0.3, q4).map_err(io)?));
        tensors.push((name("ffn_up"), random(&[ff, hidden], 0.3, q4).map_err(io)?));
        tensors.push((name("ffn_down"), random(&[hidden, ff], 0.3, q4).map_err(io)?));
    }

    let string = |s: &str| Value::String(s.to_owned());
    let strings = |items: &[String]| Value::Array(items.iter().map(|s| string(s)).collect());
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", string("llama")),
        ("general.name", string("tiny-random-llama")),
        ("llama.block_count", Value::U32(layers as u32)),
        ("llama.context_length", Value::U32(4096)),
        ("llama.embedding_length", Value::U32(hidden as u32)),
        ("llama.feed_forward_length", Value::U32(ff as u32)),
        ("llama.attention.head_count", Value::U32(heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(kv_heads as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.vocab_size", Value::U32(vocab as u32)),
        ("tokenizer.ggml.model", string("gpt2")),
        ("tokenizer.ggml.pre", string("smollm")),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        (
            "tokenizer.ggml.merges",
            strings(&merges.iter().map(|m| m.to_string()).collect::<Vec<_>>()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.chat_template", string(TEMPLATE)),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).map_err(|e| LocalError::io(path, e))?;
    gguf_file::write(&mut file, &metadata, &tensors).map_err(io)
}
