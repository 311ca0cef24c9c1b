//! Decode-shaped streaming: one activation row through 8 LLaMA-7B layers of Q4_K weights
//! (1.15 GB, far beyond any cache), against a plain read of the same bytes. Shows how close
//! the matrix-vector kernels run to the memory system's limit:
//! `cargo run --release -p seer-kernels --example decode_sim`.

use std::time::Instant;

use seer_kernels::{matmul, QuantType};

fn main() {
    let t = QuantType::Q4K;
    let shapes = [(4096, 4096), (4096, 4096), (4096, 4096), (4096, 4096), (11008, 4096), (11008, 4096), (4096, 11008)];
    let layers = 8;
    // Small non-zero bytes: f16 scales of ~1e-7 keep every value finite.
    let mats: Vec<(usize, usize, Vec<u8>)> = (0..layers)
        .flat_map(|_| shapes.iter().map(|&(r, c)| (r, c, vec![1u8; r * t.row_bytes(c)])))
        .collect();
    let total: usize = mats.iter().map(|m| m.2.len()).sum();
    let x = vec![0.5f32; 11008];
    let mut out = vec![0f32; 11008];
    for rep in 0..4 {
        let start = Instant::now();
        for (r, c, w) in &mats {
            matmul(t, w, *r, *c, &x[..*c], 1, &mut out[..*r]);
        }
        let kern = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let sum: u64 = std::thread::scope(|s| {
            let half = mats.len() / 2;
            let (a, b) = mats.split_at(half);
            let h = s.spawn(move || a.iter().map(|m| m.2.iter().step_by(64).map(|&v| v as u64).sum::<u64>()).sum::<u64>());
            let mine: u64 = b.iter().map(|m| m.2.iter().step_by(64).map(|&v| v as u64).sum::<u64>()).sum();
            mine + h.join().unwrap()
        });
        let read = start.elapsed().as_secs_f64();
        println!(
            "rep {rep}: kernels {:.1} GB/s ({:.1} ms per 8 layers), plain 2-thread read {:.1} GB/s [{sum}]",
            total as f64 / kern / 1e9,
            kern * 1e3,
            total as f64 / read / 1e9
        );
    }
}
