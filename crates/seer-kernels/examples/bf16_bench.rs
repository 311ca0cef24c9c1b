//! GFLOP/s of the AVX512-BF16 dense product on CLIP-L's shapes (577 tokens), with the
//! weights packed at load and read in place as f16 rows (packed per product):
//! `cargo run --release -p seer-kernels --example bf16_bench`.

use std::time::Instant;

use seer_kernels::{Bf16Matrix, Half};

fn best_ms(p: &Bf16Matrix, x: &[f32], m: usize, out: &mut [f32]) -> f64 {
    p.matmul(x, m, out);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        p.matmul(x, m, out);
        best = best.min(t.elapsed().as_secs_f64());
    }
    best * 1e3
}

fn main() {
    if !Bf16Matrix::available() {
        println!("this CPU has no AVX512-BF16");
        return;
    }
    println!("| m×n×k | packed ms | GFLOP/s | f16 in place ms | GFLOP/s |\n|---|---|---|---|---|");
    for (m, n, k) in [(577, 1024, 1024), (577, 3072, 1024), (577, 4096, 1024), (577, 1024, 4096), (577, 4096, 4096)] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let f16: Vec<u8> = w.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let mut out = vec![0f32; m * n];
        let packed = best_ms(&Bf16Matrix::pack(&w, n, k), &x, m, &mut out);
        let held = Bf16Matrix::in_place(Half::F16, n, k, Box::new(f16)).expect("sizes match");
        let in_place = best_ms(&held, &x, m, &mut out);
        let gflops = |ms: f64| 2.0 * (m * n * k) as f64 / ms / 1e6;
        println!("| {m}×{n}×{k} | {packed:.2} | {:.0} | {in_place:.2} | {:.0} |", gflops(packed), gflops(in_place));
    }
}
