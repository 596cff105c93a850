//! Voting: the same request N times, then consensus or diversity.
//!
//! - [`vote`]: extract each sample's answer and aggregate (a majority of the
//!   votes cast; or the plurality, ties broken by first appearance and
//!   reported; or at least k agreeing; weights). An answer cut off at
//!   `max_tokens` is no vote unless asked for.
//!   Samples launch in waves; with early stopping the vote ends as soon as the
//!   leader cannot be overtaken by the samples left, or, optionally, when the
//!   Beta stopping rule of Adaptive-Consistency (arXiv:2305.11860) is confident
//!   the leader is ahead of the runner-up. In-flight samples are then cancelled.
//! - [`most_consistent`]: universal self-consistency for free text — a judge
//!   call picks the answer most consistent with the others.
//! - [`distinct`]: N different options, near-duplicates removed, topped up with
//!   more samples until N remain or the budget is spent.

mod distinct;
mod judge;
mod stopping;
mod tally;

use std::collections::BTreeSet;

use futures_util::StreamExt;
use serde::Serialize;

use super::extract::Extractor;
use crate::{Executor, Failure, Outcome, Request, Task};
pub use distinct::{Distinct, distinct, similarity};
pub use judge::{Consistent, most_consistent};
pub use stopping::{beta_above_half, leader_holds};
use stopping::{decided, needed};
use tally::Tally;

/// When a vote is decided.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// More than half of the votes cast (by weight) must agree, else there is
    /// no consensus (the plurality is still reported).
    Majority,
    /// The most votes wins, majority or not.
    Plurality,
    /// At least this many samples must agree, else there is no consensus.
    AtLeast(usize),
}

/// Stopping before all N samples are in. Every rule also stops as soon as the
/// leader cannot be overtaken by the samples left (which is certain).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EarlyStop {
    /// Only when the leader cannot be overtaken: the same winner as all N, always.
    Certain,
    /// Adaptive-Consistency's Beta rule: once P(leader's share > runner-up's)
    /// under a Beta posterior reaches this (e.g. 0.95).
    Beta(f64),
    /// Once the Dirichlet-multinomial posterior predictive probability that the
    /// remaining samples leave the leader ahead reaches this (e.g. 0.99): the
    /// chance of the same winner as all N samples.
    Predictive(f64),
}

/// How a vote is run and decided.
#[derive(Clone, Debug)]
pub struct VoteOptions {
    /// The most samples to draw.
    pub samples: usize,
    /// Turns a sample's text into its vote.
    pub extractor: Extractor,
    /// When the vote counts as a consensus.
    pub rule: Rule,
    /// Weight of each sample by index (missing ones weigh 1).
    pub weights: Vec<f64>,
    /// Whether and how to stop before all samples are in; `None` runs them all.
    pub early_stop: Option<EarlyStop>,
    /// Samples launched together. `None` (the default) launches exactly as many
    /// as could decide the vote if they all agreed with the leader: no sample is
    /// launched that early stopping could have saved, and the rest still run in parallel.
    pub wave: Option<usize>,
    /// Used when the request sets no temperature: samples must differ.
    pub temperature: f32,
    /// Whether an answer cut off at `max_tokens` (`finish_reason` `length`)
    /// still votes. Off by default: a truncated answer's last number is often
    /// one from the question ("To add 12 and 30, we ...").
    pub count_truncated: bool,
}

impl VoteOptions {
    /// A majority vote over `samples` samples at temperature 0.7, without early stopping.
    pub fn new(samples: usize, extractor: Extractor) -> Self {
        Self {
            samples: samples.max(1),
            extractor,
            rule: Rule::Majority,
            weights: Vec::new(),
            early_stop: None,
            wave: None,
            temperature: 0.7,
            count_truncated: false,
        }
    }
}

/// One sample of a vote.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// The sample's position, 0 first; weights are given by it.
    pub index: usize,
    /// The sample's answer, when it got one.
    pub text: Option<String>,
    /// The extracted answer: its vote. `None` when the sample failed, had
    /// none, or was cut off at `max_tokens` (unless those count).
    pub answer: Option<String>,
    /// Cut off at `max_tokens`.
    pub truncated: bool,
    /// Why the sample has no answer.
    pub error: Option<Failure>,
}

/// An answer's share of the vote.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Count {
    /// The answer, as extracted.
    pub answer: String,
    /// Samples that gave it.
    pub votes: usize,
    /// Those samples' weights, summed.
    pub weight: f64,
}

/// What a vote decided, and from which samples.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VoteResult {
    /// The winning answer (`None` without consensus).
    pub winner: Option<String>,
    /// Whether the leader met the [`Rule`].
    pub consensus: bool,
    /// The answer with the most votes, consensus or not (ties go to the first
    /// to appear); `None` when no sample voted.
    pub plurality: Option<String>,
    /// Answers by weight, highest first (ties in order of first appearance).
    pub distribution: Vec<Count>,
    /// The winner's share of the weight of all answered samples.
    pub agreement: f64,
    /// The answers tied for the lead, when there was a tie (the first one won).
    pub tie: Vec<String>,
    /// Every sample received, in index order; cancelled ones are left out.
    pub samples: Vec<Sample>,
    /// Samples launched (in-flight ones cancelled at an early stop included).
    pub calls: usize,
    /// Whether early stopping ended the vote before all samples were in.
    pub stopped_early: bool,
}

/// The sample requests: each with its own index (and seed), never temperature 0.
fn sample_request(request: &Request, index: usize, temperature: f32) -> Request {
    let mut sample = request.clone();
    sample.sample_index = index as u32;
    sample.seed = Some(request.seed.unwrap_or(0).wrapping_add(index as u64));
    if sample.temperature.is_none_or(|t| t <= 0.0) {
        sample.temperature = Some(temperature);
    }
    sample
}

fn weight(options: &VoteOptions, index: usize) -> f64 {
    options.weights.get(index).copied().unwrap_or(1.0)
}

fn result(
    options: &VoteOptions,
    tally: &Tally,
    samples: Vec<Sample>,
    calls: usize,
    stopped_early: bool,
) -> VoteResult {
    let ranked = tally.ranked();
    let top_weight = ranked.first().map_or(0.0, |c| c.weight);
    let tied: Vec<String> = ranked
        .iter()
        .take_while(|c| (c.weight - top_weight).abs() < 1e-9)
        .map(|c| c.answer.clone())
        .collect();
    let leader = ranked.first();
    let consensus = match options.rule {
        Rule::Majority => leader.is_some_and(|_| top_weight > tally.answered_weight / 2.0),
        Rule::Plurality => leader.is_some(),
        Rule::AtLeast(k) => leader.is_some_and(|c| c.votes >= k),
    };
    let plurality = leader.map(|c| c.answer.clone());
    let winner = plurality.clone().filter(|_| consensus);
    VoteResult {
        agreement: if tally.answered_weight > 0.0 {
            top_weight / tally.answered_weight
        } else {
            0.0
        },
        winner,
        consensus,
        plurality,
        distribution: ranked,
        tie: if tied.len() > 1 { tied } else { Vec::new() },
        samples,
        calls,
        stopped_early,
    }
}

/// Votes over up to `options.samples` samples of `request`.
pub async fn vote(executor: &Executor, request: &Request, options: &VoteOptions) -> VoteResult {
    let n = options.samples;
    let mut tally = Tally::default();
    let mut samples: Vec<Sample> = Vec::with_capacity(n);
    let mut launched = 0;
    let mut decided_early = false;
    while launched < n && !decided_early {
        let wave = match (options.early_stop, options.wave) {
            (None, _) => n - launched,
            (Some(_), Some(wave)) => wave.clamp(1, n - launched),
            (Some(_), None) => needed(options, &tally, n - launched),
        };
        let tasks: Vec<Task> = (launched..launched + wave)
            .map(|i| Task::with_id(i.to_string(), sample_request(request, i, options.temperature)))
            .collect();
        launched += wave;
        let mut results = executor.stream(futures_util::stream::iter(tasks));
        while let Some(result) = results.next().await {
            let index = launched - wave + result.index;
            let (text, truncated, error) = match &result.outcome {
                Outcome::Succeeded(success) => {
                    let response = &success.response;
                    let truncated = response.is_truncated();
                    (Some(response.text.clone()), truncated, None)
                }
                other => (None, false, other.failure()),
            };
            let answer = text
                .as_deref()
                .filter(|_| !truncated || options.count_truncated)
                .and_then(|t| options.extractor.extract(t));
            if let Some(answer) = &answer {
                tally.add(answer, weight(options, index), index);
            }
            samples.push(Sample { index, text, answer, truncated, error });
            let received: BTreeSet<usize> = samples.iter().map(|s| s.index).collect();
            let remaining: Vec<usize> = (0..n).filter(|i| !received.contains(i)).collect();
            if options.early_stop.is_some()
                && !remaining.is_empty()
                && decided(options, &tally, &remaining)
            {
                decided_early = true;
                break; // dropping the stream cancels the samples in flight
            }
        }
    }
    samples.sort_by_key(|s| s.index);
    result(options, &tally, samples, launched, decided_early)
}
