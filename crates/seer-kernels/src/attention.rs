//! Attention read in place from a key/value cache: for each query row and head,
//! `softmax(q·kᵀ·scale)·v`, causal or not, with the keys and values held as f32 or f16;
//! optionally within a sliding window, and with runs of positions that see each other
//! whole (Gemma 3's images).
//!
//! The cache keeps each key/value head's positions contiguous, so a head's keys stream from
//! memory once per query block and nothing is copied first; grouped-query heads read their
//! shared head directly. Values are `[kv_heads, stride, d]`. Keys are stored in blocks of
//! [`KEY_BLOCK`] positions, dimension-major inside a block (`[kv_heads, stride / 16, d, 16]`,
//! see [`key_index`]): sixteen scores then come out of one register per dimension, with no
//! horizontal sum per key. One task is one
//! query head over a block of query rows; tasks are claimed dynamically, which evens out
//! the causal triangle's uneven rows. A single query row on AVX-512 (a decode step) takes
//! `decode_attention` instead: key/value heads read once for all the query heads they
//! serve, keys split into runs across the threads.

use std::cell::RefCell;
use std::ops::Range;

use crate::{executor, isa, Isa, OutPtr};

/// What a key/value cache may hold.
pub trait KvElem: Copy + Default + Send + Sync + 'static {
    /// Stored as IEEE half precision (converted with F16C on x86).
    const F16: bool;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// `n` zeros, from the allocator's zeroed memory: fresh pages are not touched (and take
    /// no memory) until written.
    fn zeroed(n: usize) -> Vec<Self>;
}

impl KvElem for f32 {
    const F16: bool = false;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn zeroed(n: usize) -> Vec<Self> {
        vec![0.0; n]
    }
}

impl KvElem for half::f16 {
    const F16: bool = true;
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn zeroed(n: usize) -> Vec<Self> {
        use half::vec::HalfBitsVecExt;
        // vec! recognises zero for u16, not for f16 (which it would fill value by value).
        vec![0u16; n].reinterpret_into()
    }
}

/// The shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape<'a> {
    /// Query rows.
    pub t: usize,
    pub heads: usize,
    /// Key/value heads; each serves `heads / kv_heads` query heads.
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Keys visible to the last query row.
    pub kv_len: usize,
    /// Positions from one key/value head to the next in the cache (its capacity).
    pub kv_stride: usize,
    /// Query row `i` sees keys `..kv_len - t + i + 1` (the rows are the last `t` positions);
    /// otherwise every row sees all `kv_len` keys.
    pub causal: bool,
    pub scale: f32,
    /// A sliding window: the row at position `p` sees no key before `p + 1 - window`.
    /// 0: no window.
    pub window: usize,
    /// Runs of positions whose rows also see the later keys of their own run, however
    /// far (the tokens of one image, bidirectional in Gemma 3).
    pub blocks: &'a [Range<usize>],
}

impl AttnShape<'_> {
    /// The keys query row `i` sees.
    pub fn keys(&self, i: usize) -> Range<usize> {
        let p = self.kv_len - self.t + i;
        let mut end = if self.causal { p + 1 } else { self.kv_len };
        if let Some(b) = self.blocks.iter().find(|b| b.contains(&p)) {
            end = end.max(b.end.min(self.kv_len));
        }
        let start = if self.window > 0 { (p + 1).saturating_sub(self.window) } else { 0 };
        start.min(end)..end
    }
}

/// Query rows per task.
const QUERY_BLOCK: usize = 16;

/// Key positions stored together, dimension-major.
pub const KEY_BLOCK: usize = 16;

/// Where dimension `c` of position `p` of key head `h` sits in a key buffer of `stride`
/// positions per head (a multiple of [`KEY_BLOCK`]) and `d` dimensions.
#[inline]
pub fn key_index(h: usize, p: usize, c: usize, stride: usize, d: usize) -> usize {
    h * stride * d + (p / KEY_BLOCK) * KEY_BLOCK * d + c * KEY_BLOCK + p % KEY_BLOCK
}

/// `q` is `[t, heads, head_dim]`, `v` is `[kv_heads, kv_stride, head_dim]`, `out` is
/// `[t, heads, head_dim]`, all row-major; `k` is laid out as [`key_index`] says, with
/// `kv_stride` a multiple of [`KEY_BLOCK`].
pub fn attention<T: KvElem>(s: &AttnShape, q: &[f32], k: &[T], v: &[T], out: &mut [f32]) {
    attention_with(isa(), s, q, k, v, out)
}

/// [`attention`] on a given path, which must be available on this CPU.
pub fn attention_with<T: KvElem>(isa: Isa, s: &AttnShape, q: &[f32], k: &[T], v: &[T], out: &mut [f32]) {
    let d = s.head_dim;
    assert!(isa.is_available(), "seer-kernels: this CPU cannot run the {} path", isa.name());
    assert!(s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads), "attention: {} heads over {} kv heads", s.heads, s.kv_heads);
    assert!(s.kv_len <= s.kv_stride, "attention: {} keys in a cache of {}", s.kv_len, s.kv_stride);
    assert!(s.kv_stride.is_multiple_of(KEY_BLOCK), "attention: a stride of {} positions is not whole key blocks", s.kv_stride);
    assert!(!s.causal || s.t <= s.kv_len, "attention: {} causal rows over {} keys", s.t, s.kv_len);
    assert!(q.len() >= s.t * s.heads * d && out.len() >= s.t * s.heads * d, "attention: q or out too short");
    let cache = s.kv_heads * s.kv_stride * d;
    assert!(k.len() >= cache && v.len() >= cache, "attention: cache too short");
    if s.t == 0 || s.heads == 0 || d == 0 {
        return;
    }
    if s.kv_len == 0 {
        out[..s.t * s.heads * d].fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && s.t == 1 && d.is_multiple_of(16) && s.heads / s.kv_heads <= crate::decode_attention::MAX_GROUP {
        return crate::decode_attention::attention(s, q, k, v, out);
    }
    let blocks = s.t.div_ceil(QUERY_BLOCK);
    let tasks = s.heads * blocks;
    let out = OutPtr(out.as_mut_ptr());
    let task = |range: Range<usize>| {
        with_scores(s.kv_len, |scores| {
            for task in range {
                // Heads vary fastest, so the first tasks spread over different heads.
                let (h, b) = (task % s.heads, task / s.heads);
                let g = h / (s.heads / s.kv_heads);
                let (kh, vh) = (&k[g * s.kv_stride * d..], &v[g * s.kv_stride * d..]);
                for i in b * QUERY_BLOCK..((b + 1) * QUERY_BLOCK).min(s.t) {
                    let keys = s.keys(i);
                    // From the key block holding the first key; the keys before it in that
                    // block are skipped.
                    let first = keys.start / KEY_BLOCK * KEY_BLOCK;
                    let at = (i * s.heads + h) * d;
                    // SAFETY: (i, h) pairs are disjoint across tasks; `out` holds t·heads·d.
                    let base = &out; // the whole OutPtr, not its raw field, is shared with the tasks
                    let o = unsafe { std::slice::from_raw_parts_mut(base.0.add(at), d) };
                    let (k_rows, v_rows) = (&kh[first * d..keys.end.next_multiple_of(KEY_BLOCK) * d], &vh[first * d..keys.end * d]);
                    row(isa, &q[at..at + d], k_rows, v_rows, s.scale, &mut scores[..keys.end - first], keys.start - first, o);
                }
            }
        })
    };
    let exec = executor();
    let work = s.t * s.heads * s.kv_len * d;
    if exec.threads <= 1 || tasks < 2 || work < 1 << 16 {
        task(0..tasks);
    } else {
        (exec.run)(tasks, &task);
    }
}

/// `f` on this thread's score buffer, at least `len` long (a fresh one on a nested call).
pub(crate) fn with_scores<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local! {
        static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    crate::with_local(&SCORES, |scores| {
        if scores.len() < len {
            scores.resize(len, 0.0);
        }
        f(&mut scores[..len])
    })
}

/// One query row of one head against `scores.len()` rows of `k` and `v`, leaving out the
/// first `skip` (fewer than a key block).
#[allow(clippy::too_many_arguments)]
fn row<T: KvElem>(isa: Isa, q: &[f32], k: &[T], v: &[T], scale: f32, scores: &mut [f32], skip: usize, out: &mut [f32]) {
    let d = q.len();
    match isa {
        // SAFETY: the path is available (checked by the caller); slices hold keys·d values.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if d.is_multiple_of(16) => unsafe { x86::row512(q, k, v, scale, scores, skip, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 if d.is_multiple_of(8) => unsafe { x86::row256(q, k, v, scale, scores, skip, out) },
        _ => row_scalar(q, k, v, scale, scores, skip, out),
    }
}

/// `x ← softmax(x)`, with the vectorized exponential where the CPU has AVX-512.
pub(crate) fn softmax_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: AVX-512 is available (`isa()` checked it).
        unsafe { x86::softmax512(x) };
        return;
    }
    let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `k` holds whole key blocks of one head (see [`key_index`]).
fn row_scalar<T: KvElem>(q: &[f32], k: &[T], v: &[T], scale: f32, scores: &mut [f32], skip: usize, out: &mut [f32]) {
    let d = q.len();
    let mut max = f32::NEG_INFINITY;
    for (j, s) in scores.iter_mut().enumerate() {
        *s = if j < skip { f32::NEG_INFINITY } else { q.iter().enumerate().map(|(c, a)| a * k[key_index(0, j, c, 0, d)].to_f32()).sum::<f32>() * scale };
        max = max.max(*s);
    }
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for (&p, vr) in scores.iter().zip(v.chunks_exact(d)) {
        for (o, x) in out.iter_mut().zip(vr) {
            *o += p * x.to_f32();
        }
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{exp512, load16};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::KvElem;

    /// Sixteen cache values as f32.
    #[inline(always)]
    pub(crate) unsafe fn load16<T: KvElem>(p: *const T) -> __m512 {
        if T::F16 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        } else {
            _mm512_loadu_ps(p as *const f32)
        }
    }

    #[inline(always)]
    unsafe fn load8<T: KvElem>(p: *const T) -> __m256 {
        if T::F16 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
    }

    /// eˣ for x ≤ 0 (softmax arguments), within 2 ulp: 2ⁿ·p(r) with r = x − n·ln 2.
    #[inline(always)]
    pub(crate) unsafe fn exp512(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// As [`exp512`], eight lanes; 2ⁿ is built in the exponent bits.
    #[inline(always)]
    unsafe fn exp256(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 5040.0);
        for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(pow2))
    }

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn softmax512(x: &mut [f32]) {
        let (n, p) = (x.len(), x.as_mut_ptr());
        let mask = |j: usize| -> __mmask16 { if n - j >= 16 { 0xffff } else { (1u16 << (n - j)) - 1 } };
        let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
        for j in (0..n).step_by(16) {
            mv = _mm512_mask_max_ps(mv, mask(j), mv, _mm512_maskz_loadu_ps(mask(j), p.add(j)));
        }
        let mv = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
        let mut sum = _mm512_setzero_ps();
        for j in (0..n).step_by(16) {
            let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask(j), p.add(j)), mv));
            _mm512_mask_storeu_ps(p.add(j), mask(j), e);
            sum = _mm512_mask_add_ps(sum, mask(j), sum, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for j in (0..n).step_by(16) {
            _mm512_mask_storeu_ps(p.add(j), mask(j), _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(j), p.add(j)), inv));
        }
    }

    /// `head_dim` a multiple of 16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn row512<T: KvElem>(q: &[f32], k: &[T], v: &[T], scale: f32, scores: &mut [f32], skip: usize, out: &mut [f32]) {
        let d = q.len();
        let keys = scores.len();
        let (qp, kp, vp, sp, op) = (q.as_ptr(), k.as_ptr(), v.as_ptr(), scores.as_mut_ptr(), out.as_mut_ptr());
        // Sixteen keys at a time: one register of scores, a broadcast of q per dimension.
        let mut maxv = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut j = 0;
        while j < keys {
            let kb = kp.add(j * d);
            let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut c = 0;
            while c + 2 <= d {
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(*qp.add(c)), load16(kb.add(c * 16)), a0);
                a1 = _mm512_fmadd_ps(_mm512_set1_ps(*qp.add(c + 1)), load16(kb.add(c * 16 + 16)), a1);
                c += 2;
            }
            if c < d {
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(*qp.add(c)), load16(kb.add(c * 16)), a0);
            }
            let m: __mmask16 = if keys - j >= 16 { 0xffff } else { (1u16 << (keys - j)) - 1 };
            // Skipped keys: −∞, which the exponential below takes to (next to) nothing.
            let skipped: __mmask16 = if j == 0 { ((1u32 << skip) - 1) as u16 } else { 0 };
            let s = _mm512_mask_mov_ps(_mm512_mul_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(scale)), skipped, _mm512_set1_ps(f32::NEG_INFINITY));
            _mm512_mask_storeu_ps(sp.add(j), m, s);
            maxv = _mm512_mask_max_ps(maxv, m & !skipped, maxv, s);
            j += 16;
        }
        let mv = _mm512_set1_ps(_mm512_reduce_max_ps(maxv));
        let mut sum = _mm512_setzero_ps();
        let mut j = 0;
        while j < keys {
            let m: __mmask16 = if keys - j >= 16 { 0xffff } else { (1u16 << (keys - j)) - 1 };
            let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sp.add(j)), mv));
            _mm512_mask_storeu_ps(sp.add(j), m, e);
            sum = _mm512_mask_add_ps(sum, m, sum, e);
            j += 16;
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        // The weighted sum of values, eight registers of the output at a time.
        let mut c0 = 0;
        while c0 < d {
            let n = ((d - c0) / 16).min(8);
            let mut acc = [_mm512_setzero_ps(); 8];
            for j in 0..keys {
                let p = _mm512_set1_ps(*sp.add(j));
                let vr = vp.add(j * d + c0);
                for (r, a) in acc.iter_mut().enumerate().take(n) {
                    *a = _mm512_fmadd_ps(p, load16(vr.add(16 * r)), *a);
                }
            }
            for (r, a) in acc.iter().enumerate().take(n) {
                _mm512_storeu_ps(op.add(c0 + 16 * r), _mm512_mul_ps(*a, inv));
            }
            c0 += 16 * n;
        }
    }

    /// `head_dim` a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn row256<T: KvElem>(q: &[f32], k: &[T], v: &[T], scale: f32, scores: &mut [f32], skip: usize, out: &mut [f32]) {
        let d = q.len();
        let keys = scores.len();
        let (qp, kp, vp, sp, op) = (q.as_ptr(), k.as_ptr(), v.as_ptr(), scores.as_mut_ptr(), out.as_mut_ptr());
        // Sixteen keys at a time, as two registers of eight scores.
        let mut max = f32::NEG_INFINITY;
        let mut j = 0;
        while j < keys {
            let kb = kp.add(j * d);
            let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for c in 0..d {
                let qc = _mm256_set1_ps(*qp.add(c));
                lo = _mm256_fmadd_ps(qc, load8(kb.add(c * 16)), lo);
                hi = _mm256_fmadd_ps(qc, load8(kb.add(c * 16 + 8)), hi);
            }
            let mut block = [0f32; 16];
            _mm256_storeu_ps(block.as_mut_ptr(), _mm256_mul_ps(lo, _mm256_set1_ps(scale)));
            _mm256_storeu_ps(block.as_mut_ptr().add(8), _mm256_mul_ps(hi, _mm256_set1_ps(scale)));
            for (i, &s) in block.iter().enumerate().take(keys - j) {
                let s = if j + i < skip { f32::NEG_INFINITY } else { s };
                *sp.add(j + i) = s;
                max = max.max(s);
            }
            j += 16;
        }
        let mv = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        let mut j = 0;
        while j + 8 <= keys {
            let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sp.add(j)), mv));
            _mm256_storeu_ps(sp.add(j), e);
            sum = _mm256_add_ps(sum, e);
            j += 8;
        }
        let mut total = hsum256(sum);
        while j < keys {
            let e = (*sp.add(j) - max).exp();
            *sp.add(j) = e;
            total += e;
            j += 1;
        }
        let inv = _mm256_set1_ps(1.0 / total);
        let mut c0 = 0;
        while c0 < d {
            let n = ((d - c0) / 8).min(8);
            let mut acc = [_mm256_setzero_ps(); 8];
            for j in 0..keys {
                let p = _mm256_set1_ps(*sp.add(j));
                let vr = vp.add(j * d + c0);
                for (r, a) in acc.iter_mut().enumerate().take(n) {
                    *a = _mm256_fmadd_ps(p, load8(vr.add(8 * r)), *a);
                }
            }
            for (r, a) in acc.iter().enumerate().take(n) {
                _mm256_storeu_ps(op.add(c0 + 8 * r), _mm256_mul_ps(*a, inv));
            }
            c0 += 8 * n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain f64 attention to compare every path with.
    fn reference<T: KvElem>(s: &AttnShape, q: &[f32], k: &[T], v: &[T]) -> Vec<f32> {
        let d = s.head_dim;
        let mut out = vec![0f32; s.t * s.heads * d];
        for i in 0..s.t {
            for h in 0..s.heads {
                let g = h / (s.heads / s.kv_heads);
                let keys = s.keys(i);
                let qr = &q[(i * s.heads + h) * d..][..d];
                let at = |buf: &[T], j: usize, c: usize| buf[(g * s.kv_stride + j) * d + c].to_f32() as f64;
                let key = |j: usize, c: usize| k[key_index(g, j, c, s.kv_stride, d)].to_f32() as f64;
                let sc: Vec<f64> = keys.clone()
                    .map(|j| (0..d).map(|c| qr[c] as f64 * key(j, c)).sum::<f64>() * s.scale as f64)
                    .collect();
                let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..d {
                    let y: f64 = keys.clone().zip(&e).map(|(j, w)| w * at(v, j, c)).sum::<f64>() / sum;
                    out[(i * s.heads + h) * d + c] = y as f32;
                }
            }
        }
        out
    }

    fn rand_vec(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn check<T: KvElem>(s: AttnShape, seed: u64) {
        let mut seed = seed;
        let d = s.head_dim;
        let q = rand_vec(s.t * s.heads * d, &mut seed);
        let k: Vec<T> = rand_vec(s.kv_heads * s.kv_stride * d, &mut seed).into_iter().map(T::from_f32).collect();
        let v: Vec<T> = rand_vec(s.kv_heads * s.kv_stride * d, &mut seed).into_iter().map(T::from_f32).collect();
        let want = reference(&s, &q, &k, &v);
        for isa in crate::available_isas() {
            let mut got = vec![f32::NAN; want.len()];
            attention_with(isa, &s, &q, &k, &v, &mut got);
            let err = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 5e-5, "{isa:?} {s:?} f16={}: max error {err}", T::F16);
        }
    }

    #[test]
    fn matches_reference_on_ragged_shapes() {
        let mut n = 0;
        for (heads, kv_heads) in [(1, 1), (4, 4), (6, 2), (8, 1)] {
            for d in [8, 16, 24, 64, 128, 136] {
                for (t, kv_len, stride) in [(1, 1, 16), (1, 37, 64), (5, 5, 16), (19, 40, 48), (33, 33, 64), (2, 16, 16)] {
                    for causal in [true, false] {
                        let s = AttnShape { t, heads, kv_heads, head_dim: d, kv_len, kv_stride: stride, causal, scale: 1.0 / (d as f32).sqrt(), window: 0, blocks: &[] };
                        check::<f32>(s, n);
                        check::<half::f16>(s, n + 1000);
                        n += 1;
                    }
                }
            }
        }
    }

    #[test]
    fn windows_and_bidirectional_blocks_match_reference() {
        // Gemma 3's masks: sliding windows that start mid key block, image runs that see
        // their later tokens, prefill (t = kv_len) and a later chunk (t < kv_len).
        let blocks = [3..9, 21..40];
        let mut n = 0;
        for d in [8, 16, 32, 40] {
            for (t, kv_len) in [(45, 45), (1, 45), (7, 45), (1, 17), (30, 30)] {
                for window in [0, 1, 5, 12, 16, 17, 100] {
                    for blocks in [&blocks[..], &[]] {
                        let s = AttnShape { t, heads: 4, kv_heads: 2, head_dim: d, kv_len, kv_stride: 48, causal: true, scale: 0.3, window, blocks };
                        check::<f32>(s, 5000 + n);
                        check::<half::f16>(s, 9000 + n);
                        n += 1;
                    }
                }
            }
        }
        let s = AttnShape { t: 45, heads: 1, kv_heads: 1, head_dim: 8, kv_len: 45, kv_stride: 48, causal: true, scale: 1.0, window: 12, blocks: &blocks };
        assert_eq!(s.keys(3), 0..9, "an image's first token sees its whole image");
        assert_eq!(s.keys(25), 14..40, "window start, image end");
        assert_eq!(s.keys(44), 33..45);
    }

    /// Decode steps over long caches: grouped heads (1, 3, 6 and 8 per key/value head) over
    /// keys split into runs, windows starting mid block, partial last blocks.
    #[test]
    fn long_decode_steps_match_reference() {
        let mut n = 0;
        for (heads, kv_heads) in [(4, 4), (9, 3), (12, 2), (8, 1), (18, 1)] {
            for d in [16, 64, 128] {
                for (kv_len, stride) in [(700, 704), (1031, 1040), (64, 64)] {
                    for window in [0, 100, 333] {
                        let s = AttnShape { t: 1, heads, kv_heads, head_dim: d, kv_len, kv_stride: stride, causal: true, scale: 1.0 / (d as f32).sqrt(), window, blocks: &[] };
                        check::<half::f16>(s, 20_000 + n);
                        n += 1;
                    }
                }
            }
        }
        let s = AttnShape { t: 1, heads: 6, kv_heads: 2, head_dim: 64, kv_len: 517, kv_stride: 528, causal: false, scale: 0.125, window: 0, blocks: &[] };
        check::<f32>(s, 99);
    }

    #[test]
    fn softmax_extremes_stay_finite() {
        // One huge score: the output is that key's value; every path's exp must underflow
        // cleanly for the others rather than produce NaN.
        let s = AttnShape { t: 1, heads: 1, kv_heads: 1, head_dim: 16, kv_len: 20, kv_stride: 32, causal: false, scale: 1.0, window: 0, blocks: &[] };
        let q = vec![10.0f32; 16];
        let mut k = vec![-10.0f32; 32 * 16];
        (0..16).for_each(|c| k[key_index(0, 3, c, 32, 16)] = 10.0);
        let v: Vec<f32> = (0..32 * 16).map(|i| (i / 16) as f32).collect();
        for isa in crate::available_isas() {
            let mut out = vec![0f32; 16];
            attention_with(isa, &s, &q, &k, &v, &mut out);
            assert!(out.iter().all(|&x| (x - 3.0).abs() < 1e-6), "{isa:?}: {out:?}");
        }
    }
}
