//! The documents of `fanout map-reduce`: files, folders (read recursively, in
//! name order), globs, and JSONL files whose rows each hold one document.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use fanout::pattern::map_reduce::Document;

use crate::Refusal;
use crate::input::{self, Content};

/// Every document `paths` name, each file once however often it is named.
/// A path that matches nothing, or a file that cannot be read, is refused.
pub fn gather(paths: &[String], field: Option<&str>) -> Result<Vec<Document>> {
    let mut found = Vec::new();
    for pattern in paths {
        let path = Path::new(pattern);
        if path.exists() {
            files(path, &mut found).map_err(Refusal)?;
            continue;
        }
        let matches: Vec<PathBuf> = glob::glob(pattern)
            .map_err(|e| Refusal(anyhow!("bad glob `{pattern}`: {e}")))?
            .filter_map(Result::ok)
            .collect();
        if matches.is_empty() {
            return Err(Refusal(anyhow!("`{pattern}` matches no file")).into());
        }
        for path in matches {
            files(&path, &mut found).map_err(Refusal)?;
        }
    }
    // A file named twice (a folder and a glob over it) is one document.
    let mut seen = std::collections::BTreeSet::new();
    found.retain(|p| seen.insert(std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())));
    let mut documents = Vec::new();
    for path in &found {
        add_file(path, field, &mut documents).map_err(Refusal)?;
    }
    Ok(documents)
}

fn add_file(path: &Path, field: Option<&str>, documents: &mut Vec<Document>) -> Result<()> {
    let id = path
        .file_name()
        .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    if let Some(field) = field.filter(|_| path.extension().is_some_and(|e| e == "jsonl")) {
        for row in input::rows(path, input::Format::Jsonl, None)? {
            let Content::Fields(fields) = row.content else {
                bail!("{}: {}", path.display(), "a row is not a JSON object")
            };
            let text = fields.get(field).and_then(|v| v.as_str()).with_context(|| {
                format!("{} line {}: no text field `{field}`", path.display(), row.line)
            })?;
            documents.push(Document { id: format!("{id}:{}", row.line), text: text.to_owned() });
        }
        return Ok(());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {} as text", path.display()))?;
    documents.push(Document { id, text });
    Ok(())
}

/// Every file under `path` (itself, if it is a file), in name order.
fn files(path: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(path)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for entry in entries {
            files(&entry, found)?;
        }
    } else {
        found.push(path.to_path_buf());
    }
    Ok(())
}
