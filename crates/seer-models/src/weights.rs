//! The one seam through which every layer gets its weights.
//!
//! Model code asks a [`Vb`] for tensors by the names the Hugging Face configs use
//! (`layers.0.self_attn.q_proj.weight`). A [`TensorSource`] answers: safetensors folders
//! as they are, GGUF files through a name map to llama.cpp's names. Whether a weight is
//! dense or quantized is decided here too, so model code never branches on the format.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use memmap2::{Mmap, UncheckedAdvice};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::linear::{quant_type, Linear, LinearWeight, QuantMatrix};
use crate::mapped::MappedBytes;
use seer_kernels::{Bf16Matrix, Half, HeldBytes};

/// A weight as stored: dense (upcast to f32) or in a ggml quantized type.
pub enum Stored {
    Dense(Tensor),
    /// A matrix in a type seer's kernels multiply, in place in its file.
    Ggml(QuantMatrix),
    /// Any other quantized tensor, through candle.
    Quantized(QTensor),
}

pub trait TensorSource: Send + Sync {
    /// Which file(s) this is, for error messages.
    fn describe(&self) -> String;
    fn contains(&self, name: &str) -> bool;
    fn shape(&self, name: &str) -> Result<Vec<usize>>;
    fn load(&self, name: &str) -> Result<Stored>;
    /// Rows `rows` of the 2-D tensor `name` as f32, for sources that can read part of a
    /// tensor (safetensors); `None` otherwise.
    fn load_rows(&self, _name: &str, _rows: std::ops::Range<usize>) -> Result<Option<Vec<f32>>> {
        Ok(None)
    }
    /// The 2-D tensor `name` as its 16-bit values in place (a file's map), where it is
    /// stored that way and the source can lend its bytes; `None` otherwise.
    fn in_place_half(&self, _name: &str) -> Result<Option<(Half, Box<dyn HeldBytes>)>> {
        Ok(None)
    }
}

/// How a model's weights are held, decided once at load.
#[derive(Clone, Debug, Default)]
pub struct LoadPlan {
    /// In-situ quantization of the language model's dense matrices.
    pub isq: Option<GgmlDType>,
    /// The vision tower's and projector's products in bf16 (ignored where the CPU lacks
    /// AVX512-BF16, and when the products run elsewhere).
    pub vision_bf16: bool,
    /// Where the matrix products run: `None` for seer's CPU kernels, or a device whose
    /// memory takes the matrices and whose candle kernels multiply them (a GPU; the CPU
    /// too, which tests use). Everything else (norms, attention, the KV cache) stays on
    /// the CPU: each product's input goes to the device and its result comes back.
    pub products_on: Option<Device>,
}

/// A view of a [`TensorSource`] under a name prefix, like candle's `VarBuilder`.
#[derive(Clone)]
pub struct Vb {
    src: Arc<dyn TensorSource>,
    prefix: String,
    /// In-situ quantization: dense matrices read through this view are quantized to
    /// this type as they load (one tensor at a time, so two full copies never coexist).
    isq: Option<GgmlDType>,
    /// Dense matrices read through this view are rounded to bf16 and multiplied by the
    /// AVX512-BF16 kernel (vision towers whose weights ship in 16 bits anyway); those the
    /// file stores in f16 or bf16 are read in place, their pages handed back after each
    /// product.
    bf16: bool,
    /// See [`LoadPlan::products_on`].
    products_on: Option<Device>,
}

impl Vb {
    pub fn new(src: Arc<dyn TensorSource>) -> Self {
        Vb { src, prefix: String::new(), isq: None, bf16: false, products_on: None }
    }

    /// The same view for a language model's weights: quantized at load and placed as
    /// `plan` says.
    pub fn for_text(&self, plan: &LoadPlan) -> Vb {
        Vb { isq: plan.isq, products_on: plan.products_on.clone(), ..self.clone() }
    }

    /// The same view for a vision tower's or projector's weights: bf16 and placed as
    /// `plan` says.
    pub fn for_vision(&self, plan: &LoadPlan) -> Vb {
        let bf16 = plan.vision_bf16 && plan.products_on.is_none() && Bf16Matrix::available();
        Vb { bf16, products_on: plan.products_on.clone(), ..self.clone() }
    }

    /// The same view with in-situ quantization of its matrices to `isq`.
    pub fn with_isq(&self, isq: Option<GgmlDType>) -> Vb {
        Vb { isq, ..self.clone() }
    }

    /// Where this view's matrix products run (see [`LoadPlan::products_on`]).
    pub fn products_on(&self) -> Option<&Device> {
        self.products_on.as_ref()
    }

    /// Descends one level: `vb.pp("layers").pp(3)` names `layers.3.*`.
    pub fn pp(&self, part: impl std::fmt::Display) -> Vb {
        let prefix = if self.prefix.is_empty() {
            part.to_string()
        } else {
            format!("{}.{part}", self.prefix)
        };
        Vb { prefix, ..self.clone() }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.src.contains(&self.full(name))
    }

    pub fn describe(&self) -> String {
        self.src.describe()
    }

    /// A tensor as f32, whatever it is stored as.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        match self.src.load(&self.full(name))? {
            Stored::Dense(t) => Ok(t),
            Stored::Ggml(q) => Ok(q.dequantize()?),
            Stored::Quantized(q) => Ok(q.dequantize(&Device::Cpu)?),
        }
    }

    /// Like [`Vb::tensor`] but checks the shape, so a mismatched checkpoint fails at load
    /// with the tensor's name instead of deep inside a forward pass.
    pub fn tensor_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensor(name)?;
        if t.dims() != shape {
            return Err(ModelError::Mismatch(format!(
                "tensor `{}` in {} has shape {:?}, the config implies {:?}",
                self.full(name),
                self.describe(),
                t.dims(),
                shape
            )));
        }
        Ok(t)
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.src.shape(&self.full(name))
    }

    /// The weight in its stored type, for layers that keep quantized tables as they are.
    pub fn load_stored(&self, name: &str) -> Result<Stored> {
        self.src.load(&self.full(name))
    }

    /// `{prefix}.weight` (shape `[out, in]`) and, if `bias`, `{prefix}.bias`.
    pub fn linear(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let name = self.full("weight");
        let shape = self.src.shape(&name)?;
        if shape != [out_dim, in_dim] {
            return Err(ModelError::Mismatch(format!(
                "tensor `{name}` in {} has shape {shape:?}, the config implies [{out_dim}, {in_dim}]",
                self.describe()
            )));
        }
        let weight = match self.isq_matrix("weight")? {
            Some(m) => LinearWeight::Ggml(Arc::new(m)),
            None => self.dense_or_stored(&name, in_dim, out_dim)?,
        };
        // On a device the copy there is the weight: the file's pages go back.
        let weight = match &self.products_on {
            Some(device) => {
                let copy = weight.to_device(device)?;
                weight.release_pages();
                copy
            }
            None => weight,
        };
        let bias = if bias { Some(self.tensor_shaped("bias", &[out_dim])?) } else { None };
        Ok(Linear::new(weight, bias))
    }

    /// The weight as stored: dense (f32, or bf16 for this view: in place when the file
    /// holds it in 16 bits), or quantized in its file.
    fn dense_or_stored(&self, name: &str, in_dim: usize, out_dim: usize) -> Result<LinearWeight> {
        if self.bf16 {
            if let Some((half, bytes)) = self.src.in_place_half(name)? {
                if let Some(m) = Bf16Matrix::in_place(half, out_dim, in_dim, bytes) {
                    return Ok(LinearWeight::Bf16(Arc::new(m)));
                }
            }
        }
        Ok(match self.src.load(name)? {
            Stored::Dense(t) if self.bf16 => LinearWeight::Bf16(Arc::new(with_f32_slice(&t, |w| Bf16Matrix::pack(w, out_dim, in_dim))?)),
            Stored::Dense(t) => LinearWeight::Dense(t),
            Stored::Ggml(q) => LinearWeight::Ggml(Arc::new(q)),
            Stored::Quantized(q) => LinearWeight::quantized(q)?,
        })
    }

    /// The matrix `{prefix}.name` (`[rows, cols]`) quantized to this view's ISQ type as it
    /// streams from the file, [`ISQ_CHUNK`] values at a time, so the f32 matrix never exists
    /// whole (Llama 3's 128k × 4096 output matrix alone is 2 GiB of f32). `None` without
    /// ISQ, when the rows do not split into the type's blocks, or from a source that cannot
    /// read part of a tensor.
    pub fn isq_matrix(&self, name: &str) -> Result<Option<QuantMatrix>> {
        let name = self.full(name);
        let &[rows, cols] = self.src.shape(&name)?.as_slice() else { return Ok(None) };
        let Some(dtype) = isq_type(self.isq, cols) else { return Ok(None) };
        let qt = quant_type(dtype).ok_or_else(|| ModelError::Config(format!("no kernel for ISQ type {dtype:?}")))?;
        let step = (ISQ_CHUNK / cols).max(1);
        let mut bytes = Vec::with_capacity(rows * qt.row_bytes(cols));
        for start in (0..rows).step_by(step) {
            let Some(xs) = self.src.load_rows(&name, start..(start + step).min(rows))? else { return Ok(None) };
            bytes.extend_from_slice(&quantize_parallel(dtype, &xs, cols));
        }
        QuantMatrix::owned(qt, rows, cols, bytes)
            .map(Some)
            .ok_or_else(|| ModelError::Config(format!("quantizing `{name}` [{rows}, {cols}] to {dtype:?} failed")))
    }

    /// A weight with an optional bias: present in some checkpoints, absent in others.
    pub fn linear_opt_bias(&self, in_dim: usize, out_dim: usize) -> Result<Linear> {
        self.linear(in_dim, out_dim, self.contains("bias"))
    }
}

/// The type a `[out, in]` matrix is quantized to: rows must split into whole blocks, so
/// a k-quant (blocks of 256) falls back to Q8_0 (blocks of 32) for narrower rows, and a
/// row that fits neither stays dense.
fn isq_type(isq: Option<GgmlDType>, in_dim: usize) -> Option<GgmlDType> {
    let wanted = isq?;
    [wanted, GgmlDType::Q8_0].into_iter().find(|t| in_dim.is_multiple_of(t.block_size()))
}

/// `f` on a CPU f32 tensor's values in place (a fresh one is contiguous), no copy.
fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(ModelError::Config("weights are loaded on the CPU".into()));
    };
    Ok(f(&cpu.as_slice::<f32>()?[layout.start_offset()..][..t.elem_count()]))
}

/// Values of a matrix quantized at once under ISQ: 16 MiB of f32.
pub const ISQ_CHUNK: usize = 1 << 22;

/// Rows of `cols` values (`xs`) quantized on every core, each taking a run of rows.
fn quantize_parallel(dtype: GgmlDType, xs: &[f32], cols: usize) -> Vec<u8> {
    let rows = xs.len() / cols;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows).max(1);
    let per = rows.div_ceil(threads) * cols;
    let parts: Vec<Vec<u8>> = std::thread::scope(|s| {
        let runs: Vec<_> = xs.chunks(per).map(|run| s.spawn(move || quantize_blocks(dtype, run))).collect();
        runs.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    parts.concat()
}

/// `xs` (whole blocks) in a ggml block type, as the bytes GGUF would store.
fn quantize_blocks(dtype: GgmlDType, xs: &[f32]) -> Vec<u8> {
    use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType};
    fn blocks<B: GgmlType>(xs: &[f32]) -> Vec<u8> {
        let mut ys = vec![B::zeros(); xs.len() / B::BLCK_SIZE];
        B::from_float(xs, &mut ys);
        // SAFETY: ggml blocks are plain `repr(C)` structs of integers and f16s.
        unsafe { std::slice::from_raw_parts(ys.as_ptr().cast::<u8>(), std::mem::size_of_val(ys.as_slice())) }.to_vec()
    }
    match dtype {
        GgmlDType::Q4_0 => blocks::<BlockQ4_0>(xs),
        GgmlDType::Q8_0 => blocks::<BlockQ8_0>(xs),
        GgmlDType::Q4K => blocks::<BlockQ4K>(xs),
        GgmlDType::Q5K => blocks::<BlockQ5K>(xs),
        GgmlDType::Q6K => blocks::<BlockQ6K>(xs),
        // isq_type only picks types seer's kernels have; an empty result fails the size check
        _ => Vec::new(),
    }
}

/// One or several `.safetensors` files, memory-mapped. Every tensor is copied out (to f32,
/// bf16 or quantized) as it loads, and its pages are then handed back to the kernel, so an
/// 11B checkpoint quantized at load never sits in the process's memory as a whole; or, for
/// 16-bit matrices of a bf16 view, read in place.
pub struct SafetensorsSource {
    files: Vec<PathBuf>,
    maps: Vec<Arc<Mmap>>,
    tensors: HashMap<String, TensorEntry>,
}

struct TensorEntry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Byte range within the file's map.
    start: usize,
    end: usize,
}

impl SafetensorsSource {
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            check_safetensors_header(path)?;
            let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: mapped read-only; like every mmap-based loader we assume the file is
            // not modified while seer runs.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| ModelError::Format {
                path: path.clone(),
                format: "safetensors",
                detail: e.to_string(),
            })?;
            for (name, info) in meta.tensors() {
                let (start, end) = info.data_offsets;
                let entry = TensorEntry { file: i, dtype: info.dtype, shape: info.shape.clone(), start: 8 + header_len + start, end: 8 + header_len + end };
                tensors.entry(name).or_insert(entry);
            }
            maps.push(Arc::new(map));
        }
        Ok(SafetensorsSource { files: files.to_vec(), maps, tensors })
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors.get(name).ok_or_else(|| self.missing(name))
    }

    /// The tensor as f32, and its pages dropped from this process's memory (they stay in
    /// the page cache; touching them again reads them back).
    fn load_f32(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let values = self.read_f32(name, e, e.start..e.end)?;
        Ok(Tensor::from_vec(values, e.shape.as_slice(), &Device::Cpu)?)
    }

    /// Bytes `range` of the map holding `e`, as f32; then those pages are handed back.
    fn read_f32(&self, name: &str, e: &TensorEntry, range: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let map = &self.maps[e.file];
        let bytes = &map[range.clone()];
        let values = match e.dtype {
            safetensors::Dtype::BF16 => widen_bf16(bytes),
            safetensors::Dtype::F16 => widen_f16(bytes),
            safetensors::Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            dtype => {
                let candle = candle_dtype(dtype).ok_or_else(|| ModelError::Format {
                    path: self.files[e.file].clone(),
                    format: "safetensors",
                    detail: format!("tensor `{name}` has type {dtype:?}, which seer does not read"),
                })?;
                let n = bytes.len() * 8 / dtype.bitsize();
                Tensor::from_raw_buffer(bytes, candle, &[n], &Device::Cpu)?.to_dtype(DType::F32)?.to_vec1::<f32>()?
            }
        };
        // SAFETY: the map is read-only and file-backed, and nothing borrows these bytes any
        // more: DONTNEED only drops the pages, a later read faults them in from the file.
        let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, range.start, range.len()) };
        Ok(values)
    }
}

/// IEEE half floats (little-endian bytes) to f32.
pub(crate) fn widen_f16(bytes: &[u8]) -> Vec<f32> {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    widen(bytes, |b, o| b.reinterpret_cast::<half::f16>().convert_to_f32_slice(o), |b| half::f16::from_bits(b).to_f32())
}

/// bfloat16 (little-endian bytes) to f32.
pub(crate) fn widen_bf16(bytes: &[u8]) -> Vec<f32> {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    widen(bytes, |b, o| b.reinterpret_cast::<half::bf16>().convert_to_f32_slice(o), |b| half::bf16::from_bits(b).to_f32())
}

/// 16-bit values to f32: `fast` (half's vectorized conversion) where the bytes are
/// 2-aligned, as they are in GGUF and safetensors files, else `one` at a time.
fn widen(bytes: &[u8], fast: impl Fn(&[u16], &mut [f32]), one: impl Fn(u16) -> f32) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / 2];
    // SAFETY: every bit pattern is a valid u16; align_to only hands out the aligned middle.
    let (head, bits, tail) = unsafe { bytes.align_to::<u16>() };
    if head.is_empty() && tail.is_empty() && cfg!(target_endian = "little") {
        fast(bits, &mut out);
    } else {
        out.iter_mut().zip(bytes.chunks_exact(2)).for_each(|(o, b)| *o = one(u16::from_le_bytes([b[0], b[1]])));
    }
    out
}

/// The candle type of the other element types seer reads (the floats are widened directly).
fn candle_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match dtype {
        S::F64 => DType::F64,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I64 => DType::I64,
        _ => return None,
    })
}

/// Reads the header length and checks the data it describes is all there, so a truncated
/// download is reported as such (the safetensors crate only says the buffer is too small).
fn check_safetensors_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let file_len = f.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let truncated = |detail: String| ModelError::Truncated { path: path.into(), detail };
    let mut len_bytes = [0u8; 8];
    f.read_exact(&mut len_bytes)
        .map_err(|_| truncated(format!("{file_len} bytes, shorter than the 8-byte header length")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100 << 20 {
        return Err(ModelError::Format {
            path: path.into(),
            format: "safetensors",
            detail: format!("header length {header_len} is implausible"),
        });
    }
    if 8 + header_len > file_len {
        return Err(truncated(format!("header needs {} bytes, file has {file_len}", 8 + header_len)));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| ModelError::io(path, e))?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| ModelError::Format {
        path: path.into(),
        format: "safetensors",
        detail: format!("header is not JSON: {e}"),
    })?;
    let data_end = header
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    if 8 + header_len + data_end > file_len {
        return Err(truncated(format!(
            "tensor data needs {} bytes, file has {file_len}",
            8 + header_len + data_end
        )));
    }
    Ok(())
}

impl TensorSource for SafetensorsSource {
    fn describe(&self) -> String {
        match self.files.as_slice() {
            [one] => one.display().to_string(),
            many => format!("{} ({} files)", many[0].parent().unwrap_or(Path::new(".")).display(), many.len()),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.shape.clone())
    }

    fn load(&self, name: &str) -> Result<Stored> {
        Ok(Stored::Dense(self.load_f32(name)?))
    }

    fn load_rows(&self, name: &str, rows: std::ops::Range<usize>) -> Result<Option<Vec<f32>>> {
        let e = self.entry(name)?;
        let &[n, cols] = e.shape.as_slice() else { return Ok(None) };
        if rows.end > n {
            return Err(ModelError::Mismatch(format!("rows {rows:?} of `{name}`, which has {n}")));
        }
        let row_bytes = cols * e.dtype.bitsize() / 8;
        Ok(Some(self.read_f32(name, e, e.start + rows.start * row_bytes..e.start + rows.end * row_bytes)?))
    }

    fn in_place_half(&self, name: &str) -> Result<Option<(Half, Box<dyn HeldBytes>)>> {
        let e = self.entry(name)?;
        let half = match e.dtype {
            safetensors::Dtype::F16 => Half::F16,
            safetensors::Dtype::BF16 => Half::Bf16,
            _ => return Ok(None),
        };
        if e.shape.len() != 2 {
            return Ok(None);
        }
        Ok(Some((half, Box::new(MappedBytes::new(self.maps[e.file].clone(), e.start..e.end)))))
    }
}

impl SafetensorsSource {
    /// Bytes the weights take once upcast to f32, as seer holds dense weights today.
    pub fn f32_bytes(&self) -> u64 {
        self.tensors.values().map(|e| e.shape.iter().product::<usize>() as u64 * 4).sum()
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::MissingTensor { name: name.into(), source_desc: self.describe() }
    }
}

/// Maps a Hugging Face style name to the GGUF tensor name, or `None` if the GGUF
/// layout has no such tensor.
pub type NameMap = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// How one architecture's Hugging Face names become llama.cpp's: whole names that map
/// one to one, and per-layer modules (`{layers}.N.{module}.{param}` →
/// `{blocks}.N.{gguf}.{param}`).
pub struct GgufNames {
    pub whole: &'static [(&'static str, &'static str)],
    pub layers: &'static str,
    pub blocks: &'static str,
    pub modules: &'static [(&'static str, &'static str)],
}

impl GgufNames {
    pub fn map(&self, hf: &str) -> Option<String> {
        if let Some((_, gguf)) = self.whole.iter().find(|(h, _)| *h == hf) {
            return Some(gguf.to_string());
        }
        let rest = hf.strip_prefix(self.layers)?.strip_prefix('.')?;
        let (layer, rest) = rest.split_once('.')?;
        let (module, param) = rest.rsplit_once('.')?;
        let (_, gguf) = self.modules.iter().find(|(h, _)| *h == module)?;
        Some(format!("{}.{layer}.{gguf}.{param}", self.blocks))
    }
}

/// A GGUF file seen through a name map.
pub struct GgufSource {
    file: Arc<GgufFile>,
    map: NameMap,
}

impl GgufSource {
    pub fn new(file: Arc<GgufFile>, map: NameMap) -> Self {
        GgufSource { file, map }
    }

    fn gguf_name(&self, name: &str) -> Result<String> {
        (self.map)(name)
            .filter(|n| self.file.has_tensor(n))
            .ok_or_else(|| ModelError::MissingTensor {
                name: (self.map)(name).unwrap_or_else(|| name.to_string()),
                source_desc: self.describe(),
            })
    }
}

impl TensorSource for GgufSource {
    fn describe(&self) -> String {
        self.file.path().display().to_string()
    }

    fn contains(&self, name: &str) -> bool {
        self.gguf_name(name).is_ok()
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.file.tensor_shape(&self.gguf_name(name)?)
    }

    fn load(&self, name: &str) -> Result<Stored> {
        let gname = self.gguf_name(name)?;
        let dtype = self.file.tensor_dtype(&gname)?;
        if let (Some(t), [rows, cols]) = (quant_type(dtype), self.file.tensor_shape(&gname)?.as_slice()) {
            // In place in the map: no copy, the pages load as the kernels first read them.
            if let Some(m) = QuantMatrix::mapped(t, *rows, *cols, self.file.tensor_mapped(&gname)?) {
                return Ok(Stored::Ggml(m));
            }
        }
        // Copied out of the map (as f32, or into candle's own blocks): the mapped pages
        // are not needed any more.
        let stored = match dtype {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Stored::Dense(self.file.tensor(&gname)?),
            _ => Stored::Quantized(self.file.qtensor(&gname)?),
        };
        self.file.release(&gname);
        Ok(stored)
    }

    fn in_place_half(&self, name: &str) -> Result<Option<(Half, Box<dyn HeldBytes>)>> {
        let gname = self.gguf_name(name)?;
        let half = match self.file.tensor_dtype(&gname)? {
            GgmlDType::F16 => Half::F16,
            GgmlDType::BF16 => Half::Bf16,
            _ => return Ok(None),
        };
        if self.file.tensor_shape(&gname)?.len() != 2 {
            return Ok(None);
        }
        Ok(Some((half, Box::new(self.file.tensor_mapped(&gname)?))))
    }
}
