//! Every GGUF weight type the issue names loads through the weight seam and multiplies
//! correctly: the product through `Linear` is compared with a plain f32 product over the
//! dequantized weight.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use seer_models::gguf::GgufFile;
use seer_models::weights::{GgufSource, Vb};

fn write_gguf(tag: &str, dtype: GgmlDType, weight: &Tensor) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("seer-linear-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{tag}-{dtype:?}.gguf"));
    let q = QTensor::quantize(weight, dtype).unwrap();
    let arch = gguf_file::Value::String("test".into());
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("w.weight", &q)]).unwrap();
    path
}

/// Relative error of `got` against `want`, as a norm ratio.
fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    let diff = (got - want).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    let norm = want.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    (diff / norm).sqrt()
}

#[test]
fn every_gguf_weight_type_multiplies_like_its_dequantized_weight() {
    let dev = Device::Cpu;
    // 256 columns: the k-quants pack rows in blocks of 256.
    let (out_dim, in_dim) = (48, 512);
    let weight = Tensor::randn(0f32, 1.0, (out_dim, in_dim), &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (5, in_dim), &dev).unwrap();
    let types = [
        (GgmlDType::F32, 1e-6),
        (GgmlDType::F16, 1e-6),
        (GgmlDType::BF16, 1e-6),
        // Quantized kernels also quantize the activations to 8 bits.
        (GgmlDType::Q8_0, 0.02),
        (GgmlDType::Q4_0, 0.02),
        (GgmlDType::Q4K, 0.02),
        (GgmlDType::Q5K, 0.02),
        (GgmlDType::Q6K, 0.02),
    ];
    for (dtype, tolerance) in types {
        let path = write_gguf("types", dtype, &weight);
        let file = Arc::new(GgufFile::open(&path).unwrap());
        assert_eq!(file.tensor_dtype("w.weight").unwrap(), dtype);
        let vb = Vb::new(Arc::new(GgufSource::new(file.clone(), Arc::new(|n: &str| Some(n.to_string())))));
        let linear = vb.pp("w").linear(in_dim, out_dim, false).unwrap();
        let dequantized = file.tensor("w.weight").unwrap();
        let want = x.matmul(&dequantized.t().unwrap()).unwrap();
        let got = linear.forward(&x).unwrap();
        let err = rel_err(&got, &want);
        assert!(err < tolerance, "{dtype:?}: relative error {err} over {tolerance}");
        // And the stored weight is close to the original (the quantization itself is sane).
        let wq_err = rel_err(&dequantized, &weight);
        assert!(wq_err < 0.15, "{dtype:?}: weight error {wq_err}");
    }
}

#[test]
fn wrong_shape_is_an_error_naming_the_tensor() {
    let weight = Tensor::randn(0f32, 1.0, (8, 32), &Device::Cpu).unwrap();
    let path = write_gguf("shape", GgmlDType::F32, &weight);
    let file = Arc::new(GgufFile::open(&path).unwrap());
    let vb = Vb::new(Arc::new(GgufSource::new(file, Arc::new(|n: &str| Some(n.to_string())))));
    let err = vb.pp("w").linear(32, 16, false).err().expect("shape mismatch must fail");
    assert!(err.to_string().contains("w.weight") && err.to_string().contains("[16, 32]"), "{err}");
}

/// In-situ quantization through the seam: a dense safetensors matrix read with `isq`
/// set becomes that type and multiplies within the type's error.
#[test]
fn isq_quantizes_dense_weights_as_they_load() {
    use candle_core::safetensors::save;
    use seer_models::weights::SafetensorsSource;
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("seer-isq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    let (out_dim, in_dim) = (64, 512);
    let weight = Tensor::randn(0f32, 1.0, (out_dim, in_dim), &dev).unwrap();
    let narrow = Tensor::randn(0f32, 1.0, (8, 96), &dev).unwrap();
    save(&std::collections::HashMap::from([("w.weight".to_string(), weight.clone()), ("n.weight".to_string(), narrow.clone())]), &path).unwrap();
    let vb = Vb::new(Arc::new(SafetensorsSource::open(&[path]).unwrap()));
    let x = Tensor::randn(0f32, 1.0, (3, in_dim), &dev).unwrap();
    let want = x.matmul(&weight.t().unwrap()).unwrap();
    // Measured on Gaussian weights (weights and activations both quantized): Q8_0 0.009,
    // Q6K 0.019, Q5K 0.040, Q4K 0.086, Q4_0 0.093; the bounds leave ~1.6× headroom.
    for (dtype, bound) in [(GgmlDType::Q8_0, 0.015), (GgmlDType::Q6K, 0.032), (GgmlDType::Q5K, 0.065), (GgmlDType::Q4K, 0.14), (GgmlDType::Q4_0, 0.15)] {
        let linear = vb.with_isq(Some(dtype)).pp("w").linear(in_dim, out_dim, false).unwrap();
        let err = rel_err(&linear.forward(&x).unwrap(), &want);
        eprintln!("{dtype:?}: {err}");
        assert!(err > 1e-4 && err < bound, "{dtype:?}: relative error {err}");
    }
    // 96 columns fit Q8_0's blocks of 32 but not Q4K's 256: it falls back to Q8_0, not f32.
    let x = Tensor::randn(0f32, 1.0, (2, 96), &dev).unwrap();
    let want = x.matmul(&narrow.t().unwrap()).unwrap();
    let q4k = vb.with_isq(Some(GgmlDType::Q4K)).pp("n").linear(96, 8, false).unwrap().forward(&x).unwrap();
    let q8 = vb.with_isq(Some(GgmlDType::Q8_0)).pp("n").linear(96, 8, false).unwrap().forward(&x).unwrap();
    assert_eq!(rel_err(&q4k, &want), rel_err(&q8, &want));
}

/// The loader's own safetensors reader and the streaming, row-parallel quantizer against
/// candle's: 16-bit weights widen to the same f32 values as candle's conversion, and every
/// ISQ type gives the same blocks as `QTensor::quantize` on the whole matrix (compared
/// dequantized), for a matrix that streams in two chunks and a row count that does not
/// split evenly between threads.
#[test]
fn safetensors_reader_and_streamed_isq_match_candle() {
    use candle_core::safetensors::save;
    use candle_core::DType;
    use seer_models::weights::{SafetensorsSource, ISQ_CHUNK};
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("seer-isq-bytes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    let cols = 512;
    let rows = ISQ_CHUNK / cols + 37;
    let weight = Tensor::randn(0f32, 1.0, (rows, cols), &dev).unwrap();
    let stored = [("f32", weight.clone()), ("bf16", weight.to_dtype(DType::BF16).unwrap()), ("f16", weight.to_dtype(DType::F16).unwrap())];
    save(&stored.iter().map(|(n, t)| (format!("{n}.weight"), t.clone())).collect(), &path).unwrap();
    let vb = Vb::new(Arc::new(SafetensorsSource::open(&[path]).unwrap()));
    for (name, t) in &stored {
        let want = t.to_dtype(DType::F32).unwrap();
        let got = vb.pp(name).tensor("weight").unwrap();
        assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{name}");
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let ours = vb.with_isq(Some(dtype)).pp(name).isq_matrix("weight").unwrap().expect("512 columns fit every block size");
            let theirs = candle_core::quantized::QTensor::quantize(&want, dtype).unwrap();
            let a = ours.dequantize().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(a, theirs.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{name} {dtype:?}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
