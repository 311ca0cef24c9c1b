//! Prefill (several activation rows) on AVX-512 VNNI: a GEMM over panels of 16 weight rows.
//!
//! Each task packs a panel of 16 weight rows, on the fly, into a small per-thread buffer
//! (no lasting copy of the weights): codes as unsigned bytes interleaved so that one 64-byte
//! vector holds 4 consecutive columns of each of the 16 rows, and per-row f32 scales per
//! (sub-)block. One `vpdpbusd` against 4 activation bytes broadcast to every lane then adds
//! 64 products into 16 per-row sums, with no horizontal reduction and no per-lane scale
//! shuffling; a tile of 8 activation rows reuses each packed vector 8 times. The codes'
//! offsets (Q8_0 stored +128, Q4_0's 8, Q6_K's 32) come back through the activations' sums,
//! Q4_K/Q5_K's mins likewise.

// Register arrays indexed by row and lane read best as index loops.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

// One f16 scale: the AVX2 version needs a subset of these features and inlines here.
use crate::avx2::f16s;
use std::cell::RefCell;

use crate::act::{Act, Layout};
use crate::{unpack_k4_scales, Job, OutPtr, QuantType};

/// Weight rows per panel: the 16 f32 lanes of a register.
pub(crate) const PANEL: usize = 16;
/// Activation rows per register tile.
const TILE: usize = 8;

pub(crate) fn layout(t: QuantType) -> Layout {
    match t {
        QuantType::Q4_0 => Layout::Q8 { group: 1, corr: -8, aux_stride: 1, dx_stride: 0 },
        QuantType::Q8_0 => Layout::Q8 { group: 1, corr: -128, aux_stride: 1, dx_stride: 0 },
        _ => Layout::K { swap_mid: false, sums: true },
    }
}

/// Bytes of one packed block (16 rows): the codes, then the scale vectors.
const fn packed_block_bytes(t: QuantType) -> usize {
    t.block_size() * PANEL + scale_vectors(t) * 64
}

const fn scale_vectors(t: QuantType) -> usize {
    match t {
        QuantType::Q4_0 | QuantType::Q8_0 => 1,
        // d·sc per sub-block, then dmin·m per sub-block.
        QuantType::Q4K | QuantType::Q5K => 16,
        // d·sc per sub-block of 16.
        QuantType::Q6K => 16,
    }
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

thread_local! {
    /// This thread's packed panel.
    static PACK: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
    /// This thread's copy of the panel's rows, read in order before packing.
    static STAGED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Weight rows `r0..r1` (`r0` a multiple of [`PANEL`]) against all activation rows.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL, VNNI; `out` as for [`crate::drive`].
pub(crate) unsafe fn run(job: &Job, act: &Act, r0: usize, r1: usize, out: OutPtr) {
    let nb = job.cols / job.t.block_size();
    let lines = nb * packed_block_bytes(job.t) / 64;
    crate::with_local(&PACK, |pack| {
        if pack.len() < lines {
            pack.resize(lines, Line([0; 64]));
        }
        let row_bytes = job.t.row_bytes(job.cols);
        let mut p0 = r0;
        while p0 < r1 {
            let valid = (r1 - p0).min(PANEL);
            // The panel's rows are one contiguous run: copy it in order (a stream the
            // hardware prefetchers follow), then pack from cache. Packing straight from
            // the map reads 16 rows side by side, strided streams they do not follow.
            let src = &job.w[p0 * row_bytes..(p0 + valid) * row_bytes];
            crate::with_local(&STAGED, |s| {
                s.clear();
                s.extend_from_slice(src);
                pack_panel(job.t, s.as_ptr(), row_bytes, valid, nb, pack.as_mut_ptr() as *mut u8);
            });
            let pk = pack.as_ptr() as *const u8;
            let mut i = 0;
            while i < job.n {
                let m = (job.n - i).min(TILE);
                let o = out.0.add(i * job.rows + p0);
                macro_rules! tile {
                    ($f:ident) => {
                        match m {
                            1 => $f::<1>(pk, nb, act, i, o, job.rows, valid),
                            2 => $f::<2>(pk, nb, act, i, o, job.rows, valid),
                            3 => $f::<3>(pk, nb, act, i, o, job.rows, valid),
                            4 => $f::<4>(pk, nb, act, i, o, job.rows, valid),
                            5 => $f::<5>(pk, nb, act, i, o, job.rows, valid),
                            6 => $f::<6>(pk, nb, act, i, o, job.rows, valid),
                            7 => $f::<7>(pk, nb, act, i, o, job.rows, valid),
                            _ => $f::<8>(pk, nb, act, i, o, job.rows, valid),
                        }
                    };
                }
                match job.t {
                    QuantType::Q4_0 | QuantType::Q8_0 => tile!(tile_q8),
                    QuantType::Q4K | QuantType::Q5K => tile!(tile_k4),
                    QuantType::Q6K => tile!(tile_k6),
                }
                i += m;
            }
            p0 += PANEL;
        }
    });
}

/// Packs `valid` rows (`row_bytes` apart) of `nb` blocks: per-row scales straight into
/// the packed blocks; codes decoded 64 columns at a time, one 512-bit register per row,
/// then transposed as 16×16 groups of 4 bytes so that each output register holds one
/// group of 4 columns for all 16 rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn pack_panel(t: QuantType, w: *const u8, row_bytes: usize, valid: usize, nb: usize, pack: *mut u8) {
    let bs = t.block_size();
    let pbb = packed_block_bytes(t);
    // Scales.
    for b in 0..nb {
        let sc = pack.add(b * pbb + bs * PANEL) as *mut f32;
        for r in 0..PANEL {
            if r < valid {
                scales(t, w.add(r * row_bytes + b * t.block_bytes()), sc.add(r));
            } else {
                for j in 0..scale_vectors(t) {
                    *sc.add(j * PANEL + r) = 0.0;
                }
            }
        }
    }
    // Codes, 64 columns (16 groups of 4) at a time.
    let cols = nb * bs;
    let groups_per_block = bs / 4;
    for chunk in 0..cols.div_ceil(64) {
        let mut v = [_mm512_setzero_si512(); PANEL];
        for (r, v) in v.iter_mut().enumerate().take(valid) {
            *v = codes64(t, w.add(r * row_bytes), chunk, nb);
        }
        let o = transpose16(v);
        for (c, o) in o.iter().enumerate() {
            let g = 16 * chunk + c;
            if 4 * g >= cols {
                break;
            }
            let dst = pack.add((g / groups_per_block) * pbb + (g % groups_per_block) * 64);
            _mm512_store_si512(dst as *mut __m512i, *o);
        }
    }
}

/// Transposes 16 registers of 16 dwords: output `c` holds dword `c` of every input.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4i + j], 128-bit lane L: dword 4L + j of rows 4i..4i + 4.
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    let mut o = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        let a = _mm512_shuffle_i32x4::<0x88>(u[j], u[4 + j]);
        let b = _mm512_shuffle_i32x4::<0xdd>(u[j], u[4 + j]);
        let c = _mm512_shuffle_i32x4::<0x88>(u[8 + j], u[12 + j]);
        let d = _mm512_shuffle_i32x4::<0xdd>(u[8 + j], u[12 + j]);
        o[j] = _mm512_shuffle_i32x4::<0x88>(a, c);
        o[8 + j] = _mm512_shuffle_i32x4::<0xdd>(a, c);
        o[4 + j] = _mm512_shuffle_i32x4::<0x88>(b, d);
        o[12 + j] = _mm512_shuffle_i32x4::<0xdd>(b, d);
    }
    o
}

/// One row's scales for one block, at `sc[j · 16]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn scales(t: QuantType, blk: *const u8, sc: *mut f32) {
    match t {
        QuantType::Q8_0 | QuantType::Q4_0 => *sc = f16s(blk),
        QuantType::Q4K | QuantType::Q5K => {
            let d = f16s(blk);
            let dmin = f16s(blk.add(2));
            let (s, m) = unpack_k4_scales(&*(blk.add(4) as *const [u8; 12]));
            for j in 0..8 {
                *sc.add(j * PANEL) = d * ((s >> (8 * j)) & 0xff) as f32;
                *sc.add((8 + j) * PANEL) = dmin * ((m >> (8 * j)) & 0xff) as f32;
            }
        }
        QuantType::Q6K => {
            let d = f16s(blk.add(208));
            for j in 0..16 {
                *sc.add(j * PANEL) = d * (*blk.add(192 + j) as i8) as f32;
            }
        }
    }
}

/// Columns `64·chunk..64·chunk + 64` of one row as unsigned codes (zero past the row's
/// `nb` blocks).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn codes64(t: QuantType, row: *const u8, chunk: usize, nb: usize) -> __m512i {
    let m4 = _mm256_set1_epi8(0x0f);
    let join = |lo: __m256i, hi: __m256i| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
    match t {
        QuantType::Q8_0 | QuantType::Q4_0 => {
            let half = |b: usize| -> __m256i {
                if b >= nb {
                    return _mm256_setzero_si256();
                }
                if t == QuantType::Q8_0 {
                    let q = _mm256_loadu_si256(row.add(34 * b + 2) as *const __m256i);
                    _mm256_xor_si256(q, _mm256_set1_epi8(-128))
                } else {
                    let x = _mm_loadu_si128(row.add(18 * b + 2) as *const __m128i);
                    let m = _mm_set1_epi8(0x0f);
                    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(x), m), _mm_and_si128(x, m))
                }
            };
            join(half(2 * chunk), half(2 * chunk + 1))
        }
        QuantType::Q4K | QuantType::Q5K => {
            let five = t == QuantType::Q5K;
            let (b, c) = (chunk / 4, chunk % 4);
            let blk = row.add(b * t.block_bytes());
            let q = _mm256_loadu_si256(blk.add(if five { 48 } else { 16 } + 32 * c) as *const __m256i);
            let mut lo = _mm256_and_si256(q, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
            if five {
                let hb = _mm256_srl_epi16(_mm256_loadu_si256(blk.add(16) as *const __m256i), _mm_cvtsi32_si128(2 * c as i32));
                lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(_mm256_and_si256(hb, _mm256_set1_epi8(1))));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16::<3>(_mm256_and_si256(hb, _mm256_set1_epi8(2))));
            }
            join(lo, hi)
        }
        QuantType::Q6K => {
            let (b, c) = (chunk / 4, chunk % 4);
            let (h, upper) = (c / 2, c % 2 == 1);
            let blk = row.add(b * 210);
            let ql0 = _mm256_loadu_si256(blk.add(64 * h) as *const __m256i);
            let ql1 = _mm256_loadu_si256(blk.add(64 * h + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i);
            if !upper {
                join(
                    _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16::<4>(_mm256_and_si256(qh, _mm256_set1_epi8(3)))),
                    _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_slli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(12)))),
                )
            } else {
                join(
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4), _mm256_and_si256(qh, _mm256_set1_epi8(0x30))),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), _mm256_set1_epi8(0x30)),
                    ),
                )
            }
        }
    }
}

#[inline(always)]
unsafe fn bcast(p: *const i8) -> __m512i {
    _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn store<const M: usize>(facc: &[__m512; M], o: *mut f32, rows: usize, valid: usize) {
    let mask: __mmask16 = if valid >= 16 { 0xffff } else { (1u16 << valid) - 1 };
    for (k, v) in facc.iter().enumerate() {
        _mm512_mask_storeu_ps(o.add(k * rows), mask, *v);
    }
}

/// Q4_0/Q8_0: blocks of 32, one scale vector per block.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_q8<const M: usize>(pk: *const u8, nb: usize, act: &Act, i: usize, o: *mut f32, rows: usize, valid: usize) {
    let mut qa = [std::ptr::null(); M];
    let mut da = [std::ptr::null(); M];
    let mut aux = [std::ptr::null(); M];
    for k in 0..M {
        qa[k] = act.qs(i + k);
        da[k] = act.d(i + k);
        aux[k] = act.aux(i + k);
    }
    let pbb = 32 * PANEL + 64;
    let mut facc = [_mm512_setzero_ps(); M];
    for b in 0..nb {
        let pb = pk.add(b * pbb);
        let mut acc = [_mm512_setzero_si512(); M];
        for k in 0..M {
            acc[k] = _mm512_set1_epi32(*aux[k].add(b));
        }
        for g in 0..8 {
            let wv = _mm512_load_si512(pb.add(64 * g) as *const __m512i);
            for k in 0..M {
                acc[k] = _mm512_dpbusd_epi32(acc[k], wv, bcast(qa[k].add(32 * b + 4 * g)));
            }
        }
        let dw = _mm512_load_ps(pb.add(32 * PANEL) as *const f32);
        for k in 0..M {
            let s = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[k]), _mm512_set1_ps(*da[k].add(b)));
            facc[k] = _mm512_fmadd_ps(dw, s, facc[k]);
        }
    }
    store(&facc, o, rows, valid);
}

/// Q4_K/Q5_K: super-blocks of 256, eight sub-blocks of 32 with a scale and a min each.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_k4<const M: usize>(pk: *const u8, nb: usize, act: &Act, i: usize, o: *mut f32, rows: usize, valid: usize) {
    let mut qa = [std::ptr::null(); M];
    let mut da = [std::ptr::null(); M];
    let mut sf = [std::ptr::null(); M];
    for k in 0..M {
        qa[k] = act.qs(i + k);
        da[k] = act.d(i + k);
        sf[k] = act.sf(i + k);
    }
    let pbb = 256 * PANEL + 16 * 64;
    let mut facc = [_mm512_setzero_ps(); M];
    for b in 0..nb {
        let pb = pk.add(b * pbb);
        let scales = pb.add(256 * PANEL) as *const f32;
        let mut tacc = [_mm512_setzero_ps(); M];
        for j in 0..8 {
            let mut acc = [_mm512_setzero_si512(); M];
            for g in 0..8 {
                let wv = _mm512_load_si512(pb.add(64 * (8 * j + g)) as *const __m512i);
                for k in 0..M {
                    acc[k] = _mm512_dpbusd_epi32(acc[k], wv, bcast(qa[k].add(256 * b + 32 * j + 4 * g)));
                }
            }
            let dsc = _mm512_load_ps(scales.add(PANEL * j));
            let dm = _mm512_load_ps(scales.add(PANEL * (8 + j)));
            for k in 0..M {
                tacc[k] = _mm512_fmadd_ps(dsc, _mm512_cvtepi32_ps(acc[k]), tacc[k]);
                tacc[k] = _mm512_fnmadd_ps(dm, _mm512_set1_ps(*sf[k].add(8 * b + j)), tacc[k]);
            }
        }
        for k in 0..M {
            facc[k] = _mm512_fmadd_ps(tacc[k], _mm512_set1_ps(*da[k].add(b)), facc[k]);
        }
    }
    store(&facc, o, rows, valid);
}

/// Q6_K: super-blocks of 256, sixteen sub-blocks of 16 with an i8 scale each; codes 0-63
/// stand for −32..31, the offset starting each sub-block's sums.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_k6<const M: usize>(pk: *const u8, nb: usize, act: &Act, i: usize, o: *mut f32, rows: usize, valid: usize) {
    let mut qa = [std::ptr::null(); M];
    let mut da = [std::ptr::null(); M];
    let mut si = [std::ptr::null(); M];
    for k in 0..M {
        qa[k] = act.qs(i + k);
        da[k] = act.d(i + k);
        si[k] = act.si(i + k);
    }
    let pbb = 256 * PANEL + 16 * 64;
    let mut facc = [_mm512_setzero_ps(); M];
    for b in 0..nb {
        let pb = pk.add(b * pbb);
        let scales = pb.add(256 * PANEL) as *const f32;
        let mut tacc = [_mm512_setzero_ps(); M];
        for j in 0..16 {
            let mut acc = [_mm512_setzero_si512(); M];
            for k in 0..M {
                acc[k] = _mm512_set1_epi32(*si[k].add(16 * b + j));
            }
            for g in 0..4 {
                let wv = _mm512_load_si512(pb.add(64 * (4 * j + g)) as *const __m512i);
                for k in 0..M {
                    acc[k] = _mm512_dpbusd_epi32(acc[k], wv, bcast(qa[k].add(256 * b + 16 * j + 4 * g)));
                }
            }
            let dsc = _mm512_load_ps(scales.add(PANEL * j));
            for k in 0..M {
                tacc[k] = _mm512_fmadd_ps(dsc, _mm512_cvtepi32_ps(acc[k]), tacc[k]);
            }
        }
        for k in 0..M {
            facc[k] = _mm512_fmadd_ps(tacc[k], _mm512_set1_ps(*da[k].add(b)), facc[k]);
        }
    }
    store(&facc, o, rows, valid);
}
