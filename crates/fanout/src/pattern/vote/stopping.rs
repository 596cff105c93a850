//! When a vote may stop early: the leader cannot be overtaken (or cannot miss
//! the majority), or a confidence rule says it is ahead — Adaptive-Consistency's
//! Beta rule (arXiv:2305.11860) or the Dirichlet-multinomial posterior
//! predictive — and how many samples to launch next.

use super::tally::{Tally, TopVotes};
use super::{EarlyStop, Rule, VoteOptions, weight};

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

/// Whether the vote is settled with `remaining` samples still to come.
pub(super) fn decided(options: &VoteOptions, tally: &Tally, remaining: &[usize]) -> bool {
    let ranked = tally.ranked();
    let leader_weight = ranked.first().map_or(0.0, |c| c.weight);
    let second_weight = ranked.get(1).map_or(0.0, |c| c.weight);
    let remaining_weight: f64 = remaining.iter().map(|i| weight(options, *i)).sum();
    let top = tally.top_votes();
    let confidently_ahead = top.leader > 0
        && confident(options.early_stop, contest(options.rule, top), remaining.len());
    match options.rule {
        Rule::AtLeast(k) => {
            let reached = top.leader >= k;
            let unreachable = top.leader + remaining.len() < k;
            reached || unreachable
        }
        Rule::Majority => {
            // Settled either way whatever the rest say (a failed sample only
            // raises the leader's share).
            let total = tally.answered_weight + remaining_weight;
            let majority_certain = leader_weight > total / 2.0;
            let majority_impossible = leader_weight + remaining_weight <= total / 2.0;
            majority_certain || majority_impossible || confidently_ahead
        }
        Rule::Plurality => {
            let cannot_be_overtaken = leader_weight - second_weight > remaining_weight;
            cannot_be_overtaken || confidently_ahead
        }
    }
}

/// What a confidence rule weighs the leader against: the runner-up for a
/// plurality, every other vote together for a majority (a leader confidently
/// ahead of the runner-up may still fall short of half).
fn contest(rule: Rule, top: TopVotes) -> TopVotes {
    match rule {
        Rule::Majority => TopVotes { second: top.second + top.others, others: 0, ..top },
        Rule::Plurality | Rule::AtLeast(_) => top,
    }
}

/// Whether a confidence rule says the leader is decided.
fn confident(rule: Option<EarlyStop>, top: TopVotes, remaining: usize) -> bool {
    match rule {
        None | Some(EarlyStop::Certain) => false,
        Some(EarlyStop::Beta(confidence)) => {
            beta_above_half(top.leader as u64 + 1, top.second as u64 + 1) >= confidence
        }
        Some(EarlyStop::Predictive(confidence)) => {
            let holds =
                leader_holds(top.leader, top.second, top.others, remaining, top.leader_first);
            holds >= confidence
        }
    }
}

/// How many more samples could decide the vote if they all went to the leader.
pub(super) fn needed(options: &VoteOptions, tally: &Tally, remaining: usize) -> usize {
    if remaining == 0 {
        return 0;
    }
    let top = tally.top_votes();
    let TopVotes { leader, second, others, .. } = top;
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
    let leader_first = top.leader_first || second == 0;
    let by_confidence = (1..=remaining).find(|k| {
        let ahead = TopVotes { leader: leader + k, leader_first, ..top };
        confident(options.early_stop, contest(options.rule, ahead), remaining - k)
    });
    by_confidence.map_or(by_rule, |k| k.min(by_rule)).clamp(1, remaining)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::extract::Extractor;

    /// Under the majority rule a confidence rule weighs the leader against all
    /// other votes: 6 of 12 cast is confidently ahead of a runner-up with 1,
    /// but no majority, so the vote goes on.
    #[test]
    fn majority_confidence_weighs_the_leader_against_every_other_vote() {
        let mut options = VoteOptions::new(20, Extractor::Choice);
        options.early_stop = Some(EarlyStop::Beta(0.95));
        let mut tally = Tally::default();
        let answers = ["a", "a", "a", "a", "a", "a", "b", "c", "d", "e", "f", "g"];
        for (index, answer) in answers.iter().enumerate() {
            tally.add(answer, 1.0, index);
        }
        let remaining: Vec<usize> = (12..20).collect();
        assert!(!decided(&options, &tally, &remaining), "6 of 12 is not yet a majority");
        options.rule = Rule::Plurality;
        assert!(decided(&options, &tally, &remaining), "but it is a confident plurality");
    }

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
}
