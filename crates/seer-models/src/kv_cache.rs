//! Keys and values of the positions a sequence has seen, one pair per decoder layer.
//! Buffers grow by doubling and are written in place, so a decode step copies only the
//! new position.

use candle_core::{Result, Tensor};

pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache { layers: (0..n_layers).map(|_| None).collect(), len: 0 }
    }

    /// Positions already stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `k`, `v` (`[b, kv_heads, t, d]`) after the current positions of `layer` and
    /// returns views of all positions so far. Call [`KvCache::advance`] once every layer
    /// has appended.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let need = self.len + t;
        let slot = &mut self.layers[layer];
        let capacity = slot.as_ref().map_or(0, |(k, _)| k.dim(2).unwrap_or(0));
        if need > capacity {
            let new_cap = need.max(capacity * 2).max(64);
            let grow = |old: Option<&Tensor>, new: &Tensor| -> Result<Tensor> {
                let (b, h, _, d) = new.dims4()?;
                let buf = Tensor::zeros((b, h, new_cap, d), new.dtype(), new.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            let kb = grow(slot.as_ref().map(|p| &p.0), k)?;
            let vb = grow(slot.as_ref().map(|p| &p.1), v)?;
            *slot = Some((kb, vb));
        }
        let (kb, vb) = slot.as_ref().expect("buffer allocated above");
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }

    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }
}
