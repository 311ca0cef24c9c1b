//! LLaVA-NeXT (LLaVA 1.6): LLaVA's vision tower, projector and decoder, fed an image as
//! a base tile plus a grid of tiles. The tiles' features are laid back out as one
//! picture, cut to the window that saw the image (padding dropped), and each row ends
//! with the learned `image_newline` embedding (transformers' `pack_image_features`).
//! Which tiles and which window is image geometry, worked out by
//! `seer_vision::llava_next::layout` and passed to [`LlavaNext::encode_image`].

use std::sync::Arc;

use candle_core::{Tensor, D};
use seer_vision::llava_next::Layout;
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::llava::{find_prefix, Llava};
use crate::gguf::GgufFile;
use crate::weights::{GgufSource, SafetensorsSource, LoadPlan, Vb};

/// Where `image_newline` lives: the hub's 2024 layout, or transformers 5's.
const NEWLINE_NAMES: [&str; 2] = ["", "model"];

pub struct LlavaNext {
    pub llava: Llava,
    /// `[hidden]`: appended after each kept feature row.
    image_newline: Tensor,
}

impl LlavaNext {
    pub fn load_hf(src: Arc<SafetensorsSource>, config: &Value, plan: &LoadPlan) -> Result<Self> {
        let llava = Llava::load_hf(src.clone(), config, plan)?;
        let prefix = find_prefix(&*src, &NEWLINE_NAMES, "image_newline")?;
        let root = Vb::new(src);
        let vb = if prefix.is_empty() { root } else { root.pp(prefix) };
        let hidden = llava.config.text.hidden_size;
        let image_newline = vb.tensor_shaped("image_newline", &[hidden])?;
        Ok(LlavaNext { llava, image_newline })
    }

    /// From a llama.cpp text model and a LLaVA-1.6 mmproj (the legacy converter's: an
    /// LLaVA projector plus `model.image_newline` and `clip.vision.image_grid_pinpoints`).
    pub fn load_gguf(text: Arc<GgufFile>, mmproj: Arc<GgufFile>, plan: &LoadPlan) -> Result<Self> {
        let llava = Llava::load_gguf(text, mmproj.clone(), plan)?;
        let vb = Vb::new(Arc::new(GgufSource::new(mmproj.clone(), Arc::new(|n: &str| Some(n.to_string())))));
        let name = ["model.image_newline", "v.image_newline"].into_iter().find(|n| vb.contains(n)).ok_or_else(|| {
            ModelError::Mismatch(format!("{} has image_grid_pinpoints (LLaVA-1.6) but no image_newline tensor", mmproj.path().display()))
        })?;
        let image_newline = vb.tensor_shaped(name, &[llava.config.text.hidden_size])?;
        Ok(LlavaNext { llava, image_newline })
    }

    /// The side of one tile in feature cells (24 for a 336-px CLIP with 14-px patches).
    pub fn cells_per_tile(&self) -> usize {
        self.llava.config.vision.image_size / self.llava.config.vision.patch_size
    }

    /// One image's embeddings from its blocks (`[1 + tiles, 3, size, size]`, the base
    /// first): the base tile's features, then the kept window row by row, each row
    /// followed by `image_newline`.
    pub fn encode_image(&self, blocks: &Tensor, layout: &Layout) -> Result<Tensor> {
        let features = self.llava.encode_images(blocks)?; // [blocks, cells², hidden]
        let base = features.get(0)?;
        let n = blocks.dim(0)?;
        let (rows, cols) = layout.tiles;
        if n == 1 {
            return Ok(Tensor::cat(&[base, self.image_newline.unsqueeze(0)?], 0)?);
        }
        if n != 1 + rows * cols {
            return Err(ModelError::Mismatch(format!("an image of {rows}x{cols} tiles came with {} tile blocks", n - 1)));
        }
        let (cells, hidden) = (self.cells_per_tile(), features.dim(D::Minus1)?);
        // [rows, cols, cells, cells, hidden] → [rows, cells, cols, cells, hidden]: one
        // picture of rows·cells × cols·cells feature cells.
        let grid = features
            .narrow(0, 1, n - 1)?
            .reshape((rows, cols, cells, cells, hidden))?
            .permute((0, 2, 1, 3, 4))?
            .reshape((rows * cells, cols * cells, hidden))?;
        let (top, left) = layout.offset;
        let (kept_rows, kept_cols) = layout.kept;
        let window = grid.narrow(0, top, kept_rows)?.narrow(1, left, kept_cols)?;
        let newlines = self.image_newline.reshape((1, 1, hidden))?.broadcast_as((kept_rows, 1, hidden))?;
        let packed = Tensor::cat(&[window, newlines.contiguous()?], 1)?.reshape((kept_rows * (kept_cols + 1), hidden))?;
        Ok(Tensor::cat(&[base, packed], 0)?)
    }
}
