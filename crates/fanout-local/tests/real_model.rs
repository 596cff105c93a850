//! Against the real SmolLM2-135M-Instruct: tokenizer vectors from llama.cpp,
//! and greedy answers to sanity prompts.

mod common;

use fanout::{Provider, Request};
use fanout_local::{LocalModel, LocalOptions};
use serde::Deserialize;

#[derive(Deserialize)]
struct Vector {
    text: String,
    ids: Vec<u32>,
}

fn load() -> Option<LocalModel> {
    let path = common::real_model()?;
    Some(LocalModel::load(&path, LocalOptions::default()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenizer_matches_llama_cpp_and_model_answers_sanity_prompts() {
    let Some(model) = load() else { return };
    // Reference ids from llama.cpp (tests/data/make_token_vectors.py).
    let vectors: Vec<Vector> =
        serde_json::from_str(include_str!("data/smollm2_tokens.json")).unwrap();
    for vector in &vectors {
        let ids = model.tokenizer().encode(&vector.text).unwrap();
        assert_eq!(ids, vector.ids, "token ids of {:?}", vector.text);
        let has_special = vector.text.contains("<|");
        if !has_special {
            assert_eq!(
                model.tokenizer().decode(&ids),
                vector.text,
                "round trip of {:?}",
                vector.text
            );
        }
    }

    let ask = |prompt: &str| Request::user(prompt).with_temperature(0.0).with_max_tokens(48);
    let (paris, colors) = (ask("What is the capital of France?"), ask("List three colors."));
    let (paris, colors) = tokio::join!(model.complete(&paris), model.complete(&colors));
    let paris = paris.unwrap();
    assert!(paris.text.contains("Paris"), "{:?}", paris.text);
    assert_eq!(paris.finish_reason.as_deref(), Some("stop"));
    assert!(paris.usage.input_tokens > 20 && paris.usage.output_tokens > 2, "{:?}", paris.usage);
    let colors = colors.unwrap().text.to_lowercase();
    let named = ["red", "blue", "green", "yellow", "orange", "purple", "black", "white", "pink"]
        .iter()
        .filter(|c| colors.contains(*c))
        .count();
    assert!(named >= 3, "{colors:?}");
}

/// A schema prompt to the real model: decoding keeps to the schema, so the
/// answer parses and validates, and the model still fills it sensibly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_models_answer_to_a_schema_prompt_parses() {
    let Some(model) = load() else { return };
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "country": {"type": "string", "maxLength": 40},
            "capital": {"type": "string", "maxLength": 40}
        },
        "required": ["country", "capital"],
        "additionalProperties": false
    });
    let mut request = Request::user("What is the capital of France? Answer in JSON.")
        .with_temperature(0.0)
        .with_max_tokens(64);
    request.response_format =
        Some(fanout::ResponseFormat::JsonSchema { name: "capital".into(), schema: schema.clone() });
    let mut any_object = request.clone();
    any_object.response_format = Some(fanout::ResponseFormat::JsonObject);
    let (answer, object) = tokio::join!(model.complete(&request), model.complete(&any_object));
    let answer = answer.unwrap();
    assert_eq!(answer.finish_reason.as_deref(), Some("stop"), "{:?}", answer.text);
    let value: serde_json::Value = serde_json::from_str(&answer.text).unwrap();
    assert!(jsonschema::is_valid(&schema, &value), "{value}");
    assert!(value["capital"].as_str().unwrap().contains("Paris"), "{value}");
    let object = object.unwrap();
    let value: serde_json::Value = serde_json::from_str(&object.text).unwrap();
    assert!(value.is_object(), "{value}");
}
