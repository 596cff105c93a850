//! Sections: named subtasks run concurrently, then an optional synthesizer that
//! receives every section's result by name and id, in a fixed order. A failed
//! or timed-out section reaches the synthesizer as missing, with its reason.
//! A section with an [`Agent`] works as one (tools, several turns), its
//! transcript kept beside its answer.

use serde::Serialize;

use super::asked::{Ask, ask_all};
use crate::agent::{Agent, Transcript};
use crate::{Executor, Failure, Request, Task};

/// The synthesis call's task id, beside the sections' `s1`, `s2`, ...
pub const SYNTHESIS_ID: &str = "synthesis";

/// A named subtask.
#[derive(Clone, Debug)]
pub struct Section {
    /// How the section's result is labelled for the synthesizer and in the output.
    pub name: String,
    /// What the section asks.
    pub request: Request,
    /// The agent that works on it, when it may use tools; `None` is one call.
    pub agent: Option<Agent>,
}

impl Section {
    /// A section asking `prompt` as a single user message.
    pub fn new(name: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self { name: name.into(), request: Request::user(prompt), agent: None }
    }

    /// The same section, worked on by `agent`.
    #[must_use]
    pub fn with_agent(mut self, agent: Agent) -> Self {
        self.agent = Some(agent);
        self
    }
}

/// A section's result; exactly one of `text` and `error` is set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Part {
    /// The section's name.
    pub name: String,
    /// `s1`, `s2`, ... in the order the sections were given.
    pub id: String,
    /// The section's answer, when it got one.
    pub text: Option<String>,
    /// Why the section has no answer.
    pub error: Option<Failure>,
    /// An agent's turns, tool calls and results, when the section had tools.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transcript: Option<Transcript>,
}

/// The synthesizer's result; exactly one of `text` and `error` is set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Synthesis {
    /// The synthesis, when the call got an answer.
    pub text: Option<String>,
    /// Why there is no synthesis.
    pub error: Option<Failure>,
}

/// Every section's result, then the synthesis.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SectionsResult {
    /// One per section, in the order given.
    pub parts: Vec<Part>,
    /// `None` when no synthesis was asked for.
    pub synthesis: Option<Synthesis>,
}

/// The synthesizer's prompt: the instructions, then every part by name and id;
/// a missing part says so and why.
pub fn synthesis_prompt(instructions: &str, parts: &[Part]) -> String {
    let mut prompt = format!("{instructions}\n");
    for part in parts {
        prompt.push_str(&format!("\n## {} (id: {})\n", part.name, part.id));
        match (&part.text, &part.error) {
            (Some(text), _) => prompt.push_str(text.trim()),
            (None, error) => prompt.push_str(&format!(
                "[MISSING: this part has no result ({}). Say what is missing rather than guessing.]",
                error.as_ref().map_or_else(|| "unknown reason".into(), ToString::to_string)
            )),
        }
        prompt.push('\n');
    }
    prompt
}

/// Runs the sections in parallel, then the synthesizer if `synthesize` gives its instructions.
pub async fn sections(
    executor: &Executor,
    sections: Vec<Section>,
    synthesize: Option<&str>,
) -> SectionsResult {
    let names: Vec<String> = sections.iter().map(|s| s.name.clone()).collect();
    let asks = sections
        .into_iter()
        .enumerate()
        .map(|(i, s)| Ask { id: format!("s{}", i + 1), request: s.request, agent: s.agent })
        .collect();
    let parts: Vec<Part> = ask_all(executor, asks)
        .await
        .into_iter()
        .zip(names)
        .map(|(answer, name)| Part {
            name,
            id: answer.id,
            text: answer.text,
            error: answer.error,
            transcript: answer.transcript,
        })
        .collect();
    let synthesis = match synthesize {
        None => None,
        Some(instructions) => {
            let request = Request::user(synthesis_prompt(instructions, &parts));
            let report = executor.run([Task::with_id(SYNTHESIS_ID, request)]).await;
            let outcome = &report.results[0].outcome;
            Some(Synthesis { text: outcome.text().map(str::to_owned), error: outcome.failure() })
        }
    };
    SectionsResult { parts, synthesis }
}
