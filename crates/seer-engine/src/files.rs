//! Reading the side files of a model folder.

use std::path::Path;

use seer_models::ModelError;
use serde_json::Value;

use crate::error::Result;

pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let value = serde_json::from_str(&text).map_err(|e| ModelError::Format {
        path: path.into(),
        format: "JSON",
        detail: e.to_string(),
    })?;
    Ok(value)
}

/// Like [`read_json`], but a missing file is `None`.
pub fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// The chat template of a Hugging Face folder, wherever this checkpoint keeps it:
/// `chat_template.jinja` (transformers 5), `chat_template.json` (2024 processors), or
/// `tokenizer_config.json` (text models; a string or a list of named templates).
pub fn hf_chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return Ok(Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?));
    }
    for (file, key) in [("chat_template.json", "chat_template"), ("processor_config.json", "chat_template"), ("tokenizer_config.json", "chat_template")] {
        if let Some(json) = read_json_opt(&dir.join(file))? {
            match json.get(key) {
                Some(Value::String(s)) => return Ok(Some(s.clone())),
                Some(Value::Array(list)) => {
                    let default = list
                        .iter()
                        .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                        .or_else(|| list.first());
                    if let Some(s) = default.and_then(|t| t.get("template")).and_then(Value::as_str) {
                        return Ok(Some(s.to_string()));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(None)
}
