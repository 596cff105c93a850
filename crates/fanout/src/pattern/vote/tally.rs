//! The running count of a vote's answers.

use super::Count;

/// One answer's votes so far.
#[derive(Clone, Debug)]
struct Entry {
    answer: String,
    votes: usize,
    weight: f64,
    /// The lowest sample index that gave it: ties go to the first to appear.
    first_index: usize,
}

/// The leader, the runner-up and the rest, in votes.
#[derive(Clone, Copy, Debug)]
pub(super) struct TopVotes {
    pub leader: usize,
    pub second: usize,
    pub others: usize,
    /// The leader appeared before the runner-up, and so wins a tie.
    pub leader_first: bool,
}

#[derive(Debug, Default)]
pub(super) struct Tally {
    answers: Vec<Entry>,
    /// The weight of every sample that voted.
    pub answered_weight: f64,
}

impl Tally {
    pub fn add(&mut self, answer: &str, weight: f64, index: usize) {
        self.answered_weight += weight;
        match self.answers.iter_mut().find(|e| e.answer == answer) {
            Some(entry) => {
                entry.votes += 1;
                entry.weight += weight;
                entry.first_index = entry.first_index.min(index);
            }
            None => self.answers.push(Entry {
                answer: answer.to_owned(),
                votes: 1,
                weight,
                first_index: index,
            }),
        }
    }

    /// By weight, then by first appearance in sample order: ties are broken the
    /// same way however the samples happened to arrive.
    fn sorted(&self) -> Vec<Entry> {
        let mut sorted = self.answers.clone();
        sorted
            .sort_by(|a, b| b.weight.total_cmp(&a.weight).then(a.first_index.cmp(&b.first_index)));
        sorted
    }

    /// Every answer's share, highest first.
    pub fn ranked(&self) -> Vec<Count> {
        self.sorted()
            .into_iter()
            .map(|e| Count { answer: e.answer, votes: e.votes, weight: e.weight })
            .collect()
    }

    pub fn top_votes(&self) -> TopVotes {
        let sorted = self.sorted();
        let votes = |i: usize| sorted.get(i).map_or(0, |e| e.votes);
        let first = |i: usize| sorted.get(i).map_or(usize::MAX, |e| e.first_index);
        let all: usize = sorted.iter().map(|e| e.votes).sum();
        TopVotes {
            leader: votes(0),
            second: votes(1),
            others: all - votes(0) - votes(1),
            leader_first: first(0) < first(1),
        }
    }
}
