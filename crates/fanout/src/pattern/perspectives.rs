//! Perspectives: several personas review one input in parallel, then a
//! synthesis keeps each view attributed. Built-in personas are system prompts;
//! custom ones come from a TOML (`[[persona]] name = ..., prompt = ...`) or JSON
//! (`[{"name": ..., "prompt": ...}]`) file.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::sections::{Section, SectionsResult, sections};
use crate::agent::Agent;
use crate::{Executor, Request};

/// A reviewer: a name to attribute views to, and the system prompt that makes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persona {
    /// Attributes the persona's review in the synthesis.
    pub name: String,
    /// The persona's system prompt.
    pub prompt: String,
}

/// The built-in personas, by name.
pub const BUILTIN: [(&str, &str); 7] = [
    (
        "skeptic",
        "You are a rigorous skeptic. Find the weakest assumptions, the risks, what could go wrong, and what evidence is missing. Be specific and concrete.",
    ),
    (
        "optimist",
        "You are a constructive optimist. Find the strengths, the opportunities, and how the idea could succeed beyond its current form. Be specific.",
    ),
    (
        "realist",
        "You are a pragmatic realist. Weigh costs, effort, timelines and likely outcomes. Say what is feasible, what to cut, and what to do first.",
    ),
    (
        "security",
        "You are a security reviewer. Identify threats, attack surfaces, data exposure, abuse cases and missing safeguards, ranked by severity.",
    ),
    (
        "end-user",
        "You are a typical end user. Describe what would confuse, frustrate or delight you, and what you would actually use.",
    ),
    (
        "expert",
        "You are a domain expert. Check facts and methods, point out errors and omissions, and name established practice that applies.",
    ),
    (
        "devil",
        "You are the devil's advocate. Argue the strongest case against the input's main conclusion, even if you might not hold it.",
    ),
];

/// The built-in persona `name`.
pub fn builtin(name: &str) -> Option<Persona> {
    BUILTIN
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(name, prompt)| Persona { name: (*name).into(), prompt: (*prompt).into() })
}

#[derive(Deserialize)]
struct PersonaFile {
    persona: Vec<Persona>,
}

/// Custom personas from a `.toml` or `.json` file.
pub fn load(path: &Path) -> Result<Vec<Persona>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let json = path.extension().is_some_and(|e| e == "json");
    let personas = if json {
        serde_json::from_str::<Vec<Persona>>(&text)
            .map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        toml::from_str::<PersonaFile>(&text)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .persona
    };
    if personas.is_empty() {
        return Err(format!("{} defines no persona", path.display()));
    }
    Ok(personas)
}

/// Instructions for the synthesis when the caller gives none.
pub const DEFAULT_SYNTHESIS: &str = "Several reviewers gave their views of the same input, below. Write a balanced synthesis: \
    the points they agree on, where they disagree, and a recommendation. Attribute every view to its reviewer by name.";

/// Each persona reviews `input` (as an agent with tools, when `agent` is
/// given); then, with `synthesize`, an attributed synthesis.
pub async fn perspectives(
    executor: &Executor,
    input: &str,
    personas: &[Persona],
    synthesize: Option<&str>,
    agent: Option<&Agent>,
) -> SectionsResult {
    let reviews = personas
        .iter()
        .map(|p| Section {
            name: p.name.clone(),
            request: Request::user(input).with_system(&p.prompt),
            agent: agent.cloned(),
        })
        .collect();
    sections(executor, reviews, synthesize).await
}
