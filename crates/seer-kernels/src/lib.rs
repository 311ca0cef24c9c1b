//! seer's quantized CPU matrix products, on GGML block layouts as stored in GGUF files.
//!
//! [`matmul`] multiplies `n` f32 activation rows by a `[rows, cols]` quantized weight held
//! as raw bytes (a slice of the GGUF mmap, no copy and no repacking). Like ggml, the
//! activations are first quantized per row to 8 bits (Q8_0 blocks of 32 for Q4_0/Q8_0
//! weights, Q8_K super-blocks of 256 for the k-quants, with ggml's exact rounding), then
//! every dot product is an integer one, scaled per block.
//!
//! Kernels are chosen at run time, once: AVX-512 (F, BW, VL, VNNI), AVX2 (+FMA, F16C), or
//! portable scalar code. `SEER_KERNELS=scalar|avx2|avx512` forces a path (tests, benchmarks);
//! [`matmul_with`] takes one explicitly.
//!
//! Work is split over weight rows by an [`Executor`]: by default a small pool of this
//! crate's own (`RAYON_NUM_THREADS` sizes it, as `seer --threads` sets it; the calling
//! thread works too, chunks are claimed dynamically so a descheduled thread delays nobody,
//! and idle workers spin for 50 µs and then sleep, so the pool costs nothing between
//! requests), or whatever the application installs with [`set_executor`]. For `n > 1`,
//! each weight row is loaded once per tile of activation rows; from 8 rows on, AVX-512
//! packs panels of 16 weight rows and runs a GEMM.

use std::cell::RefCell;
use std::sync::OnceLock;

mod act;
mod attention;
mod bf16;
mod pointwise;
mod pool;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod decode_attention;
#[cfg(target_arch = "x86_64")]
mod gemm512;

use act::{Act, Layout};
pub use attention::{attention, attention_with, key_index, AttnShape, KvElem, KEY_BLOCK};
pub use pointwise::{gelu_tanh, quick_gelu};
pub use bf16::{attention_bf16, bf16_bits, bf16_to_f32, cross_attention_bf16, Bf16Matrix, Half, HeldBytes};

/// The GGML weight types seer multiplies with its own kernels.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// 32 weights: f16 scale `d`, 16 bytes of 4-bit values `q`; weight = d·(q − 8).
    Q4_0,
    /// 32 weights: f16 scale `d`, 32 signed bytes `q`; weight = d·q.
    Q8_0,
    /// 256 weights: f16 `d`, f16 `dmin`, 12 bytes of eight 6-bit scales and mins, 128 bytes
    /// of 4-bit values; weight = d·sc·q − dmin·m per sub-block of 32.
    Q4K,
    /// As Q4K plus 32 bytes holding each value's fifth bit.
    Q5K,
    /// 256 weights: 128 bytes of low 4 bits, 64 bytes of high 2 bits, sixteen i8 scales (one
    /// per 16 weights), f16 `d`; weight = d·sc·(q − 32).
    Q6K,
}

impl QuantType {
    pub const ALL: [QuantType; 5] = [QuantType::Q4_0, QuantType::Q8_0, QuantType::Q4K, QuantType::Q5K, QuantType::Q6K];

    /// Weights per block.
    pub const fn block_size(self) -> usize {
        match self {
            QuantType::Q4_0 | QuantType::Q8_0 => 32,
            QuantType::Q4K | QuantType::Q5K | QuantType::Q6K => 256,
        }
    }

    /// Bytes per block (ggml-common.h).
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantType::Q4_0 => 18,
            QuantType::Q8_0 => 34,
            QuantType::Q4K => 144,
            QuantType::Q5K => 176,
            QuantType::Q6K => 210,
        }
    }

    /// Bytes of one row of `cols` weights; `cols` must be a multiple of [`Self::block_size`].
    pub const fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_size() * self.block_bytes()
    }

    /// From ggml's `enum ggml_type` id, as stored in GGUF tensor infos.
    pub const fn from_ggml_type_id(id: u32) -> Option<QuantType> {
        match id {
            2 => Some(QuantType::Q4_0),
            8 => Some(QuantType::Q8_0),
            12 => Some(QuantType::Q4K),
            13 => Some(QuantType::Q5K),
            14 => Some(QuantType::Q6K),
            _ => None,
        }
    }

    pub const fn ggml_type_id(self) -> u32 {
        match self {
            QuantType::Q4_0 => 2,
            QuantType::Q8_0 => 8,
            QuantType::Q4K => 12,
            QuantType::Q5K => 13,
            QuantType::Q6K => 14,
        }
    }

    /// ggml's name: "Q4_0", "Q4_K", ...
    pub const fn name(self) -> &'static str {
        match self {
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q4K => "Q4_K",
            QuantType::Q5K => "Q5_K",
            QuantType::Q6K => "Q6_K",
        }
    }

    /// Activations are quantized to Q8_K super-blocks (else to Q8_0 blocks).
    const fn is_k(self) -> bool {
        matches!(self, QuantType::Q4K | QuantType::Q5K | QuantType::Q6K)
    }
}

/// An instruction-set path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust, any CPU.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// x86-64 with AVX-512 F, BW, VL and VNNI (and the AVX2 set).
    Avx512,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU can run the path.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// How [`matmul`] spreads work over threads. `run(n, f)` must call `f` on ranges that
/// together cover `0..n` exactly once, from any threads, and return once all have returned.
#[derive(Clone, Copy)]
pub struct Executor {
    /// Threads `run` uses (the caller included).
    pub threads: usize,
    pub run: fn(usize, &(dyn Fn(std::ops::Range<usize>) + Sync)),
}

static EXECUTOR: OnceLock<Executor> = OnceLock::new();

/// Installs the executor every later product uses; only the first call counts (returns
/// whether this one did).
pub fn set_executor(e: Executor) -> bool {
    EXECUTOR.set(e).is_ok()
}

fn pool_run(n: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    pool::global().run(n, f)
}

/// The installed executor, else this crate's pool.
pub fn executor() -> Executor {
    EXECUTOR.get().copied().unwrap_or_else(|| Executor { threads: pool::global().threads(), run: pool_run })
}

/// The paths this CPU can run, slowest first.
pub fn available_isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
}

/// The path [`matmul`] uses: the best this CPU has, unless `SEER_KERNELS` names another
/// (a path the CPU lacks is reported once on stderr and the best one is used instead).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = *available_isas().last().expect("scalar is always available");
        match std::env::var("SEER_KERNELS") {
            Ok(v) if !v.trim().is_empty() => match Isa::parse(&v) {
                Some(i) if i.is_available() => i,
                Some(i) => {
                    eprintln!("seer-kernels: SEER_KERNELS={v}: this CPU cannot run {}, using {}", i.name(), best.name());
                    best
                }
                None => {
                    eprintln!("seer-kernels: SEER_KERNELS={v} is not one of scalar, avx2, avx512; using {}", best.name());
                    best
                }
            },
            _ => best,
        }
    })
}

/// Dequantizes `dst.len()` weights (a multiple of the block size) from the blocks at the
/// start of `src`, exactly as ggml (and candle) do.
pub fn dequantize_row(t: QuantType, src: &[u8], dst: &mut [f32]) {
    assert!(
        dst.len().is_multiple_of(t.block_size()),
        "dequantize_row: {} values are not a whole number of {} blocks of {}",
        dst.len(),
        t.name(),
        t.block_size()
    );
    let need = t.row_bytes(dst.len());
    assert!(src.len() >= need, "dequantize_row: {} values of {} need {need} bytes, got {}", dst.len(), t.name(), src.len());
    scalar::dequantize(t, &src[..need], dst);
}

/// The activations as the kernels see them: each row of `x` (rows of `cols`, a multiple of
/// the block size) quantized the way [`matmul`] quantizes it for weights of type `t` (Q8_0
/// or Q8_K, as ggml does), then dequantized to f32 into `out`.
pub fn quantize_dequantize_activations(t: QuantType, x: &[f32], cols: usize, out: &mut [f32]) {
    assert!(cols > 0 && cols.is_multiple_of(t.block_size()) && x.len().is_multiple_of(cols));
    assert_eq!(x.len(), out.len());
    let mut act = Act::default();
    let n = x.len() / cols;
    act.prepare(Layout::natural(t), x, n, cols, None);
    act.dequantize_natural(t.is_k(), out);
}

/// `out[i][r] = dot(x[i], w[r])` for `i < n`, `r < rows`: `weights` holds `rows` rows of
/// `cols` weights of type `t` (row-major, as GGUF stores a `[rows, cols]` tensor), `x` is
/// `n × cols` and `out` is `n × rows`, both row-major f32. `cols` must be a multiple of the
/// type's block size.
pub fn matmul(t: QuantType, weights: &[u8], rows: usize, cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
    matmul_with(isa(), t, weights, rows, cols, x, n, out)
}

/// [`matmul`] on a given path, which must be available on this CPU.
#[allow(clippy::too_many_arguments)]
pub fn matmul_with(
    isa: Isa,
    t: QuantType,
    weights: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    assert!(isa.is_available(), "seer-kernels: this CPU cannot run the {} path", isa.name());
    assert!(
        cols.is_multiple_of(t.block_size()),
        "matmul: {cols} columns are not a whole number of {} blocks of {}",
        t.name(),
        t.block_size()
    );
    let row_bytes = t.row_bytes(cols);
    assert!(
        weights.len() >= rows * row_bytes,
        "matmul: {rows}×{cols} {} weights need {} bytes, got {}",
        t.name(),
        rows * row_bytes,
        weights.len()
    );
    assert!(x.len() >= n * cols, "matmul: {n}×{cols} activations, got {} values", x.len());
    assert!(out.len() >= n * rows, "matmul: {n}×{rows} outputs, got room for {}", out.len());
    if rows == 0 || n == 0 {
        return;
    }
    if cols == 0 {
        out[..n * rows].fill(0.0);
        return;
    }
    thread_local! {
        // The quantized activations, reused from call to call: no allocation once warm.
        static ACT: RefCell<Act> = RefCell::new(Act::default());
    }
    let job = Job { isa, t, w: &weights[..rows * row_bytes], rows, cols, n };
    with_local(&ACT, |act| job.run(act, x, out));
}

/// `f` on this thread's value of `key` (a scratch buffer reused from call to call), or on a
/// fresh one when this thread is already using it: re-entered, as a pool worker running
/// another product while it waits.
pub(crate) fn with_local<T: Default, R>(key: &'static std::thread::LocalKey<RefCell<T>>, f: impl FnOnce(&mut T) -> R) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => f(&mut v),
        Err(_) => f(&mut T::default()),
    })
}

/// Several products of one activation row with different weights (a layer's q, k and v,
/// or its gate and up projections) as one parallel pass: the row is quantized once and
/// the threads meet once instead of once per matrix, which is most of what a small
/// model's decode step waits on. `parts` are `(type, weights, rows)`, all with `cols`
/// columns; `outs[i]` receives part `i`'s `rows` values. Falls back to one [`matmul`]
/// per part where the parts' types quantize the row differently.
pub fn matmul_many(parts: &[(QuantType, &[u8], usize)], cols: usize, x: &[f32], outs: &mut [&mut [f32]]) {
    assert_eq!(parts.len(), outs.len(), "matmul_many: {} parts, {} outputs", parts.len(), outs.len());
    let isa = isa();
    let jobs: Vec<Job> = parts.iter().map(|&(t, w, rows)| Job { isa, t, w, rows, cols, n: 1 }).collect();
    let layout = jobs.first().map(|j| j.layout());
    let shared = jobs.iter().all(|j| Some(j.layout()) == layout && !j.gemm());
    if !shared || cols == 0 || !cols.is_multiple_of(parts[0].0.block_size()) {
        for (&(t, w, rows), out) in parts.iter().zip(outs.iter_mut()) {
            matmul(t, w, rows, cols, x, 1, out);
        }
        return;
    }
    for (j, out) in jobs.iter().zip(outs.iter()) {
        assert!(j.w.len() >= j.rows * j.t.row_bytes(cols) && out.len() >= j.rows, "matmul_many: a part's shapes do not match");
    }
    assert!(x.len() >= cols, "matmul_many: {cols} columns, got {} values", x.len());
    let ptrs: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
    // Chunks of rows that never straddle two parts, about eight per thread in all.
    let exec = executor();
    let total: usize = jobs.iter().map(|j| j.rows).sum();
    let chunk = total.div_ceil(exec.threads.max(1) * 8).max(1);
    let chunks: Vec<(usize, usize, usize)> =
        jobs.iter().enumerate().flat_map(|(i, j)| (0..j.rows).step_by(chunk).map(move |r0| (i, r0, (r0 + chunk).min(j.rows)))).collect();
    thread_local! {
        static MANY: RefCell<Act> = RefCell::new(Act::default());
    }
    with_local(&MANY, |act| {
        act.prepare(layout.expect("at least one part"), &x[..cols], 1, cols, None);
        let act: &Act = act;
        let run = |range: std::ops::Range<usize>| {
            let ptrs = &ptrs; // the whole Vec, not its raw pointers, is shared with the tasks
            for &(i, r0, r1) in &chunks[range] {
                jobs[i].rows_range(act, r0, r1, ptrs[i]);
            }
        };
        if exec.threads <= 1 || chunks.len() < 2 || total * cols < PAR_MIN_MACS {
            run(0..chunks.len());
        } else {
            (exec.run)(chunks.len(), &run);
        }
    });
}

/// One product, its shapes checked.
#[derive(Clone, Copy)]
pub(crate) struct Job<'a> {
    pub isa: Isa,
    pub t: QuantType,
    pub w: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    pub n: usize,
}

/// Where a task writes: `out[i * rows + r]`. Tasks own disjoint sets of `r`.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub *mut f32);
// SAFETY: every task writes only the output columns of its own weight rows.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Activation rows handled per pass over a weight-row chunk: their quantized bytes
/// (64 × 4.3 KiB at 4096 columns) stay in L2 while the chunk's rows stream past.
const ACT_PANEL: usize = 64;

/// From this many activation rows on, AVX-512 takes the packed-panel GEMM.
const GEMM_MIN_N: usize = 8;

/// Below this many multiply-adds a product runs on the calling thread: waking the pool
/// costs more than it saves.
const PAR_MIN_MACS: usize = 1 << 16;

impl Job<'_> {
    fn layout(&self) -> Layout {
        match self.isa {
            Isa::Scalar => Layout::natural(self.t),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::layout(self.t),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::layout(self.t),
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!(),
        }
    }

    /// Whether this product takes the packed-panel GEMM (AVX-512, several activation rows).
    fn gemm(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self.isa == Isa::Avx512 && self.n >= GEMM_MIN_N
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    fn run(&self, act: &mut Act, x: &[f32], out: &mut [f32]) {
        let gemm = self.gemm();
        #[cfg(target_arch = "x86_64")]
        let layout = if gemm { gemm512::layout(self.t) } else { self.layout() };
        #[cfg(not(target_arch = "x86_64"))]
        let layout = self.layout();
        let exec = executor();
        let threads = exec.threads;
        let parallel = threads > 1 && self.n >= 4 && self.n * self.cols >= 1 << 15;
        act.prepare(layout, &x[..self.n * self.cols], self.n, self.cols, parallel.then_some(exec));
        let act: &Act = act;
        let out = OutPtr(out.as_mut_ptr());
        let rows = self.rows;
        // Rows are handed out in whole panels on the GEMM path.
        let unit = if gemm { 16 } else { 1 };
        let units = rows.div_ceil(unit);
        let macs = rows.saturating_mul(self.cols).saturating_mul(self.n);
        let task = |u0: usize, u1: usize| {
            let (r0, r1) = (u0 * unit, (u1 * unit).min(rows));
            #[cfg(target_arch = "x86_64")]
            if gemm {
                // SAFETY: AVX-512 is available (`gemm()`); shapes were checked.
                unsafe { gemm512::run(self, act, r0, r1, out) };
                return;
            }
            self.rows_range(act, r0, r1, out);
        };
        if threads <= 1 || macs < PAR_MIN_MACS || units < 2 {
            task(0, units);
            return;
        }
        // Enough chunks to even out uneven threads (a busy core, a slow phase),
        // few enough that each stays long next to the cost of handing it out.
        let chunks = (threads * 8).min(units);
        let chunk = units.div_ceil(chunks);
        let chunks = units.div_ceil(chunk);
        (exec.run)(chunks, &|cs: std::ops::Range<usize>| {
            for c in cs {
                task(c * chunk, ((c + 1) * chunk).min(units));
            }
        });
    }

    /// Weight rows `r0..r1` against every activation row.
    fn rows_range(&self, act: &Act, r0: usize, r1: usize, out: OutPtr) {
        let mut i0 = 0;
        while i0 < self.n {
            let i1 = (i0 + ACT_PANEL).min(self.n);
            // SAFETY: shapes were checked in `matmul_with`; the path is available.
            unsafe {
                match self.isa {
                    Isa::Scalar => scalar::run(self, act, r0, r1, i0, i1, out),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => avx2::run(self, act, r0, r1, i0, i1, out),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => avx512::run(self, act, r0, r1, i0, i1, out),
                    #[cfg(not(target_arch = "x86_64"))]
                    _ => unreachable!(),
                }
            }
            i0 = i1;
        }
    }
}

/// Most activation rows one kernel call handles (the register tile).
pub(crate) const MAX_TILE: usize = 4;

/// One kernel call's results, one per activation row.
pub(crate) type TileOut = [f32; MAX_TILE];

/// Bytes of weight rows walked per pass while a tile of activation rows sits in L1: they
/// stay in L2 (with the activation panel) from one tile to the next.
const WEIGHT_PASS_BYTES: usize = 160 << 10;

/// The loop every path shares. For each run of weight rows that fits in L2, for each tile
/// of up to `tile_max` activation rows (kept in L1), for each weight row: `tile(w, i, m)`
/// returns the dot products of the row at `w` with activation rows `i..i + m`.
///
/// # Safety
/// `out` must have room for `i1 × job.rows` values and no other thread may write the
/// columns `r0..r1`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn drive(
    job: &Job,
    r0: usize,
    r1: usize,
    i0: usize,
    i1: usize,
    out: OutPtr,
    tile_max: usize,
    mut tile: impl FnMut(*const u8, usize, usize) -> TileOut,
) {
    let row_bytes = job.t.row_bytes(job.cols);
    let pass = (WEIGHT_PASS_BYTES / row_bytes.max(1)).max(2);
    let mut s0 = r0;
    while s0 < r1 {
        let s1 = (s0 + pass).min(r1);
        let mut i = i0;
        while i < i1 {
            let m = (i1 - i).min(tile_max);
            for r in s0..s1 {
                let res = tile(job.w.as_ptr().add(r * row_bytes), i, m);
                for (k, v) in res.iter().enumerate().take(m) {
                    *out.0.add((i + k) * job.rows + r) = *v;
                }
            }
            i += m;
        }
        s0 = s1;
    }
}

#[inline(always)]
pub(crate) fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// Reads a little-endian u16 at `p`, any alignment.
///
/// # Safety
/// `p..p + 2` must be readable.
#[inline(always)]
pub(crate) unsafe fn read_u16(p: *const u8) -> u16 {
    u16::from_le(std::ptr::read_unaligned(p as *const u16))
}

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K/Q5_K super-block (12 bytes), as
/// two little-endian u64 of eight bytes each.
#[inline(always)]
pub(crate) fn unpack_k4_scales(s: &[u8; 12]) -> (u64, u64) {
    let w0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let w1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let w2 = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    // Sub-blocks 0-3: the low six bits of bytes 0-3 (scales) and 4-7 (mins). Sub-blocks 4-7:
    // the nibbles of bytes 8-11, topped with the two high bits of bytes 0-3 (scales) and 4-7
    // (mins).
    let sc_lo = w0 & 0x3f3f_3f3f;
    let m_lo = w1 & 0x3f3f_3f3f;
    let sc_hi = (w2 & 0x0f0f_0f0f) | ((w0 >> 2) & 0x3030_3030);
    let m_hi = ((w2 >> 4) & 0x0f0f_0f0f) | ((w1 >> 2) & 0x3030_3030);
    ((sc_lo as u64) | ((sc_hi as u64) << 32), (m_lo as u64) | ((m_hi as u64) << 32))
}
