//! Attention for a single query row (a decode step) on AVX-512, shaped for memory rather
//! than for reuse across rows: each task takes one key/value head and one run of its keys,
//! and scores every query head that shares that key/value head in the same pass, so the
//! cache is read once per step however many query heads share it (grouped-query models
//! read it 3-7 times over otherwise). Splitting the keys gives every thread work even with
//! two or three key/value heads. Each task leaves, per query head, its run's unnormalized
//! output, score maximum and sum of exponentials; the runs are then merged.

use std::ops::Range;

use crate::attention::{with_scores, AttnShape, KvElem, KEY_BLOCK};
use crate::{executor, OutPtr};

/// Query heads per key/value head that this path takes (larger groups use the general one).
pub(crate) const MAX_GROUP: usize = 8;

/// Key blocks a task takes at the least: below that, handing out the task costs more than
/// reading the keys.
const MIN_BLOCKS_PER_TASK: usize = 8;

/// `s.t == 1`, `s.head_dim` a multiple of 16, at most [`MAX_GROUP`] query heads per
/// key/value head; layouts as [`crate::attention`]. The CPU must have AVX-512 F, BW, VL.
pub(crate) fn attention<T: KvElem>(s: &AttnShape, q: &[f32], k: &[T], v: &[T], out: &mut [f32]) {
    let (d, group) = (s.head_dim, s.heads / s.kv_heads);
    let keys = s.keys(0);
    if keys.is_empty() {
        out[..s.heads * d].fill(0.0);
        return;
    }
    let first = keys.start / KEY_BLOCK * KEY_BLOCK;
    let blocks = (keys.end - first).div_ceil(KEY_BLOCK);
    let exec = executor();
    // About four tasks per thread over all heads, each at least MIN_BLOCKS_PER_TASK blocks.
    let wanted = (4 * exec.threads).div_ceil(s.kv_heads).min(blocks.div_ceil(MIN_BLOCKS_PER_TASK)).max(1);
    let per_task = blocks.div_ceil(wanted);
    let runs = blocks.div_ceil(per_task);
    // Per (run, key/value head, query head of the group): d outputs, the maximum, the sum.
    let part_len = d + 2;
    let mut parts = vec![0f32; runs * s.heads * part_len];
    let parts_ptr = OutPtr(parts.as_mut_ptr());
    let task = |range: Range<usize>| {
        let base = &parts_ptr; // the whole OutPtr, not its raw field, is shared with the tasks
        with_scores(group * per_task * KEY_BLOCK, |scores| {
            for i in range {
                // Key/value heads vary fastest, so the first tasks spread over the heads.
                let (g, r) = (i % s.kv_heads, i / s.kv_heads);
                let start = first + r * per_task * KEY_BLOCK;
                let lo = keys.start.max(start);
                let hi = keys.end.min(start + per_task * KEY_BLOCK);
                let run = Run { kb: &k[(g * s.kv_stride + start) * d..], vr: &v[(g * s.kv_stride + start) * d..], skip: lo - start, n: hi - start };
                let qg = &q[g * group * d..][..group * d];
                // SAFETY: run r of head group g is written by this task only.
                let part = unsafe { std::slice::from_raw_parts_mut(base.0.add((r * s.heads + g * group) * part_len), group * part_len) };
                // SAFETY: the caller checked AVX-512; the run lies inside the cache.
                unsafe { x86::run_dispatch(group, qg, &run, d, s.scale, scores, part) };
            }
        })
    };
    let tasks = runs * s.kv_heads;
    if exec.threads <= 1 || tasks < 2 || s.heads * (keys.end - first) * d < 1 << 14 {
        task(0..tasks);
    } else {
        (exec.run)(tasks, &task);
    }
    merge(&parts, runs, s.heads, d, out);
}

/// One task's keys: `n` positions from a key block's start (`kb` at the block in the key
/// layout, `vr` at its first value row), of which the first `skip` are not seen.
struct Run<'a, T> {
    kb: &'a [T],
    vr: &'a [T],
    skip: usize,
    n: usize,
}

/// Each query head's output from its runs' partial results: the runs' sums rescaled to the
/// overall maximum.
fn merge(parts: &[f32], runs: usize, heads: usize, d: usize, out: &mut [f32]) {
    let part = |r: usize, h: usize| &parts[(r * heads + h) * (d + 2)..][..d + 2];
    for h in 0..heads {
        let max = (0..runs).map(|r| part(r, h)[d]).fold(f32::NEG_INFINITY, f32::max);
        let o = &mut out[h * d..(h + 1) * d];
        o.fill(0.0);
        let mut sum = 0f32;
        for r in 0..runs {
            let p = part(r, h);
            if p[d + 1] == 0.0 {
                continue; // a run with no visible key
            }
            let w = (p[d] - max).exp();
            sum += w * p[d + 1];
            o.iter_mut().zip(&p[..d]).for_each(|(o, a)| *o += w * a);
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|o| *o *= inv);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Run, MAX_GROUP};
    use crate::attention::{exp512, load16, KvElem, KEY_BLOCK};

    /// [`run`] with the group size as a constant, so its accumulators stay in registers.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn run_dispatch<T: KvElem>(group: usize, q: &[f32], r: &Run<T>, d: usize, scale: f32, scores: &mut [f32], part: &mut [f32]) {
        macro_rules! go {
            ($($g:literal)*) => {
                match group {
                    $($g => run::<$g, T>(q, r, d, scale, scores, part),)*
                    _ => unreachable!("groups of 1 to {MAX_GROUP} heads"),
                }
            };
        }
        go!(1 2 3 4 5 6 7 8)
    }

    /// The `G` query heads `q` (`G × d`) over one run of keys: per head, `d` unnormalized
    /// outputs, the score maximum and the sum of exponentials into `part` (`G × (d + 2)`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn run<const G: usize, T: KvElem>(q: &[f32], r: &Run<T>, d: usize, scale: f32, scores: &mut [f32], part: &mut [f32]) {
        let (qp, kp, vp) = (q.as_ptr(), r.kb.as_ptr(), r.vr.as_ptr());
        let width = r.n.next_multiple_of(KEY_BLOCK);
        let sp = scores.as_mut_ptr();
        // Scores, sixteen keys at a time, each key block read once for all G heads.
        let mut maxv = [_mm512_set1_ps(f32::NEG_INFINITY); G];
        for j in (0..r.n).step_by(KEY_BLOCK) {
            let kb = kp.add(j * d);
            let mut acc = [[_mm512_setzero_ps(); 2]; G];
            // Two chains per head, even and odd dimensions (d is a multiple of 16).
            for c in (0..d).step_by(2) {
                let (k0, k1) = (load16(kb.add(c * KEY_BLOCK)), load16(kb.add((c + 1) * KEY_BLOCK)));
                for (h, a) in acc.iter_mut().enumerate() {
                    a[0] = _mm512_fmadd_ps(_mm512_set1_ps(*qp.add(h * d + c)), k0, a[0]);
                    a[1] = _mm512_fmadd_ps(_mm512_set1_ps(*qp.add(h * d + c + 1)), k1, a[1]);
                }
            }
            let tail: __mmask16 = if r.n - j >= 16 { 0xffff } else { (1u16 << (r.n - j)) - 1 };
            let skipped: __mmask16 = if j == 0 { ((1u32 << r.skip) - 1) as u16 } else { 0 };
            let seen = tail & !skipped;
            for (h, a) in acc.iter().enumerate() {
                let s = _mm512_maskz_mov_ps(seen, _mm512_mul_ps(_mm512_add_ps(a[0], a[1]), _mm512_set1_ps(scale)));
                _mm512_storeu_ps(sp.add(h * width + j), s);
                maxv[h] = _mm512_mask_max_ps(maxv[h], seen, maxv[h], s);
            }
        }
        // Exponentials, unseen keys at exactly zero.
        let mut max = [0f32; G];
        for h in 0..G {
            max[h] = _mm512_reduce_max_ps(maxv[h]);
            let (m, mut sum) = (_mm512_set1_ps(max[h]), _mm512_setzero_ps());
            for j in (0..r.n).step_by(KEY_BLOCK) {
                let tail: __mmask16 = if r.n - j >= 16 { 0xffff } else { (1u16 << (r.n - j)) - 1 };
                let skipped: __mmask16 = if j == 0 { ((1u32 << r.skip) - 1) as u16 } else { 0 };
                let p = sp.add(h * width + j);
                let e = _mm512_maskz_mov_ps(tail & !skipped, exp512(_mm512_sub_ps(_mm512_loadu_ps(p), m)));
                _mm512_storeu_ps(p, e);
                sum = _mm512_add_ps(sum, e);
            }
            let out = part.as_mut_ptr().add(h * (d + 2));
            *out.add(d) = max[h];
            *out.add(d + 1) = if r.skip >= r.n { 0.0 } else { _mm512_reduce_add_ps(sum) };
        }
        // The weighted values, 32 output columns at a time, each value row read once.
        for c0 in (0..d).step_by(32) {
            let two = d - c0 >= 32;
            let mut acc = [[_mm512_setzero_ps(); 2]; G];
            for j in r.skip..r.n {
                let row = vp.add(j * d + c0);
                let v0 = load16(row);
                let v1 = if two { load16(row.add(16)) } else { _mm512_setzero_ps() };
                for (h, a) in acc.iter_mut().enumerate() {
                    let p = _mm512_set1_ps(*sp.add(h * width + j));
                    a[0] = _mm512_fmadd_ps(p, v0, a[0]);
                    a[1] = _mm512_fmadd_ps(p, v1, a[1]);
                }
            }
            for (h, a) in acc.iter().enumerate() {
                let out = part.as_mut_ptr().add(h * (d + 2) + c0);
                _mm512_storeu_ps(out, a[0]);
                if two {
                    _mm512_storeu_ps(out.add(16), a[1]);
                }
            }
        }
    }
}
