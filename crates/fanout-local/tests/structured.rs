//! Structured answers on the tiny random model: decoding keeps to the
//! response format's schema, so even random weights answer valid JSON.

mod common;

use fanout::{ErrorKind, Provider, Request, ResponseFormat};
use fanout_local::{EngineOptions, LocalModel, LocalOptions};
use proptest::prelude::*;
use serde_json::{Value, json};

fn model(dir: &tempfile::TempDir) -> LocalModel {
    let engine =
        EngineOptions { threads: 1, max_batch: 8, prefill_chunk: 16, ..EngineOptions::default() };
    common::tiny_model(dir, LocalOptions { engine, ..LocalOptions::default() })
}

fn structured(prompt: &str, schema: &Value, seed: u64) -> Request {
    let mut request = Request::user(prompt).with_temperature(1.0).with_max_tokens(160);
    request.seed = Some(seed);
    request.response_format =
        Some(ResponseFormat::JsonSchema { name: "answer".into(), schema: schema.clone() });
    request
}

/// The answer parses and follows the schema.
fn check(schema: &Value, answer: &fanout::Response) -> Result<(), String> {
    if answer.finish_reason.as_deref() != Some("stop") {
        return Err(format!("cut off: {:?} {}", answer.finish_reason, answer.text));
    }
    let value: Value =
        serde_json::from_str(&answer.text).map_err(|e| format!("{e}: {}", answer.text))?;
    let validator = jsonschema::validator_for(schema).map_err(|e| e.to_string())?;
    let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
    if errors.is_empty() { Ok(()) } else { Err(format!("{errors:?}: {value}")) }
}

/// A small property schema: bounded so a random model's answer ends.
fn property() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        (1u32..6).prop_map(|n| json!({"type": "string", "maxLength": n})),
        (1i64..1000).prop_map(|m| json!({"type": "integer", "minimum": 0, "maximum": m})),
        Just(json!({"type": "boolean"})),
        Just(json!({"enum": ["red", "green", "blue"]})),
        (1u32..4).prop_map(|n| json!({
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "maxItems": n
        })),
    ];
    leaf.prop_recursive(1, 4, 2, |inner| {
        prop::collection::vec(inner, 1..3).prop_map(|fields| object(fields, true))
    })
}

/// An object of `fields` named a, b, c…, all required or only the first.
fn object(fields: Vec<Value>, all_required: bool) -> Value {
    let names: Vec<String> =
        (0..fields.len()).map(|i| char::from(b'a' + i as u8).to_string()).collect();
    let required: Vec<&String> =
        if all_required { names.iter().collect() } else { names.iter().take(1).collect() };
    let properties: serde_json::Map<String, Value> = names.iter().cloned().zip(fields).collect();
    json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
}

fn schema() -> impl Strategy<Value = Value> {
    (prop::collection::vec(property(), 1..4), any::<bool>())
        .prop_map(|(fields, all_required)| object(fields, all_required))
}

#[test]
fn every_answer_follows_its_schema() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(&dir);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let config =
        ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() };
    proptest!(config, |(schema in schema(), seed in any::<u64>())| {
        let answer = runtime.block_on(model.complete(&structured("answer in JSON", &schema, seed))).unwrap();
        prop_assert!(check(&schema, &answer).is_ok(), "{}: {}", schema, check(&schema, &answer).unwrap_err());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_and_free_answers_share_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(&dir);
    let schema = json!({
        "type": "object",
        "properties": {"grade": {"type": "integer", "minimum": 1, "maximum": 5}, "pass": {"type": "boolean"}},
        "required": ["grade", "pass"],
        "additionalProperties": false
    });
    let free = |i: u64| {
        let mut request =
            Request::user(format!("free {i}")).with_temperature(1.0).with_max_tokens(12);
        request.seed = Some(i);
        request
    };
    let mut alone = Vec::new();
    for i in 0..4 {
        alone.push(model.complete(&free(i)).await.unwrap().text);
    }
    let requests: Vec<Request> =
        (0..4).flat_map(|i| [free(i), structured("grade it", &schema, i)]).collect();
    let answers = futures_util::future::join_all(requests.iter().map(|r| model.complete(r))).await;
    for (i, answer) in answers.into_iter().enumerate() {
        let answer = answer.unwrap();
        if i % 2 == 0 {
            // Its neighbours' masks do not change a free answer.
            assert_eq!(answer.text, alone[i / 2]);
        } else {
            check(&schema, &answer).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_that_cannot_be_compiled_is_a_bad_request() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(&dir);
    let schema = json!({"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}});
    let error = model.complete(&structured("x", &schema, 1)).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BadRequest, "{error}");
    assert!(error.message().contains("the schema cannot constrain"), "{error}");
    assert!(model.complete(&Request::user("still here").with_max_tokens(3)).await.is_ok());
}

/// Stop sequences end free text only: inside JSON they would cut it short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_do_not_cut_a_structured_answer() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(&dir);
    let schema = json!({
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}},
        "required": ["a", "b"],
        "additionalProperties": false
    });
    let mut request = structured("x", &schema, 3);
    request.stop = vec![",".into(), "\"".into()];
    let answer = model.complete(&request).await.unwrap();
    check(&schema, &answer).unwrap();
}
