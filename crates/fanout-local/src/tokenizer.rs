//! The model's own tokenizer, rebuilt from GGUF metadata.
//!
//! GGUF files carry a byte-level BPE vocabulary (`tokenizer.ggml.tokens`,
//! `merges`, `token_type`) and name their pre-tokenizer (`tokenizer.ggml.pre`).
//! The pieces are assembled with the `tokenizers` crate exactly as llama.cpp
//! splits text for that pre-tokenizer name; an unknown name is an error rather
//! than a silently different tokenization.

use ahash::AHashMap;
use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::LocalError;
use crate::gguf::GgufFile;

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// GPT-2's split: contractions, letters, digits, other symbols, whitespace.
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's split: case-insensitive contractions and digits in groups of three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Text to token ids and back, plus the special tokens generation stops on.
#[derive(Debug)]
pub struct ChatTokenizer {
    inner: Tokenizer,
    /// Control tokens (`<|im_end|>`, `<|endoftext|>`...): generating one ends the answer.
    control: Vec<bool>,
    /// End-of-sequence token id (`tokenizer.ggml.eos_token_id`).
    pub eos: u32,
    /// Beginning-of-sequence token id; None when the file names none.
    pub bos: Option<u32>,
    /// Whether [`encode`](Self::encode) puts `bos` first (`tokenizer.ggml.add_bos_token`,
    /// else false).
    pub add_bos: bool,
}

impl ChatTokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata; only byte-level BPE (`gpt2`) is read.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, LocalError> {
        let model = gguf.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(gguf.format_error(format!(
                "tokenizer model `{model}` is not supported (fanout reads byte-level BPE, `gpt2`)"
            )));
        }
        let tokens: Vec<String> = strings(gguf, "tokenizer.ggml.tokens")?;
        let merges = strings(gguf, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|merge| match merge.split_once(' ') {
                Some((left, right)) => Ok((left.to_owned(), right.to_owned())),
                None => Err(gguf.format_error(format!("merge `{merge}` has no space"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let types: Vec<i32> = match gguf.array("tokenizer.ggml.token_type") {
            Ok(values) => values.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
            Err(_) => vec![1; tokens.len()],
        };
        let vocab: AHashMap<String, u32> =
            tokens.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| gguf.format_error(format!("cannot build the BPE model: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        let pre = gguf.optional_string("tokenizer.ggml.pre").unwrap_or("default");
        inner.with_pre_tokenizer(Some(pre_tokenizer(pre).map_err(|e| gguf.format_error(e))?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let added = |kind: i32, special: bool| {
            tokens
                .iter()
                .zip(&types)
                .filter(move |(_, t)| **t == kind)
                .map(move |(token, _)| AddedToken::from(token.clone(), special))
                .collect::<Vec<_>>()
        };
        inner
            .add_special_tokens(added(CONTROL, true))
            .map_err(|e| gguf.format_error(e.to_string()))?;
        inner
            .add_tokens(added(USER_DEFINED, false))
            .map_err(|e| gguf.format_error(e.to_string()))?;
        let eos = gguf.optional_u32("tokenizer.ggml.eos_token_id").ok_or_else(|| {
            gguf.format_error("metadata key `tokenizer.ggml.eos_token_id` is missing".into())
        })?;
        Ok(Self {
            control: types.iter().map(|t| *t == CONTROL).collect(),
            bos: gguf.optional_u32("tokenizer.ggml.bos_token_id"),
            add_bos: gguf.optional_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
            eos,
            inner,
        })
    }

    /// Token ids for `text`; special tokens written in the text (as a chat
    /// template writes them) become their single ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, LocalError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| LocalError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if self.add_bos
            && let Some(bos) = self.bos
        {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// The text of generated ids, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    /// Whether generating `id` ends the answer (EOS or any other control token).
    pub fn ends_generation(&self, id: u32) -> bool {
        id == self.eos || self.control.get(id as usize).copied().unwrap_or(false)
    }

    /// Every token's bytes, by id, for constrained decoding: byte-level
    /// spellings mapped back to their bytes; control tokens (and any token
    /// not spelled in byte-level symbols) as llguidance's special tokens, its
    /// marker byte and their name, so they never match text.
    pub(crate) fn token_bytes(&self) -> Vec<Vec<u8>> {
        let byte_of: AHashMap<char, u8> = byte_symbols().into_iter().zip(0..=255u8).collect();
        let special = |text: &str| {
            let mut bytes = vec![llguidance::toktrie::TokTrie::SPECIAL_TOKEN_MARKER];
            bytes.extend_from_slice(text.as_bytes());
            bytes
        };
        (0..self.inner.get_vocab_size(true) as u32)
            .map(|id| {
                let text = self.inner.id_to_token(id).unwrap_or_default();
                if self.ends_generation(id) {
                    return special(&text);
                }
                text.chars()
                    .map(|c| byte_of.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| special(&text))
            })
            .collect()
    }

    /// The token's text as the vocabulary spells it (for templates: `bos_token`).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.id_to_token(id).unwrap_or_default()
    }
}

/// GPT-2's printable stand-ins for the 256 byte values (the vocabulary's spelling).
pub(crate) fn byte_symbols() -> Vec<char> {
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            let code = if printable {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(code).expect("valid code point")
        })
        .collect()
}

fn strings(gguf: &GgufFile, key: &str) -> Result<Vec<String>, LocalError> {
    gguf.array(key)?
        .iter()
        .map(|value| match value {
            Value::String(s) => Ok(s.clone()),
            _ => Err(gguf.format_error(format!("metadata key `{key}` holds a non-string"))),
        })
        .collect()
}

/// The pre-tokenizer llama.cpp uses for a `tokenizer.ggml.pre` name.
fn pre_tokenizer(name: &str) -> Result<PreTokenizerWrapper, String> {
    let regex_split = |pattern: &str| -> Result<PreTokenizerWrapper, String> {
        Split::new(SplitPattern::Regex(pattern.to_owned()), SplitDelimiterBehavior::Isolated, false)
            .map(Into::into)
            .map_err(|e| format!("bad split pattern: {e}"))
    };
    // Byte-level mapping without its own regex and without a prefix space:
    // the splits above decide the pieces.
    let byte_level = || PreTokenizerWrapper::from(ByteLevel::new(false, false, false));
    let steps = match name {
        // SmolLM: every digit alone, then GPT-2's split.
        "smollm" => vec![regex_split(r"\p{N}")?, regex_split(GPT2_SPLIT)?, byte_level()],
        "default" | "gpt-2" | "gpt2" => vec![regex_split(GPT2_SPLIT)?, byte_level()],
        "llama3" | "llama-bpe" | "llama-v3" => vec![regex_split(LLAMA3_SPLIT)?, byte_level()],
        other => {
            return Err(format!(
                "pre-tokenizer `{other}` is not supported (known: smollm, default, gpt-2, llama-bpe)"
            ));
        }
    };
    Ok(Sequence::new(steps).into())
}
