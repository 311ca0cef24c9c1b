//! Everything between a loaded model and a finished answer: chat templates, tokenizers,
//! prompt assembly with images, sampling and the generation loop.

pub mod chat;
pub mod constraint;
pub mod error;
pub mod files;
pub mod generate;
pub mod hub;
pub mod gguf_tokenizer;
pub mod sampler;
pub mod scheduler;
pub mod tokenizer;
pub mod vlm;

pub use chat::{Message, Part, Role};
pub use constraint::Constraint;
pub use error::{EngineError, Result};
pub use generate::{FinishReason, GenerateRequest, Generation, Usage};
pub use sampler::SamplingParams;
pub use seer_models::KvType;
pub use vlm::{parse_device, ImageBatch, Isq, LoadOptions, Model, VisionDtype, Vlm};
