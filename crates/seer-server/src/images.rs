//! What an image string from a client may point at. URLs are fetched by seer-vision
//! under `ImageLimits` (http(s) only, no private addresses unless allowed); local files
//! only inside the folder given with `--allow-local-images`.

use std::path::{Component, Path, PathBuf};

use seer_vision::{looks_like_base64, ImageInput};

use crate::error::ApiError;

/// An OpenAI `image_url.url`: an http(s) URL, a `data:` URL, raw base64, or (when
/// allowed) a local path or `file://` URL inside `local_dir`.
pub fn from_url(url: &str, local_dir: Option<&Path>, param: &str) -> Result<ImageInput, ApiError> {
    let lower: String = url.chars().take(8).collect::<String>().to_ascii_lowercase();
    if lower.starts_with("data:") {
        return Ok(ImageInput::Base64(url.to_string()));
    }
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Ok(ImageInput::Url(url.to_string()));
    }
    if lower.starts_with("file://") {
        return local_path(&url["file://".len()..], local_dir, param);
    }
    if let Some((scheme, _)) = url.split_once("://") {
        let scheme: String = scheme.chars().take(20).collect();
        return Err(ApiError::invalid(param, format!("{param}: unsupported URL scheme `{scheme}`: use http(s), a data: URL or base64")));
    }
    if looks_like_base64(url) {
        return Ok(ImageInput::Base64(url.to_string()));
    }
    local_path(url, local_dir, param)
}

/// Base64 from an API that only takes base64 (KoboldCpp, Ollama).
pub fn from_base64(data: &str) -> ImageInput {
    ImageInput::Base64(data.to_string())
}

/// A local file, allowed only when it really lies inside `dir` (already canonical):
/// no `..`, and no symlink leading out, which canonicalizing the path reveals.
fn local_path(text: &str, dir: Option<&Path>, param: &str) -> Result<ImageInput, ApiError> {
    let Some(dir) = dir else {
        return Err(ApiError::invalid(
            param,
            format!("{param}: not an http(s) URL, a data: URL or base64; local image paths are refused (start seer with --allow-local-images DIR)"),
        ));
    };
    let refuse = |why: &str| ApiError::invalid(param, format!("{param}: local image refused: {why}"));
    let path = Path::new(text);
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(refuse("the path contains `..`"));
    }
    let joined: PathBuf = if path.is_absolute() { path.to_path_buf() } else { dir.join(path) };
    if !joined.starts_with(dir) {
        return Err(refuse("outside the folder given with --allow-local-images"));
    }
    let real = joined.canonicalize().map_err(|_| refuse("no such file"))?;
    if !real.starts_with(dir) {
        return Err(refuse("it leads outside the folder given with --allow-local-images"));
    }
    Ok(ImageInput::Path(real))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_told_apart() {
        assert!(matches!(from_url("https://x.org/a.png", None, "p"), Ok(ImageInput::Url(_))));
        assert!(matches!(from_url("HTTP://x.org/a.png", None, "p"), Ok(ImageInput::Url(_))));
        assert!(matches!(from_url("data:image/png;base64,AAAA", None, "p"), Ok(ImageInput::Base64(_))));
        assert!(matches!(from_url(&"QUJD".repeat(20), None, "p"), Ok(ImageInput::Base64(_))));
        assert!(from_url("ftp://x.org/a.png", None, "p").is_err());
        assert!(from_url("/etc/passwd", None, "p").is_err());
        assert!(from_url("file:///etc/passwd", None, "p").is_err());
    }

    #[test]
    fn local_paths_stay_inside_the_folder() {
        let dir = std::env::temp_dir().join(format!("seer-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        std::fs::write(dir.join("a.png"), b"x").unwrap();
        assert!(matches!(from_url("a.png", Some(&dir), "p"), Ok(ImageInput::Path(p)) if p == dir.join("a.png")));
        let absolute = dir.join("a.png").display().to_string();
        assert!(from_url(&absolute, Some(&dir), "p").is_ok());
        assert!(from_url(&format!("file://{absolute}"), Some(&dir), "p").is_ok());
        assert!(from_url("../a.png", Some(&dir), "p").is_err());
        assert!(from_url("/etc/hostname", Some(&dir), "p").is_err());
        assert!(from_url("missing.png", Some(&dir), "p").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
