//! Structured answers: decoding constrained to a JSON Schema, or to any JSON
//! object, so every answer parses.
//!
//! At each step only the tokens that keep the answer a valid prefix of the
//! schema's language may be sampled; the rest of the logits are set to −∞.
//! The grammar work is llguidance's (the constraint engine llama.cpp and vLLM
//! use): an Earley parser over a lexer of regular-expression derivatives,
//! walking a trie of the vocabulary's bytes to compute each mask. This module
//! gives it the vocabulary as bytes and keeps one matcher per sequence.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

use crate::LocalError;
use crate::tokenizer::ChatTokenizer;

/// What shape an answer must take.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema(Value),
}

/// The vocabulary as llguidance reads it: built once per model, shared by
/// every request's matcher.
pub struct Grammars {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammars")
    }
}

impl Grammars {
    /// The token trie of `tokenizer`'s vocabulary, `width` logits wide. Ids
    /// past the vocabulary are never allowed; control tokens are marked
    /// special (never inside JSON), and end the answer once it is complete.
    pub fn new(tokenizer: &ChatTokenizer, width: usize) -> Result<Self, LocalError> {
        let mut words = tokenizer.token_bytes();
        words.resize(width, Vec::new());
        let mut enders: Vec<u32> =
            (0..width as u32).filter(|&id| tokenizer.ends_generation(id)).collect();
        // The primary end token first.
        enders.sort_by_key(|&id| id != tokenizer.eos);
        let info = TokRxInfo::new(width as u32, tokenizer.eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&enders);
        // Greedy tokenization is enough: it is only used to force tokens,
        // which an approximate environment turns off.
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &SlicedBiasComputer::json_slices(),
        )
        .map_err(|e| LocalError::Engine(format!("cannot prepare constrained decoding: {e}")))?;
        factory.quiet();
        Ok(Self { factory: Arc::new(factory) })
    }

    /// A fresh constraint for one answer; a schema llguidance cannot compile
    /// is a bad request naming why.
    pub fn constrain(&self, format: &OutputFormat) -> Result<Constraint, LocalError> {
        let mut schema = match format {
            OutputFormat::JsonObject => json!({"type": "object"}),
            OutputFormat::JsonSchema(schema) => schema.clone(),
        };
        if let Some(object) = schema.as_object_mut() {
            // Compact JSON: a small model left free to add whitespace may add
            // it forever. Keywords llguidance does not enforce are left to the
            // executor's schema check rather than refusing the request.
            object
                .entry("x-guidance")
                .or_insert_with(|| json!({"whitespace_flexible": false, "lenient": true}));
        }
        let parser = self.factory.create_parser(TopLevelGrammar::from_json_schema(schema));
        let matcher = Matcher::new(parser);
        if let Some(error) = matcher.get_error() {
            return Err(LocalError::Schema(error));
        }
        Ok(Constraint { matcher })
    }
}

/// One answer's place in its grammar.
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    /// Sets the logit of every token the grammar does not allow next to −∞
    /// (once the answer is complete, only the end tokens stay).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
        for (id, logit) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(id as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Moves past the sampled (allowed, not ending) token; says whether the
    /// answer is complete, with nothing the grammar could add.
    pub fn advance(&mut self, token: u32) -> Result<bool, String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())?;
        Ok(self.matcher.is_stopped())
    }
}

/// [`Grammars`] built on the first structured request: most runs never ask
/// for one, and building the vocabulary's trie takes a moment.
#[derive(Debug)]
pub struct LazyGrammars {
    tokenizer: Arc<ChatTokenizer>,
    width: usize,
    built: std::sync::OnceLock<Result<Grammars, String>>,
}

impl LazyGrammars {
    pub fn new(tokenizer: Arc<ChatTokenizer>, width: usize) -> Self {
        Self { tokenizer, width, built: std::sync::OnceLock::new() }
    }

    /// A constraint for one answer in `format`.
    pub fn constrain(&self, format: &OutputFormat) -> Result<Constraint, LocalError> {
        let built = self
            .built
            .get_or_init(|| Grammars::new(&self.tokenizer, self.width).map_err(|e| e.to_string()));
        match built {
            Ok(grammars) => grammars.constrain(format),
            Err(message) => Err(LocalError::Engine(message.clone())),
        }
    }
}
