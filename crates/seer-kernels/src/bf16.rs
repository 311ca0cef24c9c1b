//! Dense products in bfloat16 with f32 accumulation, on AVX512-BF16 (`vdpbf16ps`: twice
//! the multiply-adds of f32 FMA per instruction), for vision towers and projectors whose
//! weights ship as f16 or bf16 anyway.
//!
//! The kernel reads panels of 32 output columns whose pairs of consecutive inputs sit in one
//! 32-bit lane, the operand layout `vdpbf16ps` wants. A [`Bf16Matrix`] either holds its
//! weights packed that way (packed once, at load, from f32) or reads them in place as a
//! file stores them, row-major f16 or bf16, and packs each panel as a product needs it:
//! a panel is 32 rows, converted once per product and used by every activation row, so
//! for a vision tower's hundreds of rows the packing costs a few percent (4 % of CLIP-L's
//! encode, weights read from DRAM) and the weights never take the process's own memory.
//! Activations are rounded to bf16 per call. Each task takes one panel and runs it against
//! all activation rows, eight at a time, the panel staying in L2.

use std::ops::Range;

use crate::{executor, OutPtr};

/// Output columns per panel (two registers of 16).
const NR: usize = 32;
/// Activation rows per tile.
const MR: usize = 8;

/// f32 → bf16 with round-to-nearest-even (what `vcvtne2ps2bf16` does); NaN stays NaN.
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A 16-bit float format weights are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    F16,
    Bf16,
}

/// Bytes a [`Bf16Matrix`] reads where they are (a file's memory map).
pub trait HeldBytes: Send + Sync {
    fn bytes(&self) -> &[u8];
    /// Called after each product: a map can hand its pages back to the system here, so
    /// the weights take memory only while they are multiplied.
    fn release(&self) {}
}

impl HeldBytes for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// A `[n, k]` weight (row-major, one row per output) for [`Bf16Matrix::matmul`].
pub struct Bf16Matrix {
    n: usize,
    k: usize,
    weights: Weights,
}

enum Weights {
    /// `[n / NR (rounded up)][k / 2 (rounded up)][NR]`: each u32 holds the bf16 weights of
    /// inputs `2i` (low half) and `2i + 1` (high half) for one output column.
    Packed(Vec<u32>),
    /// `n` rows of `k` 16-bit values, little-endian.
    Rows(Half, Box<dyn HeldBytes>),
}

impl Bf16Matrix {
    /// Whether this CPU runs the kernel (AVX-512 F and BF16).
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Packs `w` (`n` rows of `k`), each value rounded to bf16.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert!(w.len() >= n * k, "bf16 pack: {n}×{k} weights, got {} values", w.len());
        Self::pack_with(n, k, |r, c| w[r * k + c])
    }

    /// Packs the `n × k` matrix whose element `(r, c)` is `at(r, c)`.
    pub fn pack_with(n: usize, k: usize, at: impl Fn(usize, usize) -> f32) -> Self {
        let pairs = k.div_ceil(2);
        let mut panels = vec![0u32; n.div_ceil(NR) * pairs * NR];
        let at = |r: usize, c: usize| if c < k { bf16_bits(at(r, c)) as u32 } else { 0 };
        for r in 0..n {
            let base = r / NR * pairs * NR + r % NR;
            for p in 0..pairs {
                panels[base + p * NR] = at(r, 2 * p) | (at(r, 2 * p + 1) << 16);
            }
        }
        Bf16Matrix { n, k, weights: Weights::Packed(panels) }
    }

    /// The `n × k` matrix stored row-major in `bytes` as `half` values, used in place.
    /// `None` unless `bytes` is exactly that size.
    pub fn in_place(half: Half, n: usize, k: usize, bytes: Box<dyn HeldBytes>) -> Option<Self> {
        let fits = bytes.bytes().len() == n * k * 2 && cfg!(target_endian = "little");
        fits.then(|| Bf16Matrix { n, k, weights: Weights::Rows(half, bytes) })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// `out[i][j] = Σ_c x[i][c] · w[j][c]` for `m` rows of `x` (`m × k`), `out` `m × n`,
    /// spread over the executor's threads. Panics unless [`Bf16Matrix::available`].
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_on(x, m, out, true)
    }

    /// [`Bf16Matrix::matmul`], on the calling thread alone unless `parallel`.
    pub fn matmul_on(&self, x: &[f32], m: usize, out: &mut [f32], parallel: bool) {
        assert!(Self::available(), "bf16 matmul: this CPU lacks AVX512-BF16");
        let (n, k, pairs) = (self.n, self.k, self.k.div_ceil(2));
        assert!(x.len() >= m * k && out.len() >= m * n, "bf16 matmul: {m}×{k} in, {m}×{n} out");
        if m == 0 || n == 0 {
            return;
        }
        // Activations as bf16 pairs, padded with zero rows to whole tiles.
        let rows = m.div_ceil(MR) * MR;
        let mut a = vec![0u32; rows * pairs];
        for (i, xr) in x[..m * k].chunks_exact(k.max(1)).enumerate() {
            // SAFETY: AVX512-BF16 was checked above.
            unsafe { x86::to_bf16_pairs(xr, &mut a[i * pairs..(i + 1) * pairs]) };
        }
        let out = OutPtr(out.as_mut_ptr());
        let task = |panels: Range<usize>| {
            let base = &out; // the whole OutPtr, not its raw field, is shared with the tasks
            let (mut scratch, mut staged) = (Vec::new(), Vec::new());
            for p in panels {
                let cols = (n - p * NR).min(NR);
                let b: &[u32] = match &self.weights {
                    Weights::Packed(all) => &all[p * pairs * NR..][..pairs * NR],
                    Weights::Rows(half, bytes) => {
                        scratch.resize(pairs * NR, 0);
                        let rows = &bytes.bytes()[p * NR * k * 2..(p * NR + cols) * k * 2];
                        // SAFETY: AVX512-BF16 was checked; `rows` holds `cols` rows of `k`.
                        unsafe { x86::pack_panel(*half, rows, k, &mut scratch, &mut staged) };
                        &scratch
                    }
                };
                for i0 in (0..m).step_by(MR) {
                    // SAFETY: AVX512-BF16 was checked; tile (i0, p) is written by this task only.
                    unsafe { x86::tile(&a[i0 * pairs..(i0 + MR) * pairs], pairs, b, base.0.add(i0 * n + p * NR), n, (m - i0).min(MR), cols) };
                }
            }
        };
        let tasks = n.div_ceil(NR);
        let exec = executor();
        if !parallel || exec.threads <= 1 || tasks < 2 || m * n * k < 1 << 16 {
            task(0..tasks);
        } else {
            (exec.run)(tasks, &task);
        }
        if let Weights::Rows(_, bytes) = &self.weights {
            bytes.release();
        }
    }
}

/// Attention among `t` tokens with every token seeing every other (vision towers), its two
/// products in bf16: `q`, `k`, `v` and `out` are `[t, heads, d]`, as the projections
/// produce them. One task per head; the scores are a `t × t` f32 matrix per task, with the
/// softmax in f32; the shape is `[t, heads, d]`. Panics unless [`Bf16Matrix::available`].
pub fn attention_bf16(q: &[f32], k: &[f32], v: &[f32], [t, heads, d]: [usize; 3], scale: f32, out: &mut [f32]) {
    cross_attention_bf16(q, k, v, [t, t, heads, d], scale, out)
}

/// [`attention_bf16`] with `tq` query rows over `tk` other keys and values: `q` and `out`
/// are `[tq, heads, d]`, `k` and `v` `[tk, heads, d]`.
pub fn cross_attention_bf16(q: &[f32], k: &[f32], v: &[f32], [tq, tk, heads, d]: [usize; 4], scale: f32, out: &mut [f32]) {
    assert!(Bf16Matrix::available(), "bf16 attention: this CPU lacks AVX512-BF16");
    let (qlen, klen) = (tq * heads * d, tk * heads * d);
    assert!(q.len() >= qlen && k.len() >= klen && v.len() >= klen && out.len() >= qlen, "bf16 attention: [{tq}/{tk}, {heads}, {d}] inputs");
    let at = |x: &[f32], i: usize, h: usize, c: usize| x[(i * heads + h) * d + c];
    let out = OutPtr(out.as_mut_ptr());
    let task = |hs: Range<usize>| {
        let base = &out; // the whole OutPtr, not its raw field, is shared with the tasks
        let mut qh = vec![0f32; tq * d];
        let mut scores = vec![0f32; tq * tk];
        let mut y = vec![0f32; tq * d];
        for h in hs {
            for (i, row) in qh.chunks_exact_mut(d).enumerate() {
                row.iter_mut().enumerate().for_each(|(c, o)| *o = at(q, i, h, c) * scale);
            }
            Bf16Matrix::pack_with(tk, d, |j, c| at(k, j, h, c)).matmul_on(&qh, tq, &mut scores, false);
            scores.chunks_exact_mut(tk).for_each(crate::attention::softmax_in_place);
            Bf16Matrix::pack_with(d, tk, |c, j| at(v, j, h, c)).matmul_on(&scores, tq, &mut y, false);
            for (i, row) in y.chunks_exact(d).enumerate() {
                // SAFETY: head h's columns of every row are written by this task only.
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), base.0.add((i * heads + h) * d), d) };
            }
        }
    };
    let exec = executor();
    if exec.threads <= 1 || heads < 2 {
        task(0..heads);
    } else {
        (exec.run)(heads, &task);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{bf16_bits, Half, MR, NR};

    /// `x` rounded to bf16 (round to nearest even, as [`bf16_bits`]) into `out`, two per
    /// u32, the first in the low half; an odd tail's high half is 0.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn to_bf16_pairs(x: &[f32], out: &mut [u32]) {
        let mut j = 0;
        while j + 32 <= x.len() {
            let lo = _mm512_loadu_ps(x.as_ptr().add(j));
            let hi = _mm512_loadu_ps(x.as_ptr().add(j + 16));
            let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.as_mut_ptr().add(j / 2) as *mut __m512i, packed);
            j += 32;
        }
        for (p, pair) in x[j..].chunks(2).enumerate() {
            let high = pair.get(1).map_or(0, |&v| bf16_bits(v) as u32);
            out[j / 2 + p] = bf16_bits(pair[0]) as u32 | (high << 16);
        }
    }

    /// `rows` (up to `NR` rows of `k` 16-bit values) packed into `panel` (`k / 2` rounded
    /// up, times `NR`), the layout of [`super::Bf16Matrix`]'s packed weights, f16 rounded to
    /// bf16 as [`bf16_bits`] does. Columns past the last row are zero. Blocks of 16 rows ×
    /// 16 pairs are loaded a row each and transposed in registers.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pack_panel(half: Half, rows: &[u8], k: usize, panel: &mut [u32], staged: &mut Vec<u8>) {
        // The rows are one contiguous run: read it once in order (a stream the hardware
        // prefetchers follow) into bf16, then transpose from cache. Transposing straight
        // from the map reads 16 rows side by side, strided streams they do not follow.
        let rows = match half {
            Half::Bf16 => rows,
            Half::F16 => {
                staged.resize(rows.len(), 0);
                f16_to_bf16(rows, staged);
                &staged[..]
            }
        };
        let pairs = k.div_ceil(2);
        let cols = rows.len() / (2 * k.max(1));
        for c0 in (0..NR).step_by(16) {
            for q in (0..pairs).step_by(16) {
                let mut r = [_mm512_setzero_si512(); 16];
                for (i, reg) in r.iter_mut().enumerate().filter(|(i, _)| c0 + i < cols) {
                    *reg = pairs16(&rows[(c0 + i) * 2 * k..(c0 + i + 1) * 2 * k], q);
                }
                let t = crate::gemm512::transpose16(r);
                for (i, v) in t.iter().enumerate().take(pairs - q) {
                    _mm512_storeu_si512(panel.as_mut_ptr().add((q + i) * NR + c0) as *mut __m512i, *v);
                }
            }
        }
    }

    /// `src` (f16 values) as bf16 in `dst`, rounded as [`bf16_bits`] does.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn f16_to_bf16(src: &[u8], dst: &mut [u8]) {
        let whole = src.len() / 64 * 64;
        for i in (0..whole).step_by(64) {
            let p = src.as_ptr().add(i);
            let lo = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
            let hi = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32) as *const __m256i));
            let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.as_mut_ptr().add(i) as *mut __m512i, v);
        }
        for i in (whole..src.len()).step_by(2) {
            let x = crate::f16_to_f32(u16::from_le_bytes([src[i], src[i + 1]]));
            dst[i..i + 2].copy_from_slice(&bf16_bits(x).to_le_bytes());
        }
    }

    /// Pairs `q..q + 16` of `row` (bf16 values, two per pair), zero past
    /// the row's end.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn pairs16(row: &[u8], q: usize) -> __m512i {
        let (mut buf, start) = ([0u8; 64], 4 * q);
        let have = row.len().saturating_sub(start).min(64);
        let src = if have == 64 {
            row.as_ptr().add(start)
        } else {
            buf[..have].copy_from_slice(&row[start..start + have]);
            buf.as_ptr()
        };
        _mm512_loadu_si512(src as *const __m512i)
    }

    /// One `MR × NR` tile over all `pairs`: `a` holds `MR` rows of `pairs` u32, `b` the
    /// panel. Writes `rows × cols` of it at `c` (row stride `ldc`).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile(a: &[u32], pairs: usize, b: &[u32], c: *mut f32, ldc: usize, rows: usize, cols: usize) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for p in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR) as *const __m512i));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR + 16) as *const __m512i));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r * pairs + p) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
            }
        }
        let m0: __mmask16 = if cols >= 16 { 0xffff } else { (1u16 << cols) - 1 };
        let m1: __mmask16 = if cols >= 32 { 0xffff } else if cols > 16 { (1u16 << (cols - 16)) - 1 } else { 0 };
        for (r, acc) in acc.iter().enumerate().take(rows) {
            _mm512_mask_storeu_ps(c.add(r * ldc), m0, acc[0]);
            _mm512_mask_storeu_ps(c.add(r * ldc + 16), m1, acc[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(bf16_to_f32(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_to_f32(bf16_bits(-2.5)), -2.5);
    }

    /// `n` values in [-1, 1) from a fixed linear congruential sequence.
    fn uniform(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn attention_matches_f64_within_bf16_rounding() {
        if !Bf16Matrix::available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        // Square (self-attention) and rectangular (fewer or more queries than keys), ragged.
        for (tq, tk, heads, d) in [(37, 37, 3, 24), (5, 41, 3, 24), (19, 7, 2, 40)] {
            let mut seed = 11u64 + tq as u64;
            let mut rnd = |n: usize| uniform(n, &mut seed);
            let (q, k, v) = (rnd(tq * heads * d), rnd(tk * heads * d), rnd(tk * heads * d));
            let scale = 1.0 / (d as f32).sqrt();
            let mut out = vec![f32::NAN; tq * heads * d];
            if tq == tk {
                attention_bf16(&q, &k, &v, [tq, heads, d], scale, &mut out);
            } else {
                cross_attention_bf16(&q, &k, &v, [tq, tk, heads, d], scale, &mut out);
            }
            let at = |x: &[f32], i: usize, h: usize, c: usize| x[(i * heads + h) * d + c] as f64;
            for h in 0..heads {
                for i in 0..tq {
                    let s: Vec<f64> = (0..tk).map(|j| (0..d).map(|c| at(&q, i, h, c) * at(&k, j, h, c)).sum::<f64>() * scale as f64).collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..d {
                        let want = (0..tk).map(|j| e[j] * at(&v, j, h, c)).sum::<f64>() / sum;
                        let got = out[(i * heads + h) * d + c] as f64;
                        // Inputs and probabilities rounded to 8 significant bits.
                        assert!((want - got).abs() < 2e-2, "[{tq}/{tk}] ({i},{h},{c}): {got} vs {want}");
                    }
                }
            }
        }
    }

    /// The vector conversion rounds exactly as the scalar one, ties and odd tails included.
    #[test]
    fn vector_rounding_equals_scalar() {
        if !Bf16Matrix::available() {
            return;
        }
        let x: Vec<f32> = (0..101).map(|i| 1.0 + (i as f32) / 512.0 - (i % 7) as f32 * 3.3).collect();
        let mut got = vec![0u32; x.len().div_ceil(2)];
        unsafe { x86::to_bf16_pairs(&x, &mut got) };
        for (p, &g) in got.iter().enumerate() {
            let lo = bf16_bits(x[2 * p]) as u32;
            let hi = x.get(2 * p + 1).map_or(0, |&v| bf16_bits(v) as u32);
            assert_eq!(g, lo | (hi << 16), "pair {p}");
        }
    }

    /// Weights read in place (f16 or bf16 rows) give exactly the products of the same
    /// values packed at load, on ragged shapes: panels cut short, odd widths, tails of
    /// fewer than 16 pairs.
    #[test]
    fn in_place_rows_equal_packed() {
        if !Bf16Matrix::available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        let mut seed = 5u64;
        let mut rnd = |n: usize| uniform(n, &mut seed);
        for (m, n, k) in [(1, 1, 1), (3, 5, 7), (9, 33, 65), (17, 70, 128), (8, 64, 31), (40, 96, 1280)] {
            let x = rnd(m * k);
            // Some tiny values: f16 subnormals widen exactly.
            let w: Vec<f32> = rnd(n * k).iter().enumerate().map(|(i, v)| if i % 11 == 0 { v * 1e-6 } else { *v }).collect();
            let f16s: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
            let bf16s: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let cases: [(Half, Vec<u8>, Vec<f32>); 2] = [
                (Half::F16, f16s.iter().flat_map(|v| v.to_le_bytes()).collect(), f16s.iter().map(|v| v.to_f32()).collect()),
                (Half::Bf16, bf16s.iter().flat_map(|v| v.to_le_bytes()).collect(), bf16s.iter().map(|v| v.to_f32()).collect()),
            ];
            for (half, bytes, values) in cases {
                let mut want = vec![f32::NAN; m * n];
                Bf16Matrix::pack(&values, n, k).matmul(&x, m, &mut want);
                let held = Bf16Matrix::in_place(half, n, k, Box::new(bytes)).expect("sizes match");
                let mut got = vec![f32::NAN; m * n];
                held.matmul(&x, m, &mut got);
                assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{half:?} {m}×{n}×{k}");
            }
        }
        assert!(Bf16Matrix::in_place(Half::F16, 2, 3, Box::new(vec![0u8; 10])).is_none(), "a short buffer is refused");
    }

    /// The kernel against an f64 product of the same bf16-rounded values, on ragged shapes.
    #[test]
    fn matches_reference_on_ragged_shapes() {
        if !Bf16Matrix::available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        let mut seed = 7u64;
        let mut rnd = |n: usize| uniform(n, &mut seed);
        for (m, n, k) in [(1, 1, 1), (3, 5, 7), (8, 32, 64), (9, 33, 65), (17, 70, 128), (577, 64, 96), (5, 1024, 1025)] {
            let x = rnd(m * k);
            let w = rnd(n * k);
            let packed = Bf16Matrix::pack(&w, n, k);
            let mut out = vec![f32::NAN; m * n];
            packed.matmul(&x, m, &mut out);
            let r = |v: f32| bf16_to_f32(bf16_bits(v)) as f64;
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|c| r(x[i * k + c]) * r(w[j * k + c])).sum();
                    let got = out[i * n + j] as f64;
                    assert!((want - got).abs() < 1e-4 * (k as f64).sqrt(), "{m}×{n}×{k} at ({i},{j}): {got} vs {want}");
                }
            }
        }
    }
}
