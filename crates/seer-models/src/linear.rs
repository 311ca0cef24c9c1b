//! Every matrix product of every model goes through [`Linear`]. Dense weights use candle's
//! f32 GEMM; weights in the GGML types seer has kernels for (Q4_0, Q8_0, Q4_K, Q5_K, Q6_K)
//! use seer-kernels on the bytes as stored (in place in the GGUF map); other GGML types
//! keep candle's kernels. A model whose products run on another device (a GPU) holds its
//! weights there, for candle's kernels, and sends each product's input over.

use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Module, Result, Shape, Tensor};
use seer_kernels::{Bf16Matrix, QuantType};

use crate::mapped::MappedBytes;

pub enum LinearWeight {
    /// `[out, in]`, f32.
    Dense(Tensor),
    /// `[out, in]` in a type seer-kernels multiplies.
    Ggml(Arc<QuantMatrix>),
    /// Through candle's kernels, on the device that holds the weight: GGML types seer has
    /// no kernel for, and every weight of a model whose products run on a GPU.
    Candle(QMatMul),
    /// `[out, in]` for seer-kernels' AVX512-BF16 product: rounded to bf16 and packed at
    /// load, or read in place from a file that stores it in 16 bits.
    Bf16(Arc<Bf16Matrix>),
}

impl LinearWeight {
    /// A quantized weight: seer's kernels when they cover its type, candle's otherwise.
    pub fn quantized(q: QTensor) -> candle_core::Result<Self> {
        if let Some(m) = QuantMatrix::from_qtensor(&q)? {
            return Ok(LinearWeight::Ggml(Arc::new(m)));
        }
        Ok(LinearWeight::Candle(QMatMul::from_qtensor(q)?))
    }

    /// A copy of the weight held on `device` for candle's kernels, in its stored type
    /// (bf16 matrices stay with seer's kernels, as [`crate::weights::Vb`] makes none for a
    /// device).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(LinearWeight::Candle(match self {
            LinearWeight::Candle(q) if qmatmul_device(q).same_device(device) => q.clone(),
            LinearWeight::Dense(w) | LinearWeight::Candle(QMatMul::Tensor(w)) => QMatMul::Tensor(w.to_device(device)?),
            LinearWeight::Candle(QMatMul::TensorF16(w)) => QMatMul::TensorF16(w.to_device(device)?),
            LinearWeight::Ggml(m) => QMatMul::from_qtensor(m.to_qtensor(device)?)?,
            LinearWeight::Candle(QMatMul::QTensor(q)) => {
                let dims = q.shape().dims().to_vec();
                QMatMul::from_qtensor(qtensor_from_ggml(q.dtype(), &q.data()?, dims, device)?)?
            }
            LinearWeight::Bf16(m) => return Ok(LinearWeight::Bf16(m.clone())),
        }))
    }

    /// Hands a weight's mapped pages back (they stay in the page cache): for a weight
    /// whose copy lives elsewhere now.
    pub fn release_pages(&self) {
        if let LinearWeight::Ggml(m) = self {
            m.release_pages();
        }
    }
}

/// The device whose memory holds a candle weight.
fn qmatmul_device(q: &QMatMul) -> Device {
    match q {
        QMatMul::QTensor(t) => t.device(),
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.device().clone(),
    }
}

/// The candle GGML type for a seer-kernels type ([`quant_type`]'s inverse).
pub fn ggml_type(t: QuantType) -> GgmlDType {
    const HELD: [GgmlDType; 5] = [GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K];
    HELD.into_iter().find(|&d| quant_type(d) == Some(t)).expect("every seer-kernels type is a GGML type")
}

/// The seer-kernels type for a candle GGML type.
pub fn quant_type(dtype: GgmlDType) -> Option<QuantType> {
    match dtype {
        GgmlDType::Q4_0 => Some(QuantType::Q4_0),
        GgmlDType::Q8_0 => Some(QuantType::Q8_0),
        GgmlDType::Q4K => Some(QuantType::Q4K),
        GgmlDType::Q5K => Some(QuantType::Q5K),
        GgmlDType::Q6K => Some(QuantType::Q6K),
        _ => None,
    }
}

enum WeightBytes {
    /// In place in a GGUF file's map.
    Mapped(MappedBytes),
    /// Quantized at load (in-situ quantization of a dense checkpoint).
    Owned(Vec<u8>),
}

/// A `[rows, cols]` matrix in GGML blocks, row-major, as GGUF stores it.
pub struct QuantMatrix {
    t: QuantType,
    rows: usize,
    cols: usize,
    bytes: WeightBytes,
}

impl QuantMatrix {
    /// `None` unless `bytes` hold exactly `rows` rows of `cols` (a whole number of blocks).
    pub fn mapped(t: QuantType, rows: usize, cols: usize, bytes: MappedBytes) -> Option<Self> {
        Self::checked(t, rows, cols, WeightBytes::Mapped(bytes))
    }

    pub fn owned(t: QuantType, rows: usize, cols: usize, bytes: Vec<u8>) -> Option<Self> {
        Self::checked(t, rows, cols, WeightBytes::Owned(bytes))
    }

    fn checked(t: QuantType, rows: usize, cols: usize, bytes: WeightBytes) -> Option<Self> {
        let m = QuantMatrix { t, rows, cols, bytes };
        (cols.is_multiple_of(t.block_size()) && m.bytes().len() == rows * t.row_bytes(cols)).then_some(m)
    }

    /// A candle tensor's blocks, copied, when seer-kernels has its type and it is a matrix.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let (Some(t), [rows, cols]) = (quant_type(q.dtype()), q.shape().dims()) else {
            return Ok(None);
        };
        Ok(Self::owned(t, *rows, *cols, q.data()?.into_owned()))
    }

    pub fn quant_type(&self) -> QuantType {
        self.t
    }

    /// `[rows, cols]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn bytes(&self) -> &[u8] {
        match &self.bytes {
            WeightBytes::Mapped(m) => m,
            WeightBytes::Owned(v) => v,
        }
    }

    /// The blocks copied into a candle tensor on `device`.
    pub fn to_qtensor(&self, device: &Device) -> Result<QTensor> {
        qtensor_from_ggml(ggml_type(self.t), self.bytes(), vec![self.rows, self.cols], device)
    }

    /// Hands a mapped matrix's pages back (they stay in the page cache).
    pub fn release_pages(&self) {
        if let WeightBytes::Mapped(m) = &self.bytes {
            m.release_pages();
        }
    }

    /// Row `r`, dequantized into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let rb = self.t.row_bytes(self.cols);
        seer_kernels::dequantize_row(self.t, &self.bytes()[r * rb..(r + 1) * rb], out);
    }

    /// The whole matrix as f32, `[rows, cols]`.
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        seer_kernels::dequantize_row(self.t, self.bytes(), &mut out);
        Tensor::from_vec(out, (self.rows, self.cols), &candle_core::Device::Cpu)
    }

    /// Rows `ids` (each below `rows`), dequantized: `[ids.len(), cols]`.
    pub fn rows_f32(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (o, &id) in out.chunks_mut(self.cols).zip(ids) {
            if id as usize >= self.rows {
                candle_core::bail!("row {id} of a matrix of {} rows", self.rows);
            }
            self.dequantize_row(id as usize, o);
        }
        Tensor::from_vec(out, (ids.len(), self.cols), &candle_core::Device::Cpu)
    }

    /// `x` is `[..., cols]` (f32); the result is `[..., rows]`.
    pub fn forward(self: &Arc<Self>, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(candle_core::DType::F32)?.contiguous()?;
        x.apply_op1_no_bwd(&GgmlMatMul(self.clone()))?.to_dtype(dtype)
    }
}

/// `x · Wᵀ` through seer-kernels, reading candle's storage in place.
struct GgmlMatMul(Arc<QuantMatrix>);

impl CustomOp1 for GgmlMatMul {
    fn name(&self) -> &'static str {
        "seer-ggml-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = &self.0;
        row_product(self.name(), storage, layout, (w.rows, w.cols), |x, n, out| {
            seer_kernels::matmul(w.t, w.bytes(), w.rows, w.cols, x, n, out)
        })
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

    /// Whether the weight is held in a quantized (GGML) type rather than as floats.
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, LinearWeight::Ggml(_) | LinearWeight::Candle(QMatMul::QTensor(_)))
    }

    /// `x · Wᵢᵀ (+ bᵢ)` for each of `linears`, all with the same input width. A single input
    /// row through quantized weights (a decode step) takes one pass of seer-kernels over
    /// all of them; anything else runs them one by one.
    pub fn forward_many(linears: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let mats: Option<Vec<&Arc<QuantMatrix>>> = linears
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Ggml(m) => Some(m),
                _ => None,
            })
            .collect();
        let cols = x.dims().last().copied().unwrap_or(0);
        let single_row = x.elem_count() == cols;
        let Some(mats) = mats.filter(|m| single_row && m.iter().all(|q| q.cols == cols)) else {
            return linears.iter().map(|l| l.forward(x)).collect();
        };
        let input = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let parts: Vec<(QuantType, &[u8], usize)> = mats.iter().map(|m| (m.t, m.bytes(), m.rows)).collect();
        let mut outs: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; m.rows]).collect();
        let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        seer_kernels::matmul_many(&parts, cols, &input, &mut views);
        let mut lead = x.dims().to_vec();
        lead.pop();
        outs.into_iter()
            .zip(linears)
            .map(|(o, l)| {
                let mut dims = lead.clone();
                dims.push(o.len());
                let y = Tensor::from_vec(o, dims, x.device())?.to_dtype(x.dtype())?;
                match &l.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            })
            .collect()
    }

    /// Whether the weight runs through the bf16 kernel.
    pub fn is_bf16(&self) -> bool {
        matches!(self.weight, LinearWeight::Bf16(_))
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
            LinearWeight::Ggml(w) => w.forward(x)?,
            LinearWeight::Candle(q) => {
                let device = qmatmul_device(q);
                if device.same_device(x.device()) {
                    q.forward(x)?
                } else {
                    q.forward(&x.to_device(&device)?)?.to_device(x.device())?
                }
            }
            LinearWeight::Bf16(w) => {
                let dtype = x.dtype();
                let x = x.to_dtype(candle_core::DType::F32)?.contiguous()?;
                x.apply_op1_no_bwd(&Bf16MatMul(w.clone()))?.to_dtype(dtype)?
            }
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x · Wᵀ` in bf16 through seer-kernels, reading candle's storage in place.
struct Bf16MatMul(Arc<Bf16Matrix>);

impl CustomOp1 for Bf16MatMul {
    fn name(&self) -> &'static str {
        "seer-bf16-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        row_product(self.name(), storage, layout, self.0.dims(), |x, n, out| self.0.matmul(x, n, out))
    }
}

/// The body of a `x · Wᵀ` op on candle's storage, read in place: checks that the input is
/// contiguous f32 with `cols` in its last dimension, and lets `product(x, n, out)` fill
/// the `n × rows` result.
fn row_product(
    op: &str,
    storage: &CpuStorage,
    layout: &Layout,
    (rows, cols): (usize, usize),
    product: impl FnOnce(&[f32], usize, &mut [f32]),
) -> Result<(CpuStorage, Shape)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 input expected");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: input is not contiguous");
    };
    let mut dims = layout.shape().dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last == cols => *last = rows,
        _ => candle_core::bail!("{op}: input {:?} against a [{rows}, {cols}] weight", layout.shape()),
    }
    let x = &data[start..end];
    let n = x.len() / cols.max(1);
    let mut out = vec![0f32; n * rows];
    product(x, n, &mut out);
    Ok((CpuStorage::F32(out), Shape::from(dims)))
}
