//! What the mock says, and how many tokens that is.

use std::hash::{DefaultHasher, Hash, Hasher};

use crate::config::Answers;

/// About four characters a token, as the client estimates too.
pub(crate) fn tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

/// Prompt tokens: each message's text plus four tokens of framing.
pub(crate) fn prompt_tokens(messages: &[String]) -> u64 {
    messages.iter().map(|m| tokens(m) + 4).sum()
}

/// The answer for one choice. `draw` is a uniform number in `[0, 1)` used when
/// the request gives no seed.
pub(crate) fn answer(
    answers: &Answers,
    server_seed: u64,
    prompt: &str,
    request_seed: Option<u64>,
    choice: u32,
    draw: f64,
) -> String {
    match answers {
        Answers::Derived => {
            let excerpt: String = prompt.chars().take(80).collect();
            format!("Mock answer ({:08x}) to: {excerpt}", fingerprint(&(prompt, 0u64, 0u32)) as u32)
        }
        Answers::Weighted(options) => {
            let unit = match request_seed {
                Some(seed) => {
                    let hash = fingerprint(&(server_seed, prompt, seed, choice));
                    (hash >> 11) as f64 / (1u64 << 53) as f64
                }
                None => draw,
            };
            pick(options, unit)
        }
    }
}

fn fingerprint(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

fn pick(options: &[(String, f64)], unit: f64) -> String {
    let total: f64 = options.iter().map(|(_, w)| w.max(0.0)).sum();
    let mut target = unit * total;
    for (text, weight) in options {
        if target < weight.max(0.0) {
            return text.clone();
        }
        target -= weight.max(0.0);
    }
    options.last().map(|(text, _)| text.clone()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_answers_are_deterministic() {
        let a = answer(&Answers::Derived, 1, "capital of France?", None, 0, 0.3);
        let b = answer(&Answers::Derived, 2, "capital of France?", Some(9), 1, 0.9);
        assert_eq!(a, b);
        assert!(a.ends_with("to: capital of France?"), "{a}");
    }

    #[test]
    fn weighted_answers_follow_the_weights_and_request_seeds() {
        let options =
            Answers::Weighted(vec![("A".into(), 0.6), ("B".into(), 0.3), ("C".into(), 0.1)]);
        let draws: Vec<_> =
            (0..10_000).map(|s| answer(&options, 7, "q", Some(s), 0, 0.0)).collect();
        let share = |x: &str| draws.iter().filter(|d| *d == x).count() as f64 / 10_000.0;
        assert!((share("A") - 0.6).abs() < 0.02, "{}", share("A"));
        assert!((share("C") - 0.1).abs() < 0.02, "{}", share("C"));
        assert_eq!(
            answer(&options, 7, "q", Some(3), 0, 0.0),
            answer(&options, 7, "q", Some(3), 0, 0.99)
        );
        assert_eq!(answer(&options, 7, "q", None, 0, 0.95), "C");
    }
}
