//! Keys and values of the positions a sequence has seen, one pair per decoder layer, laid
//! out for seer-kernels' attention: values `[kv_heads, capacity, head_dim]`, keys in blocks
//! of 16 positions (`seer_kernels::key_index`), so each head's positions are contiguous
//! and a decode step writes only the new position. Buffers grow
//! by doubling. Quantized models keep f16 (as llama.cpp does by default: half the memory
//! traffic per token); float models keep f32, exactly as their reference computes.

use half::f16;
use std::ops::Range;

use seer_kernels::{key_index, AttnShape, KvElem, KEY_BLOCK};

/// The element type of a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvType {
    F32,
    F16,
}

enum Buffers {
    F32(Vec<f32>, Vec<f32>),
    F16(Vec<f16>, Vec<f16>),
}

/// How a layer attends: scores scaled by `scale`, within a sliding `window` (0: none),
/// with `blocks` of positions that see each other whole.
#[derive(Clone, Copy)]
pub struct Attend<'a> {
    pub scale: f32,
    pub window: usize,
    pub blocks: &'a [Range<usize>],
}

pub struct KvCache {
    /// Llama 3.2 Vision: the image states' keys and values and the mask decode steps
    /// use, kept for the whole answer.
    pub cross: Option<crate::llama::CrossContext>,
    layers: Vec<Buffers>,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    /// Where the next position sits relative to `len`: 0, except after an M-RoPE prompt
    /// whose images end their positions before their token count (Qwen2-VL).
    position_offset: i64,
}

impl KvCache {
    pub fn new(n_layers: usize, kv_heads: usize, head_dim: usize, dtype: KvType) -> Self {
        let empty = || match dtype {
            KvType::F32 => Buffers::F32(Vec::new(), Vec::new()),
            KvType::F16 => Buffers::F16(Vec::new(), Vec::new()),
        };
        KvCache { layers: (0..n_layers).map(|_| empty()).collect(), kv_heads, head_dim, capacity: 0, len: 0, position_offset: 0, cross: None }
    }

    /// Positions already stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> KvType {
        match self.layers.first() {
            Some(Buffers::F16(..)) => KvType::F16,
            _ => KvType::F32,
        }
    }

    /// Makes room for `need` positions in every layer. A sequence that reserves what it
    /// may reach (prompt plus answer) never moves its cache mid-answer; the room it does
    /// not use takes no memory.
    pub fn reserve(&mut self, need: usize) {
        if need <= self.capacity {
            return;
        }
        let cap = need.max(self.capacity * 2).max(64).next_multiple_of(KEY_BLOCK);
        let (old, h, d, len) = (self.capacity, self.kv_heads, self.head_dim, self.len);
        // Keys move in whole blocks of positions.
        let key_len = len.next_multiple_of(KEY_BLOCK).min(old);
        for l in &mut self.layers {
            match l {
                Buffers::F32(k, v) => (regrow(k, h, d, old, cap, key_len), regrow(v, h, d, old, cap, len)),
                Buffers::F16(k, v) => (regrow(k, h, d, old, cap, key_len), regrow(v, h, d, old, cap, len)),
            };
        }
        self.capacity = cap;
    }

    /// Stores `k` and `v` (`[t, kv_heads, head_dim]`, as the projections produce them)
    /// after the current positions of `layer`. Call [`KvCache::advance`] once every layer
    /// has appended.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let row = self.kv_heads * self.head_dim;
        assert_eq!(k.len(), v.len(), "kv cache: keys and values differ in length");
        assert!(k.len().is_multiple_of(row), "kv cache: {} values are not whole rows of {row}", k.len());
        self.reserve(self.len + k.len() / row);
        let (h, d, cap, len) = (self.kv_heads, self.head_dim, self.capacity, self.len);
        match &mut self.layers[layer] {
            Buffers::F32(kb, vb) => (scatter_keys(kb, k, h, d, cap, len), scatter(vb, v, h, d, cap, len)),
            Buffers::F16(kb, vb) => (scatter_keys(kb, k, h, d, cap, len), scatter(vb, v, h, d, cap, len)),
        };
    }

    /// Causal attention of `q` (`[t, heads, head_dim]`, the last `t` of the positions
    /// stored in `layer`, appended but not yet advanced past) into `out` (same shape).
    pub fn attend(&self, layer: usize, q: &[f32], heads: usize, how: &Attend, out: &mut [f32]) {
        let Attend { scale, window, blocks } = *how;
        let t = q.len() / (heads * self.head_dim);
        let s = AttnShape {
            t,
            heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            kv_len: self.len + t,
            kv_stride: self.capacity,
            causal: true,
            scale,
            window,
            blocks,
        };
        match &self.layers[layer] {
            Buffers::F32(k, v) => seer_kernels::attention(&s, q, k, v, out),
            Buffers::F16(k, v) => seer_kernels::attention(&s, q, k, v, out),
        }
    }

    /// The rotary position of the next token.
    pub fn next_position(&self) -> usize {
        (self.len as i64 + self.position_offset).max(0) as usize
    }

    pub fn set_position_offset(&mut self, offset: i64) {
        self.position_offset = offset;
    }

    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Forgets every position; the buffers stay allocated for the next sequence.
    pub fn clear(&mut self) {
        self.len = 0;
        self.position_offset = 0;
        self.cross = None;
    }
}

/// Moves each head's first `len` positions from capacity `old` to `cap`.
fn regrow<T: KvElem>(buf: &mut Vec<T>, heads: usize, d: usize, old: usize, cap: usize, len: usize) {
    let mut new = T::zeroed(heads * cap * d);
    for h in 0..heads {
        new[h * cap * d..][..len * d].copy_from_slice(&buf[h * old * d..][..len * d]);
    }
    *buf = new;
}

/// Writes key rows `[t, heads, d]` at positions `len..len + t`, in key blocks.
fn scatter_keys<T: KvElem>(buf: &mut [T], src: &[f32], heads: usize, d: usize, cap: usize, len: usize) {
    for (i, row) in src.chunks_exact(heads * d).enumerate() {
        for (h, x) in row.chunks_exact(d).enumerate() {
            for (c, &x) in x.iter().enumerate() {
                buf[key_index(h, len + i, c, cap, d)] = T::from_f32(x);
            }
        }
    }
}

/// Writes rows `[t, heads, d]` at positions `len..len + t` of `[heads, cap, d]`.
fn scatter<T: KvElem>(buf: &mut [T], src: &[f32], heads: usize, d: usize, cap: usize, len: usize) {
    for (i, row) in src.chunks_exact(heads * d).enumerate() {
        for (h, x) in row.chunks_exact(d).enumerate() {
            let at = (h * cap + len + i) * d;
            buf[at..at + d].iter_mut().zip(x).for_each(|(o, &x)| *o = T::from_f32(x));
        }
    }
}
