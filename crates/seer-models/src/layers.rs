//! Small building blocks shared by the architectures: norms and token embeddings.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Result as CResult, Tensor, D};

use crate::error::Result;
use crate::linear::{Linear, LinearWeight, QuantMatrix};
use crate::weights::{Stored, Vb};

pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(vb: &Vb, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm { weight: vb.tensor_shaped("weight", &[dim])?, eps: eps as f32 })
    }

    /// Gemma's norm, which scales by `1 + weight` (its weights are stored centred on 0).
    pub fn load_offset(vb: &Vb, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm { weight: (vb.tensor_shaped("weight", &[dim])? + 1.0)?, eps: eps as f32 })
    }

    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(vb: &Vb, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.tensor_shaped("weight", &[dim])?,
            bias: vb.tensor_shaped("bias", &[dim])?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
    }
}

/// Token embeddings, kept in their stored type (a quantized table is read row by row).
pub enum Embedding {
    Dense(Tensor),
    /// In a type seer's kernels read: rows dequantized on demand, in place in the file.
    Ggml(Arc<QuantMatrix>),
    Quantized(Arc<QTensor>),
}

impl Embedding {
    pub fn load(vb: &Vb, vocab: usize, dim: usize) -> Result<Self> {
        let shape = vb.shape("weight")?;
        if shape != [vocab, dim] {
            return Err(crate::ModelError::Mismatch(format!(
                "token embedding in {} has shape {shape:?}, expected [{vocab}, {dim}]",
                vb.describe()
            )));
        }
        // Under ISQ the table is quantized as the matrices are: for Llama 3's 128k
        // vocabulary the f32 table alone would be 2 GiB.
        if let Some(m) = vb.isq_matrix("weight")? {
            return Ok(Embedding::Ggml(Arc::new(m)));
        }
        Ok(match vb.load_stored("weight")? {
            Stored::Dense(t) => Embedding::Dense(t),
            Stored::Ggml(q) => Embedding::Ggml(Arc::new(q)),
            Stored::Quantized(q) => Embedding::Quantized(Arc::new(q)),
        })
    }

    /// `ids` is `[n]` (u32); the result is `[n, dim]`.
    pub fn forward(&self, ids: &Tensor) -> CResult<Tensor> {
        match self {
            Embedding::Dense(w) => w.index_select(ids, 0),
            Embedding::Ggml(q) => {
                let flat = ids.flatten_all()?.to_dtype(candle_core::DType::U32)?.to_vec1::<u32>()?;
                let mut dims = ids.dims().to_vec();
                dims.push(q.dims().1);
                q.rows_f32(&flat)?.reshape(dims)
            }
            Embedding::Quantized(q) => q.embedding(ids),
        }
    }

    /// The same table used as the output projection (tied embeddings), multiplied on
    /// `products_on` (a copy there) or by seer's kernels (shared with the lookup).
    pub fn as_linear(&self, products_on: Option<&Device>) -> CResult<Linear> {
        let weight = match self {
            Embedding::Dense(w) => LinearWeight::Dense(w.clone()),
            Embedding::Ggml(q) => LinearWeight::Ggml(q.clone()),
            Embedding::Quantized(q) => LinearWeight::Candle(QMatMul::from_arc(q.clone())?),
        };
        // A copy there: the lookup keeps reading the table here.
        let weight = match products_on {
            Some(device) => weight.to_device(device)?,
            None => weight,
        };
        Ok(Linear::new(weight, None))
    }

    pub fn dim(&self) -> usize {
        match self {
            Embedding::Dense(w) => w.dim(D::Minus1).unwrap_or(0),
            Embedding::Ggml(q) => q.dims().1,
            Embedding::Quantized(q) => q.shape().dims().last().copied().unwrap_or(0),
        }
    }
}
