//! Image input and preprocessing for seer's vision-language models.
//!
//! * [`input`]: load an image from a path, an http(s) URL, base64 / a data
//!   URL or bytes, as RGB8, within size and network limits ([`ImageLimits`]);
//!   JPEG through libjpeg-turbo's decoder, as Pillow does, for the same pixels.
//! * [`clip`]: CLIP-style preprocessing matching transformers'
//!   `CLIPImageProcessorPil` or llama.cpp's mtmd LLaVA path, pixel for pixel.
//! * [`idefics3`]: SmolVLM / Idefics3 tiling and prompt expansion, matching
//!   transformers' `Idefics3ImageProcessorPil` and `Idefics3Processor`.
//! * [`llava_next`]: LLaVA-NeXT's any-resolution tiles and their token counts,
//!   matching transformers' `LlavaNextImageProcessorPil` and `LlavaNextProcessor`.
//! * [`qwen2vl`]: Qwen2-VL / Qwen2.5-VL resizing and patch flattening,
//!   matching transformers' `Qwen2VLImageProcessorPil` or llama.cpp's mtmd.
//! * [`resample`]: the Pillow-compatible resizer all of those rely on.

mod fetch;
mod jpeg;

pub mod clip;
pub mod gemma3;
pub mod idefics3;
pub mod input;
pub mod llava_next;
pub mod mllama;
pub mod qwen2vl;
pub mod resample;

pub use fetch::is_public_address;
pub use input::*;
