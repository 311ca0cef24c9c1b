//! The architectures seer runs and the weight loading behind them.
//!
//! A request flows: vision tower (`clip`) → projector (`llava`) → decoder (`llama`);
//! SmolVLM's (`idefics3`) has its own tower and connector around the same decoder, and
//! Qwen2-VL / Qwen2.5-VL's (`qwen2vl`) its own tower and merger, the decoder with M-RoPE.
//! Weights reach every layer through one seam, `weights::Vb`, which hides whether they
//! came from safetensors or GGUF, and every matrix product goes through `linear::Linear`,
//! which hides whether the weight is dense or quantized.

pub mod clip;
pub mod error;
pub mod gemma3;
pub mod gguf;
pub mod idefics3;
pub mod kv_cache;
pub mod layers;
pub mod linear;
pub mod llama;
pub mod llava;
pub mod llava_next;
pub mod mapped;
pub mod mllama;
pub mod qwen2vl;
pub mod weights;

pub use error::{ModelError, Result};
pub use kv_cache::{KvCache, KvType};
pub use weights::LoadPlan;
