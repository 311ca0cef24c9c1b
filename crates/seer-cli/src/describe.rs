//! `seer describe FOLDER`: one JSON line per image, resumable. Each result is written
//! as one line in one write and synced before the next image starts, so after Ctrl-C or
//! a crash a rerun finds every finished image in the file and skips it; a line cut off
//! by the crash is dropped and that image done again.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use seer::Image;
use serde_json::{json, Value};

use crate::backend::{Backend, BackendArgs};

#[derive(Args)]
pub struct DescribeArgs {
    /// The folder of images (searched recursively).
    folder: PathBuf,
    #[arg(long, default_value = "Describe this image in detail.")]
    prompt: String,
    /// The JSON Lines file to write; an existing one is resumed.
    #[arg(long)]
    out: PathBuf,
    /// Answer with JSON that follows this schema (the `answer` field holds the JSON).
    #[arg(long)]
    schema: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
}

/// What `seer describe` reads as an image.
const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

pub fn describe(args: DescribeArgs) -> Result<()> {
    if !args.folder.is_dir() {
        bail!("{} is not a folder", args.folder.display());
    }
    let schema = match &args.schema {
        Some(path) => Some(read_schema(path)?),
        None => None,
    };
    let images = image_files(&args.folder)?;
    let (mut out, done) = open_results(&args.out)?;
    let todo: Vec<&PathBuf> = images.iter().filter(|p| !done.contains(&key(p))).collect();
    if todo.is_empty() {
        eprintln!("all {} images are in {} already", images.len(), args.out.display());
        return Ok(());
    }
    if !done.is_empty() {
        eprintln!("resuming: {} of {} images are done", images.len() - todo.len(), images.len());
    }
    let backend = Backend::new(&args.backend)?;
    let bar = progress_bar(todo.len() as u64);
    for path in todo {
        bar.set_message(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let line = describe_one(&backend, &args, path, schema.as_ref());
        write_line(&mut out, &line).with_context(|| format!("writing {}", args.out.display()))?;
        bar.inc(1);
    }
    bar.finish_with_message("done");
    Ok(())
}

fn read_schema(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// One image's line: its answer, or the error that stopped it.
fn describe_one(backend: &Backend, args: &DescribeArgs, path: &Path, schema: Option<&Value>) -> Value {
    let start = Instant::now();
    let prompt = match schema {
        Some(s) => seer::schema_prompt(&args.prompt, s),
        None => args.prompt.clone(),
    };
    let messages = [seer::user(prompt, [Image::from(path)])];
    // Decoded here first, so an unreadable file is reported the same whether the model
    // is local or behind --server (a server might not say which image it could not read).
    let readable = image::ImageReader::open(path).and_then(|r| r.with_guessed_format()).map_err(anyhow::Error::from).and_then(|r| Ok(r.decode()?));
    let result = readable.and_then(|_| backend.answer(&args.backend, &messages, schema, &mut |_| true)).and_then(|a| {
        let answer = match schema {
            Some(_) => serde_json::from_str(&a.text).with_context(|| format!("the answer is not complete JSON: {:?}", a.text))?,
            None => Value::String(a.text),
        };
        Ok(json!({
            "path": key(path),
            "answer": answer,
            "prompt_tokens": a.prompt_tokens,
            "image_tokens": a.image_tokens,
            "completion_tokens": a.completion_tokens,
            "finish_reason": a.finish_reason,
            "ms": (start.elapsed().as_secs_f64() * 1e3).round(),
        }))
    });
    result.unwrap_or_else(|e| json!({"path": key(path), "error": crate::one_line(&e)}))
}

/// How an image is named in the results: the path as found under the folder given.
fn key(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Every image file under `folder`, in a stable order.
fn image_files(folder: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut dirs = vec![folder.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())) {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Opens the results for appending, first dropping a last line cut off by a crash;
/// returns the images already there.
fn open_results(path: &Path) -> Result<(File, HashSet<String>)> {
    let mut file = OpenOptions::new().read(true).append(true).create(true).open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut text = Vec::new();
    file.read_to_end(&mut text)?;
    let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < text.len() {
        file.set_len(complete as u64)?;
        file.seek(SeekFrom::End(0))?;
    }
    let done = String::from_utf8_lossy(&text[..complete])
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["path"].as_str().map(String::from))
        .collect();
    Ok((file, done))
}

/// One result as one line in one write, on disk before the next image starts.
fn write_line(out: &mut File, value: &Value) -> std::io::Result<()> {
    let mut line = value.to_string();
    line.push('\n');
    out.write_all(line.as_bytes())?;
    out.sync_data()
}

fn progress_bar(n: u64) -> ProgressBar {
    let bar = ProgressBar::new(n);
    let style = ProgressStyle::with_template("{bar:30} {pos}/{len} images, {per_sec}, {eta} left  {msg}").unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}
