//! What identifies a job and a cached answer: written out field by field under
//! a version number and hashed with SHA-256, so renaming a Rust type, variant
//! or field never silently refuses users' stored jobs or misses their cached
//! answers. A new way of computing them gets a new version; jobs stored under
//! an old one are still recognized (see [`job_changes`]).

use std::collections::BTreeMap;

use fanout_store::Fingerprint;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::batch::{Keep, Spec};
use crate::input::Format;
use crate::settings::{ProviderKind, Settings};

/// The current way fingerprints and cache scopes are written.
const VERSION: &str = "2";
/// The fingerprint part that holds [`VERSION`]; jobs of the first version have none.
const VERSION_PART: &str = "fingerprint version";
const SETTINGS_PART: &str = "provider, model or parameters";

pub fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// What one call is stored under (the answer cache, a job's recorded
/// calls): `scope` (which provider, endpoint and model) and the whole
/// request as it is sent. Its JSON keys stay in the order they were written,
/// because the order changes answers: a model writes a schema's properties in
/// that order.
pub fn request_key(scope: &str, request: &fanout::Request) -> String {
    let request = serde_json::to_vec(request).unwrap_or_default();
    sha256(&[scope.as_bytes(), &[0], &request].concat())
}

/// The key versions before fanout kept key order wrote for `request`: they
/// sent, and hashed, every JSON object with its keys sorted.
pub fn sorted_request_key(scope: &str, request: &fanout::Request) -> String {
    request_key(scope, &request.sorted_json())
}

/// The part that holds a job's response schema.
const SCHEMA_PART: &str = "response schema";
/// Which rows of the input a shard's job runs (`batch --shard K/N`).
pub const SHARD_PART: &str = "shard";

fn schema_hash(schema: &fanout::ResponseFormat) -> String {
    sha256(&serde_json::to_vec(schema).expect("a schema serializes"))
}

/// The settings that change answers (not limits or timeouts), by name.
#[derive(Serialize)]
struct Answering<'a> {
    provider: &'static str,
    model: &'a str,
    base_url: Option<&'a str>,
    temperature: Option<f32>,
    max_tokens: Option<u32>,
}

/// The job's shape beyond its texts: how rows are read, and what answers them.
#[derive(Serialize)]
struct Shape<'a> {
    version: &'static str,
    format: &'static str,
    id_field: Option<&'a str>,
    answering: Answering<'a>,
}

fn provider_name(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Openai => "openai",
        ProviderKind::Anthropic => "anthropic",
        ProviderKind::Mock => "mock",
        ProviderKind::Local => "local",
    }
}

fn format_name(format: Format) -> &'static str {
    match format {
        Format::Jsonl => "jsonl",
        Format::Csv => "csv",
        Format::OpenaiBatch => "openai-batch",
    }
}

fn answering(settings: &Settings) -> Answering<'_> {
    Answering {
        provider: provider_name(settings.provider),
        model: &settings.model,
        base_url: settings.base_url.as_deref(),
        temperature: settings.temperature,
        max_tokens: settings.max_tokens,
    }
}

/// The texts every version fingerprints the same way.
fn texts(spec: &Spec, input_hash: String) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("input file".to_owned(), input_hash),
        ("prompt template".to_owned(), sha256(spec.prompt.as_deref().unwrap_or("").as_bytes())),
        ("system prompt".to_owned(), sha256(spec.system.as_deref().unwrap_or("").as_bytes())),
    ])
}

/// A job's fingerprint: its input, templates and answer-shaping settings.
pub fn job(spec: &Spec, input_hash: String) -> Fingerprint {
    let shape = Shape {
        version: VERSION,
        format: format_name(spec.format),
        id_field: spec.id_field.as_deref(),
        answering: answering(&spec.settings),
    };
    let shape = serde_json::to_vec(&shape).expect("the shape serializes");
    let mut parts = texts(spec, input_hash);
    parts.insert(SETTINGS_PART.to_owned(), sha256(&shape));
    // Only jobs that have them carry these parts, so older jobs keep their fingerprint.
    if !spec.images.is_empty() {
        parts.insert("image fields".to_owned(), spec.images.join(","));
    }
    // The same job keeps the same fields beside every answer.
    if let Some(keep) = &spec.keep {
        let fields = match keep {
            Keep::All => "*".to_owned(),
            Keep::Fields(fields) => fields.join(","),
        };
        parts.insert("kept fields".to_owned(), fields);
    }
    if let Some(schema) = &spec.schema {
        parts.insert(SCHEMA_PART.to_owned(), schema_hash(schema));
    }
    if let Some(shard) = spec.shard {
        parts.insert(SHARD_PART.to_owned(), shard.to_string());
    }
    parts.insert(VERSION_PART.to_owned(), VERSION.to_owned());
    Fingerprint(parts)
}

/// The first version's fingerprint, frozen: it hashed the `Debug` text of the
/// settings, spelled out here as it was so those jobs can still be resumed.
fn legacy_v1(spec: &Spec, input_hash: String) -> Fingerprint {
    let format = match spec.format {
        Format::Jsonl => "Jsonl",
        Format::Csv => "Csv",
        Format::OpenaiBatch => "OpenaiBatch",
    };
    let provider = legacy_provider_name(spec.settings.provider);
    let settings = &spec.settings;
    let shape = format!(
        "{format}|{:?}|{provider}|{}|{:?}|{:?}|{:?}",
        spec.id_field, settings.model, settings.base_url, settings.temperature, settings.max_tokens
    );
    let mut parts = texts(spec, input_hash);
    parts.insert(SETTINGS_PART.to_owned(), sha256(shape.as_bytes()));
    Fingerprint(parts)
}

/// The provider as the first version's `Debug` text named it.
fn legacy_provider_name(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Openai => "Openai",
        ProviderKind::Anthropic => "Anthropic",
        ProviderKind::Mock => "Mock",
        ProviderKind::Local => "Local",
    }
}

/// The cache scope of the first version (`Debug` text, frozen here), which
/// the cache still reads so an upgrade pays for no cached answer again.
pub fn legacy_cache_scope(settings: &Settings) -> String {
    let provider = legacy_provider_name(settings.provider);
    format!("{provider}|{}|{:?}", settings.model, settings.base_url)
}

/// What differs between a stored job and this run (empty: the same job), and
/// the fingerprint to store when the job was written by an older version.
pub fn job_changes(
    stored: &Fingerprint,
    spec: &Spec,
    input_hash: String,
) -> (Vec<String>, Option<Fingerprint>) {
    let current = job(spec, input_hash.clone());
    if stored.0.contains_key(VERSION_PART) {
        let changes = stored.differences(&current);
        // Jobs started before key order was kept sent, and hashed, the schema
        // with its keys sorted: the same job, which now sends them as written.
        let sorted_schema = spec.schema.as_ref().map(|schema| schema_hash(&schema.sorted_json()));
        if changes == [SCHEMA_PART] && stored.0.get(SCHEMA_PART) == sorted_schema.as_ref() {
            return (Vec::new(), Some(current));
        }
        return (changes, None);
    }
    let mut changes = stored.differences(&legacy_v1(spec, input_hash));
    // The first version had no shards: its jobs ran every row.
    if spec.shard.is_some() {
        changes.push(SHARD_PART.to_owned());
    }
    let upgrade = changes.is_empty().then_some(current);
    (changes, upgrade)
}

/// The cache's scope: which provider, endpoint and default model answered.
pub fn cache_scope(settings: &Settings) -> String {
    #[derive(Serialize)]
    struct Scope<'a> {
        version: &'static str,
        provider: &'static str,
        model: &'a str,
        base_url: Option<&'a str>,
    }
    let scope = Scope {
        version: VERSION,
        provider: provider_name(settings.provider),
        model: &settings.model,
        base_url: settings.base_url.as_deref(),
    };
    serde_json::to_string(&scope).expect("the scope serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::OutputFormat;

    fn spec() -> Spec {
        let settings = Settings {
            provider: ProviderKind::Openai,
            model: "gpt-4o-mini".into(),
            base_url: Some("http://127.0.0.1:8080/v1".into()),
            api_key_env: "OPENAI_API_KEY".into(),
            concurrency: 16,
            rpm: None,
            tpm: None,
            attempt_timeout: 120.0,
            deadline: None,
            retries: 4,
            temperature: Some(0.5),
            max_tokens: Some(64),
            threads: None,
            kv_memory: None,
            price: None,
            price_given: false,
            budget: None,
            max_total_tokens: None,
            schema_repairs: None,
            retry_truncated: None,
            hedge: None,
        };
        Spec {
            keep: None,
            images: Vec::new(),
            schema: None,
            input: "rows.jsonl".into(),
            format: Format::Jsonl,
            prompt: Some("Grade: {{ essay }}".into()),
            system: None,
            id_field: Some("id".into()),
            output_format: OutputFormat::Jsonl,
            via: None,
            shard: None,
            queued: false,
            settings,
        }
    }

    /// The serialized form is pinned: a rename that changes it fails here, not
    /// in users' stored jobs.
    #[test]
    fn the_fingerprint_is_pinned() {
        let fingerprint = job(&spec(), "abc".into());
        let shape = concat!(
            r#"{"version":"2","format":"jsonl","id_field":"id","answering":{"provider":"openai","#,
            r#""model":"gpt-4o-mini","base_url":"http://127.0.0.1:8080/v1","temperature":0.5,"max_tokens":64}}"#
        );
        assert_eq!(
            fingerprint.0[SETTINGS_PART],
            sha256(shape.as_bytes()),
            "the shape is exactly this"
        );
        assert_eq!(fingerprint.0[VERSION_PART], "2");
        assert_eq!(
            legacy_cache_scope(&spec().settings),
            r#"Openai|gpt-4o-mini|Some("http://127.0.0.1:8080/v1")"#,
            "what the first version wrote"
        );
        assert_eq!(
            cache_scope(&spec().settings),
            r#"{"version":"2","provider":"openai","model":"gpt-4o-mini","base_url":"http://127.0.0.1:8080/v1"}"#
        );
    }

    /// A job stored by the first version (no version part, the Debug-text
    /// hash) is still the same job, and gets the current fingerprint.
    #[test]
    fn a_job_of_the_first_version_is_recognized_and_upgraded() {
        let spec = spec();
        // What the first version stored for this spec.
        let debug_text = r#"Jsonl|Some("id")|Openai|gpt-4o-mini|Some("http://127.0.0.1:8080/v1")|Some(0.5)|Some(64)"#;
        let mut stored = texts(&spec, "abc".into());
        stored.insert(SETTINGS_PART.into(), sha256(debug_text.as_bytes()));
        let stored = Fingerprint(stored);
        let (changes, upgrade) = job_changes(&stored, &spec, "abc".into());
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(upgrade, Some(job(&spec, "abc".into())));
        // Under the current version, the same job is unchanged; another model is not.
        let (changes, upgrade) = job_changes(&job(&spec, "abc".into()), &spec, "abc".into());
        assert!(changes.is_empty() && upgrade.is_none());
        let mut other = spec.clone();
        other.settings.model = "gpt-4o".into();
        let (changes, _) = job_changes(&stored, &other, "abc".into());
        assert_eq!(changes, [SETTINGS_PART]);
    }

    /// JSON keys are sent, and hashed, in the order they were written: a
    /// schema in another order is another call and another job (its answers
    /// come in another order). What older versions stored, with keys sorted,
    /// is still found: a request whose keys are sorted hashes exactly as
    /// before, recorded calls are also looked up sorted, and a job started
    /// with the sorted schema is the same job.
    #[test]
    fn key_order_is_part_of_a_request_and_what_older_versions_stored_is_found() {
        let schema = |text: &str| fanout::ResponseFormat::JsonSchema {
            name: "grade".into(),
            schema: serde_json::from_str(text).unwrap(),
        };
        let written = schema(r#"{"type":"object","properties":{"score":{},"reason":{}}}"#);
        let reordered = schema(r#"{"properties":{"reason":{},"score":{}},"type":"object"}"#);
        let request = |format: &fanout::ResponseFormat, extra: &str| {
            let mut request = fanout::Request::user("Grade this.");
            request.response_format = Some(format.clone());
            let parameters = serde_json::from_str(extra).unwrap();
            request.tools = vec![fanout::ToolSpec::new("look", "Looks.", parameters)];
            request.extra = serde_json::from_str(extra).unwrap();
            request
        };
        let first = request(&written, r#"{"z":1,"a":{"y":1,"b":2}}"#);
        let second = request(&reordered, r#"{"a":{"b":2,"y":1},"z":1}"#);
        assert_ne!(request_key("scope", &first), request_key("scope", &second));
        assert_eq!(sorted_request_key("scope", &first), sorted_request_key("scope", &second));
        // What every earlier version sent and hashed for both.
        let sorted = concat!(
            r#"{"messages":[{"role":"user","content":"Grade this."}],"response_format":"#,
            r#"{"type":"json_schema","name":"grade","schema":{"properties":{"reason":{},"score":{}},"#,
            r#""type":"object"}},"tools":[{"name":"look","description":"Looks.","parameters":"#,
            r#"{"a":{"b":2,"y":1},"z":1}}],"extra":{"a":{"b":2,"y":1},"z":1}}"#
        );
        assert_eq!(
            serde_json::to_string(&second).unwrap(),
            sorted,
            "already sorted: sent as before"
        );
        let old_key = sha256(&[&b"scope\0"[..], sorted.as_bytes()].concat());
        assert_eq!(request_key("scope", &second), old_key);
        assert_eq!(sorted_request_key("scope", &first), old_key);

        let (mut one, mut other) = (spec(), spec());
        one.schema = Some(written);
        other.schema = Some(reordered);
        let (changes, _) = job_changes(&job(&one, "abc".into()), &other, "abc".into());
        assert_eq!(changes, [SCHEMA_PART]);
        // A job stored with the sorted schema's hash is `one`'s job, upgraded.
        let mut stored = job(&one, "abc".into());
        stored.0.insert(SCHEMA_PART.into(), job(&other, "abc".into()).0[SCHEMA_PART].clone());
        let (changes, upgrade) = job_changes(&stored, &one, "abc".into());
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(upgrade, Some(job(&one, "abc".into())));
    }

    /// Kept fields, images and a schema are parts only of jobs that set them
    /// (older jobs keep their fingerprint), and a change of them is named.
    #[test]
    fn optional_parts_are_named_when_they_change() {
        let plain = spec();
        let mut keeping = plain.clone();
        keeping.keep = Some(Keep::Fields(vec!["name".into(), "grade".into()]));
        let stored = job(&keeping, "abc".into());
        assert_eq!(stored.0["kept fields"], "name,grade");
        assert!(!job(&plain, "abc".into()).0.contains_key("kept fields"));
        let (changes, _) = job_changes(&stored, &plain, "abc".into());
        assert_eq!(changes, ["kept fields"]);
        keeping.keep = Some(Keep::All);
        let (changes, _) = job_changes(&stored, &keeping, "abc".into());
        assert_eq!(changes, ["kept fields"]);
    }
}
