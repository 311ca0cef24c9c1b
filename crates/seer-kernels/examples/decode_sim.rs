//! Decode-shaped streaming: one activation row through a model's matrices (far beyond any
//! cache), against a plain read of the same bytes. Shows how close the matrix-vector
//! kernels run to the memory system's limit:
//!
//! ```sh
//! cargo run --release -p seer-kernels --example decode_sim            # 8 LLaMA-7B layers, Q4_K (1.15 GB)
//! cargo run --release -p seer-kernels --example decode_sim -- qwen2vl # Qwen2-VL-2B Q4_K_M, output matrix included (0.98 GB)
//! ```
//!
//! Qwen2-VL's rows are short (1536 columns, six Q4_K super-blocks), so the cost of starting
//! and ending each row shows there and not in LLaMA's.

use std::time::Instant;

use seer_kernels::{matmul, QuantType};

/// `(type, rows, cols)` of every product of one decode step.
fn shapes(model: &str) -> Vec<(QuantType, usize, usize)> {
    use QuantType::{Q4K, Q6K};
    match model {
        "qwen2vl" => {
            // llama.cpp's Q4_K_M: Q6_K for v and down in the first and last layers and every
            // third between, and for the tied 151 936-row output matrix.
            let six = |l: usize| !(3..23).contains(&l) || l % 3 == 2;
            let mut v: Vec<_> = (0..28)
                .flat_map(|l| {
                    let d = if six(l) { Q6K } else { Q4K };
                    [(Q4K, 1536, 1536), (Q4K, 256, 1536), (d, 256, 1536), (Q4K, 1536, 1536), (Q4K, 8960, 1536), (Q4K, 8960, 1536), (d, 1536, 8960)]
                })
                .collect();
            v.push((Q6K, 151_936, 1536));
            v
        }
        _ => {
            let layer = [(Q4K, 4096, 4096), (Q4K, 4096, 4096), (Q4K, 4096, 4096), (Q4K, 4096, 4096), (Q4K, 11008, 4096), (Q4K, 11008, 4096), (Q4K, 4096, 11008)];
            (0..8).flat_map(|_| layer).collect()
        }
    }
}

fn main() {
    let model = std::env::args().nth(1).unwrap_or_default();
    // Small non-zero bytes: f16 scales of ~1e-7 keep every value finite.
    let mats: Vec<(QuantType, usize, usize, Vec<u8>)> =
        shapes(&model).into_iter().map(|(t, r, c)| (t, r, c, vec![1u8; r * t.row_bytes(c)])).collect();
    let total: usize = mats.iter().map(|m| m.3.len()).sum();
    let widest = mats.iter().map(|m| m.1.max(m.2)).max().unwrap_or(0);
    let x = vec![0.5f32; widest];
    let mut out = vec![0f32; widest];
    for rep in 0..4 {
        let start = Instant::now();
        for (t, r, c, w) in &mats {
            matmul(*t, w, *r, *c, &x[..*c], 1, &mut out[..*r]);
        }
        let kern = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let sum: u64 = std::thread::scope(|s| {
            let half = mats.len() / 2;
            let (a, b) = mats.split_at(half);
            let h = s.spawn(move || a.iter().map(|m| m.3.iter().step_by(64).map(|&v| v as u64).sum::<u64>()).sum::<u64>());
            let mine: u64 = b.iter().map(|m| m.3.iter().step_by(64).map(|&v| v as u64).sum::<u64>()).sum();
            mine + h.join().unwrap()
        });
        let read = start.elapsed().as_secs_f64();
        println!(
            "rep {rep}: kernels {:.1} GB/s ({:.1} ms per step), plain 2-thread read {:.1} GB/s [{sum}]",
            total as f64 / kern / 1e9,
            kern * 1e3,
            total as f64 / read / 1e9
        );
    }
}
