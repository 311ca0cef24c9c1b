//! GgufFile against files written by candle's GGUF writer and by hand: values read back,
//! and cut-off or hostile files rejected with the right error, never a panic.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use seer_models::gguf::{GgufFile, GgufValue};
use seer_models::ModelError;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("seer-gguf-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ramp(shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * scale).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn metadata() -> Vec<(&'static str, GgufValue)> {
    let names = ["a", "b", "c"].iter().map(|s| GgufValue::String(s.to_string())).collect();
    vec![
        ("general.architecture", GgufValue::String("llama".into())),
        ("llama.block_count", GgufValue::U32(2)),
        ("test.u8", GgufValue::U8(7)),
        ("test.i64", GgufValue::I64(5)),
        ("test.negative", GgufValue::I32(-1)),
        ("test.big", GgufValue::U64(1 << 40)),
        ("test.f32", GgufValue::F32(1.5)),
        ("test.f64", GgufValue::F64(0.25)),
        ("test.bool", GgufValue::Bool(true)),
        ("test.names", GgufValue::Array(names)),
    ]
}

/// The tensors of the sample file, as (name, dtype, original values).
fn tensors() -> Vec<(&'static str, GgmlDType, Tensor)> {
    vec![
        ("dense.weight", GgmlDType::F32, ramp(&[3, 4], 1.0)),
        ("half.weight", GgmlDType::F16, ramp(&[2, 8], 3.0)),
        ("q8.weight", GgmlDType::Q8_0, ramp(&[2, 64], 2.0)),
        ("q4k.weight", GgmlDType::Q4K, ramp(&[2, 256], 1.0)),
    ]
}

fn write_sample(path: &Path) -> Vec<u8> {
    let qtensors: Vec<(&str, QTensor)> =
        tensors().into_iter().map(|(n, d, t)| (n, QTensor::quantize(&t, d).unwrap())).collect();
    let meta = metadata();
    let meta_refs: Vec<(&str, &GgufValue)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
    drop(file);
    std::fs::read(path).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn open_err(path: &Path) -> ModelError {
    GgufFile::open(path).expect_err("open should fail")
}

#[test]
fn reads_back_metadata() {
    let dir = temp_dir("meta");
    let path = dir.join("sample.gguf");
    write_sample(&path);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.path(), path);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 2);
    assert_eq!(f.get_u32("test.u8").unwrap(), 7);
    assert_eq!(f.get_u32("test.i64").unwrap(), 5);
    assert_eq!(f.get_f32("test.f32").unwrap(), 1.5);
    assert_eq!(f.get_f32("test.f64").unwrap(), 0.25);
    assert_eq!(f.opt_bool("test.bool"), Some(true));
    assert_eq!(f.opt_str("general.architecture"), Some("llama"));
    assert_eq!(f.opt_u32("test.negative"), None);
    assert_eq!(f.opt_u32("test.big"), None);
    assert_eq!(f.opt_f32("missing"), None);
    assert_eq!(f.get_array("test.names").unwrap().len(), 3);
    assert_eq!(f.metadata().len(), metadata().len());
}

#[test]
fn metadata_errors_name_key_and_file() {
    let dir = temp_dir("meta-err");
    let path = dir.join("sample.gguf");
    write_sample(&path);
    let f = GgufFile::open(&path).unwrap();
    for err in [
        f.get_str("no.such.key").unwrap_err(),
        f.get_u32("test.negative").unwrap_err(),
        f.get_u32("test.big").unwrap_err(),
        f.get_str("test.f32").unwrap_err(),
        f.get_f32("test.names").unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(matches!(err, ModelError::Format { .. }), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
    assert!(f.get_u32("test.negative").unwrap_err().to_string().contains("test.negative"));
    assert!(f.get_str("no.such.key").unwrap_err().to_string().contains("no.such.key"));
}

#[test]
fn reads_back_tensors() {
    let dir = temp_dir("tensors");
    let path = dir.join("sample.gguf");
    write_sample(&path);
    let f = GgufFile::open(&path).unwrap();
    let names: Vec<&str> = f.tensor_names().collect();
    assert_eq!(names, ["dense.weight", "half.weight", "q8.weight", "q4k.weight"]);
    for (name, dtype, original) in tensors() {
        assert!(f.has_tensor(name));
        assert_eq!(f.tensor_shape(name).unwrap(), original.dims(), "{name}");
        assert_eq!(f.tensor_dtype(name).unwrap(), dtype, "{name}");
        assert_eq!(f.qtensor(name).unwrap().dtype(), dtype, "{name}");
        let loaded = f.tensor(name).unwrap();
        assert_eq!(loaded.dtype(), candle_core::DType::F32);
        let err = max_abs_diff(&loaded, &original);
        let tolerance = match dtype {
            GgmlDType::F32 => 0.0,
            GgmlDType::F16 => 3.0 * 1e-3,
            GgmlDType::Q8_0 => 2.0 / 127.0,
            _ => 0.15,
        };
        assert!(err <= tolerance, "{name}: max error {err} > {tolerance}");
    }
}

#[test]
fn missing_tensor_names_tensor_and_file() {
    let dir = temp_dir("missing");
    let path = dir.join("sample.gguf");
    write_sample(&path);
    let f = GgufFile::open(&path).unwrap();
    assert!(!f.has_tensor("nope.weight"));
    let err = f.tensor("nope.weight").unwrap_err();
    assert!(matches!(err, ModelError::MissingTensor { .. }));
    let msg = err.to_string();
    assert!(msg.contains("nope.weight") && msg.contains(&path.display().to_string()), "{msg}");
    assert!(matches!(f.tensor_shape("nope.weight"), Err(ModelError::MissingTensor { .. })));
}

#[test]
fn not_gguf_is_a_format_error() {
    let dir = temp_dir("notgguf");
    let path = dir.join("model.gguf");
    std::fs::write(&path, b"PK\x03\x04 this is a zip file, not a model").unwrap();
    let err = open_err(&path);
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Format { .. }), "{msg}");
    assert!(msg.contains(&path.display().to_string()) && msg.contains("magic"), "{msg}");
}

#[test]
fn missing_file_is_an_io_error() {
    let path = temp_dir("nofile").join("absent.gguf");
    let err = open_err(&path);
    assert!(matches!(err, ModelError::Io { .. }));
    assert!(err.to_string().contains("absent.gguf"));
}

fn cut(bytes: &[u8], len: usize, path: &Path) -> ModelError {
    std::fs::write(path, &bytes[..len]).unwrap();
    open_err(path)
}

fn assert_truncated(err: ModelError, path: &Path, words: &[&str]) {
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Truncated { .. }), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    for word in words {
        assert!(msg.contains(word), "`{word}` not in: {msg}");
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn truncated_files_are_reported() {
    let dir = temp_dir("truncated");
    let bytes = write_sample(&dir.join("sample.gguf"));
    let path = dir.join("cut.gguf");
    assert_truncated(cut(&bytes, 2, &path), &path, &[]);
    assert_truncated(cut(&bytes, 10, &path), &path, &["header"]);
    let key = find(&bytes, b"llama.block_count");
    assert_truncated(cut(&bytes, key + 3, &path), &path, &["metadata"]);
    let names = find(&bytes, b"test.names");
    assert_truncated(cut(&bytes, names + 40, &path), &path, &["metadata", "test.names"]);
    let info = find(&bytes, b"half.weight");
    assert_truncated(cut(&bytes, info + 4, &path), &path, &["tensor info"]);

    let f = GgufFile::open(&dir.join("sample.gguf")).unwrap();
    let q8 = f.tensor_infos().find(|t| t.name == "q8.weight").unwrap().clone();
    let err = cut(&bytes, q8.offset as usize + 5, &path);
    assert_truncated(err, &path, &["q8.weight", &format!("needs {} bytes", q8.size), "5 of its bytes"]);
}

/// Cutting the file anywhere before the end of the last tensor's data must give a
/// `Truncated` error; only the trailing padding may go.
#[test]
fn every_cut_point_is_truncated() {
    let dir = temp_dir("every-cut");
    let bytes = write_sample(&dir.join("sample.gguf"));
    let f = GgufFile::open(&dir.join("sample.gguf")).unwrap();
    let data_end = f.tensor_infos().map(|t| t.offset + t.size).max().unwrap() as usize;
    let path = dir.join("cut.gguf");
    for len in 0..bytes.len() {
        std::fs::write(&path, &bytes[..len]).unwrap();
        match GgufFile::open(&path) {
            Ok(_) => assert!(len >= data_end, "cut at {len} opened"),
            Err(ModelError::Truncated { .. }) => assert!(len < data_end),
            Err(e) => panic!("cut at {len}: {e}"),
        }
    }
}

/// Flipped bytes anywhere must give an error or a usable file, never a panic.
#[test]
fn corrupted_bytes_never_panic() {
    let dir = temp_dir("corrupt");
    let bytes = write_sample(&dir.join("sample.gguf"));
    let path = dir.join("corrupt.gguf");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..600 {
        let mut broken = bytes.clone();
        for _ in 0..3 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = (seed % broken.len() as u64) as usize;
            broken[at] = (seed >> 32) as u8;
        }
        std::fs::write(&path, &broken).unwrap();
        if let Ok(f) = GgufFile::open(&path) {
            let names: Vec<String> = f.tensor_names().map(String::from).collect();
            for name in names {
                let _ = f.tensor(&name);
            }
        }
    }
}

/// A GGUF v3 file assembled by hand, for cases candle's writer cannot produce.
#[derive(Default)]
struct Hand {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
    alignment: usize,
}

impl Hand {
    fn new() -> Self {
        Hand { alignment: 32, ..Default::default() }
    }

    fn str_into(buf: &mut Vec<u8>, s: &str) {
        buf.extend((s.len() as u64).to_le_bytes());
        buf.extend(s.as_bytes());
    }

    fn kv_raw(mut self, key: &str, value_type: u32, value: &[u8]) -> Self {
        Self::str_into(&mut self.kv, key);
        self.kv.extend(value_type.to_le_bytes());
        self.kv.extend(value);
        self.n_kv += 1;
        self
    }

    fn alignment(mut self, alignment: u32) -> Self {
        self.alignment = alignment.max(1) as usize;
        self.kv_raw("general.alignment", 4, &alignment.to_le_bytes())
    }

    /// `ne` innermost first, as stored; `offset` relative to the data section.
    fn tensor(mut self, name: &str, ne: &[u64], type_id: u32, offset: u64) -> Self {
        Self::str_into(&mut self.infos, name);
        self.infos.extend((ne.len() as u32).to_le_bytes());
        for d in ne {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(type_id.to_le_bytes());
        self.infos.extend(offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }

    fn data(mut self, data: &[u8]) -> Self {
        self.data.extend(data);
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.infos);
        out.resize(out.len().next_multiple_of(self.alignment), 0);
        out.extend(&self.data);
        out
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.bytes()).unwrap();
        path
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn assert_format(path: &Path, words: &[&str]) {
    let err = open_err(path);
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Format { .. }), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    for word in words {
        assert!(msg.contains(word), "`{word}` not in: {msg}");
    }
}

#[test]
fn hand_written_file_opens() {
    let dir = temp_dir("hand");
    let values = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let path = Hand::new()
        .kv_raw("general.architecture", 8, &[&5u64.to_le_bytes()[..], b"llama"].concat())
        .tensor("t", &[3, 2], 0, 0)
        .data(&f32_bytes(&values))
        .write(&dir, "ok.gguf");
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.tensor_shape("t").unwrap(), [2, 3]);
    assert_eq!(f.tensor("t").unwrap().to_vec2::<f32>().unwrap(), [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]);
}

#[test]
fn hostile_headers_are_format_errors() {
    let dir = temp_dir("hostile");
    let p = Hand::new().kv_raw("k", 99, &[0]).write(&dir, "value-type.gguf");
    assert_format(&p, &["value type 99", "`k`"]);
    let p = Hand::new().kv_raw("k", 7, &[2]).write(&dir, "bool.gguf");
    assert_format(&p, &["bool"]);
    let p = Hand::new().alignment(0).write(&dir, "align0.gguf");
    assert_format(&p, &["general.alignment"]);
    let p = Hand::new().alignment(24).write(&dir, "align24.gguf");
    assert_format(&p, &["general.alignment"]);
    let p = Hand::new().tensor("t", &[4], 99, 0).data(&[0; 64]).write(&dir, "type.gguf");
    assert_format(&p, &["ggml type id 99", "`t`"]);
    let p = Hand::new().tensor("t", &[1, 1, 1, 1, 1], 0, 0).data(&[0; 64]).write(&dir, "dims.gguf");
    assert_format(&p, &["dimensions"]);
    let p = Hand::new().tensor("t", &[u64::MAX, 4], 0, 0).write(&dir, "overflow.gguf");
    assert_format(&p, &["overflow", "`t`"]);
    let p = Hand::new().tensor("t", &[4], 0, u64::MAX - 8).write(&dir, "offset.gguf");
    assert_format(&p, &["overflow", "`t`"]);
    let p = Hand::new().tensor("t", &[48], 8, 0).data(&[0; 64]).write(&dir, "block.gguf");
    assert_format(&p, &["blocks", "`t`"]);
    let p = Hand::new().tensor("t", &[1], 0, 0).tensor("t", &[1], 0, 32).data(&[0; 64]).write(&dir, "dup.gguf");
    assert_format(&p, &["duplicate tensor"]);
    let p = Hand::new().kv_raw("k", 4, &[0; 4]).kv_raw("k", 4, &[0; 4]).write(&dir, "dupkey.gguf");
    assert_format(&p, &["duplicate metadata key `k`"]);
}

#[test]
fn huge_counts_are_truncation_not_allocation() {
    let dir = temp_dir("huge");
    let mut array = 8u32.to_le_bytes().to_vec();
    array.extend(u64::MAX.to_le_bytes());
    let p = Hand::new().kv_raw("big", 9, &array).write(&dir, "array.gguf");
    assert_truncated(open_err(&p), &p, &["`big`"]);

    let mut bytes = Hand::new().bytes();
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let p = dir.join("tensors.gguf");
    std::fs::write(&p, bytes).unwrap();
    assert_truncated(open_err(&p), &p, &["header declares"]);

    let mut nested = Vec::new();
    for _ in 0..100 {
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
    }
    let p = Hand::new().kv_raw("deep", 9, &nested).write(&dir, "nested.gguf");
    let msg = open_err(&p).to_string();
    assert!(msg.contains("nested") || msg.contains("truncated"), "{msg}");
}

#[test]
fn unsupported_type_fails_only_when_requested() {
    let dir = temp_dir("unsupported");
    // IQ2_XXS: 256 elements in a 66-byte block.
    let path = Hand::new()
        .tensor("odd.weight", &[256], 16, 0)
        .tensor("fine.weight", &[2], 0, 96)
        .data(&[0; 96])
        .data(&f32_bytes(&[1.0, 2.0]))
        .write(&dir, "iq.gguf");
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.tensor_shape("odd.weight").unwrap(), [256]);
    assert_eq!(f.tensor_infos().next().unwrap().type_name, "IQ2_XXS");
    for err in [f.tensor_dtype("odd.weight").unwrap_err(), f.qtensor("odd.weight").unwrap_err()] {
        let msg = err.to_string();
        assert!(msg.contains("odd.weight") && msg.contains("IQ2_XXS"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
    assert_eq!(f.tensor("fine.weight").unwrap().to_vec1::<f32>().unwrap(), [1.0, 2.0]);

    // The same tensor cut short is still caught at open, although it cannot be loaded.
    let bytes = std::fs::read(&path).unwrap();
    let short = dir.join("short.gguf");
    std::fs::write(&short, &bytes[..bytes.len() - 50]).unwrap();
    assert_truncated(open_err(&short), &short, &["odd.weight"]);
}

/// With `general.alignment = 1` tensor data may start at any byte; loading must still work.
#[test]
fn unaligned_tensor_data_loads() {
    let dir = temp_dir("unaligned");
    let values = [0.5f32, -1.5, 2.25];
    // Offsets 1 and 14 differ by 1 modulo 4, so at least one of the two is misaligned.
    let mut data = vec![0u8; 1];
    data.extend(f32_bytes(&values));
    data.push(0);
    data.extend(f32_bytes(&values));
    let path =
        Hand::new().alignment(1).tensor("a", &[3], 0, 1).tensor("b", &[3], 0, 14).data(&data).write(&dir, "u.gguf");
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.tensor("a").unwrap().to_vec1::<f32>().unwrap(), values);
    assert_eq!(f.tensor("b").unwrap().to_vec1::<f32>().unwrap(), values);
}
