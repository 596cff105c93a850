//! Choosing the next token from the model's logits: greedy, or temperature
//! with top-k and top-p (nucleus) filtering, from a seeded generator so the
//! same seed and prompt give the same answer.

/// How one request samples. `temperature <= 0` is greedy decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits before the softmax: lower is more deterministic.
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Seeds the random generator: the same seed and prompt give the same answer.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// SmolLM2-Instruct's recommended settings (its model card: temperature 0.2, top-p 0.9).
    fn default() -> Self {
        Self { temperature: 0.2, top_p: 0.9, top_k: 0, seed: 0 }
    }
}

/// Picks one sequence's tokens; its generator advances from token to token.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: fastrand::Rng,
    /// Reused candidate list: (token, weight).
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler whose generator starts from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = fastrand::Rng::with_seed(params.seed);
        Self { params, rng, candidates: Vec::new() }
    }

    /// The next token id, from one position's logits (one per vocabulary entry).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 || self.params.top_k == 1 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.candidates.clear();
        self.candidates.extend(
            logits.iter().enumerate().map(|(id, &l)| (id as u32, ((l - max) * inv_t).exp())),
        );
        let by_weight_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = self.params.top_k;
        if k > 0 && k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, by_weight_desc);
            self.candidates.truncate(k);
        }
        let top_p = self.params.top_p;
        if top_p > 0.0 && top_p < 1.0 {
            // Tokens below (1 - p) / n of the mass cannot be in the nucleus: all of
            // them together weigh less than 1 - p. Dropping them first means only
            // a short list is sorted, and the result is exactly the nucleus.
            let total: f32 = self.candidates.iter().map(|c| c.1).sum();
            let floor = total * (1.0 - top_p) / self.candidates.len() as f32 * 0.999;
            self.candidates.retain(|c| c.1 >= floor);
            self.candidates.sort_unstable_by(by_weight_desc);
            let mut cumulative = 0.0;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                cumulative += c.1;
                if cumulative >= top_p * total {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep);
        }
        let total: f32 = self.candidates.iter().map(|c| c.1).sum();
        let mut target = self.rng.f32() * total;
        for &(id, weight) in &self.candidates {
            if target < weight {
                return id;
            }
            target -= weight;
        }
        // Rounding left some mass unspent: the last candidate that has any
        // (never one at zero weight: a constrained answer's masked tokens).
        self.candidates.iter().rev().find(|c| c.1 > 0.0).map_or_else(|| argmax(logits), |c| c.0)
    }
}

/// The most likely token; the lowest id among equals.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> Sampler {
        Sampler::new(SamplingParams { temperature, top_p, top_k, seed })
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(sampler(0.0, 1.0, 0, 1).sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_different_seeds_differ() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = sampler(1.0, 1.0, 0, seed);
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_and_top_p_keep_only_the_head() {
        // Probabilities ~ 0.5, 0.3, 0.15, 0.05.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()];
        let mut seen = [0usize; 4];
        let mut top_k = sampler(1.0, 1.0, 2, 3);
        for _ in 0..2000 {
            seen[top_k.sample(&logits) as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0 && seen[2] == 0 && seen[3] == 0, "{seen:?}");
        let mut seen = [0usize; 4];
        let mut top_p = sampler(1.0, 0.9, 0, 3);
        for _ in 0..2000 {
            seen[top_p.sample(&logits) as usize] += 1;
        }
        // 0.5 + 0.3 < 0.9 <= 0.95: three tokens in the nucleus.
        assert!(seen[2] > 0 && seen[3] == 0, "{seen:?}");
        // Frequencies follow the renormalized weights (0.5/0.95 ~ 0.53).
        assert!((seen[0] as f64 / 2000.0 - 0.526).abs() < 0.05, "{seen:?}");
    }

    #[test]
    fn low_temperature_sharpens() {
        let logits = [1.0, 0.0];
        let mut cold = sampler(0.05, 1.0, 0, 9);
        assert!((0..500).all(|_| cold.sample(&logits) == 0));
    }
}
