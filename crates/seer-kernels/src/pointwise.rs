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
