//! GFLOP/s of the AVX512-BF16 dense product on CLIP-L's shapes (577 tokens):
//! `cargo run --release -p seer-kernels --example bf16_bench`.

use std::time::Instant;

use seer_kernels::PackedBf16;

fn main() {
    if !PackedBf16::available() {
        println!("this CPU has no AVX512-BF16");
        return;
    }
    println!("| m×n×k | ms | GFLOP/s |\n|---|---|---|");
    for (m, n, k) in [(577, 1024, 1024), (577, 3072, 1024), (577, 4096, 1024), (577, 1024, 4096), (577, 4096, 4096)] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let p = PackedBf16::pack(&w, n, k);
        let mut out = vec![0f32; m * n];
        p.matmul(&x, m, &mut out);
        let reps = 5;
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            p.matmul(&x, m, &mut out);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("| {m}×{n}×{k} | {:.2} | {:.0} |", best * 1e3, 2.0 * (m * n * k) as f64 / best / 1e9);
    }
}
