//! Conversations and chat templates, rendered with Hugging Face's semantics: the
//! template sees `messages` whose `content` is a list of `{"type": "text"|"image"}`
//! parts, plus `add_generation_prompt`, `bos_token` and `eos_token`.

use seer_vision::ImageInput;
use serde::Serialize;

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" | "developer" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Part {
    Text(String),
    Image(ImageInput),
}

#[derive(Debug, Clone)]
pub struct Message {
    pub role: Role,
    pub parts: Vec<Part>,
}

impl Message {
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Message { role, parts: vec![Part::Text(text.into())] }
    }

    /// A user turn with images first, then the text, the order most VLM templates expect.
    pub fn user_with_images(text: impl Into<String>, images: Vec<ImageInput>) -> Self {
        let mut parts: Vec<Part> = images.into_iter().map(Part::Image).collect();
        parts.push(Part::Text(text.into()));
        Message { role: Role::User, parts }
    }

    pub fn images(&self) -> impl Iterator<Item = &ImageInput> {
        self.parts.iter().filter_map(|p| match p {
            Part::Image(i) => Some(i),
            Part::Text(_) => None,
        })
    }
}

/// How images reach the template.
#[derive(Debug, Clone)]
pub enum ImageParts {
    /// As `{"type": "image"}` parts: the template writes the model's image token
    /// (Hugging Face processors).
    Structured,
    /// Folded into the text: each user message's text starts with one marker per image
    /// and `content` is a plain string (llama.cpp's convention for GGUF templates).
    MarkerFirst(String),
}

#[derive(Serialize)]
struct TemplatePart {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum TemplateContent {
    Text(String),
    Parts(Vec<TemplatePart>),
}

#[derive(Serialize)]
struct TemplateMessage {
    role: Role,
    content: TemplateContent,
}

fn to_template(m: &Message, images: &ImageParts, typed_text: bool) -> TemplateMessage {
    let content = match images {
        ImageParts::Structured => TemplateContent::Parts(
            m.parts
                .iter()
                .map(|p| match p {
                    Part::Text(t) => TemplatePart { kind: "text", text: Some(t.clone()) },
                    Part::Image(_) => TemplatePart { kind: "image", text: None },
                })
                .collect(),
        ),
        ImageParts::MarkerFirst(marker) => {
            let mut s = marker.repeat(m.images().count());
            for p in &m.parts {
                if let Part::Text(t) = p {
                    s.push_str(t);
                }
            }
            if typed_text {
                TemplateContent::Parts(vec![TemplatePart { kind: "text", text: Some(s) }])
            } else {
                TemplateContent::Text(s)
            }
        }
    };
    TemplateMessage { role: m.role, content }
}

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    pub bos_token: String,
    pub eos_token: String,
    /// The template ignores string `content` and only reads `{"type": "text"}` parts
    /// (llava-hf's does); folded text is then passed as one text part, as llama.cpp does.
    typed_text: bool,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        // As transformers (and llama.cpp) render chat templates: a block tag's newline is
        // dropped, and so is the indentation before it.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", strip_generation_tags(source))
            .map_err(|e| EngineError::Template(format!("the chat template does not parse: {e}")))?;
        let mut t = ChatTemplate { env, bos_token: bos_token.into(), eos_token: eos_token.into(), typed_text: false };
        let probe = "seer-probe-7f3a";
        let rendered = t.render(&[Message::text(Role::User, probe)], &ImageParts::MarkerFirst(String::new()), false);
        t.typed_text = !rendered.is_ok_and(|s| s.contains(probe));
        Ok(t)
    }

    pub fn render(&self, messages: &[Message], images: &ImageParts, add_generation_prompt: bool) -> Result<String> {
        let msgs: Vec<TemplateMessage> = messages.iter().map(|m| to_template(m, images, self.typed_text)).collect();
        let tmpl = self.env.get_template("chat").expect("added in new()");
        tmpl.render(minijinja::context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| EngineError::Template(format!("rendering the chat template failed: {e}")))
    }
}

/// transformers' `{% generation %}` tag marks assistant text for training masks; when
/// rendering a prompt it has no effect, so it is removed before minijinja sees it.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else { break };
        let tag = &rest[start..start + len + 2];
        let word = tag.trim_start_matches("{%").trim_end_matches("%}").trim_matches(|c: char| c == '-' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if word != "generation" && word != "endgeneration" {
            out.push_str(tag);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_are_removed() {
        let s = strip_generation_tags("a{% generation %}{{ x }}{%- endgeneration -%}b{% if y %}c{% endif %}");
        assert_eq!(s, "a{{ x }}b{% if y %}c{% endif %}");
    }

    #[test]
    fn marker_first_folds_images_into_text() {
        let t = ChatTemplate::new("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}", "<s>", "</s>").unwrap();
        let msg = Message::user_with_images("hi", vec![ImageInput::Path("a.png".into()), ImageInput::Path("b.png".into())]);
        let s = t.render(&[msg], &ImageParts::MarkerFirst("<M>".into()), false).unwrap();
        assert_eq!(s, "[user]<M><M>hi");
    }

    #[test]
    fn folded_text_becomes_a_text_part_when_the_template_needs_one() {
        let src = "{% for m in messages %}{% for c in m.content | selectattr('type', 'equalto', 'text') %}{{ c.text }}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let msg = Message::user_with_images("hi", vec![ImageInput::Path("a.png".into())]);
        assert_eq!(t.render(&[msg], &ImageParts::MarkerFirst("<M>".into()), false).unwrap(), "<M>hi");
    }

    #[test]
    fn structured_parts_reach_the_template() {
        let src = "{% for m in messages %}{{ m.role.upper() }}:{% for c in m.content %}{% if c.type == 'image' %}<image>{% else %}{{ c.text }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let msg = Message::user_with_images("hi", vec![ImageInput::Path("a.png".into())]);
        assert_eq!(t.render(&[msg], &ImageParts::Structured, true).unwrap(), "USER:<image>hiA:");
    }
}
