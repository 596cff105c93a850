//! `--keep`: input fields carried beside each row's answer, in every output
//! format and in the store (so `jobs export` has them too).
//!
//! The fields travel beside the tasks, not through the executor: a row's
//! selection is put aside when its task is made and taken back when its result
//! is committed, so no more are held than there are tasks alive.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Which input fields each output row keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    /// Every field of the row (`--keep '*'`).
    All,
    /// These fields, in this order (`--keep name,grade_level`).
    Fields(Vec<String>),
}

impl std::str::FromStr for Keep {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim() == "*" {
            return Ok(Self::All);
        }
        let fields: Vec<String> =
            text.split(',').map(str::trim).filter(|f| !f.is_empty()).map(str::to_owned).collect();
        if fields.is_empty() {
            return Err("name the fields to keep, separated by commas, or '*' for all".into());
        }
        Ok(Self::Fields(fields))
    }
}

impl Keep {
    /// The kept fields of `row`; a named field the row lacks is `null`, so
    /// every output row has the same fields.
    pub fn select(&self, row: &Map<String, Value>) -> Map<String, Value> {
        match self {
            Self::All => row.clone(),
            Self::Fields(names) => names
                .iter()
                .map(|name| (name.clone(), row.get(name).cloned().unwrap_or(Value::Null)))
                .collect(),
        }
    }

    /// The CSV columns of the kept fields: the names given, or for `*` the
    /// fields of the input's first row (`first`).
    pub fn columns(&self, first: Option<&Map<String, Value>>) -> Vec<String> {
        match self {
            Self::All => first.map(|row| row.keys().cloned().collect()).unwrap_or_default(),
            Self::Fields(names) => names.clone(),
        }
    }
}

/// Kept fields of the tasks alive, by row index.
#[derive(Clone, Debug, Default)]
pub struct KeptFields(Arc<Mutex<HashMap<u64, Map<String, Value>>>>);

impl KeptFields {
    pub fn put(&self, index: u64, fields: Map<String, Value>) {
        self.0.lock().expect("never poisoned").insert(index, fields);
    }

    pub fn take(&self, index: u64) -> Option<Map<String, Value>> {
        self.0.lock().expect("never poisoned").remove(&index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_named_or_all() {
        let row: Map<String, Value> =
            serde_json::from_str(r#"{"name": "Ann", "grade": 5, "essay": "..."}"#).unwrap();
        let keep: Keep = "grade, name,missing".parse().unwrap();
        let kept = keep.select(&row);
        assert_eq!(
            Value::Object(kept),
            serde_json::json!({"grade": 5, "name": "Ann", "missing": null})
        );
        assert_eq!(keep.columns(None), ["grade", "name", "missing"]);
        let all: Keep = "*".parse().unwrap();
        assert_eq!(all.select(&row), row);
        assert_eq!(all.columns(Some(&row)).len(), 3);
        assert!(" , ".parse::<Keep>().is_err());
    }
}
