//! Picks the next token from the logits: greedy at temperature 0, otherwise top-k, then
//! top-p over the temperature-scaled distribution, from a seeded generator.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no limit.
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / self.params.temperature))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if self.params.top_k > 0 {
            candidates.truncate(self.params.top_k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let keep = nucleus_size(&probs, self.params.top_p);
        let mass: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * mass;
        for (i, p) in probs[..keep].iter().enumerate() {
            if r < *p {
                return candidates[i].0;
            }
            r -= p;
        }
        candidates[keep - 1].0
    }
}

/// The smallest prefix of descending `probs` whose mass reaches `top_p` (at least one).
fn nucleus_size(probs: &[f32], top_p: f32) -> usize {
    if top_p >= 1.0 {
        return probs.len();
    }
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if acc >= top_p {
            return i + 1;
        }
    }
    probs.len()
}

/// Index of the largest logit; the first one on ties, as torch.argmax does.
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

    #[test]
    fn greedy_takes_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(SamplingParams { temperature: 5.0, top_k: 1, ..Default::default() });
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.5, 0.2, 4.0, 1.0]), 2);
        }
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // softmax([10, 9, 0, 0]) puts ~0.73/0.27 on the first two: top_p 0.9 never picks 2 or 3.
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.9, seed: 7, ..Default::default() });
        let picks: Vec<u32> = (0..200).map(|_| s.sample(&[10.0, 9.0, 0.0, 0.0])).collect();
        assert!(picks.iter().all(|&p| p < 2));
        assert!(picks.contains(&0) && picks.contains(&1));
    }

    #[test]
    fn same_seed_same_choices() {
        let params = SamplingParams { temperature: 1.0, seed: 42, ..Default::default() };
        let logits = [1.0, 1.1, 0.9, 1.05];
        let a: Vec<u32> = { let mut s = Sampler::new(params.clone()); (0..50).map(|_| s.sample(&logits)).collect() };
        let b: Vec<u32> = { let mut s = Sampler::new(params); (0..50).map(|_| s.sample(&logits)).collect() };
        assert_eq!(a, b);
    }
}
