//! Every weight type on every path this CPU has, against a plain reference: the weights
//! dequantized with `dequantize_row`, the activations quantized and dequantized as the
//! kernels quantize them, and an f64 dot product. The dequantizer itself is checked
//! bit for bit against candle's.

use candle_core::quantized::{ggml_file, GgmlDType};
use candle_core::Device;
use seer_kernels::{available_isas, dequantize_row, matmul_with, quantize_dequantize_activations, Isa, QuantType};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn byte(&mut self) -> u8 {
        (self.next() >> 56) as u8
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

/// `blocks` valid blocks of type `t`: random codes (every bit pattern, -128 included for
/// Q8_0), scales of either sign and sane magnitude.
fn random_blocks(t: QuantType, blocks: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks * t.block_bytes());
    for _ in 0..blocks {
        let mut blk: Vec<u8> = (0..t.block_bytes()).map(|_| rng.byte()).collect();
        match t {
            QuantType::Q4_0 | QuantType::Q8_0 => blk[..2].copy_from_slice(&f16_bytes(rng.unit() * 0.05)),
            QuantType::Q4K | QuantType::Q5K => {
                blk[..2].copy_from_slice(&f16_bytes(rng.unit() * 0.01));
                blk[2..4].copy_from_slice(&f16_bytes(rng.unit() * 0.02));
            }
            QuantType::Q6K => blk[208..].copy_from_slice(&f16_bytes(rng.unit() * 0.01)),
        }
        out.extend_from_slice(&blk);
    }
    out
}

fn random_acts(len: usize, rng: &mut Rng) -> Vec<f32> {
    // Mostly small with a few outliers, as real activations are.
    (0..len).map(|_| if rng.below(50) == 0 { rng.unit() * 20.0 } else { rng.unit() }).collect()
}

/// `out[i][r]` in f64, and the scale of its terms (Σ|w·a|) for the tolerance.
fn reference(t: QuantType, w: &[u8], rows: usize, cols: usize, x: &[f32], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut wf = vec![0f32; rows * cols];
    for r in 0..rows {
        let rb = t.row_bytes(cols);
        dequantize_row(t, &w[r * rb..(r + 1) * rb], &mut wf[r * cols..(r + 1) * cols]);
    }
    let mut xq = vec![0f32; n * cols];
    quantize_dequantize_activations(t, x, cols, &mut xq);
    let mut out = vec![0f64; n * rows];
    let mut mag = vec![0f64; n * rows];
    for i in 0..n {
        for r in 0..rows {
            let (a, b) = (&xq[i * cols..(i + 1) * cols], &wf[r * cols..(r + 1) * cols]);
            out[i * rows + r] = a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum();
            mag[i * rows + r] = a.iter().zip(b).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
        }
    }
    (out, mag)
}

fn check(isa: Isa, t: QuantType, rows: usize, cols: usize, n: usize, rng: &mut Rng) {
    let w = random_blocks(t, rows * cols / t.block_size(), rng);
    let x = random_acts(n * cols, rng);
    let (want, mag) = reference(t, &w, rows, cols, &x, n);
    let mut got = vec![f32::NAN; n * rows];
    matmul_with(isa, t, &w, rows, cols, &x, n, &mut got);
    for (j, ((&g, &w), &m)) in got.iter().zip(&want).zip(&mag).enumerate() {
        let tol = 2e-6 * m + 1e-30;
        assert!(
            (g as f64 - w).abs() <= tol,
            "{} {}: rows {rows} cols {cols} n {n}: out[{}][{}] = {g}, reference {w} (|diff| {} > {tol})",
            isa.name(),
            t.name(),
            j / rows,
            j % rows,
            (g as f64 - w).abs()
        );
    }
}

#[test]
fn matmul_matches_reference_on_every_type_and_path() {
    let isas = available_isas();
    eprintln!("paths on this CPU: {:?}", isas);
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for isa in isas {
        for t in QuantType::ALL {
            let bs = t.block_size();
            // Ragged shapes: odd row counts (and not whole panels of 16), 1-4 blocks (odd
            // counts for Q4_0's runs of blocks), 1-7 activation rows (tiles of 4 plus a
            // remainder), then 8-20 (the packed GEMM: tiles of 8 plus a remainder).
            for _ in 0..40 {
                let rows = 1 + rng.below(37);
                let cols = bs * (1 + rng.below(4));
                let n = 1 + rng.below(7);
                check(isa, t, rows, cols, n, &mut rng);
            }
            for _ in 0..12 {
                let rows = 1 + rng.below(50);
                let cols = bs * (1 + rng.below(4));
                let n = 8 + rng.below(13);
                check(isa, t, rows, cols, n, &mut rng);
            }
            // Large enough to run on the thread pool, with more activation rows than a panel.
            check(isa, t, 301, 4 * bs.max(256), 3, &mut rng);
            check(isa, t, 97, 2 * bs, 70, &mut rng);
            check(isa, t, 513, 8 * bs, 1, &mut rng);
        }
    }
}

#[test]
fn all_zero_activations_give_zero() {
    let mut rng = Rng(7);
    for isa in available_isas() {
        for t in QuantType::ALL {
            let cols = t.block_size() * 2;
            let w = random_blocks(t, 5 * 2, &mut rng);
            let x = vec![0f32; 2 * cols];
            let mut out = vec![f32::NAN; 2 * 5];
            matmul_with(isa, t, &w, 5, cols, &x, 2, &mut out);
            assert!(out.iter().all(|&v| v == 0.0), "{} {}: {out:?}", isa.name(), t.name());
        }
    }
}

fn candle_dtype(t: QuantType) -> GgmlDType {
    match t {
        QuantType::Q4_0 => GgmlDType::Q4_0,
        QuantType::Q8_0 => GgmlDType::Q8_0,
        QuantType::Q4K => GgmlDType::Q4K,
        QuantType::Q5K => GgmlDType::Q5K,
        QuantType::Q6K => GgmlDType::Q6K,
    }
}

#[test]
fn dequantize_row_is_bit_identical_to_candle() {
    let mut rng = Rng(42);
    for t in QuantType::ALL {
        assert_eq!(t.block_bytes(), candle_dtype(t).type_size(), "{}", t.name());
        assert_eq!(t.block_size(), candle_dtype(t).block_size(), "{}", t.name());
        let (rows, cols) = (7, t.block_size() * 3);
        let bytes = random_blocks(t, rows * 3, &mut rng);
        let q = ggml_file::qtensor_from_ggml(candle_dtype(t), &bytes, vec![rows, cols], &Device::Cpu).unwrap();
        let want: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let mut got = vec![0f32; rows * cols];
        for r in 0..rows {
            let rb = t.row_bytes(cols);
            dequantize_row(t, &bytes[r * rb..(r + 1) * rb], &mut got[r * cols..(r + 1) * cols]);
        }
        for (j, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{}: value {j}: {g} vs candle {w}", t.name());
        }
    }
}

#[test]
fn type_ids_and_sizes() {
    for t in QuantType::ALL {
        assert_eq!(QuantType::from_ggml_type_id(t.ggml_type_id()), Some(t));
        assert_eq!(t.row_bytes(t.block_size() * 5), t.block_bytes() * 5);
    }
    assert_eq!(QuantType::from_ggml_type_id(0), None);
    assert_eq!(QuantType::from_ggml_type_id(15), None);
}

/// ggml's x86 Q8_0 rounds half to even (`_mm256_round_ps`) with `id = 127 / amax`, and its
/// Q8_K rounds half to even (`nearest_int`) with `iscale = −127 / max`: ties show it.
#[test]
fn activation_rounding_is_ggmls() {
    let mut x = vec![0f32; 32];
    x[0] = 127.0; // amax 127: d = 1, id = 1
    x[1] = 2.5;
    x[2] = 3.5;
    x[3] = -2.5;
    x[4] = 0.5;
    let mut q = vec![0f32; 32];
    quantize_dequantize_activations(QuantType::Q8_0, &x, 32, &mut q);
    assert_eq!(&q[..5], &[127.0, 2.0, 4.0, -2.0, 0.0]);

    let mut x = vec![0f32; 256];
    x[0] = -127.0; // max −127: iscale = 1, d = 1
    x[1] = 2.5;
    x[2] = 3.5;
    x[3] = -2.5;
    x[4] = 127.0;
    let mut q = vec![0f32; 256];
    quantize_dequantize_activations(QuantType::Q4K, &x, 256, &mut q);
    assert_eq!(&q[..5], &[-127.0, 2.0, 4.0, -2.0, 127.0]);
    // The largest magnitude, when positive, maps to −127 through a negative scale.
    x[0] = 100.0;
    x[4] = 0.0;
    quantize_dequantize_activations(QuantType::Q4K, &x, 256, &mut q);
    assert!((q[0] - 100.0).abs() < 1e-4, "{}", q[0]);
}

#[test]
fn forced_paths_parse() {
    assert_eq!(Isa::parse("AVX2"), Some(Isa::Avx2));
    assert_eq!(Isa::parse(" scalar "), Some(Isa::Scalar));
    assert_eq!(Isa::parse("avx512"), Some(Isa::Avx512));
    assert_eq!(Isa::parse("neon"), None);
    assert!(Isa::Scalar.is_available());
}

/// One pass over several matrices gives each matrix's product exactly, with types that
/// share the activation layout (fused) and with a mix that does not (the fallback).
#[test]
fn matmul_many_equals_one_product_per_matrix() {
    let mut rng = Rng(99);
    let cols = 512;
    for types in [
        [QuantType::Q8_0, QuantType::Q8_0, QuantType::Q8_0],
        [QuantType::Q4K, QuantType::Q4K, QuantType::Q4K],
        [QuantType::Q4K, QuantType::Q4K, QuantType::Q6K],
    ] {
        let rows = [96, 17, 33];
        let weights: Vec<Vec<u8>> =
            types.iter().zip(rows).map(|(&t, r)| random_blocks(t, r * cols / t.block_size(), &mut rng)).collect();
        let x = random_acts(cols, &mut rng);
        let parts: Vec<(QuantType, &[u8], usize)> = types.iter().zip(&weights).zip(rows).map(|((&t, w), r)| (t, w.as_slice(), r)).collect();
        let mut outs: Vec<Vec<f32>> = rows.iter().map(|&r| vec![f32::NAN; r]).collect();
        let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        seer_kernels::matmul_many(&parts, cols, &x, &mut views);
        for (i, &(t, w, r)) in parts.iter().enumerate() {
            let mut want = vec![0f32; r];
            seer_kernels::matmul(t, w, r, cols, &x, 1, &mut want);
            assert_eq!(outs[i], want, "{types:?}: part {i}");
        }
    }
}
