//! The `seer` command.

mod backend;
mod bench;
mod chat;
mod describe;
mod ocr;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use seer_engine::{hub, parse_device, GenerateRequest, Isq, KvType, LoadOptions, Message, Role, SamplingParams, VisionDtype, Vlm};
use seer_server::{Limits, ServeOptions};
use seer_vision::{ImageInput, ImageLimits};

#[derive(Parser)]
#[command(name = "seer", version, about = "Run vision-language models on your own machine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one prompt about one or more images and exit.
    Run(RunArgs),
    /// Talk about images interactively (line editing, history, `\image PATH` to attach).
    Chat(chat::ChatArgs),
    /// Transcribe a PDF or scanned pages, page by page.
    Ocr(ocr::OcrArgs),
    /// Describe every image in a folder into a JSON Lines file (resumable).
    Describe(describe::DescribeArgs),
    /// Serve the model over HTTP: OpenAI, KoboldCpp and Ollama compatible APIs.
    Serve(ServeArgs),
    /// Read structured data out of images: JSON that always follows the given schema.
    Extract(ExtractArgs),
    /// Pick one of the given labels for the images.
    Classify(ClassifyArgs),
    /// Time image encoding, prefill and decoding on one image (see ../shared/bench).
    Bench(bench::BenchArgs),
}

#[derive(Args)]
struct ExtractArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A JSON schema file the answer must follow.
    #[arg(long)]
    schema: PathBuf,
    /// An image: a path, an http(s) URL, raw base64 or a data: URL. Repeatable.
    #[arg(long)]
    image: Vec<String>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
}

#[derive(Args)]
struct ClassifyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// One of the answers allowed. Repeat for each (at least two).
    #[arg(long = "label", required = true)]
    labels: Vec<String>,
    /// An image: a path, an http(s) URL, raw base64 or a data: URL. Repeatable.
    #[arg(long)]
    image: Vec<String>,
    #[arg(long, default_value = "Which of these describes the image best?")]
    prompt: String,
}

#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face folder, a GGUF text model (with --mmproj), or a hub repository:
    /// `org/name` or `org/name:file.gguf`, downloaded into the Hugging Face cache
    /// (default: HuggingFaceTB/SmolVLM-256M-Instruct).
    #[arg(long)]
    model: Option<String>,
    /// For a hub repository of GGUF files: the text model whose name holds this (e.g. Q4_K_M).
    #[arg(long)]
    quant: Option<String>,
    /// The GGUF projector ("mmproj") that goes with a GGUF text model.
    #[arg(long)]
    mmproj: Option<PathBuf>,
    /// Quantize a Hugging Face checkpoint's language model as it loads: q4_0, q4k, q5k, q6k or q8_0.
    #[arg(long, value_parser = parse_isq)]
    isq: Option<Isq>,
    /// Threads for matrix products (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Precision of the vision tower: auto (bf16 on CPUs with AVX512-BF16 when the mmproj
    /// is stored in 16 bits or --isq is given, else f32), f32 or bf16.
    #[arg(long, default_value = "auto", value_parser = parse_vision_dtype)]
    vision_dtype: VisionDtype,
    /// The KV cache's element type, f16 or f32 (default: f16 for quantized models, f32 otherwise).
    #[arg(long, value_parser = parse_kv_cache)]
    kv_cache: Option<KvType>,
    /// Qwen2-VL from GGUF: the fewest image tokens an image becomes (llama.cpp's
    /// --image-min-tokens; the GGUF does not say; default 8).
    #[arg(long)]
    image_min_tokens: Option<usize>,
    /// Qwen2-VL from GGUF: the most image tokens an image becomes (default 4096).
    #[arg(long)]
    image_max_tokens: Option<usize>,
    /// Where the matrix products run: cpu (seer's kernels), or cuda / cuda:N (a GPU holds
    /// the weights; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl ModelArgs {
    fn load_options(&self) -> Result<LoadOptions> {
        Ok(LoadOptions {
            isq: self.isq,
            vision: self.vision_dtype,
            kv_cache: self.kv_cache,
            image_min_tokens: self.image_min_tokens,
            image_max_tokens: self.image_max_tokens,
            products_on: parse_device(&self.device)?,
        })
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An image: a path, an http(s) URL, raw base64 or a data: URL. Repeatable.
    #[arg(long)]
    image: Vec<String>,
    #[arg(long)]
    prompt: String,
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 picks the most likely token every time (deterministic).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 means no limit.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Generate max-tokens tokens even past end-of-sequence.
    #[arg(long, hide = true)]
    ignore_eos: bool,
    /// Print one JSON object (text, token ids, usage, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Clients must send `Authorization: Bearer KEY` (every endpoint but /health).
    #[arg(long, env = "SEER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Let image URLs reach loopback, private and link-local addresses.
    #[arg(long)]
    allow_private_urls: bool,
    /// Let `image_url` name local files, inside DIR only.
    #[arg(long, value_name = "DIR")]
    allow_local_images: Option<PathBuf>,
    /// Largest request body; bigger is answered 413.
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    max_body_bytes: usize,
    /// Most images in one request.
    #[arg(long, default_value_t = Limits::default().max_images)]
    max_images: usize,
    /// Most pixels (width × height) in one decoded image.
    #[arg(long, default_value_t = Limits::default().image.max_pixels)]
    max_image_pixels: u64,
    /// Most requests waiting for the model; more are answered 503.
    #[arg(long, default_value_t = seer_server::state::DEFAULT_MAX_QUEUE)]
    max_queue: usize,
}

/// Keeps freed buffers in the heap for the next ones instead of returning them to the
/// system: every forward pass allocates activations of the same sizes (tens of MiB), and
/// fresh pages from the kernel cost a page fault and zeroing each, which was 7-13 % of
/// image encoding and prefill. Peak memory is unchanged; memory between requests stays held.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        // 32 MiB is the largest threshold glibc accepts on 64-bit systems.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Loading converts weights through temporary copies (f16 to f32 to packed bf16); the
/// heap keeps those freed buffers (see [`keep_freed_memory`]). Give them back once.
fn release_load_garbage() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Chat(args) => chat::chat(args),
        Command::Ocr(args) => ocr::ocr(args),
        Command::Describe(args) => describe::describe(args),
        Command::Serve(args) => serve(args),
        Command::Extract(args) => extract(args),
        Command::Classify(args) => classify(args),
        Command::Bench(args) => bench::bench(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping causes the message already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

fn parse_vision_dtype(s: &str) -> Result<VisionDtype, String> {
    VisionDtype::parse(s).ok_or_else(|| format!("`{s}` is not one of auto, f32, bf16"))
}

fn parse_kv_cache(s: &str) -> Result<KvType, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f16" => Ok(KvType::F16),
        "f32" => Ok(KvType::F32),
        _ => Err(format!("`{s}` is not one of f16, f32")),
    }
}

fn parse_isq(s: &str) -> Result<Isq, String> {
    Isq::parse(s).ok_or_else(|| format!("unknown type `{s}`; one of {}", Isq::NAMES))
}

fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        // candle's CPU kernels size their pools from these at first use.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("OMP_NUM_THREADS", n.to_string());
    }
}

fn load(args: &ModelArgs) -> Result<(Vlm, f64)> {
    set_threads(args.threads);
    let (model, mmproj) = model_files(args)?;
    let start = Instant::now();
    let opts = args.load_options()?;
    let vlm = Vlm::load_with(&model, mmproj.as_deref(), &opts).context("loading the model")?;
    release_load_garbage();
    Ok((vlm, start.elapsed().as_secs_f64() * 1e3))
}

/// The model's local files: the paths given, or a hub repository's, downloaded when not
/// in the cache yet.
fn model_files(args: &ModelArgs) -> Result<(PathBuf, Option<PathBuf>)> {
    let spec = args.model.as_deref().unwrap_or(hub::DEFAULT_MODEL);
    let files = hub::resolve(spec, args.quant.as_deref(), args.mmproj.as_deref()).with_context(|| format!("model {spec}"))?;
    Ok((files.model, files.mmproj))
}

fn run(args: RunArgs) -> Result<()> {
    let (vlm, load_ms) = load(&args.model)?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::text(Role::System, system.clone()));
    }
    let images = args.image.iter().map(|s| ImageInput::parse(s)).collect();
    messages.push(Message::user_with_images(args.prompt.clone(), images));
    let req = GenerateRequest {
        messages,
        max_tokens: args.max_tokens,
        sampling: SamplingParams { temperature: args.temperature, top_p: args.top_p, top_k: args.top_k, seed: args.seed, ..Default::default() },
        ignore_eos: args.ignore_eos,
        ..Default::default()
    };
    let stdout = std::io::stdout();
    let stream = !args.json;
    let mut on_text = |piece: &str| {
        if stream {
            let mut out = stdout.lock();
            // A closed pipe (`seer run ... | head`) ends the generation instead of failing.
            return out.write_all(piece.as_bytes()).and_then(|_| out.flush()).is_ok();
        }
        true
    };
    // A local user may fetch images from their own network; the server refuses that by default.
    let limits = ImageLimits { allow_private_urls: true, ..ImageLimits::default() };
    let gen = vlm.generate(&req, &limits, &mut on_text)?;
    if args.json {
        let timings = &gen.timings;
        let out = serde_json::json!({
            "text": gen.text,
            "token_ids": gen.token_ids,
            "finish_reason": gen.finish_reason,
            "usage": gen.usage,
            "timings": {
                "load_ms": load_ms,
                "image_encode_ms": timings.image_encode_ms,
                "prefill_tokens_per_s": timings.prefill_tokens_per_s,
                "decode_tokens_per_s": timings.decode_tokens_per_s,
                "ttft_ms": timings.ttft_ms,
            },
        });
        println!("{out}");
    } else {
        println!();
    }
    Ok(())
}

/// The model behind the Rust API, for the commands built on it.
fn api_model(args: &ModelArgs, max_tokens: usize) -> Result<seer::Model> {
    let (vlm, _) = load(args)?;
    let mut model = seer::Model::from_engine(vlm);
    model.set_options(seer::Options { max_tokens, ..Default::default() });
    Ok(model)
}

fn images(specs: &[String]) -> Vec<seer::Image> {
    specs.iter().map(|s| seer::Image::from(s.as_str())).collect()
}

fn extract(args: ExtractArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.schema).with_context(|| format!("reading {}", args.schema.display()))?;
    let schema: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", args.schema.display()))?;
    let model = api_model(&args.model, args.max_tokens)?;
    let (value, _) = model.extract_json(schema, &args.prompt, images(&args.image))?;
    println!("{value}");
    Ok(())
}

fn classify(args: ClassifyArgs) -> Result<()> {
    if args.labels.len() < 2 {
        bail!("give at least two --label options to choose between");
    }
    let labels: Vec<&str> = args.labels.iter().map(String::as_str).collect();
    let max_tokens = labels.iter().map(|l| l.len()).max().unwrap_or(1) + 8;
    let model = api_model(&args.model, max_tokens)?;
    println!("{}", model.classify(&labels, &args.prompt, images(&args.image))?);
    Ok(())
}

fn serve(args: ServeArgs) -> Result<()> {
    set_threads(args.model.threads);
    let (model, mmproj) = model_files(&args.model)?;
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_target(false).with_ansi(colour).init();
    let defaults = Limits::default();
    let image = ImageLimits { max_pixels: args.max_image_pixels, allow_private_urls: args.allow_private_urls, ..defaults.image };
    let opts = ServeOptions {
        model,
        mmproj,
        load: args.model.load_options()?,
        host: args.host,
        port: args.port,
        api_key: args.api_key,
        limits: Limits { max_body_bytes: args.max_body_bytes, max_images: args.max_images, image, local_images: args.allow_local_images },
        max_queue: args.max_queue,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let served = runtime.block_on(seer_server::serve(opts));
    // Ctrl-C while a model loads: exit now rather than wait for the load to finish.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}
