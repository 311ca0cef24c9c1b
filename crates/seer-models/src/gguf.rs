//! GGUF files: memory-mapped, parsed and validated once at open.
//!
//! The parser is our own rather than candle's `gguf_file::Content::read` for three reasons:
//! every failure must become a typed `ModelError` naming the file (truncated vs. corrupt),
//! hostile input must never panic (candle divides by a zero `general.alignment`), and
//! tensors of ggml types candle cannot load must not stop the file from opening.
//!
//! Layout (little-endian, v2/v3): magic "GGUF", u32 version, u64 tensor count, u64 metadata
//! count, the metadata key/values, the tensor infos, padding up to `general.alignment`, then
//! the tensor data. A tensor info lists dimensions innermost first (ggml's `ne`); we expose
//! them outermost first, as candle does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use memmap2::Mmap;

use crate::error::{ModelError, Result};
use crate::mapped::MappedBytes;

pub use candle_core::quantized::gguf_file::Value as GgufValue;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Bounds recursion through arrays of arrays, so a crafted file cannot overflow the stack.
const MAX_ARRAY_DEPTH: usize = 16;

/// Everything we know about one ggml type: enough to size its data even when candle
/// cannot load it, so that bounds are checked for every tensor at open.
#[derive(Debug, Clone, Copy)]
struct GgmlType {
    id: u32,
    name: &'static str,
    /// Elements per block.
    block: u64,
    /// Bytes per block.
    size: u64,
    /// The candle type, when candle can load tensors of this type.
    candle: Option<GgmlDType>,
}

const fn ty(id: u32, name: &'static str, block: u64, size: u64, candle: Option<GgmlDType>) -> GgmlType {
    GgmlType { id, name, block, size, candle }
}

/// Sizes follow ggml's block structs (ggml-common.h); ids follow `enum ggml_type`.
const GGML_TYPES: &[GgmlType] = &[
    ty(0, "F32", 1, 4, Some(GgmlDType::F32)),
    ty(1, "F16", 1, 2, Some(GgmlDType::F16)),
    ty(2, "Q4_0", 32, 18, Some(GgmlDType::Q4_0)),
    ty(3, "Q4_1", 32, 20, Some(GgmlDType::Q4_1)),
    ty(6, "Q5_0", 32, 22, Some(GgmlDType::Q5_0)),
    ty(7, "Q5_1", 32, 24, Some(GgmlDType::Q5_1)),
    ty(8, "Q8_0", 32, 34, Some(GgmlDType::Q8_0)),
    // Q8_1 and Q8_K are ggml's intermediate types for activations; candle cannot load them.
    ty(9, "Q8_1", 32, 36, None),
    ty(10, "Q2_K", 256, 84, Some(GgmlDType::Q2K)),
    ty(11, "Q3_K", 256, 110, Some(GgmlDType::Q3K)),
    ty(12, "Q4_K", 256, 144, Some(GgmlDType::Q4K)),
    ty(13, "Q5_K", 256, 176, Some(GgmlDType::Q5K)),
    ty(14, "Q6_K", 256, 210, Some(GgmlDType::Q6K)),
    ty(15, "Q8_K", 256, 292, None),
    ty(16, "IQ2_XXS", 256, 66, None),
    ty(17, "IQ2_XS", 256, 74, None),
    ty(18, "IQ3_XXS", 256, 98, None),
    ty(19, "IQ1_S", 256, 50, None),
    ty(20, "IQ4_NL", 32, 18, None),
    ty(21, "IQ3_S", 256, 110, None),
    ty(22, "IQ2_S", 256, 82, None),
    ty(23, "IQ4_XS", 256, 136, None),
    ty(24, "I8", 1, 1, None),
    ty(25, "I16", 1, 2, None),
    ty(26, "I32", 1, 4, None),
    ty(27, "I64", 1, 8, None),
    ty(28, "F64", 1, 8, None),
    ty(29, "IQ1_M", 256, 56, None),
    ty(30, "BF16", 1, 2, Some(GgmlDType::BF16)),
    // 31-33 and 36-38: interleaved layouts that newer ggml no longer writes, still met in old files.
    ty(31, "Q4_0_4_4", 32, 18, None),
    ty(32, "Q4_0_4_8", 32, 18, None),
    ty(33, "Q4_0_8_8", 32, 18, None),
    ty(34, "TQ1_0", 256, 54, None),
    ty(35, "TQ2_0", 256, 66, None),
    ty(36, "IQ4_NL_4_4", 32, 18, None),
    ty(37, "IQ4_NL_4_8", 32, 18, None),
    ty(38, "IQ4_NL_8_8", 32, 18, None),
    ty(39, "MXFP4", 32, 17, None),
    ty(40, "NVFP4", 64, 36, None),
    ty(41, "Q1_0", 128, 18, None),
    ty(42, "Q2_0", 64, 18, None),
];

fn ggml_type(id: u32) -> Option<&'static GgmlType> {
    GGML_TYPES.iter().find(|t| t.id == id)
}

/// Where a tensor lives in the file and what it holds.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Outermost dimension first (candle's order): a `[n_out, n_in]` weight.
    pub shape: Vec<usize>,
    /// ggml's name for the type ("Q4_K", "IQ2_XS", ...), whether or not candle can load it.
    pub type_name: &'static str,
    /// `None` when candle cannot load this type.
    pub dtype: Option<GgmlDType>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Byte length of the data.
    pub size: u64,
}

/// A GGUF file, mapped into memory. Tensor data is read from the map on demand.
pub struct GgufFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    version: u32,
    metadata: HashMap<String, GgufValue>,
    /// In file order.
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps, parses and validates the file: every tensor's data must lie inside it.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        if len == 0 {
            // Mapping an empty file fails with an obscure OS error; say what is wrong instead.
            return Err(truncated(path, "the file is empty".to_string()));
        }
        // SAFETY: the map is only read. Like every mmap-based loader, we assume the file is
        // not modified while it is open; that is the user's contract, as with llama.cpp.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let parsed = Parser::new(&mmap, path).parse()?;
        let tensors = parsed.tensors;
        check_tensor_ranges(&tensors, mmap.len() as u64, path)?;
        let by_name = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            version: parsed.version,
            metadata: parsed.metadata,
            tensors,
            by_name,
            data_offset: parsed.data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Absolute byte offset where the tensor data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn metadata(&self) -> &HashMap<String, GgufValue> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key).ok_or_else(|| self.format_err(format!("metadata key `{key}` is missing")))
    }

    fn wrong_type(&self, key: &str, value: &GgufValue, expected: &str) -> ModelError {
        let found = value_type_name(value);
        self.format_err(format!("metadata key `{key}` holds {found} {}, expected {expected}", short(value)))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let value = self.require(key)?;
        match value {
            GgufValue::String(s) => Ok(s),
            v => Err(self.wrong_type(key, v, "a string")),
        }
    }

    /// Accepts any integer type whose value fits in a u32.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let value = self.require(key)?;
        as_u64(value)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| self.wrong_type(key, value, "an integer that fits in u32"))
    }

    /// Accepts f32, f64 and integers.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let value = self.require(key)?;
        as_f32(value).ok_or_else(|| self.wrong_type(key, value, "a float"))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            GgufValue::Bool(b) => Ok(*b),
            v => Err(self.wrong_type(key, v, "a bool")),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<&[GgufValue]> {
        match self.require(key)? {
            GgufValue::Array(values) => Ok(values),
            v => Err(self.wrong_type(key, v, "an array")),
        }
    }

    /// `None` when the key is missing or holds another type.
    pub fn opt_u32(&self, key: &str) -> Option<u32> {
        self.get(key).and_then(as_u64).and_then(|v| u32::try_from(v).ok())
    }

    pub fn opt_f32(&self, key: &str) -> Option<f32> {
        self.get(key).and_then(as_f32)
    }

    pub fn opt_str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            GgufValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn opt_array(&self, key: &str) -> Option<&[GgufValue]> {
        match self.get(key)? {
            GgufValue::Array(values) => Some(values),
            _ => None,
        }
    }

    /// An array of non-negative integers; `None` when the key is missing or holds
    /// anything else.
    pub fn opt_usizes(&self, key: &str) -> Option<Vec<usize>> {
        self.opt_array(key)?.iter().map(|v| as_u64(v).and_then(|x| usize::try_from(x).ok())).collect()
    }

    /// The id of a token in the vocabulary (`tokenizer.ggml.tokens`); the last one
    /// when the text repeats, as in llama.cpp.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        let tokens = self.opt_array("tokenizer.ggml.tokens")?;
        tokens.iter().rposition(|t| matches!(t, GgufValue::String(s) if s == text)).map(|i| i as u32)
    }

    /// `general.architecture`: "llama", "qwen2", "clip", ...
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// Tensor names in file order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// Tensor infos in file order.
    pub fn tensor_infos(&self) -> impl Iterator<Item = &GgufTensorInfo> {
        self.tensors.iter()
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    pub fn tensor_info(&self, name: &str) -> Result<&GgufTensorInfo> {
        match self.by_name.get(name) {
            Some(&i) => Ok(&self.tensors[i]),
            None => {
                Err(ModelError::MissingTensor { name: name.to_string(), source_desc: self.path.display().to_string() })
            }
        }
    }

    /// Outermost dimension first: a `[n_out, n_in]` weight.
    pub fn tensor_shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.tensor_info(name)?.shape.clone())
    }

    /// Errors, naming the tensor and its type, when candle cannot load that type.
    pub fn tensor_dtype(&self, name: &str) -> Result<GgmlDType> {
        let info = self.tensor_info(name)?;
        info.dtype.ok_or_else(|| self.unsupported(info))
    }

    /// The tensor's raw bytes, straight from the map.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.tensor_info(name)?;
        // In range: checked at open.
        Ok(&self.mmap[info.offset as usize..(info.offset + info.size) as usize])
    }

    /// The tensor's raw bytes in place in the map, holding the map alive (no copy).
    pub fn tensor_mapped(&self, name: &str) -> Result<MappedBytes> {
        let info = self.tensor_info(name)?;
        // In range: checked at open.
        Ok(MappedBytes::new(self.mmap.clone(), info.offset as usize..(info.offset + info.size) as usize))
    }

    /// Tells the system that the tensor's pages in the map are not needed for now: call
    /// it once the tensor has been copied out (a dense weight converted at load), so the
    /// file's pages stop counting in this process's memory. The map is read-only and the
    /// file unchanged, so a later read of the range simply faults the pages in again.
    pub fn release(&self, name: &str) {
        if let Ok(bytes) = self.tensor_mapped(name) {
            bytes.release_pages();
        }
    }

    /// The tensor as stored (quantized or not), on the CPU.
    pub fn qtensor(&self, name: &str) -> Result<QTensor> {
        let dtype = self.tensor_dtype(name)?;
        let info = self.tensor_info(name)?;
        let bytes = self.tensor_bytes(name)?;
        let aligned = aligned_copy(bytes);
        let bytes = aligned.as_deref().map(u64s_as_bytes).unwrap_or(bytes);
        let bytes = &bytes[..info.size as usize];
        let shape = info.shape.clone();
        candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, bytes, shape, &Device::Cpu)
            .map_err(|e| self.format_err(format!("cannot load tensor `{name}`: {e}")))
    }

    /// The tensor dequantized to f32, on the CPU.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        // Float tensors are widened straight from the map: no intermediate copy of the
        // bytes or of a candle tensor .
        let info = self.tensor_info(name)?;
        let bytes = &self.tensor_bytes(name)?[..info.size as usize];
        let floats = match self.tensor_dtype(name)? {
            GgmlDType::F32 => Some(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
            GgmlDType::F16 => Some(crate::weights::widen_f16(bytes)),
            GgmlDType::BF16 => Some(crate::weights::widen_bf16(bytes)),
            _ => None,
        };
        if let Some(values) = floats {
            return Tensor::from_vec(values, info.shape.clone(), &Device::Cpu).map_err(|e| self.format_err(format!("tensor `{name}`: {e}")));
        }
        let q = self.qtensor(name)?;
        q.dequantize(&Device::Cpu).map_err(|e| self.format_err(format!("cannot dequantize tensor `{name}`: {e}")))
    }

    fn format_err(&self, detail: String) -> ModelError {
        format_err(&self.path, detail)
    }

    fn unsupported(&self, info: &GgufTensorInfo) -> ModelError {
        let supported: Vec<&str> = GGML_TYPES.iter().filter(|t| t.candle.is_some()).map(|t| t.name).collect();
        ModelError::Mismatch(format!(
            "{}: tensor `{}` has ggml type {}, which seer cannot load (supported: {})",
            self.path.display(),
            info.name,
            info.type_name,
            supported.join(", ")
        ))
    }
}

fn format_err(path: &Path, detail: String) -> ModelError {
    ModelError::Format { path: path.to_path_buf(), format: "GGUF", detail }
}

fn truncated(path: &Path, detail: String) -> ModelError {
    ModelError::Truncated { path: path.to_path_buf(), detail }
}

/// candle reinterprets tensor bytes as blocks of f16/f32 fields, which needs their
/// alignment. A mmap is page-aligned and GGUF aligns tensor data, but a crafted file need
/// not: copy its bytes to an aligned buffer then (`None` when the slice is fine as it is).
fn aligned_copy(bytes: &[u8]) -> Option<Vec<u64>> {
    if (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<u64>()) {
        return None;
    }
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    for (word, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
        let mut buf = [0u8; 8];
        buf[..chunk.len()].copy_from_slice(chunk);
        *word = u64::from_ne_bytes(buf);
    }
    Some(words)
}

fn u64s_as_bytes(words: &[u64]) -> &[u8] {
    // SAFETY: u8 has no alignment or validity requirements; the length is in bytes.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) }
}

fn as_u64(value: &GgufValue) -> Option<u64> {
    match *value {
        GgufValue::U8(v) => Some(v.into()),
        GgufValue::U16(v) => Some(v.into()),
        GgufValue::U32(v) => Some(v.into()),
        GgufValue::U64(v) => Some(v),
        GgufValue::I8(v) => u64::try_from(v).ok(),
        GgufValue::I16(v) => u64::try_from(v).ok(),
        GgufValue::I32(v) => u64::try_from(v).ok(),
        GgufValue::I64(v) => u64::try_from(v).ok(),
        _ => None,
    }
}

fn as_f32(value: &GgufValue) -> Option<f32> {
    match *value {
        GgufValue::F32(v) => Some(v),
        GgufValue::F64(v) => Some(v as f32),
        GgufValue::I8(v) => Some(v.into()),
        GgufValue::I16(v) => Some(v.into()),
        GgufValue::I32(v) => Some(v as f32),
        GgufValue::I64(v) => Some(v as f32),
        _ => as_u64(value).map(|v| v as f32),
    }
}

fn value_type_name(value: &GgufValue) -> &'static str {
    match value {
        GgufValue::U8(_) => "a u8",
        GgufValue::I8(_) => "an i8",
        GgufValue::U16(_) => "a u16",
        GgufValue::I16(_) => "an i16",
        GgufValue::U32(_) => "a u32",
        GgufValue::I32(_) => "an i32",
        GgufValue::U64(_) => "a u64",
        GgufValue::I64(_) => "an i64",
        GgufValue::F32(_) => "an f32",
        GgufValue::F64(_) => "an f64",
        GgufValue::Bool(_) => "a bool",
        GgufValue::String(_) => "a string",
        GgufValue::Array(_) => "an array",
    }
}

/// A value for an error message, kept short: arrays can hold a whole vocabulary.
fn short(value: &GgufValue) -> String {
    let text = match value {
        GgufValue::Array(values) => return format!("of {} values", values.len()),
        GgufValue::String(s) => format!("{:?}", s.chars().take(40).collect::<String>()),
        GgufValue::Bool(v) => v.to_string(),
        GgufValue::F32(v) => v.to_string(),
        GgufValue::F64(v) => v.to_string(),
        v => as_u64(v).map(|u| u.to_string()).unwrap_or_else(|| signed(v).to_string()),
    };
    format!("({text})")
}

fn signed(value: &GgufValue) -> i64 {
    match *value {
        GgufValue::I8(v) => v.into(),
        GgufValue::I16(v) => v.into(),
        GgufValue::I32(v) => v.into(),
        GgufValue::I64(v) => v,
        _ => 0,
    }
}

/// Checks every tensor's data against the file's length, lowest offset first, so that a
/// cut-off file reports the first tensor it lost.
fn check_tensor_ranges(tensors: &[GgufTensorInfo], file_len: u64, path: &Path) -> Result<()> {
    let mut by_offset: Vec<&GgufTensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    let Some(t) = by_offset.into_iter().find(|t| t.offset + t.size > file_len) else {
        return Ok(());
    };
    let present = file_len.saturating_sub(t.offset);
    let detail = format!(
        "tensor `{}` ({} {:?}) needs {} bytes at offset {}, but the file is {} bytes long \
         ({present} of its bytes are present)",
        t.name, t.type_name, t.shape, t.size, t.offset, file_len
    );
    Err(truncated(path, detail))
}

struct Parsed {
    version: u32,
    metadata: HashMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    data_offset: u64,
}

/// A cursor over the mapped bytes. `place` says what is being read, for error messages.
struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
    place: String,
}

impl<'a> Parser<'a> {
    fn new(bytes: &'a [u8], path: &'a Path) -> Self {
        Parser { bytes, pos: 0, path, place: "the header".to_string() }
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.cut_off(n));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn cut_off(&self, needed: u64) -> ModelError {
        truncated(
            self.path,
            format!(
                "the file ends inside {}: {} bytes needed at offset {}, but the file is {} bytes long",
                self.place,
                needed,
                self.pos,
                self.bytes.len()
            ),
        )
    }

    fn err(&self, detail: String) -> ModelError {
        format_err(self.path, format!("{} (in {})", detail, self.place))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_le_bytes)
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        let bytes = self.take(len)?;
        // GGUF strings should be UTF-8, but some vocabularies hold invalid pieces; keep going.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn parse(mut self) -> Result<Parsed> {
        let version = self.header()?;
        let n_tensors = self.u64()?;
        let n_kv = self.u64()?;
        self.check_counts(n_tensors, n_kv)?;
        let metadata = self.metadata(n_kv)?;
        let alignment = alignment(&metadata).map_err(|d| format_err(self.path, d))?;
        let tensors = self.tensor_infos(n_tensors)?;
        let data_offset = (self.pos as u64).next_multiple_of(alignment);
        let tensors = tensors.into_iter().map(|raw| self.locate(raw, data_offset)).collect::<Result<Vec<_>>>()?;
        Ok(Parsed { version, metadata, tensors, data_offset })
    }

    fn header(&mut self) -> Result<u32> {
        let head = &self.bytes[..self.bytes.len().min(4)];
        if head != &MAGIC[..head.len()] {
            let found = head.escape_ascii();
            return Err(format_err(self.path, format!("bad magic \"{found}\", expected \"GGUF\"")));
        }
        self.take(4)?;
        let version = self.u32()?;
        match version {
            2 | 3 => Ok(version),
            1 => Err(self.err("GGUF version 1 is not supported; reconvert the model".into())),
            v if (1..=3).contains(&v.swap_bytes()) => Err(self.err("big-endian GGUF files are not supported".into())),
            v => Err(self.err(format!("unsupported GGUF version {v}"))),
        }
    }

    /// Rejects counts the file cannot possibly hold before allocating for them.
    fn check_counts(&self, n_tensors: u64, n_kv: u64) -> Result<()> {
        // Smallest metadata entry: key length, value type, one byte. Smallest tensor info:
        // name length, dimension count, type, offset.
        let needed = n_kv.saturating_mul(8 + 4 + 1).saturating_add(n_tensors.saturating_mul(8 + 4 + 4 + 8));
        if needed > self.remaining() {
            return Err(truncated(
                self.path,
                format!(
                    "the file ends inside its metadata or tensor infos: the header declares {n_kv} \
                     metadata entries and {n_tensors} tensors, which need at least {needed} more bytes, \
                     but only {} remain (the file is {} bytes long)",
                    self.remaining(),
                    self.bytes.len()
                ),
            ));
        }
        Ok(())
    }

    fn metadata(&mut self, n_kv: u64) -> Result<HashMap<String, GgufValue>> {
        let mut metadata = HashMap::new();
        for i in 0..n_kv {
            self.place = format!("metadata entry {i} of {n_kv}");
            let key = self.string()?;
            self.place = format!("metadata entry {i} of {n_kv} (`{key}`)");
            let value_type = self.u32()?;
            let value = self.value(value_type, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(self.err(format!("duplicate metadata key `{key}`")));
            }
        }
        Ok(metadata)
    }

    fn value(&mut self, value_type: u32, depth: usize) -> Result<GgufValue> {
        Ok(match value_type {
            0 => GgufValue::U8(self.array::<1>()?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array()?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => GgufValue::Bool(self.bool()?),
            8 => GgufValue::String(self.string()?),
            9 => self.array_value(depth)?,
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            t => return Err(self.err(format!("unknown metadata value type {t}"))),
        })
    }

    fn bool(&mut self) -> Result<bool> {
        match self.array::<1>()?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.err(format!("invalid bool byte {b}"))),
        }
    }

    fn array_value(&mut self, depth: usize) -> Result<GgufValue> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}")));
        }
        let elem_type = self.u32()?;
        let len = self.u64()?;
        let min_size =
            min_value_size(elem_type).ok_or_else(|| self.err(format!("unknown array element type {elem_type}")))?;
        if len.saturating_mul(min_size) > self.remaining() {
            return Err(self.cut_off(len.saturating_mul(min_size)));
        }
        // `len` is bounded by the file size now; cap the up-front allocation all the same.
        let mut values = Vec::with_capacity(len.min(1 << 20) as usize);
        for _ in 0..len {
            values.push(self.value(elem_type, depth + 1)?);
        }
        Ok(GgufValue::Array(values))
    }

    fn tensor_infos(&mut self, n_tensors: u64) -> Result<Vec<RawTensorInfo>> {
        let mut infos = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for i in 0..n_tensors {
            self.place = format!("tensor info {i} of {n_tensors}");
            let name = self.string()?;
            self.place = format!("tensor info {i} of {n_tensors} (`{name}`)");
            let info = self.tensor_info(name)?;
            if !seen.insert(info.name.clone()) {
                return Err(self.err(format!("duplicate tensor `{}`", info.name)));
            }
            infos.push(info);
        }
        Ok(infos)
    }

    fn tensor_info(&mut self, name: String) -> Result<RawTensorInfo> {
        let n_dims = self.u32()?;
        if n_dims > MAX_DIMS {
            return Err(self.err(format!("{n_dims} dimensions, at most {MAX_DIMS} allowed")));
        }
        let ne = (0..n_dims).map(|_| self.u64()).collect::<Result<Vec<_>>>()?;
        let type_id = self.u32()?;
        let ggml = *ggml_type(type_id).ok_or_else(|| self.err(format!("unknown ggml type id {type_id}")))?;
        let offset = self.u64()?;
        Ok(RawTensorInfo { name, ne, ggml, offset })
    }

    /// Sizes a tensor and places it in the file; overflow means a corrupt header.
    fn locate(&self, raw: RawTensorInfo, data_offset: u64) -> Result<GgufTensorInfo> {
        let fail = |detail: String| format_err(self.path, format!("tensor `{}`: {detail}", raw.name));
        let elems = raw.ne.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let elems = elems.ok_or_else(|| fail(format!("dimensions {:?} overflow", raw.ne)))?;
        let row = raw.ne.first().copied().unwrap_or(1);
        if row % raw.ggml.block != 0 {
            return Err(fail(format!(
                "rows of {row} elements do not divide into {} blocks of {}",
                raw.ggml.name, raw.ggml.block
            )));
        }
        let size = (elems / raw.ggml.block).checked_mul(raw.ggml.size);
        let offset = data_offset.checked_add(raw.offset);
        let end = offset.zip(size).and_then(|(o, s)| o.checked_add(s));
        let (Some(offset), Some(size), Some(_)) = (offset, size, end) else {
            return Err(fail(format!("offset {} and shape {:?} overflow", raw.offset, raw.ne)));
        };
        let shape = raw.ne.iter().rev().map(|&d| usize::try_from(d)).collect::<std::result::Result<Vec<_>, _>>();
        let shape = shape.map_err(|_| fail(format!("dimensions {:?} too large", raw.ne)))?;
        Ok(GgufTensorInfo { name: raw.name, shape, type_name: raw.ggml.name, dtype: raw.ggml.candle, offset, size })
    }
}

struct RawTensorInfo {
    name: String,
    /// Innermost first, as stored.
    ne: Vec<u64>,
    ggml: GgmlType,
    /// Relative to the data section.
    offset: u64,
}

/// Smallest encoding of one value of a metadata type, to bound array lengths.
fn min_value_size(value_type: u32) -> Option<u64> {
    Some(match value_type {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        8 => 8,     // length prefix
        9 => 4 + 8, // element type + length
        _ => return None,
    })
}

/// `general.alignment`: a power of two, 32 when absent.
fn alignment(metadata: &HashMap<String, GgufValue>) -> std::result::Result<u64, String> {
    let Some(value) = metadata.get("general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match as_u64(value) {
        Some(a) if a.is_power_of_two() && a <= u32::MAX as u64 => Ok(a),
        _ => Err(format!("general.alignment must be a power of two, found {value:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our size table must agree with candle wherever candle loads the type.
    #[test]
    fn type_table_matches_candle() {
        for t in GGML_TYPES.iter().filter(|t| t.candle.is_some()) {
            let d = t.candle.unwrap();
            assert_eq!(t.block, d.block_size() as u64, "{}", t.name);
            assert_eq!(t.size, d.type_size() as u64, "{}", t.name);
        }
    }

    #[test]
    fn type_ids_are_unique() {
        let mut ids: Vec<u32> = GGML_TYPES.iter().map(|t| t.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), GGML_TYPES.len());
    }
}
