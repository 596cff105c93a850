//! Evaluation for `bench/` and BENCHMARKS.md: early stopping against a fixed
//! n = 15, over VOTES votes, with the mock answering A 0.6 / B 0.3 / C 0.1.
//! Each sample's answer is a function of (question, sample index), so an early
//! vote sees a prefix of the very samples the fixed vote sees: agreement is
//! measured on the same draws.
//!
//! ```text
//! cargo run --release -p fanout --example vote_eval -- [VOTES]
//! ```

use std::hash::{DefaultHasher, Hash, Hasher};

use fanout::pattern::extract::Extractor;
use fanout::pattern::vote::{EarlyStop, VoteOptions, vote};
use fanout::{Executor, MockProvider, Request};

fn skewed(request: &Request) -> String {
    let mut hasher = DefaultHasher::new();
    (request.prompt(), request.sample_index).hash(&mut hasher);
    let unit = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
    let answer = if unit < 0.6 {
        "A"
    } else if unit < 0.9 {
        "B"
    } else {
        "C"
    };
    format!("The answer is ({answer}).")
}

#[tokio::main]
async fn main() {
    let votes: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(300);
    let executor = Executor::builder(MockProvider::new().with_reply(skewed))
        .concurrency(16)
        .probe(false)
        .build();
    let fixed_options = VoteOptions::new(15, Extractor::Choice);
    let mut fixed = Vec::with_capacity(votes);
    for v in 0..votes {
        fixed.push(
            vote(&executor, &Request::user(format!("question {v}")), &fixed_options).await.winner,
        );
    }
    println!(
        "| early stopping | waves | calls (fixed n=15: {}) | fewer calls | agreement with n=15 |",
        votes * 15
    );
    println!("| --- | --- | --- | --- | --- |");
    let rules = [
        ("leader cannot be overtaken", EarlyStop::Certain),
        ("Beta rule 0.90", EarlyStop::Beta(0.90)),
        ("Beta rule 0.95", EarlyStop::Beta(0.95)),
        ("predictive 0.95", EarlyStop::Predictive(0.95)),
        ("predictive 0.97", EarlyStop::Predictive(0.97)),
        ("predictive 0.98", EarlyStop::Predictive(0.98)),
        ("predictive 0.99", EarlyStop::Predictive(0.99)),
    ];
    for (name, rule) in rules {
        for wave in [None, Some(3)] {
            let mut options = VoteOptions::new(15, Extractor::Choice);
            options.early_stop = Some(rule);
            options.wave = wave;
            let (mut calls, mut agree) = (0, 0);
            for (v, fixed_winner) in fixed.iter().enumerate() {
                let result =
                    vote(&executor, &Request::user(format!("question {v}")), &options).await;
                calls += result.calls;
                agree += usize::from(&result.winner == fixed_winner);
            }
            let saved = 100.0 * (1.0 - calls as f64 / (votes * 15) as f64);
            let agreement = 100.0 * agree as f64 / votes as f64;
            let waves = wave.map_or("adaptive".to_string(), |w| format!("fixed {w}"));
            println!("| {name} | {waves} | {calls} | {saved:.1}% | {agreement:.1}% |");
        }
    }
}
