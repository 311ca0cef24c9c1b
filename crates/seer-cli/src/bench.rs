//! `seer bench`: the same work as one `llama-mtmd-cli` run in ../shared/bench (one image
//! plus "Describe this image in detail." through the chat template, greedy, EOS ignored),
//! timed phase by phase, best and median over repeats, as JSON that bench_report.py reads.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use seer_engine::generate::Timings;
use seer_engine::{Constraint, GenerateRequest, Message, Vlm};
use seer_vision::{ImageInput, ImageLimits};
use serde_json::{json, Map, Value};

use crate::ModelArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The image to describe (default: a synthetic 640×480 gradient).
    #[arg(long, conflicts_with = "image_size")]
    image: Option<String>,
    /// A synthetic image of this size, `WxH`.
    #[arg(long)]
    image_size: Option<String>,
    #[arg(long, default_value = "Describe this image in detail.")]
    prompt: String,
    /// Also time a text-only prefill of this many tokens (llama-bench's pp512); 0 skips it.
    #[arg(long, default_value_t = 0)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Also decode under this JSON schema, to report the cost of constrained decoding
    /// (`decode_tokens_per_s_schema`, beside the unconstrained `decode_tokens_per_s`).
    #[arg(long)]
    schema: Option<std::path::PathBuf>,
    /// Print one JSON object (the default output is a short table).
    #[arg(long)]
    json: bool,
}

/// One repeat's measurements, named as the benchmark harness expects.
type Run = Map<String, Value>;

pub fn bench(args: BenchArgs) -> Result<()> {
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let (vlm, load_ms) = crate::load(&args.model)?;
    let image = bench_image(&args)?;
    let schema = match &args.schema {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Some(Constraint::JsonSchema(serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?))
        }
        None => None,
    };
    let mut runs = Vec::new();
    for _ in 0..args.repeat {
        let mut run = describe_once(&vlm, &image, &args, None)?;
        if let Some(c) = &schema {
            let constrained = describe_once(&vlm, &image, &args, Some(c.clone()))?;
            run.insert("decode_tokens_per_s_schema".into(), constrained["decode_tokens_per_s"].clone());
            run.insert("completion_tokens_schema".into(), constrained["completion_tokens"].clone());
            run.insert("constraint_ms_per_token".into(), constrained["constraint_ms_per_token"].clone());
        }
        if args.prompt_tokens > 0 {
            run.insert("pp512_tokens_per_s".into(), json!(text_prefill(&vlm, args.prompt_tokens)?));
        }
        runs.push(run);
    }
    let mut out = summarize(&runs);
    // A count, the same in every run: kept an integer.
    out.insert("image_tokens".into(), runs[0]["image_tokens"].clone());
    out.insert("load_ms".into(), json!(load_ms));
    out.insert("peak_rss_mib".into(), json!(peak_rss_mib()));
    out.insert("repeats".into(), json!(args.repeat));
    // Where the matrix products ran (`--device`).
    out.insert("device".into(), json!(args.model.device));
    if args.json {
        println!("{}", Value::Object(out));
    } else {
        for (k, v) in &out {
            if !v.is_object() && !v.is_array() {
                println!("{k:>24}  {v}");
            }
        }
    }
    Ok(())
}

fn bench_image(args: &BenchArgs) -> Result<ImageInput> {
    if let Some(path) = &args.image {
        return Ok(ImageInput::parse(path));
    }
    let size = args.image_size.as_deref().unwrap_or("640x480");
    let (w, h) = size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
        .filter(|&(w, h)| w > 0 && h > 0)
        .with_context(|| format!("--image-size `{size}` is not WxH"))?;
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, ((x + y) % 256) as u8]));
    Ok(ImageInput::Decoded(Arc::new(img)))
}

/// One image description, like llama-mtmd-cli with `-n N --ignore-eos --temp 0`; under
/// a constraint, until the constraint is complete or N tokens.
fn describe_once(vlm: &Vlm, image: &ImageInput, args: &BenchArgs, constraint: Option<Constraint>) -> Result<Run> {
    let req = GenerateRequest {
        messages: vec![Message::user_with_images(args.prompt.clone(), vec![image.clone()])],
        max_tokens: args.gen_tokens,
        ignore_eos: true,
        constraint,
        ..Default::default()
    };
    let gen = vlm.generate(&req, &ImageLimits::default(), &mut |_| true)?;
    let t: &Timings = &gen.timings;
    let mut run = Run::new();
    run.insert("image_encode_ms".into(), json!(t.image_encode_ms));
    run.insert("prefill_tokens_per_s".into(), json!(t.prefill_tokens_per_s));
    run.insert("decode_tokens_per_s".into(), json!(t.decode_tokens_per_s));
    run.insert("ttft_ms".into(), json!(t.ttft_ms));
    run.insert("prompt_tokens".into(), json!(gen.usage.prompt_tokens));
    run.insert("image_tokens".into(), json!(gen.usage.image_tokens));
    run.insert("completion_tokens".into(), json!(gen.usage.completion_tokens));
    run.insert("constraint_ms_per_token".into(), json!(t.constraint_ms / gen.usage.completion_tokens.max(1) as f64));
    Ok(run)
}

/// Text-only prefill of `n` arbitrary tokens on a fresh cache, in tokens per second.
fn text_prefill(vlm: &Vlm, n: usize) -> Result<f64> {
    let lm = vlm.model.language_model();
    let vocab = lm.config.vocab_size as u32;
    // A fixed spread of ids: what they are does not change the work.
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let mut cache = lm.new_cache();
    let start = Instant::now();
    let embeds = lm.embed(&ids)?;
    lm.forward(&embeds, &mut cache)?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Best (fastest) and median of each measure: times are best when lowest, rates when highest.
fn summarize(runs: &[Run]) -> Run {
    let mut out = Run::new();
    let mut medians = Run::new();
    for key in runs[0].keys() {
        let mut values: Vec<f64> = runs.iter().filter_map(|r| r.get(key)?.as_f64()).collect();
        values.sort_by(f64::total_cmp);
        let lower_is_better = key.ends_with("_ms");
        let best = if lower_is_better { values[0] } else { values[values.len() - 1] };
        out.insert(key.clone(), json!(best));
        medians.insert(key.clone(), json!(values[values.len() / 2]));
    }
    out.insert("median".into(), Value::Object(medians));
    out.insert("runs".into(), Value::Array(runs.iter().cloned().map(Value::Object).collect()));
    out
}

/// The process's peak resident memory (VmHWM), MiB; 0 where /proc is not there.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}
