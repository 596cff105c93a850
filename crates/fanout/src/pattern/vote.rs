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

use std::collections::BTreeSet;

use futures_util::StreamExt;
use serde::Serialize;

use super::extract::{Extractor, normalize};
use crate::{Executor, Failure, Outcome, Request, Task};

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

#[derive(Clone, Debug)]
pub struct VoteOptions {
    pub samples: usize,
    pub extractor: Extractor,
    pub rule: Rule,
    /// Weight of each sample by index (missing ones weigh 1).
    pub weights: Vec<f64>,
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
    pub index: usize,
    pub text: Option<String>,
    /// The extracted answer: its vote. `None` when the sample failed, had
    /// none, or was cut off at `max_tokens` (unless those count).
    pub answer: Option<String>,
    /// Cut off at `max_tokens`.
    pub truncated: bool,
    pub error: Option<Failure>,
}

/// An answer's share of the vote.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Count {
    pub answer: String,
    pub votes: usize,
    pub weight: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VoteResult {
    /// The winning answer (`None` without consensus).
    pub winner: Option<String>,
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
    pub samples: Vec<Sample>,
    /// Samples launched (in-flight ones cancelled at an early stop included).
    pub calls: usize,
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

/// Probability under the posterior predictive that, after `remaining` more
/// samples, the leader (`leader` votes) still wins against the runner-up
/// (`second`): ahead, or level when `wins_ties` (it appeared first, and ties go
/// to the first). The rest (`others`) are lumped together. Dirichlet(counts + 1)
/// posterior; an exact sum over the outcomes.
pub fn leader_holds(
    leader: usize,
    second: usize,
    others: usize,
    remaining: usize,
    wins_ties: bool,
) -> f64 {
    // Rising factorial x^(n) = x (x + 1) ... (x + n - 1), in f64: small integers here.
    let rising = |x: f64, n: usize| (0..n).map(|i| x + i as f64).product::<f64>();
    let choose =
        |n: usize, k: usize| (0..k).map(|i| (n - i) as f64 / (i + 1) as f64).product::<f64>();
    let (a, b, c) = (leader as f64 + 1.0, second as f64 + 1.0, others as f64 + 1.0);
    let total = rising(a + b + c, remaining);
    let mut holds = 0.0;
    for x in 0..=remaining {
        for y in 0..=remaining - x {
            if leader + x > second + y || (wins_ties && leader + x == second + y) {
                let z = remaining - x - y;
                let ways = choose(remaining, x) * choose(remaining - x, y);
                holds += ways * rising(a, x) * rising(b, y) * rising(c, z) / total;
            }
        }
    }
    holds.min(1.0)
}

/// P(X > 1/2) for X ~ Beta(a, b), integers: P(Binomial(a + b - 1, 1/2) <= a - 1).
pub fn beta_above_half(a: u64, b: u64) -> f64 {
    let n = a + b - 1;
    let mut term = 0.5f64.powi(n as i32); // C(n, 0) / 2^n
    let mut total = 0.0;
    for j in 0..a {
        total += term;
        term *= (n - j) as f64 / (j + 1) as f64;
    }
    total.min(1.0)
}

#[derive(Default)]
struct Tally {
    /// Answer, votes, weight, and the lowest sample index that gave it.
    answers: Vec<(String, usize, f64, usize)>,
    answered_weight: f64,
}

impl Tally {
    fn add(&mut self, answer: &str, weight: f64, index: usize) {
        self.answered_weight += weight;
        match self.answers.iter_mut().find(|(a, ..)| a == answer) {
            Some(entry) => {
                entry.1 += 1;
                entry.2 += weight;
                entry.3 = entry.3.min(index);
            }
            None => self.answers.push((answer.to_owned(), 1, weight, index)),
        }
    }

    /// By weight, then by first appearance in sample order: ties are broken the
    /// same way however the samples happened to arrive.
    fn ranked(&self) -> Vec<(String, usize, f64)> {
        let mut ranked = self.answers.clone();
        ranked.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.3.cmp(&b.3)));
        ranked.into_iter().map(|(answer, votes, weight, _)| (answer, votes, weight)).collect()
    }

    /// Votes of the leader, the runner-up, and all the others, and whether the
    /// leader appeared before the runner-up (and so wins a tie).
    fn top_votes(&self) -> (usize, usize, usize, bool) {
        let mut ranked = self.answers.clone();
        ranked.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.3.cmp(&b.3)));
        let votes = |i: usize| ranked.get(i).map_or(0, |r| r.1);
        let all: usize = ranked.iter().map(|r| r.1).sum();
        let first = |i: usize| ranked.get(i).map_or(usize::MAX, |r| r.3);
        (votes(0), votes(1), all - votes(0) - votes(1), first(0) < first(1))
    }
}

fn weight(options: &VoteOptions, index: usize) -> f64 {
    options.weights.get(index).copied().unwrap_or(1.0)
}

/// Whether the vote is settled with `remaining` samples still to come.
fn decided(options: &VoteOptions, tally: &Tally, remaining: &[usize]) -> bool {
    let ranked = tally.ranked();
    let (leader_votes, leader_weight) = ranked.first().map_or((0, 0.0), |(_, v, w)| (*v, *w));
    let (second_votes, second_weight) = ranked.get(1).map_or((0, 0.0), |(_, v, w)| (*v, *w));
    let remaining_weight: f64 = remaining.iter().map(|i| weight(options, *i)).sum();
    match options.rule {
        Rule::AtLeast(k) => {
            let reached = leader_votes >= k;
            let unreachable = leader_votes + remaining.len() < k;
            reached || unreachable
        }
        Rule::Majority => {
            // Settled either way whatever the rest say (a failed sample only
            // raises the leader's share).
            let total = tally.answered_weight + remaining_weight;
            let majority_certain = leader_weight > total / 2.0;
            let majority_impossible = leader_weight + remaining_weight <= total / 2.0;
            let (_, _, others, wins_ties) = tally.top_votes();
            let votes = Votes { leader: leader_votes, second: second_votes, others, wins_ties };
            majority_certain
                || majority_impossible
                || (leader_votes > 0 && confident(options.early_stop, votes, remaining.len()))
        }
        Rule::Plurality => {
            let cannot_be_overtaken = leader_weight - second_weight > remaining_weight;
            let (_, _, others, wins_ties) = tally.top_votes();
            let votes = Votes { leader: leader_votes, second: second_votes, others, wins_ties };
            cannot_be_overtaken
                || (leader_votes > 0 && confident(options.early_stop, votes, remaining.len()))
        }
    }
}

fn result(
    options: &VoteOptions,
    tally: &Tally,
    samples: Vec<Sample>,
    calls: usize,
    stopped_early: bool,
) -> VoteResult {
    let ranked = tally.ranked();
    let top_weight = ranked.first().map_or(0.0, |(_, _, w)| *w);
    let tied: Vec<String> = ranked
        .iter()
        .take_while(|(_, _, w)| (*w - top_weight).abs() < 1e-9)
        .map(|(a, _, _)| a.clone())
        .collect();
    let leader = ranked.first();
    let consensus = match options.rule {
        Rule::Majority => leader.is_some_and(|_| top_weight > tally.answered_weight / 2.0),
        Rule::Plurality => leader.is_some(),
        Rule::AtLeast(k) => leader.is_some_and(|(_, votes, _)| *votes >= k),
    };
    let plurality = leader.map(|(answer, _, _)| answer.clone());
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
        distribution: ranked
            .into_iter()
            .map(|(answer, votes, weight)| Count { answer, votes, weight })
            .collect(),
        tie: if tied.len() > 1 { tied } else { Vec::new() },
        samples,
        calls,
        stopped_early,
    }
}

/// The counts a confidence rule looks at.
#[derive(Clone, Copy)]
struct Votes {
    leader: usize,
    second: usize,
    others: usize,
    wins_ties: bool,
}

/// Whether a confidence rule says the vote is decided.
fn confident(rule: Option<EarlyStop>, v: Votes, remaining: usize) -> bool {
    match rule {
        None | Some(EarlyStop::Certain) => false,
        Some(EarlyStop::Beta(confidence)) => {
            beta_above_half(v.leader as u64 + 1, v.second as u64 + 1) >= confidence
        }
        Some(EarlyStop::Predictive(confidence)) => {
            leader_holds(v.leader, v.second, v.others, remaining, v.wins_ties) >= confidence
        }
    }
}

/// How many more samples could decide the vote if they all went to the leader.
fn needed(options: &VoteOptions, tally: &Tally, remaining: usize) -> usize {
    if remaining == 0 {
        return 0;
    }
    let (leader, second, others, wins_ties) = tally.top_votes();
    let by_rule = match options.rule {
        Rule::AtLeast(k) => k.saturating_sub(leader).max(1),
        // Weighted votes: one at a time is the only safe bound.
        Rule::Majority | Rule::Plurality if !options.weights.is_empty() => 1,
        // leader + k > (cast + remaining) / 2
        Rule::Majority => ((leader + second + others + remaining) / 2 + 1).saturating_sub(leader),
        // leader + k - second > remaining - k
        Rule::Plurality => (remaining + second).saturating_sub(leader) / 2 + 1,
    };
    // The leader wins ties if it appeared first, or if it has no runner-up yet.
    let wins_ties = wins_ties || second == 0;
    let by_confidence = (1..=remaining).find(|k| {
        confident(
            options.early_stop,
            Votes { leader: leader + k, second, others, wins_ties },
            remaining - k,
        )
    });
    by_confidence.map_or(by_rule, |k| k.min(by_rule)).clamp(1, remaining)
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
                    let truncated = response.finish_reason.as_deref() == Some("length");
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

/// Universal self-consistency: which of N free-text answers the judge found most consistent.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Consistent {
    /// Index into `samples` of the chosen answer.
    pub chosen: Option<usize>,
    pub text: Option<String>,
    pub samples: Vec<Sample>,
    pub judge: Option<String>,
    pub error: Option<Failure>,
}

/// Samples `n` answers, then asks a judge for the most consistent one.
pub async fn most_consistent(
    executor: &Executor,
    request: &Request,
    n: usize,
    temperature: f32,
) -> Consistent {
    let tasks =
        (0..n).map(|i| Task::with_id(i.to_string(), sample_request(request, i, temperature)));
    let report = executor.run(tasks).await;
    let samples: Vec<Sample> = report
        .results
        .iter()
        .map(|r| Sample {
            index: r.index,
            text: r.outcome.text().map(str::to_owned),
            answer: None,
            truncated: r
                .outcome
                .success()
                .is_some_and(|s| s.response.finish_reason.as_deref() == Some("length")),
            error: r.outcome.failure(),
        })
        .collect();
    let answered: Vec<&Sample> = samples.iter().filter(|s| s.text.is_some()).collect();
    if answered.is_empty() {
        return Consistent {
            chosen: None,
            text: None,
            samples,
            judge: None,
            error: Some(Failure::Pattern("no sample succeeded".into())),
        };
    }
    let mut prompt = format!(
        "I generated {} responses to the question below. Evaluate them and select the most consistent one: the \
         response whose content agrees most with the others.\n\nQuestion: {}\n\n",
        answered.len(),
        request.prompt()
    );
    for (number, sample) in answered.iter().enumerate() {
        prompt.push_str(&format!(
            "Response {}:\n{}\n\n",
            number + 1,
            sample.text.as_deref().unwrap_or("")
        ));
    }
    prompt.push_str(
        "Finish with: \"The most consistent response is Response X\", X being its number.",
    );
    let judged =
        executor.run([Request { model: request.model.clone(), ..Request::user(prompt) }]).await;
    let judge = judged.results[0].outcome.text().map(str::to_owned);
    let pick = judge.as_deref().and_then(|text| {
        let number = regex::Regex::new(r"(?i)response\s*#?\s*(\d+)").expect("valid");
        let found = number.captures_iter(text).last()?;
        let k: usize = found[1].parse().ok()?;
        answered.get(k.checked_sub(1)?).map(|s| s.index)
    });
    let error = match (&judge, pick) {
        (None, _) => judged.results[0].outcome.failure(),
        (Some(_), None) => Some(Failure::Pattern("the judge named no response".into())),
        _ => None,
    };
    let text =
        pick.and_then(|i| samples.iter().find(|s| s.index == i)).and_then(|s| s.text.clone());
    Consistent { chosen: pick, text, samples, judge, error }
}

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

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Distinct {
    pub options: Vec<String>,
    /// Samples dropped as near-duplicates of a kept option.
    pub duplicates: Vec<String>,
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
    fn beta_rule_matches_closed_forms() {
        // Beta(2, 1): P(X > 1/2) = 1 - 0.25.
        assert!((beta_above_half(2, 1) - 0.75).abs() < 1e-12);
        assert!((beta_above_half(1, 1) - 0.5).abs() < 1e-12);
        // Beta(5, 1): 1 - 0.5^5.
        assert!((beta_above_half(5, 1) - (1.0 - 0.5f64.powi(5))).abs() < 1e-12);
        assert!(beta_above_half(7, 2) > 0.95 && beta_above_half(4, 3) < 0.8);
    }

    #[test]
    fn predictive_rule_is_exact_on_small_cases() {
        // One sample left, leader 2, runner-up 1: only a runner-up vote (ties count as not holding)
        // breaks the lead. Posterior predictive P(runner-up) = (1 + 1) / (2 + 1 + 1 + 1 + 1 + 0) = 2/6.
        assert!((leader_holds(2, 1, 0, 1, false) - 4.0 / 6.0).abs() < 1e-12);
        // Winning ties, the leader only loses if... it cannot: 2 + 0 vs 1 + 1 is a tie it keeps.
        assert!(leader_holds(2, 1, 0, 1, true) > 1.0 - 1e-12);
        assert!(leader_holds(3, 0, 0, 2, false) > 1.0 - 1e-12, "cannot be overtaken");
        assert!(leader_holds(6, 2, 0, 7, false) > 0.9 && leader_holds(3, 2, 1, 9, false) < 0.8);
        // Ahead and behind-or-level are all the outcomes: swapping the roles sums to one.
        let (ahead, swapped) = (leader_holds(4, 2, 1, 6, false), leader_holds(2, 4, 1, 6, true));
        assert!((ahead + swapped - 1.0).abs() < 1e-9, "{ahead} + {swapped}");
    }

    #[test]
    fn similarity_of_near_duplicates() {
        assert_eq!(similarity("Cats rule the world!", "cats rule the world"), 1.0);
        assert!(similarity("A new dawn for solar power", "Solar power: a new dawn") > 0.8);
        assert!(similarity("Solar power grows", "Wind farms expand offshore") < 0.2);
    }
}
