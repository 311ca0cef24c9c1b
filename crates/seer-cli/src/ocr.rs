//! `seer ocr FILE`: transcribe a PDF (or a scanned page) page by page. Each PDF page is
//! rendered in pure Rust (hayro) at the DPI asked, on white, and the model reads it.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use hayro::hayro_interpret::util::TransformExt;
use hayro::hayro_interpret::InterpreterSettings;
use hayro::hayro_syntax::{DecryptionError, LoadPdfError, Pdf};
use hayro::kurbo::Affine;
use hayro::vello_cpu::color::palette::css::WHITE;
use hayro::vello_cpu::{Pixmap, RasterizerSettings, RenderContext, Resources, TargetInit};
use hayro::{RenderCache, RenderSettings};
use image::{DynamicImage, Rgb, RgbImage};
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use seer::{Image, ImageInput};
use serde_json::json;

use crate::backend::{Backend, BackendArgs};

#[derive(Args)]
pub struct OcrArgs {
    /// A PDF, or an image (PNG, JPEG, TIFF) as a single page.
    file: PathBuf,
    /// The pages to read, from 1: `3`, `2-5`, `1-3,7` (default: all).
    #[arg(long, value_parser = parse_pages)]
    pages: Option<PageRanges>,
    /// The resolution PDF pages are rendered at.
    #[arg(long, default_value_t = 150, value_parser = clap::value_parser!(u32).range(10..=1200))]
    dpi: u32,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Write here instead of stdout (replaced once every page is read).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Ask this instead of the format's transcription prompt.
    #[arg(long)]
    prompt: Option<String>,
    /// Also save each page as the model sees it, as DIR/page-N.png.
    #[arg(long, value_name = "DIR")]
    save_pages: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Format {
    /// `--- page N ---` before each page's text.
    Text,
    /// A `## Page N` section per page.
    Markdown,
    /// One JSON document with each page's text and token counts.
    Json,
}

pub fn ocr(args: OcrArgs) -> Result<()> {
    let doc = Document::open(&args.file)?;
    let count = doc.page_count();
    if count == 0 {
        bail!("{} has no pages", args.file.display());
    }
    let pages = match &args.pages {
        Some(ranges) => select(&ranges.0, count, &args.file)?,
        None => (1..=count).collect(),
    };
    if let Some(dir) = &args.save_pages {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let backend = Backend::new(&args.backend)?;
    let Some(path) = &args.out else {
        return transcribe(&args, &doc, &pages, &backend, &mut std::io::stdout().lock());
    };
    // Written beside the output and renamed at the end: an existing file is only ever
    // replaced by a complete transcription.
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = File::create(&tmp).with_context(|| format!("creating {}", tmp.display())).and_then(|file| {
        let mut out = BufWriter::new(file);
        transcribe(&args, &doc, &pages, &backend, &mut out)?;
        out.into_inner()?.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn transcribe(args: &OcrArgs, doc: &Document, pages: &[usize], backend: &Backend, out: &mut dyn Write) -> Result<()> {
    let prompt = match (&args.prompt, args.format) {
        (Some(prompt), _) => prompt.clone(),
        (None, Format::Markdown) => "Transcribe this page as Markdown, verbatim: keep headings, lists and tables.".into(),
        (None, _) => "Transcribe all the text on this page verbatim, in reading order.".into(),
    };
    let cache = RenderCache::new();
    let bar = progress_bar(pages.len() as u64);
    let mut results = Vec::new();
    for &n in pages {
        bar.set_message(format!("page {n}"));
        let image = doc.page(n, &cache, args.dpi).with_context(|| format!("rendering page {n}"))?;
        if let Some(dir) = &args.save_pages {
            let png = dir.join(format!("page-{n}.png"));
            image.save(&png).with_context(|| format!("writing {}", png.display()))?;
        }
        let messages = [seer::user(prompt.clone(), [Image(ImageInput::Decoded(image))])];
        let answer = backend.answer(&args.backend, &messages, None, &mut |_| true).with_context(|| format!("page {n}"))?;
        let text = answer.text.trim();
        let written = match args.format {
            Format::Text => bar.suspend(|| write!(out, "--- page {n} ---\n{text}\n").and_then(|_| out.flush())),
            Format::Markdown => bar.suspend(|| write!(out, "## Page {n}\n\n{text}\n\n").and_then(|_| out.flush())),
            Format::Json => {
                results.push(json!({
                    "page": n,
                    "text": text,
                    "prompt_tokens": answer.prompt_tokens,
                    "completion_tokens": answer.completion_tokens,
                    "finish_reason": answer.finish_reason,
                }));
                Ok(())
            }
        };
        written.context("writing the transcription")?;
        bar.inc(1);
    }
    if args.format == Format::Json {
        writeln!(out, "{}", json!({"file": args.file.display().to_string(), "pages": results})).context("writing the transcription")?;
    }
    bar.finish_and_clear();
    Ok(())
}

enum Document {
    Pdf(Pdf),
    Image(Arc<RgbImage>),
}

impl Document {
    /// A PDF or an image, told apart by their contents rather than the file's name.
    fn open(path: &Path) -> Result<Document> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if bytes[..bytes.len().min(1024)].windows(5).any(|w| w == b"%PDF-") {
            // hayro rebuilds what it can of a cut-off file, which would read as blank pages.
            if !bytes[bytes.len().saturating_sub(1024)..].windows(5).any(|w| w == b"%%EOF") {
                bail!("{} is truncated: it does not end with %%EOF", path.display());
            }
            return match Pdf::new(bytes) {
                Ok(pdf) => Ok(Document::Pdf(pdf)),
                Err(LoadPdfError::Invalid) => bail!("{} is a damaged PDF", path.display()),
                Err(LoadPdfError::Decryption(DecryptionError::PasswordProtected)) => bail!("{} is an encrypted PDF that needs a password", path.display()),
                Err(LoadPdfError::Decryption(e)) => bail!("{} is an encrypted PDF that cannot be opened ({e:?})", path.display()),
            };
        }
        if image::guess_format(&bytes).is_err() {
            bail!("{} is neither a PDF nor an image (PNG, JPEG, TIFF, WebP, GIF, BMP)", path.display());
        }
        let image = image::load_from_memory(&bytes).with_context(|| format!("reading the image {}", path.display()))?;
        Ok(Document::Image(Arc::new(on_white(image))))
    }

    fn page_count(&self) -> usize {
        match self {
            Document::Pdf(pdf) => pdf.pages().len(),
            Document::Image(_) => 1,
        }
    }

    /// Page `n` (from 1) as RGB pixels.
    fn page<'a>(&'a self, n: usize, cache: &RenderCache<'a>, dpi: u32) -> Result<Arc<RgbImage>> {
        match self {
            Document::Image(image) => Ok(image.clone()),
            Document::Pdf(pdf) => {
                let page = &pdf.pages()[n - 1];
                // A PDF is untrusted input: a renderer bug on one page is an error, not a crash.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| render(page, cache, dpi)))
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the PDF renderer failed on this page")))
                    .map(Arc::new)
            }
        }
    }
}

/// One PDF page at `dpi`: its size in points × dpi / 72, rounded, on white.
fn render<'a>(page: &'a hayro::hayro_syntax::page::Page<'a>, cache: &RenderCache<'a>, dpi: u32) -> Result<RgbImage> {
    let (w, h) = page.render_dimensions();
    let scale = dpi as f32 / 72.0;
    let (width, height) = ((w * scale).round(), (h * scale).round());
    let fits = |side: f32| (1.0..=u16::MAX as f32).contains(&side);
    if !fits(width) || !fits(height) {
        bail!("a page of {w}×{h} points is too large to render at {dpi} dpi");
    }
    let mut ctx = RenderContext::new(width as u16, height as u16);
    let transform = Affine::scale_non_uniform(width as f64 / w as f64, height as f64 / h as f64) * page.initial_transform(true).to_kurbo();
    hayro::render_into(page, cache, &InterpreterSettings::default(), &RenderSettings::default(), &mut ctx, transform);
    ctx.flush();
    let mut pixmap = Pixmap::new(ctx.width(), ctx.height());
    let settings = RasterizerSettings { target_init: TargetInit::Clear(WHITE), ..Default::default() };
    ctx.render_with(&mut pixmap, &mut Resources::default(), settings);
    // Opaque everywhere (cleared to white), so premultiplied RGBA is plain RGBA.
    let rgb = pixmap.data_as_u8_slice().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
    RgbImage::from_raw(width as u32, height as u32, rgb).context("the rendered page has the wrong size")
}

/// A scan with transparency, composited on white like a PDF page.
fn on_white(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let over = |c: u8| ((c as u32 * a as u32 + 255 * (255 - a as u32) + 127) / 255) as u8;
        Rgb([over(r), over(g), over(b)])
    })
}

/// `--pages`: inclusive ranges, from 1.
#[derive(Clone)]
struct PageRanges(Vec<(usize, usize)>);

fn parse_pages(spec: &str) -> Result<PageRanges, String> {
    spec.split(',')
        .map(|part| {
            let number = |s: &str| s.trim().parse::<usize>().ok().filter(|&n| n >= 1).ok_or(format!("`{part}` is not a page number or range like 2-5 (pages count from 1)"));
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None => (number(part)?, number(part)?),
            };
            if first > last {
                return Err(format!("`{part}` runs backwards"));
            }
            Ok((first, last))
        })
        .collect::<Result<_, _>>()
        .map(PageRanges)
}

/// The pages asked for, each once, in order.
fn select(ranges: &[(usize, usize)], count: usize, file: &Path) -> Result<Vec<usize>> {
    let mut pages = BTreeSet::new();
    for &(first, last) in ranges {
        if last > count {
            bail!("there is no page {last}: {} has {count} page{}", file.display(), if count == 1 { "" } else { "s" });
        }
        pages.extend(first..=last);
    }
    Ok(pages.into_iter().collect())
}

fn progress_bar(n: u64) -> ProgressBar {
    let bar = ProgressBar::new(n);
    let style = ProgressStyle::with_template("{bar:30} {pos}/{len} pages, {pages_per_minute}, {eta} left  {msg}")
        .map(|s| s.with_key("pages_per_minute", |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.1}/min", state.per_sec() * 60.0);
        }))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}
