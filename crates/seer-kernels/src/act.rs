//! Activation rows quantized to 8 bits, the way ggml quantizes them on x86, laid out for
//! the kernel that will read them.
//!
//! Values match ggml exactly; only their order in memory and the extra per-block integers
//! (`aux`, `bs`) depend on the kernel:
//! - Q8_0 (for Q4_0/Q8_0 weights), ggml's AVX2 `quantize_row_q8_0`: `d = amax / 127` stored
//!   as f16, values `round_half_even(x · 127 / amax)`.
//! - Q8_K (for the k-quants), ggml's `quantize_row_q8_K_ref`: the value of largest magnitude
//!   `max` maps to −127 (`iscale = −127 / max`), values `min(127, round_half_even(x · iscale))`,
//!   `d = 1 / iscale` in f32.

use crate::{Executor, QuantType};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Q8_0 blocks. `group` > 1: within each run of `group` blocks, the first halves of
    /// the blocks come first, then the second halves (`[b0[0..16], b1[0..16], …, b0[16..32],
    /// b1[16..32], …]`; blocks after the last whole run stay natural), which matches the low
    /// and high nibbles of Q4_0 blocks loaded side by side. `aux` holds `corr · Σq` per block
    /// (the correction for unsigned weight codes), at `aux_stride` i32 per block with zeros
    /// between, so that a run of blocks is a ready i32 vector. `dx` repeats each block's
    /// scale `dx_stride` times, a ready f32 vector of lanes.
    Q8 { group: usize, corr: i32, aux_stride: usize, dx_stride: usize },
    /// Q8_K super-blocks. `swap_mid`: in each half of 128, bytes 32..64 and 64..96 trade
    /// places, which matches the nibbles of a 64-byte load of Q4_K/Q5_K codes. `bs` holds,
    /// per super-block, the 16 sums of 16 values then the 8 sums of 32 (natural order).
    /// `sums`: also the sums of 32 as f32 (`sf`) and −32 × the sums of 16 as i32 (`si`).
    K { swap_mid: bool, sums: bool },
}

impl Layout {
    pub fn natural(t: QuantType) -> Layout {
        match t {
            QuantType::Q4_0 => Layout::Q8 { group: 1, corr: -8, aux_stride: 1, dx_stride: 0 },
            QuantType::Q8_0 => Layout::Q8 { group: 1, corr: 0, aux_stride: 1, dx_stride: 0 },
            _ => Layout::K { swap_mid: false, sums: false },
        }
    }
}

/// Per super-block: 16 sums of 16, then 8 sums of 32.
pub(crate) const BS_PER_SB: usize = 24;

#[derive(Default)]
pub(crate) struct Act {
    /// `n × cols` codes.
    pub qs: Vec<i8>,
    /// `n × blocks` scales.
    pub d: Vec<f32>,
    /// Q8_0: `n × blocks × aux_stride`.
    pub aux: Vec<i32>,
    /// Q8_0: `n × blocks × dx_stride`.
    pub dx: Vec<f32>,
    /// Q8_K: `n × blocks × BS_PER_SB`.
    pub bs: Vec<i16>,
    /// Q8_K with `sums`: `n × blocks × 8` sums of 32, as f32.
    pub sf: Vec<f32>,
    /// Q8_K with `sums`: `n × blocks × 16` sums of 16 times −32, as i32.
    pub si: Vec<i32>,
    pub cols: usize,
    /// Blocks per row.
    pub nb: usize,
    pub aux_stride: usize,
    pub dx_stride: usize,
}

/// Grows `v` to at least `len` (never shrinks, so a warm buffer is never reallocated).
fn ensure<T: Copy + Default>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

impl Act {
    /// Quantizes the `n` rows of `x` for `layout`, on `parallel`'s threads if given.
    pub fn prepare(&mut self, layout: Layout, x: &[f32], n: usize, cols: usize, parallel: Option<Executor>) {
        debug_assert_eq!(x.len(), n * cols);
        let simd = simd();
        self.cols = cols;
        ensure(&mut self.qs, n * cols);
        match layout {
            Layout::Q8 { group, corr, aux_stride, dx_stride } => {
                let nb = cols / 32;
                self.nb = nb;
                self.aux_stride = aux_stride;
                self.dx_stride = dx_stride;
                ensure(&mut self.d, n * nb);
                ensure(&mut self.aux, n * nb * aux_stride);
                ensure(&mut self.dx, n * nb * dx_stride);
                let qs = &mut self.qs[..n * cols];
                let d = &mut self.d[..n * nb];
                let aux = &mut self.aux[..n * nb * aux_stride];
                for_rows(parallel, qs, cols, d, nb, aux, nb * aux_stride, |i, q, d, a| {
                    quantize_row_q8_0(&x[i * cols..(i + 1) * cols], q, d, a, group, corr, aux_stride, simd);
                });
                if dx_stride > 0 {
                    for (dx, &d) in self.dx[..n * nb * dx_stride].chunks_mut(dx_stride).zip(&self.d[..n * nb]) {
                        dx.fill(d);
                    }
                }
            }
            Layout::K { swap_mid, sums } => {
                let nb = cols / 256;
                self.nb = nb;
                ensure(&mut self.d, n * nb);
                ensure(&mut self.bs, n * nb * BS_PER_SB);
                let qs = &mut self.qs[..n * cols];
                let d = &mut self.d[..n * nb];
                let bs = &mut self.bs[..n * nb * BS_PER_SB];
                for_rows(parallel, qs, cols, d, nb, bs, nb * BS_PER_SB, |i, q, d, b| {
                    quantize_row_q8_k(&x[i * cols..(i + 1) * cols], q, d, b, swap_mid, simd);
                });
                if sums {
                    ensure(&mut self.sf, n * nb * 8);
                    ensure(&mut self.si, n * nb * 16);
                    for (blk, (sf, si)) in
                        self.bs[..n * nb * BS_PER_SB].chunks(BS_PER_SB).zip(self.sf.chunks_mut(8).zip(self.si.chunks_mut(16)))
                    {
                        for j in 0..16 {
                            si[j] = -32 * blk[j] as i32;
                        }
                        for j in 0..8 {
                            sf[j] = blk[16 + j] as f32;
                        }
                    }
                }
            }
        }
    }

    /// Codes of activation row `i`.
    #[inline(always)]
    pub fn qs(&self, i: usize) -> *const i8 {
        self.qs[i * self.cols..].as_ptr()
    }

    /// Block scales of activation row `i`.
    #[inline(always)]
    pub fn d(&self, i: usize) -> *const f32 {
        self.d[i * self.nb..].as_ptr()
    }

    /// Q8_0 per-block corrections of activation row `i`.
    #[inline(always)]
    pub fn aux(&self, i: usize) -> *const i32 {
        self.aux[i * self.nb * self.aux_stride..].as_ptr()
    }

    /// Q8_0 block scales of activation row `i`, each repeated `dx_stride` times.
    #[inline(always)]
    pub fn dx(&self, i: usize) -> *const f32 {
        self.dx[i * self.nb * self.dx_stride..].as_ptr()
    }

    /// Q8_K sums of 32 (f32) of activation row `i` (layouts with `sums`).
    #[inline(always)]
    pub fn sf(&self, i: usize) -> *const f32 {
        self.sf[i * self.nb * 8..].as_ptr()
    }

    /// Q8_K −32 × sums of 16 (i32) of activation row `i` (layouts with `sums`).
    #[inline(always)]
    pub fn si(&self, i: usize) -> *const i32 {
        self.si[i * self.nb * 16..].as_ptr()
    }

    /// Q8_K per-super-block sums of activation row `i`.
    #[inline(always)]
    pub fn bs(&self, i: usize) -> *const i16 {
        self.bs[i * self.nb * BS_PER_SB..].as_ptr()
    }

    /// `d · q` for every value, in natural order (only for natural layouts).
    pub fn dequantize_natural(&self, k: bool, out: &mut [f32]) {
        let block = if k { 256 } else { 32 };
        for (b, (o, q)) in out.chunks_mut(block).zip(self.qs.chunks(block)).enumerate() {
            let d = self.d[b];
            for (o, &q) in o.iter_mut().zip(q) {
                *o = d * q as f32;
            }
        }
    }
}

/// Runs `f(i, codes, scales, extras)` for each row, on `parallel`'s threads if given.
#[allow(clippy::too_many_arguments)]
fn for_rows<E: Send>(
    parallel: Option<Executor>,
    qs: &mut [i8],
    cols: usize,
    d: &mut [f32],
    nb: usize,
    extra: &mut [E],
    per_row: usize,
    f: impl Fn(usize, &mut [i8], &mut [f32], &mut [E]) + Sync,
) {
    let n = d.len() / nb.max(1);
    match parallel {
        Some(exec) if n > 1 => {
            let (q, dp, e) = (SendPtr(qs.as_mut_ptr()), SendPtr(d.as_mut_ptr()), SendPtr(extra.as_mut_ptr()));
            (exec.run)(n, &|rows: std::ops::Range<usize>| {
                for i in rows {
                    // SAFETY: the executor hands out each row once; rows are disjoint.
                    let (q, d, e) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(q.get().add(i * cols), cols),
                            std::slice::from_raw_parts_mut(dp.get().add(i * nb), nb),
                            std::slice::from_raw_parts_mut(e.get().add(i * per_row), per_row),
                        )
                    };
                    f(i, q, d, e);
                }
            });
        }
        _ => {
            for (i, ((q, d), e)) in qs.chunks_mut(cols).zip(d.chunks_mut(nb)).zip(extra.chunks_mut(per_row)).enumerate() {
                f(i, q, d, e);
            }
        }
    }
}

/// A pointer handed to other threads, each of which touches its own part only.
struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: see the uses: disjoint rows per thread.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// Whether the AVX2 quantizers can run (same results as the portable ones, faster).
fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| crate::Isa::Avx2.is_available())
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// ggml's x86 `quantize_row_q8_0`, one row.
#[allow(clippy::too_many_arguments)]
fn quantize_row_q8_0(
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    aux: &mut [i32],
    group: usize,
    corr: i32,
    stride: usize,
    simd: bool,
) {
    let nb = d.len();
    for b in 0..nb {
        let xb: &[f32; 32] = x[b * 32..(b + 1) * 32].try_into().unwrap();
        let mut q = [0i8; 32];
        let (db, sum) = q8_0_block(xb, &mut q, simd);
        d[b] = db;
        aux[b * stride..(b + 1) * stride].fill(0);
        aux[b * stride] = corr * sum;
        if group > 1 && b < nb / group * group {
            // Block j of its run: first half at 16j, second half at 16·group + 16j.
            let base = (b - b % group) * 32 + (b % group) * 16;
            qs[base..base + 16].copy_from_slice(&q[..16]);
            qs[base + 16 * group..base + 16 * group + 16].copy_from_slice(&q[16..]);
        } else {
            qs[b * 32..(b + 1) * 32].copy_from_slice(&q);
        }
    }
}

/// One Q8_0 block: its codes, its scale (the f16 value, as f32) and the sum of its codes.
fn q8_0_block(x: &[f32; 32], q: &mut [i8; 32], simd: bool) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only set when AVX2, FMA and F16C are available.
        return unsafe { q8_0_block_avx2(x, q) };
    }
    let _ = simd;
    q8_0_block_scalar(x, q)
}

fn q8_0_block_scalar(x: &[f32; 32], q: &mut [i8; 32]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let dh = half::f16::from_f32(amax / 127.0);
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in q.iter_mut().zip(x) {
        // `as i32` saturates like cvtps_epi32 + packs do in range; values stay in ±127.
        *q = ((v * id).round_ties_even() as i32).clamp(-128, 127) as i8;
        sum += *q as i32;
    }
    (dh.to_f32(), sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_block_avx2(x: &[f32; 32], q: &mut [i8; 32]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let p = x.as_ptr();
    let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
    let amax = hmax_abs(&v);
    let d = amax / 127.0;
    let dh = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(d))));
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let r = |v: __m256| _mm256_cvtps_epi32(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(v, id)));
    let i = [r(v[0]), r(v[1]), r(v[2]), r(v[3])];
    let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, pack_i8(&i));
    (dh, _mm_cvtsi128_si32(s))
}

/// The largest |v| over four vectors.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hmax_abs(v: &[std::arch::x86_64::__m256]) -> f32 {
    use std::arch::x86_64::*;
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for v in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *v));
    }
    let m4 = _mm_max_ps(_mm256_extractf128_ps::<1>(m), _mm256_castps256_ps128(m));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)))
}

/// Four vectors of i32 (within i8 range, or saturated) as 32 bytes in order.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_i8(i: &[std::arch::x86_64::__m256i; 4]) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let a = _mm256_packs_epi32(i[0], i[1]);
    let b = _mm256_packs_epi32(i[2], i[3]);
    _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// ggml's `quantize_row_q8_K_ref`, one row.
fn quantize_row_q8_k(x: &[f32], qs: &mut [i8], d: &mut [f32], bs: &mut [i16], swap_mid: bool, simd: bool) {
    for (b, d) in d.iter_mut().enumerate() {
        let xb: &[f32; 256] = x[b * 256..(b + 1) * 256].try_into().unwrap();
        let mut q = [0i8; 256];
        *d = q8_k_block(xb, &mut q, simd);
        let sums = &mut bs[b * BS_PER_SB..(b + 1) * BS_PER_SB];
        for j in 0..16 {
            sums[j] = q[j * 16..(j + 1) * 16].iter().map(|&v| v as i16).sum();
        }
        for j in 0..8 {
            sums[16 + j] = sums[2 * j] + sums[2 * j + 1];
        }
        let dst = &mut qs[b * 256..(b + 1) * 256];
        if swap_mid {
            for h in 0..2 {
                let (s, o) = (&q[h * 128..(h + 1) * 128], &mut dst[h * 128..(h + 1) * 128]);
                o[..32].copy_from_slice(&s[..32]);
                o[32..64].copy_from_slice(&s[64..96]);
                o[64..96].copy_from_slice(&s[32..64]);
                o[96..].copy_from_slice(&s[96..]);
            }
        } else {
            dst.copy_from_slice(&q);
        }
    }
}

/// One Q8_K super-block: its codes and its scale.
fn q8_k_block(x: &[f32; 256], q: &mut [i8; 256], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only set when AVX2, FMA and F16C are available.
        return unsafe { q8_k_block_avx2(x, q) };
    }
    let _ = simd;
    q8_k_block_scalar(x, q)
}

fn q8_k_block_scalar(x: &[f32; 256], q: &mut [i8; 256]) -> f32 {
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
    }
    1.0 / iscale
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_k_block_avx2(x: &[f32; 256], q: &mut [i8; 256]) -> f32 {
    use std::arch::x86_64::*;
    let p = x.as_ptr();
    let mut m = [_mm256_setzero_ps(); 4];
    for c in 0..8 {
        for (k, m) in m.iter_mut().enumerate() {
            *m = _mm256_max_ps(*m, _mm256_andnot_ps(_mm256_set1_ps(-0.0), _mm256_loadu_ps(p.add(32 * c + 8 * k))));
        }
    }
    let amax = hmax_abs(&m);
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    // The first value of largest magnitude sets the sign, as ggml's strict `>` scan does.
    let max = *x.iter().find(|v| v.abs() == amax).unwrap();
    let iscale = -127.0 / max;
    let s = _mm256_set1_ps(iscale);
    let top = _mm256_set1_epi32(127);
    for c in 0..8 {
        let r = |k: usize| {
            let v = _mm256_mul_ps(s, _mm256_loadu_ps(p.add(32 * c + 8 * k)));
            _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)), top)
        };
        let i = [r(0), r(1), r(2), r(3)];
        _mm256_storeu_si256(q.as_mut_ptr().add(32 * c) as *mut __m256i, pack_i8(&i));
    }
    1.0 / iscale
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// Blocks with ties (x.5 after scaling), zeros and opposite-sign equal maxima.
    fn blocks(len: usize, rng: &mut Rng) -> Vec<Vec<f32>> {
        let mut out = Vec::new();
        for k in 0..200 {
            let mut x: Vec<f32> = (0..len).map(|_| rng.next() * 3.0).collect();
            match k % 5 {
                0 => x.iter_mut().for_each(|v| *v = (*v * 10.0).round() / 2.0 + 0.5),
                1 => x.iter_mut().for_each(|v| *v = 0.0),
                2 => {
                    x[len / 3] = 7.0;
                    x[len / 2] = -7.0;
                }
                3 => {
                    x[len / 3] = -7.0;
                    x[len / 2] = 7.0;
                }
                _ => {}
            }
            out.push(x);
        }
        out
    }

    #[test]
    fn simd_quantizers_match_the_portable_ones() {
        if !simd() {
            return;
        }
        let mut rng = Rng(99);
        for x in blocks(32, &mut rng) {
            let (mut a, mut b) = ([0i8; 32], [0i8; 32]);
            let x: &[f32; 32] = x[..].try_into().unwrap();
            let ra = q8_0_block_scalar(x, &mut a);
            let rb = unsafe { q8_0_block_avx2(x, &mut b) };
            assert_eq!((ra.0.to_bits(), ra.1, a), (rb.0.to_bits(), rb.1, b));
        }
        for x in blocks(256, &mut rng) {
            let (mut a, mut b) = ([0i8; 256], [0i8; 256]);
            let x: &[f32; 256] = x[..].try_into().unwrap();
            let ra = q8_k_block_scalar(x, &mut a);
            let rb = unsafe { q8_k_block_avx2(x, &mut b) };
            assert_eq!(ra.to_bits(), rb.to_bits());
            assert_eq!(a, b);
        }
    }
}
