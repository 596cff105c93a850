//! `--schema FILE`: the JSON Schema every answer must follow, read and checked
//! before any call (a bad one is exit 2, naming the file).

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use fanout::ResponseFormat;
use serde_json::Value;

/// The response format `path` describes; its name (which OpenAI requires) is
/// the file's stem, in the characters OpenAI allows.
pub fn read(path: &Path) -> Result<ResponseFormat> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the schema {}", path.display()))?;
    let schema: Value = serde_json::from_str(&text)
        .with_context(|| format!("the schema {} is not JSON", path.display()))?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("answer");
    let name: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .take(64)
        .collect();
    ResponseFormat::json_schema(name, schema)
        .map_err(|error| anyhow!("the schema {} is {error}", path.display()))
}

/// The top-level fields of the schema's objects: CSV columns of the answers.
pub fn fields(format: &ResponseFormat) -> Vec<String> {
    match format {
        ResponseFormat::JsonSchema { schema, .. } => schema
            .get("properties")
            .and_then(Value::as_object)
            .map(|properties| properties.keys().cloned().collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}
