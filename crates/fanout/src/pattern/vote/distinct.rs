//! N different options: near-duplicates removed, topped up with more samples
//! until N remain or the budget is spent.

use std::collections::BTreeSet;

use serde::Serialize;

use super::sample_request;
use crate::pattern::extract::normalize;
use crate::{Executor, Request, Task};

/// Token-set similarity (Jaccard) of two normalized texts.
pub fn similarity(a: &str, b: &str) -> f64 {
    let (a, b) = (normalize(a), normalize(b));
    let a: BTreeSet<&str> = a.split(' ').filter(|t| !t.is_empty()).collect();
    let b: BTreeSet<&str> = b.split(' ').filter(|t| !t.is_empty()).collect();
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    a.intersection(&b).count() as f64 / a.union(&b).count() as f64
}

/// What [`distinct`] found: the options kept and the near-duplicates dropped.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Distinct {
    /// The distinct answers, trimmed, in the order they arrived; at most `n`.
    pub options: Vec<String>,
    /// Samples dropped as near-duplicates of a kept option.
    pub duplicates: Vec<String>,
    /// Samples sent, failed ones included.
    pub calls: usize,
    /// Whether the budget ran out before `n` distinct options were found.
    pub exhausted: bool,
}

/// `n` distinct answers: near-duplicates (token-set similarity at or above
/// `threshold`) are dropped and replaced, within `budget` calls.
pub async fn distinct(
    executor: &Executor,
    request: &Request,
    n: usize,
    budget: usize,
    threshold: f64,
    temperature: f32,
) -> Distinct {
    let mut kept: Vec<String> = Vec::new();
    let mut duplicates = Vec::new();
    let mut calls = 0;
    while kept.len() < n && calls < budget {
        let wave = (n - kept.len()).min(budget - calls);
        let tasks: Vec<Task> = (calls..calls + wave)
            .map(|i| Task::with_id(i.to_string(), sample_request(request, i, temperature)))
            .collect();
        calls += wave;
        let report = executor.run(tasks).await;
        for text in report.results.iter().filter_map(|r| r.outcome.text()) {
            let text = text.trim().to_owned();
            if kept.len() < n && kept.iter().all(|k| similarity(k, &text) < threshold) {
                kept.push(text);
            } else {
                duplicates.push(text);
            }
        }
    }
    Distinct { exhausted: kept.len() < n, options: kept, duplicates, calls }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similarity_of_near_duplicates() {
        assert_eq!(similarity("Cats rule the world!", "cats rule the world"), 1.0);
        assert!(similarity("A new dawn for solar power", "Solar power: a new dawn") > 0.8);
        assert!(similarity("Solar power grows", "Wind farms expand offshore") < 0.2);
    }
}
