//! The shape of a pattern run, kept with its job (in the settings, under
//! `outcome`) so that `fanout report` can draw it: a vote's answer
//! distribution per question and where early stopping cut; a workflow's (or
//! sections', or perspectives') step graph with each step's status; a
//! map-reduce's collapse tree. Only the shape and names: no answer text
//! beyond the extracted vote answers and the question voted on, which are
//! what a vote's report is about.

use fanout::Failure;
use fanout::pattern::map_reduce::MapReduceResult;
use fanout::pattern::sections::{SYNTHESIS_ID, SectionsResult};
use fanout::pattern::vote::VoteResult;
use fanout::pattern::workflow::WorkflowResult;
use serde_json::{Value, json};

/// The most vote questions kept: a vote over a large file keeps the first ones.
pub const MAX_QUESTIONS: usize = 200;
/// The most answers kept per question, the most voted first.
const MAX_ANSWERS: usize = 12;

/// One question of a vote: its answers and votes, the winner, and how many
/// of the `asked` samples were drawn before the vote was decided.
pub fn vote_question(question: &str, result: &VoteResult, asked: usize) -> Value {
    let answers: Vec<Value> = result
        .distribution
        .iter()
        .take(MAX_ANSWERS)
        .map(|count| json!({"answer": count.answer, "votes": count.votes}))
        .collect();
    json!({
        "question": question,
        "answers": answers,
        "more_answers": result.distribution.len().saturating_sub(MAX_ANSWERS),
        "winner": result.winner,
        "consensus": result.consensus,
        "asked": asked,
        "drawn": result.calls,
        "failed": result.samples.iter().filter(|s| s.error.is_some()).count(),
        "stopped_early": result.stopped_early,
    })
}

/// A vote's questions (one, or one per row of its input).
pub fn votes(questions: Vec<Value>, more: usize) -> Value {
    json!({"kind": "vote", "questions": questions, "more_questions": more})
}

/// One step of a step graph: `id` is the task id its calls are recorded
/// under, so the report can tell each step's time from them.
fn step(name: &str, id: &str, needs: &[&str], error: Option<&Failure>) -> Value {
    json!({"name": name, "id": id, "needs": needs, "error": error.map(ToString::to_string)})
}

/// A workflow's steps, each with the steps it needs.
pub fn workflow(needs: &[(&str, Vec<&str>)], result: &WorkflowResult) -> Value {
    let steps: Vec<Value> = result
        .steps
        .iter()
        .map(|done| {
            let needed = needs.iter().find(|(name, _)| *name == done.name).map(|(_, n)| &n[..]);
            step(&done.name, &done.name, needed.unwrap_or_default(), done.error.as_ref())
        })
        .collect();
    json!({"kind": "steps", "steps": steps})
}

/// Sections or perspectives: every part side by side, then the synthesis
/// that needs them all.
pub fn parts(result: &SectionsResult) -> Value {
    let mut steps: Vec<Value> = result
        .parts
        .iter()
        .map(|part| step(&part.name, &part.id, &[], part.error.as_ref()))
        .collect();
    if let Some(synthesis) = &result.synthesis {
        let names: Vec<&str> = result.parts.iter().map(|p| p.name.as_str()).collect();
        steps.push(step("synthesis", SYNTHESIS_ID, &names, synthesis.error.as_ref()));
    }
    json!({"kind": "steps", "steps": steps})
}

/// A map-reduce's collapse tree: for each level after the first, how many
/// summaries of the level below went into each of its summaries (in order),
/// so the tree is kept in a few numbers per node, whatever the chunks' ids.
pub fn collapse(result: &MapReduceResult) -> Value {
    let mut levels = vec![json!({"nodes": result.levels.first().map_or(0, Vec::len)})];
    for pair in result.levels.windows(2) {
        let (below, level) = (&pair[0], &pair[1]);
        let fan_in: Vec<usize> = level
            .iter()
            .map(|summary| {
                let covers = |s: &&fanout::pattern::map_reduce::Summary| {
                    s.sources.iter().all(|id| summary.sources.contains(id))
                };
                below.iter().filter(covers).count()
            })
            .collect();
        levels.push(json!({"nodes": level.len(), "fan_in": fan_in}));
    }
    json!({
        "kind": "collapse",
        "levels": levels,
        "answered": result.answer.is_some(),
        "failures": result.failures.iter().map(|(ids, failure)| json!({"ids": ids, "error": failure.to_string()})).take(50).collect::<Vec<_>>(),
    })
}
