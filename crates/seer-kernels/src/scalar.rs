//! Portable kernels and the dequantizers. The dequantizers reproduce ggml's (and candle's)
//! float operations in the same order, so their output is bit-identical.

use crate::act::{Act, BS_PER_SB};
use crate::{drive, f16_to_f32, unpack_k4_scales, Job, OutPtr, QuantType, MAX_TILE};

pub(crate) fn dequantize(t: QuantType, src: &[u8], dst: &mut [f32]) {
    let bb = t.block_bytes();
    let bs = t.block_size();
    for (blk, y) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(bs)) {
        match t {
            QuantType::Q4_0 => {
                let d = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
                for j in 0..16 {
                    let x0 = (blk[2 + j] & 0x0f) as i16 - 8;
                    let x1 = (blk[2 + j] >> 4) as i16 - 8;
                    y[j] = x0 as f32 * d;
                    y[j + 16] = x1 as f32 * d;
                }
            }
            QuantType::Q8_0 => {
                let d = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
                for j in 0..32 {
                    y[j] = blk[2 + j] as i8 as f32 * d;
                }
            }
            QuantType::Q4K | QuantType::Q5K => {
                let d = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
                let dmin = f16_to_f32(u16::from_le_bytes([blk[2], blk[3]]));
                let (sc, m) = unpack_k4_scales(blk[4..16].try_into().unwrap());
                let (qh, qs) = if t == QuantType::Q5K { (&blk[16..48], &blk[48..176]) } else { (&[][..], &blk[16..144]) };
                for c in 0..4 {
                    let q = &qs[c * 32..(c + 1) * 32];
                    let d1 = d * ((sc >> (16 * c)) & 0xff) as f32;
                    let m1 = dmin * ((m >> (16 * c)) & 0xff) as f32;
                    let d2 = d * ((sc >> (16 * c + 8)) & 0xff) as f32;
                    let m2 = dmin * ((m >> (16 * c + 8)) & 0xff) as f32;
                    for l in 0..32 {
                        let (mut lo, mut hi) = ((q[l] & 0x0f) as f32, (q[l] >> 4) as f32);
                        if !qh.is_empty() {
                            if qh[l] & (1 << (2 * c)) != 0 {
                                lo += 16.0;
                            }
                            if qh[l] & (2 << (2 * c)) != 0 {
                                hi += 16.0;
                            }
                        }
                        y[64 * c + l] = d1 * lo - m1;
                        y[64 * c + 32 + l] = d2 * hi - m2;
                    }
                }
            }
            QuantType::Q6K => {
                let d = f16_to_f32(u16::from_le_bytes([blk[208], blk[209]]));
                for h in 0..2 {
                    let ql = &blk[64 * h..64 * h + 64];
                    let qh = &blk[128 + 32 * h..128 + 32 * h + 32];
                    let sc = &blk[192 + 8 * h..192 + 8 * h + 8];
                    let y = &mut y[128 * h..128 * h + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i8 - 32;
                        let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                        y[l] = d * sc[is] as i8 as f32 * q1 as f32;
                        y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
                        y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
                        y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
                    }
                }
            }
        }
    }
}

/// # Safety
/// See [`drive`].
pub(crate) unsafe fn run(job: &Job, act: &Act, r0: usize, r1: usize, i0: usize, i1: usize, out: OutPtr) {
    let nb = job.cols / job.t.block_size();
    let t = job.t;
    drive(job, r0, r1, i0, i1, out, MAX_TILE, |w, i, m| {
        let mut res = [0f32; MAX_TILE];
        for (k, r) in res.iter_mut().enumerate().take(m) {
            // SAFETY: `w` points at a whole row of `nb` blocks; `i + k` is a quantized row.
            let w = unsafe { std::slice::from_raw_parts(w, t.row_bytes(job.cols)) };
            *r = dot(t, w, nb, act, i + k);
        }
        res
    });
}

/// One weight row against activation row `i`.
fn dot(t: QuantType, w: &[u8], nb: usize, act: &Act, i: usize) -> f32 {
    let cols = act.cols;
    let a = &act.qs[i * cols..(i + 1) * cols];
    let ad = &act.d[i * act.nb..(i + 1) * act.nb];
    let mut sum = 0f32;
    match t {
        QuantType::Q4_0 | QuantType::Q8_0 => {
            let aux = &act.aux[i * act.nb * act.aux_stride..];
            for b in 0..nb {
                let blk = &w[b * t.block_bytes()..(b + 1) * t.block_bytes()];
                let a = &a[b * 32..(b + 1) * 32];
                let dw = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
                let isum = if t == QuantType::Q8_0 {
                    (0..32).map(|j| blk[2 + j] as i8 as i32 * a[j] as i32).sum::<i32>()
                } else {
                    // Codes 0..15 with the −8 offset folded into the activation correction.
                    let lo: i32 = (0..16).map(|j| (blk[2 + j] & 0x0f) as i32 * a[j] as i32).sum();
                    let hi: i32 = (0..16).map(|j| (blk[2 + j] >> 4) as i32 * a[j + 16] as i32).sum();
                    lo + hi + aux[b * act.aux_stride]
                };
                sum += isum as f32 * (dw * ad[b]);
            }
        }
        QuantType::Q4K | QuantType::Q5K => {
            let bs = &act.bs[i * act.nb * BS_PER_SB..];
            let five = t == QuantType::Q5K;
            for b in 0..nb {
                let blk = &w[b * t.block_bytes()..(b + 1) * t.block_bytes()];
                let d = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
                let dmin = f16_to_f32(u16::from_le_bytes([blk[2], blk[3]]));
                let (sc, m) = unpack_k4_scales(blk[4..16].try_into().unwrap());
                let (qh, qs) = if five { (&blk[16..48], &blk[48..176]) } else { (&[][..], &blk[16..144]) };
                let a = &a[b * 256..(b + 1) * 256];
                let mut isum = 0i32;
                for c in 0..4 {
                    let (mut lo, mut hi) = (0i32, 0i32);
                    for l in 0..32 {
                        let mut ql = (qs[32 * c + l] & 0x0f) as i32;
                        let mut qhi = (qs[32 * c + l] >> 4) as i32;
                        if five {
                            ql |= (((qh[l] >> (2 * c)) & 1) as i32) << 4;
                            qhi |= (((qh[l] >> (2 * c + 1)) & 1) as i32) << 4;
                        }
                        lo += ql * a[64 * c + l] as i32;
                        hi += qhi * a[64 * c + 32 + l] as i32;
                    }
                    isum += lo * ((sc >> (16 * c)) & 0xff) as i32 + hi * ((sc >> (16 * c + 8)) & 0xff) as i32;
                }
                let sums = &bs[b * BS_PER_SB + 16..b * BS_PER_SB + 24];
                let msum: i32 = (0..8).map(|j| ((m >> (8 * j)) & 0xff) as i32 * sums[j] as i32).sum();
                sum += ad[b] * d * isum as f32 - ad[b] * dmin * msum as f32;
            }
        }
        QuantType::Q6K => {
            let bs = &act.bs[i * act.nb * BS_PER_SB..];
            for b in 0..nb {
                let blk = &w[b * 210..(b + 1) * 210];
                let d = f16_to_f32(u16::from_le_bytes([blk[208], blk[209]]));
                let a = &a[b * 256..(b + 1) * 256];
                let mut isum = 0i32;
                for h in 0..2 {
                    let ql = &blk[64 * h..64 * h + 64];
                    let qh = &blk[128 + 32 * h..128 + 32 * h + 32];
                    let a = &a[128 * h..128 * h + 128];
                    let mut sub = [0i32; 8];
                    for l in 0..32 {
                        let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32;
                        let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32;
                        let is = l / 16;
                        sub[is] += q1 * a[l] as i32;
                        sub[is + 2] += q2 * a[l + 32] as i32;
                        sub[is + 4] += q3 * a[l + 64] as i32;
                        sub[is + 6] += q4 * a[l + 96] as i32;
                    }
                    for (j, s) in sub.iter().enumerate() {
                        isum += blk[192 + 8 * h + j] as i8 as i32 * s;
                    }
                }
                // The −32 offset of the codes, through the sums of 16 activations.
                let sums = &bs[b * BS_PER_SB..b * BS_PER_SB + 16];
                let corr: i32 = (0..16).map(|j| blk[192 + j] as i8 as i32 * sums[j] as i32).sum();
                isum -= 32 * corr;
                sum += d * ad[b] * isum as f32;
            }
        }
    }
    sum
}
