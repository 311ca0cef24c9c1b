//! Times a LLaVA GGUF's image encoding alone (vision tower + projector), for profiling:
//! `cargo run --release -p seer-models --example encode_bench -- TEXT.gguf MMPROJ.gguf [f32|bf16] [repeats]`.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use seer_models::gguf::GgufFile;
use seer_models::llava::Llava;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: encode_bench TEXT.gguf MMPROJ.gguf [f32|bf16] [repeats]");
        std::process::exit(2);
    }
    let text = Arc::new(GgufFile::open(args[1].as_ref()).expect("text model"));
    let proj = Arc::new(GgufFile::open(args[2].as_ref()).expect("mmproj"));
    let bf16 = args.get(3).is_none_or(|s| s == "bf16");
    let repeats: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(3);
    let plan = seer_models::LoadPlan { vision_bf16: bf16, ..Default::default() };
    let model = Llava::load_gguf(text, proj, &plan).expect("load");
    let size = model.config.vision.image_size;
    let pixels = Tensor::randn(0f32, 1.0, (1, 3, size, size), &Device::Cpu).unwrap();
    for _ in 0..repeats {
        let t = Instant::now();
        let out = model.encode_images(&pixels).unwrap();
        println!("encode {:?}: {:.0} ms", out.dims(), t.elapsed().as_secs_f64() * 1e3);
    }
}
