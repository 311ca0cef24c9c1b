//! Models named by their Hugging Face hub id, downloaded into the standard hub cache
//! (`HF_HOME`, default `~/.cache/huggingface`) from `HF_ENDPOINT` (default the hub), with
//! `HF_TOKEN` (or the cache's token file) for gated repositories:
//!
//! * `org/name`: a Hugging Face folder (its configs, tokenizer, chat template and
//!   safetensors); a repository holding only GGUF files is read as the next form.
//! * `org/name:file.gguf`, or `org/name` with a `quant` such as `Q4_K_M`: one GGUF text
//!   model from the repository, with the projector (`mmproj*.gguf`) found beside it.
//!
//! Files are fetched by hf-hub: into a `.incomplete` file first, resumed from where a broken
//! connection left it (a few retries), renamed into the cache only when whole. seer also
//! checks each file's size against what the server announced, so a cut-off transfer is
//! never taken for a model.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{EngineError, Result};

/// What `seer run` uses when no `--model` is given.
pub const DEFAULT_MODEL: &str = "HuggingFaceTB/SmolVLM-256M-Instruct";

/// Where to download from and to.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The hub's address (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The cache folder (`$HF_HOME/hub`).
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    /// Show a progress bar per file on stderr.
    pub progress: bool,
    /// Attempts after a broken transfer, each resuming where the last one stopped.
    pub retries: usize,
}

impl HubOptions {
    /// From `HF_HOME`, `HF_ENDPOINT` and `HF_TOKEN` (else the cache's token file).
    pub fn from_env() -> Self {
        let cache = Cache::from_env();
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.trim().is_empty()).or_else(|| cache.token());
        HubOptions {
            endpoint: std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into()),
            cache_dir: cache.path().clone(),
            token,
            progress: true,
            retries: 5,
        }
    }
}

/// Local files for a model: a folder, or a GGUF text model and its projector.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFiles {
    pub model: PathBuf,
    pub mmproj: Option<PathBuf>,
}

/// Whether `spec` names a hub repository rather than a local path: `org/name` or
/// `org/name:file.gguf`, and nothing at that path on disk.
pub fn is_hub_id(spec: &str) -> bool {
    if Path::new(spec).exists() || spec.starts_with(['.', '/', '~']) {
        return false;
    }
    let repo = spec.split(':').next().unwrap_or("");
    // A missing local file, not a repository.
    if [".gguf", ".safetensors", ".json"].iter().any(|x| repo.to_ascii_lowercase().ends_with(x)) {
        return false;
    }
    let parts: Vec<&str> = repo.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

/// The local files for a model named the way `seer --model` takes it: a local folder or
/// GGUF file (with its `mmproj`), or a hub repository (`org/name`, `org/name:file.gguf`,
/// with `quant` picking among GGUF files), downloaded when not in the cache yet.
pub fn resolve(spec: &str, quant: Option<&str>, mmproj: Option<&Path>) -> Result<ModelFiles> {
    if !is_hub_id(spec) {
        if quant.is_some() {
            return Err(EngineError::BadRequest(format!("a quant chooses a file in a hub repository; {spec} is a local path")));
        }
        return Ok(ModelFiles { model: PathBuf::from(spec), mmproj: mmproj.map(Path::to_path_buf) });
    }
    if mmproj.is_some() {
        return Err(EngineError::BadRequest(format!(
            "the mmproj is found beside the text model in hub repository {spec}; give a local GGUF file to pair it with"
        )));
    }
    fetch(spec, quant, &HubOptions::from_env())
}

/// Downloads (or finds in the cache) the files of hub model `spec`.
pub fn fetch(spec: &str, quant: Option<&str>, opts: &HubOptions) -> Result<ModelFiles> {
    let (repo_id, file) = match spec.split_once(':') {
        Some((r, f)) => (r, Some(f)),
        None => (spec, None),
    };
    let api = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
        .with_endpoint(opts.endpoint.clone())
        .with_token(opts.token.clone())
        .with_progress(opts.progress)
        .with_retries(opts.retries)
        .build()
        .map_err(|e| download_error(repo_id, "", e))?;
    let repo = Hub { api: api.clone(), repo: api.repo(Repo::new(repo_id.to_string(), RepoType::Model)), cache: Cache::new(opts.cache_dir.clone()), id: repo_id };
    let files = repo.files()?;
    let ggufs: Vec<&String> = files.iter().filter(|f| f.to_ascii_lowercase().ends_with(".gguf")).collect();
    let has_safetensors = files.iter().any(|f| f.ends_with(".safetensors"));
    if file.is_none() && quant.is_none() && has_safetensors {
        return fetch_folder(&repo, &files);
    }
    if ggufs.is_empty() {
        return Err(EngineError::BadRequest(format!("{repo_id} has no GGUF files (and no safetensors to load instead)")));
    }
    let text = pick_text_gguf(repo_id, &ggufs, file, quant)?;
    let mmproj = pick_mmproj(repo_id, &ggufs)?;
    Ok(ModelFiles { model: repo.get(&text)?, mmproj: Some(repo.get(&mmproj)?) })
}

/// One repository: its client, its handle and the cache.
struct Hub<'a> {
    api: Api,
    repo: ApiRepo,
    cache: Cache,
    id: &'a str,
}

impl Hub<'_> {
    /// The repository's files: from the hub, or offline from what the cache holds of it.
    fn files(&self) -> Result<Vec<String>> {
        match self.repo.info() {
            Ok(info) => Ok(info.siblings.into_iter().map(|s| s.rfilename).collect()),
            Err(e) => {
                let cached = self.cached_snapshot().and_then(|dir| std::fs::read_dir(dir).ok());
                let names: Vec<String> = cached
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect();
                if names.is_empty() {
                    return Err(download_error(self.id, "", e));
                }
                Ok(names)
            }
        }
    }

    /// `models--org--name/snapshots/<commit of main>` in the cache, if there.
    fn cached_snapshot(&self) -> Option<PathBuf> {
        let folder = self.cache.path().join(format!("models--{}", self.id.replace('/', "--")));
        let commit = std::fs::read_to_string(folder.join("refs").join("main")).ok()?;
        Some(folder.join("snapshots").join(commit.trim())).filter(|p| p.is_dir())
    }

    /// One file from the cache, else downloaded and checked whole.
    fn get(&self, file: &str) -> Result<PathBuf> {
        if let Some(path) = self.cache.repo(Repo::new(self.id.to_string(), RepoType::Model)).get(file) {
            return Ok(path);
        }
        let path = self.repo.download(file).map_err(|e| download_error(self.id, file, e))?;
        let meta = self.api.metadata(&self.repo.url(file)).map_err(|e| download_error(self.id, file, e))?;
        let have = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if have != meta.size() as u64 {
            // Never leave a short file where a whole one is expected.
            let blob = std::fs::canonicalize(&path).unwrap_or(path.clone());
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(blob);
            return Err(EngineError::Download(format!(
                "{}/{file}: got {have} of {} bytes; the partial file was removed, run again to download it anew",
                self.id, meta.size()
            )));
        }
        Ok(path)
    }
}

/// The files a Hugging Face folder needs: top-level configs, tokenizer, chat template
/// and weights (no other weight formats, no subfolders).
fn fetch_folder(repo: &Hub, files: &[String]) -> Result<ModelFiles> {
    let wanted = |f: &&String| !f.contains('/') && [".json", ".jinja", ".safetensors", ".txt"].iter().any(|x| f.ends_with(x));
    let mut folder = None;
    for f in files.iter().filter(wanted) {
        let path = repo.get(f)?;
        folder = path.parent().map(Path::to_path_buf);
    }
    let model = folder.ok_or_else(|| EngineError::BadRequest(format!("{} has no model files", repo.id)))?;
    Ok(ModelFiles { model, mmproj: None })
}

/// The text model: the file named, else the one whose name holds `quant`.
fn pick_text_gguf(repo_id: &str, ggufs: &[&String], file: Option<&str>, quant: Option<&str>) -> Result<String> {
    if let Some(f) = file {
        return ggufs
            .iter()
            .find(|g| g.as_str() == f)
            .map(|g| g.to_string())
            .ok_or_else(|| EngineError::BadRequest(format!("{repo_id} has no file {f}; its GGUF files: {}", list(ggufs))));
    }
    let texts: Vec<&&String> = ggufs.iter().filter(|g| !is_mmproj(g)).collect();
    let wanted = quant.unwrap_or("Q4_K_M").to_ascii_lowercase();
    let matching: Vec<&&&String> = texts.iter().filter(|g| g.to_ascii_lowercase().contains(&wanted)).collect();
    match (matching.as_slice(), quant, texts.as_slice()) {
        ([one], _, _) => Ok(one.to_string()),
        // No quant asked for and only one text model: that one.
        ([], None, [only]) => Ok(only.to_string()),
        _ => Err(EngineError::BadRequest(format!(
            "{repo_id}: choose a text model with --quant or as {repo_id}:FILE; its GGUF files: {}",
            list(ggufs)
        ))),
    }
}

/// The projector beside the text model, f16 preferred where there are several.
fn pick_mmproj(repo_id: &str, ggufs: &[&String]) -> Result<String> {
    let projs: Vec<&&String> = ggufs.iter().filter(|g| is_mmproj(g)).collect();
    let f16 = projs.iter().find(|g| g.to_ascii_lowercase().contains("f16"));
    f16.or(projs.first())
        .map(|g| g.to_string())
        .ok_or_else(|| EngineError::BadRequest(format!("{repo_id} has no projector (mmproj*.gguf) for its GGUF text models")))
}

fn is_mmproj(name: &str) -> bool {
    name.rsplit('/').next().unwrap_or(name).to_ascii_lowercase().starts_with("mmproj")
}

fn list(files: &[&String]) -> String {
    files.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(", ")
}

fn download_error(repo_id: &str, file: &str, e: impl std::fmt::Display) -> EngineError {
    let what = if file.is_empty() { repo_id.to_string() } else { format!("{repo_id}/{file}") };
    EngineError::Download(format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_paths() {
        assert!(is_hub_id("HuggingFaceTB/SmolVLM-256M-Instruct"));
        assert!(is_hub_id("ggml-org/SmolVLM-256M-Instruct-GGUF:SmolVLM-256M-Instruct-Q8_0.gguf"));
        for not in ["model.gguf", "gguf/missing.gguf", "./org/name", "/abs/path", "a/b/c", "org/", "org/na me", ""] {
            assert!(!is_hub_id(not), "{not}");
        }
    }

    #[test]
    fn choosing_gguf_files() {
        let names: Vec<String> = ["m-Q4_K_M.gguf", "m-Q8_0.gguf", "mmproj-m-Q8_0.gguf", "mmproj-m-f16.gguf"].map(String::from).into();
        let files: Vec<&String> = names.iter().collect();
        assert_eq!(pick_text_gguf("r", &files, None, None).unwrap(), "m-Q4_K_M.gguf");
        assert_eq!(pick_text_gguf("r", &files, None, Some("q8_0")).unwrap(), "m-Q8_0.gguf");
        assert_eq!(pick_text_gguf("r", &files, Some("m-Q8_0.gguf"), None).unwrap(), "m-Q8_0.gguf");
        let err = pick_text_gguf("r", &files, None, Some("Q5_K_S")).unwrap_err().to_string();
        assert!(err.contains("--quant") && err.contains("m-Q8_0.gguf"), "{err}");
        assert!(pick_text_gguf("r", &files, Some("nope.gguf"), None).unwrap_err().to_string().contains("no file nope.gguf"));
        assert_eq!(pick_mmproj("r", &files).unwrap(), "mmproj-m-f16.gguf");
        let only_text: Vec<&String> = files[..2].to_vec();
        assert!(pick_mmproj("r", &only_text).unwrap_err().to_string().contains("no projector"));
    }
}
