//! Picks the next token from the logits. Penalties first (repetition as in transformers,
//! frequency and presence as in OpenAI's API), then greedy at temperature 0, or top-k,
//! min-p and top-p over the temperature-scaled distribution, from a seeded generator.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no limit.
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 is off.
    pub min_p: f32,
    pub seed: u64,
    /// > 1 discourages every token already in the prompt or the answer; 1 is off.
    pub repetition_penalty: f32,
    /// Subtracted once per earlier occurrence in the answer.
    pub frequency_penalty: f32,
    /// Subtracted once if the token occurred in the answer.
    pub presence_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: 0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens the repetition penalty applies to (prompt and answer).
    seen: HashSet<u32>,
    /// Occurrences in the answer, for the frequency and presence penalties.
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        let seen = if params.repetition_penalty != 1.0 { prompt.iter().copied().collect() } else { HashSet::new() };
        Sampler { params, rng, seen, counts: HashMap::new() }
    }

    /// Records a generated token for the penalties.
    pub fn observe(&mut self, token: u32) {
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
        *self.counts.entry(token).or_default() += 1;
    }

    /// Applies the penalties in place; what remains is the distribution sampled from.
    pub fn penalize(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &n) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
    }

    /// Picks from logits that [`Sampler::penalize`] has already processed.
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
        // Sorted descending, so the tokens min-p keeps are a prefix.
        let above_min = probs.iter().take_while(|&&p| p >= self.params.min_p * probs[0]).count().max(1);
        let keep = nucleus_size(&probs[..above_min], self.params.top_p);
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

/// `log_softmax` of the logits: what OpenAI's `logprobs` report.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
    logits.iter().map(|l| l - log_sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params, &[])
    }

    #[test]
    fn greedy_takes_first_maximum() {
        let mut s = sampler(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = sampler(SamplingParams { temperature: 5.0, top_k: 1, ..Default::default() });
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.5, 0.2, 4.0, 1.0]), 2);
        }
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // softmax([10, 9, 0, 0]) puts ~0.73/0.27 on the first two: top_p 0.9 never picks 2 or 3.
        let mut s = sampler(SamplingParams { temperature: 1.0, top_p: 0.9, seed: 7, ..Default::default() });
        let picks: Vec<u32> = (0..200).map(|_| s.sample(&[10.0, 9.0, 0.0, 0.0])).collect();
        assert!(picks.iter().all(|&p| p < 2));
        assert!(picks.contains(&0) && picks.contains(&1));
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // p ≈ [0.66, 0.24, 0.09, 0.01]: min_p 0.2 keeps tokens with p ≥ 0.13, i.e. 0 and 1.
        let mut s = sampler(SamplingParams { temperature: 1.0, min_p: 0.2, seed: 3, ..Default::default() });
        let picks: Vec<u32> = (0..300).map(|_| s.sample(&[3.0, 2.0, 1.0, -1.0])).collect();
        assert!(picks.iter().all(|&p| p < 2), "{picks:?}");
        assert!(picks.contains(&1));
    }

    #[test]
    fn same_seed_same_choices() {
        let params = SamplingParams { temperature: 1.0, seed: 42, ..Default::default() };
        let logits = [1.0, 1.1, 0.9, 1.05];
        let a: Vec<u32> = { let mut s = sampler(params.clone()); (0..50).map(|_| s.sample(&logits)).collect() };
        let b: Vec<u32> = { let mut s = sampler(params); (0..50).map(|_| s.sample(&logits)).collect() };
        assert_eq!(a, b);
    }

    #[test]
    fn penalties_follow_transformers_and_openai() {
        let params = SamplingParams { repetition_penalty: 2.0, frequency_penalty: 0.5, presence_penalty: 0.25, ..Default::default() };
        let mut s = Sampler::new(params, &[0, 1]);
        s.observe(2);
        s.observe(2);
        let mut logits = [4.0, -1.0, 3.0, 1.0];
        s.penalize(&mut logits);
        // 0: positive, divided; 1: negative, multiplied; 2: repetition, then 2 × 0.5 + 0.25.
        assert_eq!(logits, [2.0, -2.0, 1.5 - 1.25, 1.0]);
    }

    #[test]
    fn log_softmax_normalizes() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(lp[2] > lp[1] && lp[1] > lp[0]);
    }
}
