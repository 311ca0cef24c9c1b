//! Every matrix product of every model goes through [`Linear`]. Today dense weights use
//! candle's f32 GEMM and quantized ones candle's ggml kernels; seer's own quantized CPU
//! kernels will replace the latter here, and nowhere else.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};

pub enum LinearWeight {
    /// `[out, in]`, f32.
    Dense(Tensor),
    Quantized(QMatMul),
}

impl LinearWeight {
    pub fn quantized(q: QTensor) -> candle_core::Result<Self> {
        Ok(LinearWeight::Quantized(QMatMul::from_qtensor(q)?))
    }
}

pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: LinearWeight, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    /// `x` is `[..., in]`; the result is `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => {
                let dims = x.dims().to_vec();
                let (last, lead) = dims.split_last().expect("linear input has at least one dim");
                let rows: usize = lead.iter().product();
                let y = x.reshape((rows, *last))?.matmul(&w.t()?)?;
                let mut out_dims = lead.to_vec();
                out_dims.push(w.dim(0)?);
                y.reshape(out_dims)?
            }
            LinearWeight::Quantized(q) => q.forward(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
