//! The built-in file tools, `read_file` and `list_dir`, confined to folders.
//!
//! A path is refused unless it resolves inside one of the allowed folders:
//! `..` anywhere in it is refused outright, and the path is resolved (every
//! symbolic link followed, as the operating system would) before it is
//! checked, so a link pointing outside is refused too. Relative paths are
//! looked up in each allowed folder in turn. Nothing here writes, runs a
//! command or reaches the network.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::tool::Tool;
use crate::provider::ToolSpec;

/// The most of a file `read_file` reads; the toolbox then caps what reaches the model.
const MAX_READ: u64 = 1024 * 1024;

/// The folders the file tools may read.
#[derive(Clone, Debug)]
pub struct AllowedDirs {
    /// Each folder as given (for messages) and resolved (for checks).
    dirs: Arc<Vec<(PathBuf, PathBuf)>>,
}

impl AllowedDirs {
    /// The folders, each of which must exist.
    pub fn new(dirs: impl IntoIterator<Item = PathBuf>) -> Result<Self, String> {
        let mut resolved = Vec::new();
        for dir in dirs {
            let real =
                dir.canonicalize().map_err(|e| format!("--allow-dir {}: {e}", dir.display()))?;
            if !real.is_dir() {
                return Err(format!("--allow-dir {}: not a folder", dir.display()));
            }
            resolved.push((dir, real));
        }
        Ok(Self { dirs: Arc::new(resolved) })
    }

    /// `read_file` and `list_dir` over these folders.
    pub fn tools(&self) -> Vec<Arc<dyn Tool>> {
        vec![
            Arc::new(FileTool { kind: Kind::Read, dirs: self.clone() }),
            Arc::new(FileTool { kind: Kind::List, dirs: self.clone() }),
        ]
    }

    fn described(&self) -> String {
        let dirs: Vec<String> =
            self.dirs.iter().map(|(given, _)| given.display().to_string()).collect();
        dirs.join(", ")
    }

    /// Where `path` leads, if that is inside an allowed folder.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, String> {
        let asked = Path::new(path);
        if asked.components().any(|c| c == Component::ParentDir) {
            return Err(format!("`{path}`: `..` is not allowed in paths"));
        }
        let candidates: Vec<PathBuf> = if asked.is_absolute() {
            vec![asked.to_path_buf()]
        } else {
            self.dirs.iter().map(|(given, _)| given.join(asked)).collect()
        };
        let found = candidates.iter().find_map(|c| c.canonicalize().ok());
        let Some(real) = found else {
            return Err(format!(
                "`{path}` does not exist in the allowed folders ({})",
                self.described()
            ));
        };
        if self.dirs.iter().any(|(_, root)| real.starts_with(root)) {
            Ok(real)
        } else {
            Err(format!("`{path}` is outside the allowed folders ({})", self.described()))
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Read,
    List,
}

#[derive(Debug)]
struct FileTool {
    kind: Kind,
    dirs: AllowedDirs,
}

#[async_trait::async_trait]
impl Tool for FileTool {
    fn spec(&self) -> ToolSpec {
        let path = json!({"type": "object", "properties": {"path": {"type": "string",
            "description": "A path inside an allowed folder, or relative to one"}}, "required": ["path"]});
        let folders = self.dirs.described();
        match self.kind {
            Kind::Read => ToolSpec::new(
                "read_file",
                format!("Reads a text file. Allowed folders: {folders}."),
                path,
            ),
            Kind::List => ToolSpec::new(
                "list_dir",
                format!(
                    "Lists a folder's entries (folders end with /). Allowed folders: {folders}."
                ),
                path,
            ),
        }
    }

    async fn call(&self, arguments: Map<String, Value>) -> Result<String, String> {
        let Some(path) = arguments.get("path").and_then(Value::as_str) else {
            return Err("the argument `path` (a string) is required".into());
        };
        let real = self.dirs.resolve(path)?;
        let kind = self.kind;
        // File reads block; they run off the async threads.
        tokio::task::spawn_blocking(move || match kind {
            Kind::Read => read(&real),
            Kind::List => list(&real),
        })
        .await
        .map_err(|e| format!("the file tool failed: {e}"))?
        .map_err(|e| format!("`{path}`: {e}"))
    }
}

fn read(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    // A pipe or a device could block the reading thread forever.
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(MAX_READ).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn list(path: &Path) -> std::io::Result<String> {
    let mut entries: Vec<String> = std::fs::read_dir(path)?
        .filter_map(Result::ok)
        .map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().is_ok_and(|t| t.is_dir()) { format!("{name}/") } else { name }
        })
        .collect();
    entries.sort();
    Ok(entries.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, tempfile::TempDir, AllowedDirs) {
        let inside = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(inside.path().join("notes")).unwrap();
        std::fs::write(inside.path().join("notes/a.md"), "# A").unwrap();
        std::fs::write(outside.path().join("secret.txt"), "key").unwrap();
        let dirs = AllowedDirs::new([inside.path().to_path_buf()]).unwrap();
        (inside, outside, dirs)
    }

    async fn call(dirs: &AllowedDirs, tool: usize, path: &str) -> Result<String, String> {
        let mut arguments = Map::new();
        arguments.insert("path".into(), json!(path));
        dirs.tools()[tool].call(arguments).await
    }

    #[tokio::test]
    async fn reads_and_lists_inside_the_allowed_folders() {
        let (inside, _outside, dirs) = setup();
        assert_eq!(call(&dirs, 0, "notes/a.md").await.unwrap(), "# A");
        let absolute = inside.path().join("notes/a.md").display().to_string();
        assert_eq!(call(&dirs, 0, &absolute).await.unwrap(), "# A");
        assert_eq!(call(&dirs, 1, ".").await.unwrap(), "notes/");
        assert_eq!(call(&dirs, 1, "notes").await.unwrap(), "a.md");
        assert!(call(&dirs, 0, "notes").await.is_err(), "a folder is not read as a file");
        assert!(call(&dirs, 0, "nothing.md").await.unwrap_err().contains("does not exist"));
    }

    #[tokio::test]
    async fn relative_paths_are_found_in_any_allowed_folder() {
        let (first, _outside, _) = setup();
        let second = tempfile::tempdir().unwrap();
        std::fs::write(second.path().join("b.md"), "# B").unwrap();
        let dirs =
            AllowedDirs::new([first.path().to_path_buf(), second.path().to_path_buf()]).unwrap();
        assert_eq!(call(&dirs, 0, "b.md").await.unwrap(), "# B");
        assert_eq!(call(&dirs, 0, "notes/a.md").await.unwrap(), "# A");
        let described = dirs.tools()[0].spec().description;
        let real = second.path().canonicalize().unwrap().display().to_string();
        assert!(
            described.contains(&real),
            "the folders are named as the model should use them: {described}"
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn no_path_escapes_the_allowed_folders() {
        let (inside, outside, dirs) = setup();
        let secret = outside.path().join("secret.txt");
        let refused = |e: String| e.contains("outside the allowed folders") || e.contains("`..`");
        assert!(refused(call(&dirs, 0, "notes/../../secret.txt").await.unwrap_err()));
        assert!(refused(call(&dirs, 0, "notes/../notes/a.md").await.unwrap_err()), "any `..`");
        assert!(refused(call(&dirs, 0, &secret.display().to_string()).await.unwrap_err()));
        std::os::unix::fs::symlink(&secret, inside.path().join("link.txt")).unwrap();
        assert!(refused(call(&dirs, 0, "link.txt").await.unwrap_err()), "a link pointing out");
        std::os::unix::fs::symlink(outside.path(), inside.path().join("door")).unwrap();
        assert!(refused(call(&dirs, 0, "door/secret.txt").await.unwrap_err()));
        assert!(refused(call(&dirs, 1, "door").await.unwrap_err()));
        assert!(call(&dirs, 0, "/etc/passwd").await.unwrap_err().contains("outside"));
        assert!(AllowedDirs::new([outside.path().join("missing")]).is_err());
    }
}
