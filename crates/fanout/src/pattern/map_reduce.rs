//! Map-reduce: documents split into chunks that fit a token budget (with
//! overlap), chunks mapped in parallel, the mapped outputs reduced. When they do
//! not fit the reduce budget they are grouped and collapsed, level by level,
//! until they do. Chunk ids (`doc#n`) travel with every summary through the
//! whole tree, so the final answer can cite its sources.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::tokens::estimate_text;
use crate::{Executor, Failure, Request, Task};

/// A text to map-reduce, with the id its chunks are named after.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// Names the document's chunks (`report` gives `report#1`, ...).
    pub id: String,
    /// The document's full text.
    pub text: String,
}

/// What to ask of each chunk and of the summaries, and the token budgets.
#[derive(Clone, Debug, PartialEq)]
pub struct MapReduceOptions {
    /// Instructions for each chunk.
    pub map: String,
    /// Instructions for combining summaries.
    pub reduce: String,
    /// A chunk's size, in estimated tokens (default 1500).
    pub chunk_tokens: usize,
    /// Tokens each chunk shares with the one before it (default 100).
    pub overlap_tokens: usize,
    /// The most a reduce (or collapse) prompt's summaries may hold.
    pub reduce_tokens: usize,
}

impl MapReduceOptions {
    /// Options with these instructions and the default budgets (chunks of 1500 tokens, 100 overlap, reduce 3000).
    pub fn new(map: impl Into<String>, reduce: impl Into<String>) -> Self {
        Self {
            map: map.into(),
            reduce: reduce.into(),
            chunk_tokens: 1500,
            overlap_tokens: 100,
            reduce_tokens: 3000,
        }
    }
}

/// A piece of a document, mapped on its own.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Chunk {
    /// `doc#1`, `doc#2`, ...
    pub id: String,
    /// The chunk's text, trimmed.
    pub text: String,
}

/// A summary and the chunks it stands for.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// Ids of the chunks the summary covers.
    pub sources: Vec<String>,
    /// The summary itself.
    pub text: String,
}

/// What a map-reduce brings back: the answer, its sources and every level.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MapReduceResult {
    /// The final answer; `None` when no chunk was mapped or the last reduce failed.
    pub answer: Option<String>,
    /// Every chunk id the answer stands on.
    pub sources: Vec<String>,
    /// Level 0 holds the mapped chunks; each later level, one round of collapsing.
    pub levels: Vec<Vec<Summary>>,
    /// Chunks or groups that failed: their ids and why.
    pub failures: Vec<(Vec<String>, Failure)>,
}

/// Splits a document into chunks of about `chunk_tokens`, overlapping by about
/// `overlap_tokens`, cutting at whitespace where it can.
pub fn chunk(document: &Document, chunk_tokens: usize, overlap_tokens: usize) -> Vec<Chunk> {
    let chars: Vec<char> = document.text.chars().collect();
    let size = (chunk_tokens.max(1) * 4).max(8);
    let overlap = (overlap_tokens * 4).min(size / 2);
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < chars.len() {
        let mut end = (start + size).min(chars.len());
        if end < chars.len()
            && let Some(space) =
                chars[start + size / 2..end].iter().rposition(|c| c.is_whitespace())
        {
            end = start + size / 2 + space + 1;
        }
        let text: String = chars[start..end].iter().collect();
        chunks.push(Chunk {
            id: format!("{}#{}", document.id, chunks.len() + 1),
            text: text.trim().to_owned(),
        });
        if end == chars.len() {
            break;
        }
        start = end.saturating_sub(overlap).max(start + 1);
    }
    chunks
}

fn labelled(summary: &Summary) -> String {
    format!("[{}]\n{}", summary.sources.join(", "), summary.text.trim())
}

fn combine_prompt(instructions: &str, summaries: &[Summary], last: bool) -> String {
    let how = if last {
        "Cite the sources you use by their ids in square brackets, e.g. [report#2]."
    } else {
        "Combine these partial summaries into one. Keep every source id in square brackets next to what it supports."
    };
    let body: Vec<String> = summaries.iter().map(labelled).collect();
    format!("{instructions}\n{how}\n\n{}", body.join("\n\n"))
}

/// Groups consecutive summaries so each group's text fits `budget`; every group
/// has at least two summaries (when there are two), so each level shrinks.
fn groups(summaries: Vec<Summary>, budget: usize) -> Vec<Vec<Summary>> {
    let mut groups: Vec<Vec<Summary>> = Vec::new();
    let mut size = 0;
    for summary in summaries {
        let tokens = estimate_text(&labelled(&summary)) as usize;
        match groups.last_mut() {
            Some(group) if group.len() < 2 || size + tokens <= budget => {
                size += tokens;
                group.push(summary);
            }
            _ => {
                size = tokens;
                groups.push(vec![summary]);
            }
        }
    }
    // A lone last summary joins the group before it rather than making a level of one.
    if groups.len() > 1 && groups.last().is_some_and(|g| g.len() == 1) {
        let last = groups.pop().expect("checked");
        groups.last_mut().expect("checked").extend(last);
    }
    groups
}

/// Runs prompts in parallel; each result keeps the sources it stands for.
async fn run_all(
    executor: &Executor,
    prompts: Vec<(Vec<String>, String)>,
    failures: &mut Vec<(Vec<String>, Failure)>,
) -> Vec<Summary> {
    let tasks: Vec<Task> =
        prompts.iter().map(|(_, p)| Task::new(Request::user(p.clone()))).collect();
    let report = executor.run(tasks).await;
    let mut out = Vec::new();
    for (result, (sources, _)) in report.results.iter().zip(prompts) {
        match (result.outcome.text(), result.outcome.failure()) {
            (Some(text), _) => out.push(Summary { sources, text: text.to_owned() }),
            (None, failure) => failures.extend(failure.map(|failure| (sources, failure))),
        }
    }
    out
}

/// Maps every chunk of `documents`, then reduces (collapsing as needed).
pub async fn map_reduce(
    executor: &Executor,
    documents: &[Document],
    options: &MapReduceOptions,
) -> MapReduceResult {
    let mut failures = Vec::new();
    let prompts: Vec<(Vec<String>, String)> = documents
        .iter()
        .flat_map(|d| chunk(d, options.chunk_tokens, options.overlap_tokens))
        .map(|c| (vec![c.id.clone()], format!("{}\n\nSource {}:\n{}", options.map, c.id, c.text)))
        .collect();
    let mut current = run_all(executor, prompts, &mut failures).await;
    let mut levels = vec![current.clone()];
    const MAX_LEVELS: usize = 16;
    while current.len() > 1 && levels.len() < MAX_LEVELS {
        let total: usize = current.iter().map(|s| estimate_text(&labelled(s)) as usize).sum();
        if total <= options.reduce_tokens {
            break;
        }
        let prompts = groups(current, options.reduce_tokens)
            .into_iter()
            .map(|group| {
                let sources: Vec<String> = group.iter().flat_map(|s| s.sources.clone()).collect();
                (sources, combine_prompt(&options.reduce, &group, false))
            })
            .collect();
        current = run_all(executor, prompts, &mut failures).await;
        levels.push(current.clone());
    }
    let sources: Vec<String> = current
        .iter()
        .flat_map(|s| s.sources.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let answer = if current.is_empty() {
        None
    } else {
        let prompt = vec![(sources.clone(), combine_prompt(&options.reduce, &current, true))];
        run_all(executor, prompt, &mut failures).await.pop().map(|s| s.text)
    };
    MapReduceResult { answer, sources, levels, failures }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_overlap_and_cover_the_text() {
        let words: Vec<String> = (0..400).map(|i| format!("w{i}")).collect();
        let document = Document { id: "doc".into(), text: words.join(" ") };
        let chunks = chunk(&document, 50, 10);
        assert!(chunks.len() > 5);
        assert_eq!(chunks[0].id, "doc#1");
        for pair in chunks.windows(2) {
            let last_word = pair[0].text.split(' ').next_back().unwrap();
            assert!(pair[1].text.contains(last_word), "chunks overlap");
        }
        assert!(chunks.last().unwrap().text.ends_with("w399"));
        assert!(chunks.iter().all(|c| estimate_text(&c.text) <= 50));
    }

    #[test]
    fn groups_fit_the_budget_and_shrink_each_level() {
        let summaries: Vec<Summary> = (0..9)
            .map(|i| Summary { sources: vec![format!("d#{i}")], text: "x".repeat(100) })
            .collect();
        let grouped = groups(summaries, 80);
        assert!(grouped.len() < 9 && grouped.iter().all(|g| g.len() >= 2));
        assert_eq!(grouped.iter().map(Vec::len).sum::<usize>(), 9);
    }
}
