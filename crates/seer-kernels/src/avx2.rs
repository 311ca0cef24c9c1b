//! AVX2 + FMA + F16C kernels (256-bit, no VNNI): `vpmaddubsw` multiplies unsigned weight
//! codes by signed activations into i16 pairs, `vpmaddwd` applies the per-sub-block scales
//! (or ones) while widening to i32.

// Register arrays indexed by row and lane read best as index loops.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::act::{Act, Layout, BS_PER_SB};
use crate::{drive, read_u16, unpack_k4_scales, Job, OutPtr, QuantType, MAX_TILE};

pub(crate) fn layout(t: QuantType) -> Layout {
    match t {
        QuantType::Q4_0 => Layout::Q8 { group: 2, corr: -8, aux_stride: 4, dx_stride: 0 },
        QuantType::Q8_0 => Layout::Q8 { group: 1, corr: 0, aux_stride: 1, dx_stride: 0 },
        _ => Layout::K { swap_mid: false, sums: false },
    }
}

/// # Safety
/// See [`drive`]; the CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn run(job: &Job, act: &Act, r0: usize, r1: usize, i0: usize, i1: usize, out: OutPtr) {
    let nb = job.cols / job.t.block_size();
    macro_rules! go {
        ($k:ident $(, $c:literal)?) => {
            drive(job, r0, r1, i0, i1, out, 4, |w, i, m| unsafe {
                match m {
                    1 => widen($k::<1 $(, $c)?>(w, nb, act, i)),
                    2 => widen($k::<2 $(, $c)?>(w, nb, act, i)),
                    3 => widen($k::<3 $(, $c)?>(w, nb, act, i)),
                    _ => widen($k::<4 $(, $c)?>(w, nb, act, i)),
                }
            })
        };
    }
    match job.t {
        QuantType::Q4_0 => go!(q4_0),
        QuantType::Q8_0 => go!(q8_0),
        QuantType::Q4K => go!(q4k, false),
        QuantType::Q5K => go!(q4k, true),
        QuantType::Q6K => go!(q6k),
    }
}

#[inline(always)]
pub(crate) fn widen<const M: usize>(r: [f32; M]) -> [f32; MAX_TILE] {
    let mut o = [0f32; MAX_TILE];
    o[..M].copy_from_slice(&r);
    o
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f16s(p: *const u8) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(read_u16(p) as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum128(v: __m128) -> f32 {
    let s = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum256(v: __m256) -> f32 {
    hsum128(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v)))
}

#[inline(always)]
unsafe fn load(p: *const i8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// Pointers into activation rows `i..i + M`: codes, scales, and the layout's extras.
pub(crate) struct Rows<const M: usize> {
    pub q: [*const i8; M],
    pub d: [*const f32; M],
    pub aux: [*const i32; M],
    pub dx: [*const f32; M],
    pub bs: [*const i16; M],
}

#[inline(always)]
pub(crate) fn rows<const M: usize>(act: &Act, i: usize, k_quant: bool) -> Rows<M> {
    let mut r = Rows { q: [std::ptr::null(); M], d: [std::ptr::null(); M], aux: [std::ptr::null(); M], dx: [std::ptr::null(); M], bs: [std::ptr::null(); M] };
    for k in 0..M {
        r.q[k] = act.qs(i + k);
        r.d[k] = act.d(i + k);
        if k_quant {
            r.bs[k] = act.bs(i + k);
        } else {
            r.aux[k] = act.aux(i + k);
            if act.dx_stride > 0 {
                r.dx[k] = act.dx(i + k);
            }
        }
    }
    r
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0<const M: usize>(w: *const u8, nb: usize, act: &Act, i: usize) -> [f32; M] {
    let Rows { q: qa, d: da, .. } = rows::<M>(act, i, false);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); M];
    for b in 0..nb {
        let blk = w.add(34 * b);
        let dw = f16s(blk);
        let wq = _mm256_loadu_si256(blk.add(2) as *const __m256i);
        let aw = _mm256_sign_epi8(wq, wq);
        for k in 0..M {
            let sa = _mm256_sign_epi8(load(qa[k].add(32 * b)), wq);
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sa), ones);
            acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * *da[k].add(b)), acc[k]);
        }
    }
    let mut r = [0f32; M];
    for k in 0..M {
        r[k] = hsum256(acc[k]);
    }
    r
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0<const M: usize>(w: *const u8, nb: usize, act: &Act, i: usize) -> [f32; M] {
    let Rows { q: qa, d: da, aux, .. } = rows::<M>(act, i, false);
    let ones = _mm256_set1_epi16(1);
    let m4 = _mm256_set1_epi8(0x0f);
    let mut acc = [_mm256_setzero_ps(); M];
    for p in 0..nb / 2 {
        let b0 = w.add(36 * p);
        let b1 = b0.add(18);
        let y = _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(b0.add(2) as *const __m128i)),
            _mm_loadu_si128(b1.add(2) as *const __m128i),
        );
        let lo = _mm256_and_si256(y, m4);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(y), m4);
        let (d0, d1) = (f16s(b0), f16s(b1));
        for k in 0..M {
            let a = qa[k].add(64 * p);
            let s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, load(a)), _mm256_maddubs_epi16(hi, load(a.add(32))));
            let corr = _mm256_loadu_si256(aux[k].add(8 * p) as *const __m256i);
            let s32 = _mm256_add_epi32(_mm256_madd_epi16(s16, ones), corr);
            let sc = _mm256_set_m128(_mm_set1_ps(d1 * *da[k].add(2 * p + 1)), _mm_set1_ps(d0 * *da[k].add(2 * p)));
            acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), sc, acc[k]);
        }
    }
    if nb % 2 == 1 {
        let b = nb - 1;
        let blk = w.add(18 * b);
        let x = _mm_loadu_si128(blk.add(2) as *const __m128i);
        let m4 = _mm_set1_epi8(0x0f);
        let y = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(x), m4), _mm_and_si128(x, m4));
        let dw = f16s(blk);
        for k in 0..M {
            let corr = _mm256_zextsi128_si256(_mm_cvtsi32_si128(*aux[k].add(4 * b)));
            let s32 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(y, load(qa[k].add(32 * b))), ones), corr);
            acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_set1_ps(dw * *da[k].add(b)), acc[k]);
        }
    }
    let mut r = [0f32; M];
    for k in 0..M {
        r[k] = hsum256(acc[k]);
    }
    r
}

/// `vpshufb` controls that spread i16 word `j` of each 128-bit lane over the whole lane.
#[repr(align(32))]
struct Shuf([[u8; 32]; 8]);
static SPLAT_WORD: Shuf = {
    let mut t = [[0u8; 32]; 8];
    let mut j = 0;
    while j < 8 {
        let mut b = 0;
        while b < 32 {
            t[j][b] = (2 * j + b % 2) as u8;
            b += 1;
        }
        j += 1;
    }
    Shuf(t)
};
/// Lane 0 gets word `2r`, lane 1 word `2r + 1` (Q6_K: two sub-blocks of 16 per register).
static SPLAT_PAIR: Shuf = {
    let mut t = [[0u8; 32]; 8];
    let mut r = 0;
    while r < 4 {
        let mut b = 0;
        while b < 32 {
            t[r][b] = (4 * r + 2 * (b / 16) + b % 2) as u8;
            b += 1;
        }
        r += 1;
    }
    Shuf(t)
};

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k<const M: usize, const FIVE: bool>(w: *const u8, nb: usize, act: &Act, i: usize) -> [f32; M] {
    let Rows { q: qa, d: da, bs, .. } = rows::<M>(act, i, true);
    let bb = if FIVE { 176 } else { 144 };
    let m4 = _mm256_set1_epi8(0x0f);
    let mut facc = [_mm256_setzero_ps(); M];
    let mut macc = [_mm_setzero_ps(); M];
    for b in 0..nb {
        let blk = w.add(bb * b);
        let d = f16s(blk);
        let dmin = f16s(blk.add(2));
        let (sc, mn) = unpack_k4_scales(&*(blk.add(4) as *const [u8; 12]));
        let scv = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
        let mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
        let qs = blk.add(if FIVE { 48 } else { 16 });
        let mut hb = if FIVE { _mm256_loadu_si256(blk.add(16) as *const __m256i) } else { _mm256_setzero_si256() };
        let mut iacc = [_mm256_setzero_si256(); M];
        for c in 0..4 {
            let q = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
            let mut lo = _mm256_and_si256(q, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
            if FIVE {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(_mm256_and_si256(hb, _mm256_set1_epi8(1))));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16::<3>(_mm256_and_si256(hb, _mm256_set1_epi8(2))));
                hb = _mm256_srli_epi16::<2>(hb);
            }
            let s_lo = _mm256_shuffle_epi8(scv, _mm256_load_si256(SPLAT_WORD.0[2 * c].as_ptr() as *const __m256i));
            let s_hi = _mm256_shuffle_epi8(scv, _mm256_load_si256(SPLAT_WORD.0[2 * c + 1].as_ptr() as *const __m256i));
            for k in 0..M {
                let a = qa[k].add(256 * b + 64 * c);
                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load(a)), s_lo);
                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load(a.add(32))), s_hi);
                iacc[k] = _mm256_add_epi32(iacc[k], _mm256_add_epi32(p_lo, p_hi));
            }
        }
        for k in 0..M {
            let dak = *da[k].add(b);
            facc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[k]), _mm256_set1_ps(d * dak), facc[k]);
            let sums = _mm_loadu_si128(bs[k].add(BS_PER_SB * b + 16) as *const __m128i);
            let mins = _mm_cvtepi32_ps(_mm_madd_epi16(mn16, sums));
            macc[k] = _mm_fmadd_ps(mins, _mm_set1_ps(dmin * dak), macc[k]);
        }
    }
    let mut r = [0f32; M];
    for k in 0..M {
        r[k] = hsum256(facc[k]) - hsum128(macc[k]);
    }
    r
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k<const M: usize>(w: *const u8, nb: usize, act: &Act, i: usize) -> [f32; M] {
    let Rows { q: qa, d: da, bs, .. } = rows::<M>(act, i, true);
    let m4 = _mm256_set1_epi8(0x0f);
    let mut facc = [_mm256_setzero_ps(); M];
    for b in 0..nb {
        let blk = w.add(210 * b);
        let d = f16s(blk.add(208));
        let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(192) as *const __m128i));
        let scv = [_mm256_permute2x128_si256::<0x00>(sc16, sc16), _mm256_permute2x128_si256::<0x11>(sc16, sc16)];
        // −32·sc: the codes' offset, applied through the activations' sums of 16.
        let scn = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16::<5>(sc16));
        let mut iacc = [_mm256_setzero_si256(); M];
        for k in 0..M {
            iacc[k] = _mm256_madd_epi16(scn, _mm256_loadu_si256(bs[k].add(BS_PER_SB * b) as *const __m256i));
        }
        for h in 0..2 {
            let ql0 = _mm256_loadu_si256(blk.add(64 * h) as *const __m256i);
            let ql1 = _mm256_loadu_si256(blk.add(64 * h + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i);
            let q = [
                _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16::<4>(_mm256_and_si256(qh, _mm256_set1_epi8(3)))),
                _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_slli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(12)))),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4), _mm256_and_si256(qh, _mm256_set1_epi8(0x30))),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(qh), _mm256_set1_epi8(0x30)),
                ),
            ];
            for (r, q) in q.iter().enumerate() {
                let s = _mm256_shuffle_epi8(scv[h], _mm256_load_si256(SPLAT_PAIR.0[r].as_ptr() as *const __m256i));
                for k in 0..M {
                    let a = qa[k].add(256 * b + 128 * h + 32 * r);
                    iacc[k] = _mm256_add_epi32(iacc[k], _mm256_madd_epi16(_mm256_maddubs_epi16(*q, load(a)), s));
                }
            }
        }
        for k in 0..M {
            facc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[k]), _mm256_set1_ps(d * *da[k].add(b)), facc[k]);
        }
    }
    let mut r = [0f32; M];
    for k in 0..M {
        r[k] = hsum256(facc[k]);
    }
    r
}
