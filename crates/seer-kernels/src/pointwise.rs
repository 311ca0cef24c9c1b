//! Element-wise activations, vectorized, for the places where candle's three-op versions
//! (each a pass over memory and a fresh buffer) showed up in profiles.

use crate::{isa, Isa};

/// `out = x · sigmoid(1.702 · x)` (CLIP's "quick GELU"), element by element.
pub fn quick_gelu(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "quick_gelu: input and output differ in length");
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: AVX-512 is available (`isa()` checked it).
        unsafe { quick_gelu512(x, out) };
        return;
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v / (1.0 + (-1.702 * v).exp());
    }
}

/// `out = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, the tanh form of GELU
/// (`gelu_pytorch_tanh`), element by element.
pub fn gelu_tanh(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "gelu_tanh: input and output differ in length");
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: AVX-512 is available (`isa()` checked it).
        unsafe { gelu_tanh512(x, out) };
        return;
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = 0.5 * v * (1.0 + (GELU_K * (v + 0.044715 * v * v * v)).tanh());
    }
}

/// √(2/π).
const GELU_K: f32 = 0.797_884_6;

/// tanh(y) = 1 − 2 / (e^{2y} + 1): exact limits at both ends (e^{2y} → ∞ gives 1, → 0
/// gives −1).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn gelu_tanh512(x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let (half, one, two) = (_mm512_set1_ps(0.5), _mm512_set1_ps(1.0), _mm512_set1_ps(2.0));
    let (k, c) = (_mm512_set1_ps(GELU_K), _mm512_set1_ps(0.044715));
    for j in (0..n).step_by(16) {
        let m: __mmask16 = if n - j >= 16 { 0xffff } else { (1u16 << (n - j)) - 1 };
        let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(j));
        let inner = _mm512_mul_ps(k, _mm512_fmadd_ps(_mm512_mul_ps(c, v), _mm512_mul_ps(v, v), v));
        let e = crate::attention::exp512(_mm512_min_ps(_mm512_mul_ps(two, inner), _mm512_set1_ps(88.0)));
        let tanh = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(e, one)));
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(j), m, _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, tanh)));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn quick_gelu512(x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let one = _mm512_set1_ps(1.0);
    let k = _mm512_set1_ps(-1.702);
    for j in (0..n).step_by(16) {
        let m: __mmask16 = if n - j >= 16 { 0xffff } else { (1u16 << (n - j)) - 1 };
        let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(j));
        // exp of a large positive argument is +inf, and v / inf = 0: the right limit.
        let e = crate::attention::exp512(_mm512_min_ps(_mm512_mul_ps(k, v), _mm512_set1_ps(88.0)));
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(j), m, _mm512_div_ps(v, _mm512_add_ps(one, e)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_tanh_matches_f64() {
        let x: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.037).chain([-200.0, 200.0, 0.0, 1e-3]).collect();
        let mut out = vec![f32::NAN; x.len()];
        gelu_tanh(&x, &mut out);
        for (&v, &o) in x.iter().zip(&out) {
            let v64 = v as f64;
            let want = 0.5 * v64 * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v64 + 0.044715 * v64.powi(3))).tanh());
            assert!((want - o as f64).abs() <= 2e-6 * (1.0 + want.abs()), "gelu_tanh({v}) = {o}, want {want}");
        }
    }

    #[test]
    fn quick_gelu_matches_f64() {
        let x: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.037).chain([-200.0, 200.0, 0.0]).collect();
        let mut out = vec![f32::NAN; x.len()];
        quick_gelu(&x, &mut out);
        for (&v, &o) in x.iter().zip(&out) {
            let want = v as f64 / (1.0 + (-1.702 * v as f64).exp());
            assert!((want - o as f64).abs() <= 1e-6 * (1.0 + want.abs()), "quick_gelu({v}) = {o}, want {want}");
        }
    }
}
