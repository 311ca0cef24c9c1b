//! Quantized matrix products: seer's kernels (each path this CPU has) against candle's
//! `QMatMul` on the same bytes, 2 threads.
//!
//! ```sh
//! cargo run --release -p seer-kernels --example matvec_bench            # everything
//! cargo run --release -p seer-kernels --example matvec_bench -- Q4_K    # one type
//! ```
//!
//! Decode (n = 1) is bound by memory: GB/s counts the weight bytes read per second. The
//! matrices are cycled through several copies (≥ 256 MiB in all) so that they come from
//! DRAM, as a real model's layers do, not from the 32 MiB L3. Prefill (n = 128) is bound by
//! compute: GOP/s counts 2·rows·cols·n operations per second. Every figure is the best of
//! several timed batches (the machine is shared and noisy).
//!
//! seer's kernels run on their own thread pool, as in seer (`BENCH_POOL=candle`: candle's).
//! `BENCH_THREADS=1` changes the thread count; `BENCH_HOT=1` reuses one copy of the matrix
//! (cache-resident when it fits: the kernels' compute ceiling rather than DRAM's);
//! `BENCH_N=8` adds a case with that many activation rows.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::quantized::{ggml_file, GgmlDType, QMatMul};
use candle_core::{Device, Module, Tensor};
use seer_kernels::{available_isas, matmul_with, Isa, QuantType};

const ROTATE_BYTES: usize = 256 << 20;

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn threads() -> usize {
    env_usize("BENCH_THREADS").unwrap_or(2)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn random_blocks(t: QuantType, blocks: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(blocks * t.block_bytes());
    for _ in 0..blocks {
        let start = out.len();
        for _ in 0..t.block_bytes() {
            out.push((rng.next() >> 56) as u8);
        }
        let blk = &mut out[start..];
        let f16 = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
        match t {
            QuantType::Q4_0 | QuantType::Q8_0 => blk[..2].copy_from_slice(&f16(rng.unit() * 0.05)),
            QuantType::Q4K | QuantType::Q5K => {
                blk[..2].copy_from_slice(&f16(rng.unit() * 0.01));
                blk[2..4].copy_from_slice(&f16(rng.unit() * 0.02));
            }
            QuantType::Q6K => blk[208..].copy_from_slice(&f16(rng.unit() * 0.01)),
        }
    }
    out
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

/// Seconds per call: the best mean over `batches` batches of calls lasting ≥ `per_batch`.
fn time(mut f: impl FnMut(usize), batches: usize, per_batch: Duration) -> f64 {
    // Warm up (thread pools, scratch buffers, page faults).
    let mut calls = 0;
    let start = Instant::now();
    while start.elapsed() < per_batch / 2 || calls < 2 {
        f(calls);
        calls += 1;
    }
    let mut best = f64::INFINITY;
    let mut k = calls;
    for _ in 0..batches {
        let start = Instant::now();
        let mut c = 0;
        while start.elapsed() < per_batch || c < 2 {
            f(k);
            k += 1;
            c += 1;
        }
        best = best.min(start.elapsed().as_secs_f64() / c as f64);
    }
    best
}

/// Plain read bandwidth with `threads()` threads, in GB/s: sums of the bytes of
/// `bufs[k % bufs.len()]` as u64 words (the same rotation as the decode cases).
fn read_bandwidth(bufs: &[Vec<u8>], batches: usize) -> f64 {
    let sum = |b: &[u8]| -> u64 {
        let chunk = b.len().div_ceil(threads()).next_multiple_of(8);
        std::thread::scope(|s| {
            let parts: Vec<_> = b
                .chunks(chunk)
                .map(|c| {
                    s.spawn(move || {
                        // SAFETY: any bytes are valid u64s; `align_to` keeps the aligned middle.
                        let (_, words, _) = unsafe { c.align_to::<u64>() };
                        words.iter().fold(0u64, |a, &w| a.wrapping_add(w))
                    })
                })
                .collect();
            parts.into_iter().map(|p| p.join().unwrap()).fold(0u64, u64::wrapping_add)
        })
    };
    let secs = time(|k| { black_box(sum(&bufs[k % bufs.len()])); }, batches, Duration::from_millis(250));
    bufs[0].len() as f64 / secs / 1e9
}

struct Case {
    t: QuantType,
    rows: usize,
    cols: usize,
    n: usize,
}

fn main() {
    // Both engines size their pools from these (candle: CANDLE_NUM_THREADS, then RAYON_NUM_THREADS).
    std::env::set_var("RAYON_NUM_THREADS", threads().to_string());
    std::env::set_var("CANDLE_NUM_THREADS", threads().to_string());
    if std::env::var("BENCH_POOL").as_deref() == Ok("candle") {
        fn run(n: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
            candle_core::utils::barrier_pool().execute_chunked(n, f);
        }
        seer_kernels::set_executor(seer_kernels::Executor { threads: threads(), run });
    }
    let filter: Vec<String> = std::env::args().skip(1).collect();
    let probe: Vec<Vec<u8>> = (0..2).map(|k| vec![0x5a ^ k as u8; 256 << 20]).collect();
    let bw = read_bandwidth(&probe, 5);
    drop(probe);
    println!("read bandwidth ({} threads, 2 × 256 MiB): {bw:.1} GB/s", threads());
    println!("paths: {:?}", available_isas());
    println!();
    println!("(% of read bw: against a plain read of the same buffers just before each decode case;");
    println!(" prefill: against the figure above)");
    println!();
    println!("| type | rows×cols | n | path | ms/call | weight GB/s | % of read bw | GOP/s | vs candle |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut rng = Rng(0x5eed);
    for t in QuantType::ALL {
        if !filter.is_empty() && !filter.iter().any(|f| f.eq_ignore_ascii_case(t.name())) {
            continue;
        }
        let mut cases = vec![
            Case { t, rows: 4096, cols: 4096, n: 1 },
            Case { t, rows: 11008, cols: 4096, n: 1 },
            Case { t, rows: 4096, cols: 4096, n: 128 },
        ];
        if let Some(n) = env_usize("BENCH_N") {
            cases.push(Case { t, rows: 4096, cols: 4096, n });
        }
        for case in cases {
            run_case(&case, bw, &mut rng);
        }
    }
}

fn run_case(c: &Case, bw_start: f64, rng: &mut Rng) {
    let (t, rows, cols, n) = (c.t, c.rows, c.cols, c.n);
    let bytes = t.row_bytes(cols) * rows;
    // Decode cycles through copies so the weights come from DRAM; prefill reuses one.
    let hot = env_usize("BENCH_HOT") == Some(1);
    let copies = if n == 1 && !hot { ROTATE_BYTES.div_ceil(bytes).max(2) } else { 1 };
    let weights: Vec<Vec<u8>> = (0..copies).map(|_| random_blocks(t, rows * cols / t.block_size(), rng)).collect();
    let x: Vec<f32> = (0..n * cols).map(|_| rng.unit()).collect();
    let mut out = vec![0f32; n * rows];
    let (batches, per_batch) = if n == 1 { (7, Duration::from_millis(250)) } else { (3, Duration::from_millis(600)) };
    let bw = if n == 1 { read_bandwidth(&weights, 5) } else { bw_start };

    let dev = Device::Cpu;
    let qmm: Vec<QMatMul> = weights
        .iter()
        .map(|w| {
            let q = ggml_file::qtensor_from_ggml(candle_dtype(t), w, vec![rows, cols], &dev).unwrap();
            QMatMul::from_qtensor(q).unwrap()
        })
        .collect();
    let xt = Tensor::from_vec(x.clone(), (n, cols), &dev).unwrap();
    let candle = time(
        |k| {
            black_box(qmm[k % copies].forward(&xt).unwrap());
        },
        batches,
        per_batch,
    );

    let report = |path: &str, secs: f64| {
        let gbs = bytes as f64 / secs / 1e9;
        let gops = 2.0 * (rows * cols * n) as f64 / secs / 1e9;
        println!(
            "| {} | {rows}×{cols} | {n} | {path} | {:.3} | {gbs:.1} | {:.0}% | {gops:.0} | {:.2}× |",
            t.name(),
            secs * 1e3,
            100.0 * gbs / bw,
            candle / secs
        );
    };
    report("candle", candle);
    for isa in available_isas() {
        if isa == Isa::Scalar && n > 1 {
            continue; // minutes, and says nothing new
        }
        let secs = time(
            |k| {
                matmul_with(isa, t, &weights[k % copies], rows, cols, &x, n, &mut out);
                black_box(&out);
            },
            if isa == Isa::Scalar { 2 } else { batches },
            per_batch,
        );
        report(&format!("seer {}", isa.name()), secs);
    }
}
