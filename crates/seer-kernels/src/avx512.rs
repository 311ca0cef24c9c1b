//! AVX-512 (F, BW, VL, VNNI) kernels. Q4_0/Q8_0 use 256-bit `vpdpbusd` per block (unsigned
//! weight codes × signed activations, the offset folded into the accumulator's start); the
//! k-quants use 512-bit registers, `vpmaddubsw` then `vpdpwssd` with per-lane sub-block
//! scales (so a scale costs no extra instruction), one super-block per iteration.

// Register arrays indexed by row and lane read best as index loops.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

// One f16 scale: the AVX2 version needs a subset of these features and inlines here.
use crate::avx2::f16s;

use crate::act::{Act, Layout, BS_PER_SB};
use crate::avx2::{hsum256, rows, widen, Rows};
use crate::{drive, read_u16, unpack_k4_scales, Job, OutPtr, QuantType, MAX_TILE};

pub(crate) fn layout(t: QuantType) -> Layout {
    match t {
        // Runs of four blocks: one 512-bit register of low nibbles, one of high.
        QuantType::Q4_0 => Layout::Q8 { group: 4, corr: -8, aux_stride: 4, dx_stride: 4 },
        // Pairs of blocks per register. Codes are flipped to unsigned (q ^ 0x80 = q + 128):
        // subtract 128·Σa.
        QuantType::Q8_0 => Layout::Q8 { group: 1, corr: -128, aux_stride: 8, dx_stride: 8 },
        QuantType::Q4K | QuantType::Q5K => Layout::K { swap_mid: true, sums: false },
        QuantType::Q6K => Layout::K { swap_mid: false, sums: false },
    }
}

/// # Safety
/// See [`drive`]; the CPU must have the AVX2 set and AVX-512 F, BW, VL and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn run(job: &Job, act: &Act, r0: usize, r1: usize, i0: usize, i1: usize, out: OutPtr) {
    let nb = job.cols / job.t.block_size();
    let row_bytes = job.t.row_bytes(job.cols);
    let at = |r: usize| OutPtr(out.0.add(i0 * job.rows + r));
    macro_rules! go {
        ($k:ident $(, $c:literal)?) => {{
            if i1 - i0 == 1 {
                // Decode: rows r and r + half as two long sequential streams, which the
                // hardware prefetchers follow (adjacent rows interleaved within pages defeat
                // them), all in one call so its setup and constants are paid once per range.
                let half = (r1 - r0) / 2;
                let (lo, hi) = (at(r0), at(r0 + half));
                let walk = Walk { w: job.w.as_ptr().add(r0 * row_bytes), stride: half * row_bytes, step: row_bytes, count: half };
                $k::<2, 1 $(, $c)?>(walk, nb, act, i0, |g, v| {
                    *lo.0.add(g) = v[0][0];
                    *hi.0.add(g) = v[1][0];
                });
                if (r1 - r0) % 2 == 1 {
                    let last = at(r1 - 1);
                    $k::<1, 1 $(, $c)?>(Walk::one(job.w.as_ptr().add((r1 - 1) * row_bytes)), nb, act, i0, |_, v| *last.0 = v[0][0]);
                }
                return;
            }
            drive(job, r0, r1, i0, i1, out, MAX_TILE, |w, i, m| unsafe {
                let w = Walk::one(w);
                let mut o = [0f32; MAX_TILE];
                match m {
                    1 => $k::<1, 1 $(, $c)?>(w, nb, act, i, |_, v| o = widen(v[0])),
                    2 => $k::<1, 2 $(, $c)?>(w, nb, act, i, |_, v| o = widen(v[0])),
                    3 => $k::<1, 3 $(, $c)?>(w, nb, act, i, |_, v| o = widen(v[0])),
                    _ => $k::<1, 4 $(, $c)?>(w, nb, act, i, |_, v| o = widen(v[0])),
                }
                o
            })
        }};
    }
    match job.t {
        QuantType::Q4_0 => go!(q4_0),
        QuantType::Q8_0 => go!(q8_0),
        QuantType::Q4K => go!(q4k, false),
        QuantType::Q5K => go!(q4k, true),
        QuantType::Q6K => go!(q6k),
    }
}

/// The weight rows one kernel call covers: `count` groups of `NR` rows, group `g` starting
/// at `w + g·step`, its rows `stride` bytes apart. The kernel hands each group's dot
/// products to its `emit`.
#[derive(Clone, Copy)]
struct Walk {
    w: *const u8,
    stride: usize,
    step: usize,
    count: usize,
}

impl Walk {
    fn one(w: *const u8) -> Walk {
        Walk { w, stride: 0, step: 0, count: 1 }
    }
}

/// The lane sums of each accumulator. Two rows' registers are folded together, sharing
/// the shuffles (a decode step ends a row every few blocks).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn sums<const NR: usize, const M: usize>(acc: [[__m512; M]; NR]) -> [[f32; M]; NR] {
    let mut r = [[0f32; M]; NR];
    for k in 0..M {
        if NR == 2 {
            (r[0][k], r[1][k]) = sum2(acc[0][k], acc[1][k]);
        } else {
            for j in 0..NR {
                r[j][k] = _mm512_reduce_add_ps(acc[j][k]);
            }
        }
    }
    r
}

/// The lane sums of `a` and of `b`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn sum2(a: __m512, b: __m512) -> (f32, f32) {
    // 128-bit quarters: [a0 + a2, a1 + a3, b0 + b2, b1 + b3], then [a, b] in the low half.
    let s = _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(a, b), _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b));
    let t = _mm512_add_ps(s, _mm512_shuffle_f32x4::<0b10_11_00_01>(s, s));
    let v = _mm512_castps512_ps256(_mm512_shuffle_f32x4::<0b00_00_10_00>(t, t));
    // Within each 128-bit lane: two horizontal adds leave the lane's sum everywhere.
    let h = _mm256_hadd_ps(v, v);
    let h = _mm256_hadd_ps(h, h);
    (_mm256_cvtss_f32(h), _mm_cvtss_f32(_mm256_extractf128_ps::<1>(h)))
}

#[inline(always)]
unsafe fn load(p: *const i8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

#[inline(always)]
unsafe fn load512(p: *const i8) -> __m512i {
    _mm512_loadu_si512(p as *const __m512i)
}

/// The two f16 at `p` (a k-quant's `d` and `dmin`) as f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn f16x2(p: *const u8) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// For each group of `walk`: its `NR` weight rows against activation rows `i..i + M`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0<const NR: usize, const M: usize>(walk: Walk, nb: usize, act: &Act, i: usize, mut emit: impl FnMut(usize, [[f32; M]; NR])) {
    let Rows { q: qa, d: da, aux, dx, .. } = rows::<M>(act, i, false);
    let flip = _mm512_set1_epi8(-128);
    for group in 0..walk.count {
        let (w, stride) = (walk.w.add(group * walk.step), walk.stride);
        let mut acc = [[_mm512_setzero_ps(); M]; NR];
        // Two blocks per register: lanes 0-7 the first, 8-15 the second.
        for p in 0..nb / 2 {
            let mut wq = [_mm512_setzero_si512(); NR];
            let mut dw = [_mm512_setzero_ps(); NR];
            for j in 0..NR {
                let b0 = w.add(j * stride + 68 * p);
                let b1 = b0.add(34);
                let v = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_loadu_si256(b0.add(2) as *const __m256i)),
                    _mm256_loadu_si256(b1.add(2) as *const __m256i),
                );
                wq[j] = _mm512_xor_si512(v, flip);
                dw[j] = _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16(read_u16(b1) as i16), _mm_set1_epi16(read_u16(b0) as i16)));
            }
            for k in 0..M {
                let a = load512(qa[k].add(64 * p));
                let start = _mm512_loadu_si512(aux[k].add(16 * p) as *const __m512i);
                let dxv = _mm512_loadu_ps(dx[k].add(16 * p));
                for j in 0..NR {
                    let s32 = _mm512_dpbusd_epi32(start, wq[j], a);
                    acc[j][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s32), _mm512_mul_ps(dw[j], dxv), acc[j][k]);
                }
            }
        }
        let mut r = sums(acc);
        if nb % 2 == 1 {
            let b = nb - 1;
            for j in 0..NR {
                let blk = w.add(j * stride + 34 * b);
                let dw = f16s(blk);
                let wq = _mm256_xor_si256(_mm256_loadu_si256(blk.add(2) as *const __m256i), _mm256_set1_epi8(-128));
                for k in 0..M {
                    let start = _mm256_zextsi128_si256(_mm_cvtsi32_si128(*aux[k].add(8 * b)));
                    let s32 = _mm256_dpbusd_epi32(start, wq, load(qa[k].add(32 * b)));
                    r[j][k] += hsum256(_mm256_cvtepi32_ps(s32)) * (dw * *da[k].add(b));
                }
            }
        }
        emit(group, r);
    }
}

#[repr(align(32))]
struct Idx16([i16; 16]);
/// Spreads words 0-3 over four lanes each.
static QUAD_IDX: Idx16 = Idx16([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]);

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_0<const NR: usize, const M: usize>(walk: Walk, nb: usize, act: &Act, i: usize, mut emit: impl FnMut(usize, [[f32; M]; NR])) {
    let Rows { q: qa, d: da, aux, dx, .. } = rows::<M>(act, i, false);
    let m4 = _mm512_set1_epi8(0x0f);
    let quad = _mm256_load_si256(QUAD_IDX.0.as_ptr() as *const __m256i);
    for group in 0..walk.count {
        let (w, stride) = (walk.w.add(group * walk.step), walk.stride);
        let mut acc = [[_mm512_setzero_ps(); M]; NR];
        // Four blocks per register pair: the low nibbles of blocks 0-3, then their high nibbles;
        // lanes 4j..4j + 4 of the sums belong to block j.
        for g in 0..nb / 4 {
            let mut lo = [_mm512_setzero_si512(); NR];
            let mut hi = [_mm512_setzero_si512(); NR];
            let mut dw = [_mm512_setzero_ps(); NR];
            for j in 0..NR {
                let b = w.add(j * stride + 72 * g);
                let lo2 = _mm256_inserti128_si256::<1>(
                    _mm256_castsi128_si256(_mm_loadu_si128(b.add(2) as *const __m128i)),
                    _mm_loadu_si128(b.add(20) as *const __m128i),
                );
                let hi2 = _mm256_inserti128_si256::<1>(
                    _mm256_castsi128_si256(_mm_loadu_si128(b.add(38) as *const __m128i)),
                    _mm_loadu_si128(b.add(56) as *const __m128i),
                );
                let y = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo2), hi2);
                lo[j] = _mm512_and_si512(y, m4);
                hi[j] = _mm512_and_si512(_mm512_srli_epi16::<4>(y), m4);
                let ds = _mm_setr_epi16(
                    read_u16(b) as i16,
                    read_u16(b.add(18)) as i16,
                    read_u16(b.add(36)) as i16,
                    read_u16(b.add(54)) as i16,
                    0,
                    0,
                    0,
                    0,
                );
                dw[j] = _mm512_cvtph_ps(_mm256_permutexvar_epi16(quad, _mm256_castsi128_si256(ds)));
            }
            for k in 0..M {
                let a = qa[k].add(128 * g);
                let (a0, a1) = (load512(a), load512(a.add(64)));
                let start = _mm512_loadu_si512(aux[k].add(16 * g) as *const __m512i);
                let dxv = _mm512_loadu_ps(dx[k].add(16 * g));
                for j in 0..NR {
                    let s32 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, lo[j], a0), hi[j], a1);
                    acc[j][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s32), _mm512_mul_ps(dw[j], dxv), acc[j][k]);
                }
            }
        }
        let mut r = sums(acc);
        // The last 1-3 blocks, natural order.
        let m4 = _mm_set1_epi8(0x0f);
        for b in nb / 4 * 4..nb {
            for j in 0..NR {
                let blk = w.add(j * stride + 18 * b);
                let x = _mm_loadu_si128(blk.add(2) as *const __m128i);
                let y = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(x), m4), _mm_and_si128(x, m4));
                let dw = f16s(blk);
                for k in 0..M {
                    let start = _mm256_zextsi128_si256(_mm_cvtsi32_si128(*aux[k].add(4 * b)));
                    let s32 = _mm256_dpbusd_epi32(start, y, load(qa[k].add(32 * b)));
                    r[j][k] += hsum256(_mm256_cvtepi32_ps(s32)) * (dw * *da[k].add(b));
                }
            }
        }
        emit(group, r);
    }
}

#[repr(align(64))]
struct Bytes([[u8; 64]; 4]);

/// `vpshufb` controls spreading the i16 scale of each sub-block over the lanes of the
/// register holding it (the eight scales are broadcast to every 128-bit lane). Q4_K/Q5_K:
/// a 64-byte load of codes holds, in its low nibbles, sub-blocks 4h and 4h + 2 (i16 lanes
/// 0-15, 16-31), in its high nibbles 4h + 1 and 4h + 3.
static K4_SHUF: Bytes = {
    let mut t = [[0u8; 64]; 4];
    let mut r = 0;
    while r < 4 {
        let base = (r / 2) * 4 + r % 2;
        let mut b = 0;
        while b < 64 {
            let sub = base + 2 * (b / 32);
            t[r][b] = (2 * sub + b % 2) as u8;
            b += 1;
        }
        r += 1;
    }
    Bytes(t)
};

/// Q5_K: which bit of the broadcast `qh` bytes is the fifth bit of each lane of the four
/// registers (low/high nibbles of codes 0-63, then 64-127).
static Q5_BITS: Bytes = {
    let mut t = [[0u8; 64]; 4];
    let mut r = 0;
    while r < 4 {
        // Register r covers chunks 2(r/2) and 2(r/2)+1 (64 values each); its nibble
        // (r % 2) picks bit 2·chunk + nibble.
        let mut l = 0;
        while l < 64 {
            let chunk = 2 * (r / 2) + l / 32;
            t[r][l] = 1u8 << (2 * chunk + r % 2);
            l += 1;
        }
        r += 1;
    }
    Bytes(t)
};

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k<const NR: usize, const M: usize, const FIVE: bool>(
    walk: Walk,
    nb: usize,
    act: &Act,
    i: usize,
    mut emit: impl FnMut(usize, [[f32; M]; NR]),
) {
    let Rows { q: qa, d: da, bs, .. } = rows::<M>(act, i, true);
    let bb = if FIVE { 176 } else { 144 };
    let m4 = _mm512_set1_epi8(0x0f);
    let shuf = [
        _mm512_load_si512(K4_SHUF.0[0].as_ptr() as *const __m512i),
        _mm512_load_si512(K4_SHUF.0[1].as_ptr() as *const __m512i),
        _mm512_load_si512(K4_SHUF.0[2].as_ptr() as *const __m512i),
        _mm512_load_si512(K4_SHUF.0[3].as_ptr() as *const __m512i),
    ];
    for group in 0..walk.count {
        let (w, stride) = (walk.w.add(group * walk.step), walk.stride);
        let mut facc = [[_mm512_setzero_ps(); M]; NR];
        let mut macc = [[_mm_setzero_ps(); M]; NR];
        for b in 0..nb {
            let mut q = [[_mm512_setzero_si512(); 4]; NR];
            let mut s = [[_mm512_setzero_si512(); 4]; NR];
            let mut mn16 = [_mm_setzero_si128(); NR];
            let mut dd = [(0f32, 0f32); NR];
            for j in 0..NR {
                let blk = w.add(j * stride + bb * b);
                dd[j] = f16x2(blk);
                let (sc, mn) = unpack_k4_scales(&*(blk.add(4) as *const [u8; 12]));
                let scb = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
                for r in 0..4 {
                    s[j][r] = _mm512_shuffle_epi8(scb, shuf[r]);
                }
                mn16[j] = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
                let qs = blk.add(if FIVE { 48 } else { 16 });
                let qa0 = _mm512_loadu_si512(qs as *const __m512i);
                let qa1 = _mm512_loadu_si512(qs.add(64) as *const __m512i);
                q[j] = [
                    _mm512_and_si512(qa0, m4),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(qa0), m4),
                    _mm512_and_si512(qa1, m4),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(qa1), m4),
                ];
                if FIVE {
                    let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(blk.add(16) as *const __m256i));
                    let sixteen = _mm512_set1_epi8(16);
                    for r in 0..4 {
                        let bits = _mm512_load_si512(Q5_BITS.0[r].as_ptr() as *const __m512i);
                        q[j][r] = _mm512_mask_add_epi8(q[j][r], _mm512_test_epi8_mask(qh, bits), q[j][r], sixteen);
                    }
                }
            }
            for k in 0..M {
                let a = qa[k].add(256 * b);
                let av = [load512(a), load512(a.add(64)), load512(a.add(128)), load512(a.add(192))];
                let sums = _mm_loadu_si128(bs[k].add(BS_PER_SB * b + 16) as *const __m128i);
                let dak = *da[k].add(b);
                for j in 0..NR {
                    let mut acc0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_maddubs_epi16(q[j][0], av[0]), s[j][0]);
                    acc0 = _mm512_dpwssd_epi32(acc0, _mm512_maddubs_epi16(q[j][1], av[1]), s[j][1]);
                    let mut acc1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_maddubs_epi16(q[j][2], av[2]), s[j][2]);
                    acc1 = _mm512_dpwssd_epi32(acc1, _mm512_maddubs_epi16(q[j][3], av[3]), s[j][3]);
                    let acc = _mm512_add_epi32(acc0, acc1);
                    facc[j][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(dd[j].0 * dak), facc[j][k]);
                    let mins = _mm_cvtepi32_ps(_mm_madd_epi16(mn16[j], sums));
                    macc[j][k] = _mm_fmadd_ps(mins, _mm_set1_ps(dd[j].1 * dak), macc[j][k]);
                }
            }
        }
        // The mins' share goes into the first four lanes, so one sum per row remains.
        for j in 0..NR {
            for k in 0..M {
                facc[j][k] = _mm512_sub_ps(facc[j][k], _mm512_zextps128_ps512(macc[j][k]));
            }
        }
        let r = sums(facc);
        emit(group, r);
    }
}

/// Q6_K: register r (low nibbles of half 0, high of half 0, low of half 1, high of half 1)
/// holds sub-blocks of 16 numbered 4r..4r + 4, eight i16 lanes (one 128-bit lane) each;
/// scales 0-7 are broadcast to every 128-bit lane of one register, 8-15 of another.
static K6_SHUF: Bytes = {
    let mut t = [[0u8; 64]; 4];
    let mut r = 0;
    while r < 4 {
        let mut b = 0;
        while b < 64 {
            let sub = (4 * r + b / 16) % 8;
            t[r][b] = (2 * sub + b % 2) as u8;
            b += 1;
        }
        r += 1;
    }
    Bytes(t)
};

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q6k<const NR: usize, const M: usize>(walk: Walk, nb: usize, act: &Act, i: usize, mut emit: impl FnMut(usize, [[f32; M]; NR])) {
    let Rows { q: qa, d: da, bs, .. } = rows::<M>(act, i, true);
    let m4 = _mm512_set1_epi8(0x0f);
    let m30 = _mm512_set1_epi8(0x30);
    let shuf = [
        _mm512_load_si512(K6_SHUF.0[0].as_ptr() as *const __m512i),
        _mm512_load_si512(K6_SHUF.0[1].as_ptr() as *const __m512i),
        _mm512_load_si512(K6_SHUF.0[2].as_ptr() as *const __m512i),
        _mm512_load_si512(K6_SHUF.0[3].as_ptr() as *const __m512i),
    ];
    // Per 16-bit word: the first 32 bytes of a register take the qh bits at 0-1 (low
    // nibbles) or 4-5 (high), the last 32 bytes those at 2-3 or 6-7.
    let shl = _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(2));
    let shr = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(2));
    for group in 0..walk.count {
        let (w, stride) = (walk.w.add(group * walk.step), walk.stride);
        let mut facc = [[_mm512_setzero_ps(); M]; NR];
        for b in 0..nb {
            let mut q = [[_mm512_setzero_si512(); 4]; NR];
            let mut s = [[_mm512_setzero_si512(); 4]; NR];
            let mut scn = [_mm256_setzero_si256(); NR];
            let mut d = [0f32; NR];
            for j in 0..NR {
                let blk = w.add(j * stride + 210 * b);
                d[j] = f16s(blk.add(208));
                let sc8 = _mm_loadu_si128(blk.add(192) as *const __m128i);
                let sc16 = _mm256_cvtepi8_epi16(sc8);
                let lo = _mm512_broadcast_i32x4(_mm256_castsi256_si128(sc16));
                let hi = _mm512_broadcast_i32x4(_mm256_extracti128_si256::<1>(sc16));
                s[j] = [
                    _mm512_shuffle_epi8(lo, shuf[0]),
                    _mm512_shuffle_epi8(lo, shuf[1]),
                    _mm512_shuffle_epi8(hi, shuf[2]),
                    _mm512_shuffle_epi8(hi, shuf[3]),
                ];
                // −32·sc: the codes' offset, applied through the activations' sums of 16.
                scn[j] = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16::<5>(sc16));
                for h in 0..2 {
                    let ql = _mm512_loadu_si512(blk.add(64 * h) as *const __m512i);
                    let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i));
                    let hl = _mm512_and_si512(_mm512_sllv_epi16(qh, shl), m30);
                    let hh = _mm512_and_si512(_mm512_srlv_epi16(qh, shr), m30);
                    // (a & b) | c
                    q[j][2 * h] = _mm512_ternarylogic_epi32::<0xea>(ql, m4, hl);
                    q[j][2 * h + 1] = _mm512_ternarylogic_epi32::<0xea>(_mm512_srli_epi16::<4>(ql), m4, hh);
                }
            }
            for k in 0..M {
                let a = qa[k].add(256 * b);
                let av = [load512(a), load512(a.add(64)), load512(a.add(128)), load512(a.add(192))];
                let sums = _mm256_loadu_si256(bs[k].add(BS_PER_SB * b) as *const __m256i);
                let dak = *da[k].add(b);
                for j in 0..NR {
                    let start = _mm512_zextsi256_si512(_mm256_madd_epi16(scn[j], sums));
                    let mut acc0 = _mm512_dpwssd_epi32(start, _mm512_maddubs_epi16(q[j][0], av[0]), s[j][0]);
                    acc0 = _mm512_dpwssd_epi32(acc0, _mm512_maddubs_epi16(q[j][1], av[1]), s[j][1]);
                    let mut acc1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_maddubs_epi16(q[j][2], av[2]), s[j][2]);
                    acc1 = _mm512_dpwssd_epi32(acc1, _mm512_maddubs_epi16(q[j][3], av[3]), s[j][3]);
                    let acc = _mm512_add_epi32(acc0, acc1);
                    facc[j][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(d[j] * dak), facc[j][k]);
                }
            }
        }
        let r = sums(facc);
        emit(group, r);
    }
}
