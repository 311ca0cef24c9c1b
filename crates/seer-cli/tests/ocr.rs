//! `seer ocr` on PDFs written here: pages in order, page ranges, the three formats, the
//! rendered pages' sizes and contents, what goes to a server, and one-line errors for
//! files it cannot read.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::Value;

const LETTER: (u32, u32) = (612, 792);
const A4: (u32, u32) = (595, 842);
/// The colour of the image on the last page.
const RED: [u8; 3] = [220, 20, 20];

/// A PDF from its objects (numbered from 1, the first the catalog), with an xref table
/// at the right byte offsets; `trailer` adds entries to the trailer.
fn pdf(objects: &[Vec<u8>], trailer: &str) -> Vec<u8> {
    let mut out = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
    let mut offsets = Vec::new();
    for (i, body) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend(format!("{} 0 obj\n", i + 1).as_bytes());
        out.extend(body);
        out.extend(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes());
    for offset in offsets {
        out.extend(format!("{offset:010} 00000 n \n").as_bytes());
    }
    out.extend(format!("trailer\n<< /Size {} /Root 1 0 R {trailer} >>\nstartxref\n{xref}\n%%EOF\n", objects.len() + 1).as_bytes());
    out
}

fn stream(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut out = format!("<< {dict} /Length {} >>\nstream\n", data.len()).into_bytes();
    out.extend(data);
    out.extend(b"\nendstream");
    out
}

/// Text pages of the given sizes, then a US Letter page with a 4×4 red image on it.
fn document(sizes: &[(u32, u32)]) -> Vec<u8> {
    let n = sizes.len() + 1;
    // 1 catalog, 2 page tree, 3 font, 4 image, then each page and its content.
    let kids: Vec<String> = (0..n).map(|i| format!("{} 0 R", 5 + 2 * i)).collect();
    let mut objects = vec![
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        format!("<< /Type /Pages /Kids [{}] /Count {n} >>", kids.join(" ")).into_bytes(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec(),
        stream("/Type /XObject /Subtype /Image /Width 4 /Height 4 /ColorSpace /DeviceRGB /BitsPerComponent 8", &RED.repeat(16)),
    ];
    for (i, &(w, h)) in sizes.iter().chain([&LETTER]).enumerate() {
        let mut content = format!("BT /F1 24 Tf 72 700 Td (Page {} text) Tj ET", i + 1);
        if i + 1 == n {
            content += " q 200 0 0 200 100 300 cm /Im1 Do Q";
        }
        let resources = "<< /Font << /F1 3 0 R >> /XObject << /Im1 4 0 R >> >>";
        objects.push(format!("<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {w} {h}] /Resources {resources} /Contents {} 0 R >>", 6 + 2 * i).into_bytes());
        objects.push(stream("", content.as_bytes()));
    }
    pdf(&objects, "")
}

/// A fresh folder for one test.
fn folder(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("seer-ocr-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Letter, A4 and the image page.
fn three_pages(dir: &Path) -> String {
    let path = dir.join("doc.pdf");
    std::fs::write(&path, document(&[LETTER, A4])).unwrap();
    path.display().to_string()
}

fn ocr(args: &[&str]) -> Output {
    seer().arg("ocr").args(args).output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The `## Page N` headings, in the order they come.
fn headings(markdown: &str) -> Vec<String> {
    markdown.lines().filter(|l| l.starts_with("## Page ")).map(String::from).collect()
}

#[test]
fn local_model_reads_the_pages_in_order() {
    let dir = folder("local");
    let doc = three_pages(&dir);
    let model = smolvlm();
    let local = ["--model", &model, "--max-tokens", "8", "--dpi", "50"];

    let markdown = ok(ocr(&[&[doc.as_str(), "--format", "markdown"][..], &local].concat()));
    assert_eq!(headings(&markdown), ["## Page 1", "## Page 2", "## Page 3"], "{markdown}");

    let some = ok(ocr(&[&[doc.as_str(), "--format", "markdown", "--pages", "2-3"][..], &local].concat()));
    assert_eq!(headings(&some), ["## Page 2", "## Page 3"], "{some}");

    // JSON, written through --out: the file holds the whole document and nothing is left beside it.
    let out = dir.join("doc.json");
    let stdout = ok(ocr(&[&[doc.as_str(), "--format", "json", "--pages", "3,1", "--out", out.to_str().unwrap()][..], &local].concat()));
    assert!(stdout.is_empty());
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(json["file"], doc.as_str());
    let pages = json["pages"].as_array().unwrap();
    assert_eq!(pages.iter().map(|p| p["page"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 3]);
    for page in pages {
        assert!(page["text"].is_string() && page["prompt_tokens"].as_u64().unwrap() > 0, "{page}");
        assert!(page["completion_tokens"].as_u64().unwrap() <= 8 && page["finish_reason"].is_string(), "{page}");
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2, "doc.pdf and doc.json only");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn rendered_pages_have_the_page_sizes_and_go_to_the_server_in_order() {
    let dir = folder("render");
    let doc = three_pages(&dir);
    let saved = dir.join("pages");
    let (url, bodies) = slow_server(3, Duration::from_millis(1));
    let text = ok(ocr(&[&doc, "--server", &url, "--dpi", "100", "--save-pages", saved.to_str().unwrap()]));
    assert_eq!(text, "--- page 1 ---\nword0 word1 word2\n--- page 2 ---\nword0 word1 word2\n--- page 3 ---\nword0 word1 word2\n");

    let pages: Vec<image::RgbImage> = (1..=3).map(|n| image::open(saved.join(format!("page-{n}.png"))).unwrap().into_rgb8()).collect();
    for (page, (w, h)) in pages.iter().zip([LETTER, A4, LETTER]) {
        let at_100_dpi = |points: u32| (points as f64 * 100.0 / 72.0).round() as u32;
        assert_eq!(page.dimensions(), (at_100_dpi(w), at_100_dpi(h)));
    }
    let dark = pages[0].pixels().filter(|p| p.0.iter().all(|&c| c < 100)).count();
    assert!(dark > 50, "the text of page 1 is drawn ({dark} dark pixels)");
    assert!(pages[0].pixels().filter(|p| p.0 == [255; 3]).count() > pages[0].len() / 4, "on white");
    let red = |p: &&image::Rgb<u8>| p.0.iter().zip(RED).all(|(&c, r)| c.abs_diff(r) < 8);
    assert!(pages[2].pixels().filter(red).count() > 10_000, "the image on page 3 is drawn");
    assert_eq!(pages[0].pixels().filter(red).count(), 0);

    // One request a page, in order, each with one image: the page as rendered.
    let bodies = bodies.lock().unwrap();
    assert_eq!(bodies.len(), 3);
    for (body, page) in bodies.iter().zip(&pages) {
        let content = body["messages"][0]["content"].as_array().unwrap();
        let urls: Vec<&str> = content.iter().filter_map(|p| p["image_url"]["url"].as_str()).collect();
        assert_eq!(urls.len(), 1, "{content:?}");
        let png = urls[0].strip_prefix("data:image/png;base64,").expect("a PNG data URL");
        let sent = image::load_from_memory(&base64::engine::general_purpose::STANDARD.decode(png).unwrap()).unwrap();
        assert!(sent.into_rgb8() == *page, "the page sent is the page saved");
        assert!(content.iter().any(|p| p["text"] == "Transcribe all the text on this page verbatim, in reading order."));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_image_is_one_page() {
    let model = smolvlm();
    let png = image("square-64x64.png");
    let text = ok(ocr(&[&png, "--model", &model, "--max-tokens", "8"]));
    assert!(text.starts_with("--- page 1 ---\n") && text.matches("--- page").count() == 1, "{text}");

    // A TIFF scan too, through a server; a second page is not there.
    let dir = folder("tiff");
    let tiff = dir.join("scan.tif");
    image::open(&png).unwrap().save(&tiff).unwrap();
    let (url, bodies) = slow_server(2, Duration::from_millis(1));
    let tiff = tiff.to_str().unwrap();
    assert_eq!(ok(ocr(&[tiff, "--server", &url, "--format", "markdown"])), "## Page 1\n\nword0 word1\n\n");
    assert_eq!(bodies.lock().unwrap().len(), 1);
    let error = one_line_error(ocr(&[tiff, "--server", &url, "--pages", "1-2"]));
    assert!(error.contains("no page 2") && error.contains("has 1 page"), "{error}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The message of a run that failed as it should: a non-zero exit and one `error:` line.
fn one_line_error(out: Output) -> String {
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() == 1 && lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}

#[test]
fn files_it_cannot_read_are_one_line_errors() {
    let dir = folder("bad");
    let good = document(&[A4]);
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path.display().to_string()
    };
    // Nothing listens there: every error below comes before any request.
    let fails = |file: &str, extra: &[&str]| one_line_error(ocr(&[&[file, "--server", "http://127.0.0.1:9"][..], extra].concat()));

    let truncated = write("truncated.pdf", &good[..good.len() / 2]);
    let error = fails(&truncated, &[]);
    assert!(error.contains("truncated.pdf is truncated"), "{error}");
    let corrupt = write("corrupt.pdf", b"%PDF-1.4\n1 0 obj\n<< /Type /Cat\x00\xff garbage\n%%EOF\n");
    let error = fails(&corrupt, &[]);
    assert!(error.contains("corrupt.pdf is a damaged PDF"), "{error}");

    // hayro opens encrypted PDFs whose user password is empty (it tries the empty password);
    // this one's /U does not match the empty password, so it needs one.
    let objects = [b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(), b"<< /Type /Pages /Kids [] /Count 0 >>".to_vec()];
    let hex = "00112233445566778899aabbccddeeff".repeat(2);
    let encrypt = format!("/Encrypt << /Filter /Standard /V 1 /R 2 /O <{hex}> /U <{hex}> /P -44 >> /ID [<{hex}> <{hex}>]");
    let encrypted = write("encrypted.pdf", &pdf(&objects, &encrypt));
    let error = fails(&encrypted, &[]);
    assert!(error.contains("encrypted.pdf") && error.contains("encrypted") && error.contains("password"), "{error}");

    let empty = write("empty.pdf", &pdf(&objects, ""));
    let error = fails(&empty, &[]);
    assert!(error.contains("empty.pdf has no pages"), "{error}");

    let text = write("notes.pdf", b"just some notes, not a PDF\n");
    let error = fails(&text, &[]);
    assert!(error.contains("notes.pdf is neither a PDF nor an image"), "{error}");

    let error = fails(dir.join("missing.pdf").to_str().unwrap(), &[]);
    assert!(error.contains("missing.pdf") && error.contains("No such file"), "{error}");

    let two = write("two.pdf", &good);
    let error = fails(&two, &["--pages", "1,3-4"]);
    assert!(error.contains("no page 4") && error.contains("has 2 pages"), "{error}");
    assert!(!ocr(&[&two, "--pages", "3-1"]).status.success());
    assert!(!ocr(&[&two, "--pages", "0"]).status.success());
    std::fs::remove_dir_all(&dir).ok();
}
