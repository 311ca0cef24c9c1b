#!/usr/bin/env python3
"""Reference fixtures for seer's LLaVA-NeXT (LLaVA-1.6) implementation (tests/fixtures/llava_next/).

What it builds (all deterministic; re-running rewrites the same files):
  images/              two extreme-aspect PNG test images drawn here: very-wide-300x40.png, very-tall-40x300.png
                       (the other cases use tests/fixtures/llava/images/, made by make_llava_fixtures.py)
  tiny-llava-next/     a tiny random LLaVA-NeXT (LlavaNextForConditionalGeneration: CLIP vision tower, 2-layer
                       gelu projector, image_newline, Llama text model) exactly as transformers 5 `save_pretrained`
                       writes it (config.json, model.safetensors in bfloat16, generation_config.json,
                       processor_config.json with the LlavaNextImageProcessorPil settings nested,
                       chat_template.jinja, tokenizer.json + tokenizer_config.json)
  cases/<case>.json (+ .pixels.f32, .logits.f32, .logits_f64.f32, .image_features.f32)
                       transformers references: messages, prompt, input_ids after the processor's expansion of
                       each <image>, the anyres layout of every image, pixel_values, image_sizes, packed image
                       features (projector output after unpadding + image_newline), first-step logits (float32
                       run and float64 run), 16 greedy tokens (EOS masked), margins; computed by loading
                       tiny-llava-next/ back in float32 (and float64 for the check)
  gguf/                the model converted with llama.cpp's own tools: tiny-llava-next-F16.gguf (the Llama text model,
                       exported alone as docs/multimodal/llava.md says, convert_hf_to_gguf.py through
                       convert_with_vocab.py) and mmproj-tiny-llava-next-F16.gguf (llava_surgery_v2.py +
                       convert_image_encoder_to_gguf.py --llava-projector --clip-model-is-vision, the documented
                       LLaVA-1.6 path); llamacpp-F16-<case>.json (+ .pixels.f32, .image_features.f32): llama-mtmd-cli
                       greedy outputs for the single-turn cases, with what llama.cpp fed its vision encoder and got
                       out of it (emulated, checked against its debug output) and the comparison with transformers
  README.md            what is there and how it was made

Model: LlavaNextConfig / LlavaNextForConditionalGeneration with CLIPVisionConfig (image 56, patch 14: 16
patches per tile, 2 layers, vision_feature_layer -2, select strategy "default") and LlamaConfig (2 layers);
image_grid_pinpoints = llava-hf's [[336,672],[672,336],[672,672],[1008,336],[336,1008]] scaled by 56/336.
Processor: LlavaNextProcessor with LlavaNextImageProcessorPil (the PIL class, named explicitly),
num_additional_image_tokens 1 (as llava-hf/llava-v1.6-*-hf).

Tokenizer: the real Llama-2 SentencePiece vocabulary (llama.cpp's models/ggml-vocab-llama-spm.gguf) with
<image>=32000 and <pad>=32001, built by make_llava_fixtures.build_tokenizer() (same tokenizer.json as
tests/fixtures/llava/tiny-llava-new); chat template: llava-hf's (the same as the LLaVA-1.5 fixtures).

How to run (the benchmark tree of /work/shared/bench/setup.sh: its venv with torch, torchvision,
transformers 5.23, safetensors, pillow, numpy; the llama.cpp source and its tools in $BENCH_DIR/build/bin:
llama-mtmd-cli, llama-tokenize, libmtmd.so; tests/fixtures/llava/images must exist):

    ~/.cache/seer-bench/venv/bin/python scripts/make_llava_next_fixtures.py                  # all steps
    ~/.cache/seer-bench/venv/bin/python scripts/make_llava_next_fixtures.py --steps gguf,llamacpp,readme

Steps: images, hf, cases, gguf (conversion), llamacpp (llama-mtmd-cli references), llamacpp-next (llama-mtmd-cli
with LLaVA-1.6's packing patched back in, built in $BENCH_DIR/build-fixed, and transformers on its prompts), readme.  `--seed-search 1,2,...`
prints the smallest greedy margin of each seed (how SEED was chosen; writes nothing).  Environment: see
scripts/fixture_common.py (BENCH_DIR, LLAMA_CPP_DIR: the llama.cpp source, for its vocabulary GGUF and converters;
SEER_SHARED_BENCH: convert_with_vocab.py, legacy_llava_mmproj.py).
Runs on CPU with 2 threads (the llamacpp step: torch 1 thread, llama.cpp -t 1) in about 40 seconds.
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture_common as fc  # noqa: E402
from fixture_common import BIN, LLAMA_CPP_COMMIT, MEDIA, REPO, dump_json, log, write_f32  # noqa: E402

fc.set_log_tag("llava_next")
FIX = REPO / "tests" / "fixtures" / "llava_next"
MODEL = "tiny-llava-next"
N_NEW_TOKENS = 16
MIN_MARGIN = 2e-2
SEED = 3  # chosen (seeds 1..8, lm_head std 1.6 / 2.4: --seed-search) for the largest smallest greedy margin
LM_HEAD_STD = 1.6

# ----------------------------------------------------------------------------- model config
IMAGE_TOKEN, IMAGE_ID = "<image>", 32000
PAD_TOKEN, PAD_ID = "<pad>", 32001
EOS_ID = 2
VOCAB_SIZE = 32064  # as llava-hf/llava-v1.6-vicuna-7b-hf: 32000 + <image> + <pad>, padded to a multiple of 64
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TILE = 56
PATCH = 14
GRID = TILE // PATCH  # 4: 4x4 = 16 features per tile
# llava-hf/llava-v1.6-*: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] ([height, width]) * 56/336
PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]

VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
              image_size=TILE, patch_size=PATCH, num_channels=3, hidden_act="quick_gelu",
              layer_norm_eps=1e-5, projection_dim=48, attention_dropout=0.0)
# hidden 32 (not 64): the untied 32064-row embedding and lm_head dominate the size (bf16: 4 MB at 32, 8 MB at 64)
TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_act="silu",
            rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
            attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
TOP = dict(image_token_index=IMAGE_ID, vision_feature_layer=-2, vision_feature_select_strategy="default",
           projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
           image_grid_pinpoints=PINPOINTS, image_seq_length=GRID * GRID, pad_token_id=PAD_ID)

# ----------------------------------------------------------------------------- cases
# paths relative to tests/fixtures/llava_next
IMAGES = {"square": "../llava/images/square-64x64.png", "wide": "../llava/images/wide-120x72.jpg",
          "tall": "../llava/images/tall-40x90.png", "very_wide": "images/very-wide-300x40.png",
          "very_tall": "images/very-tall-40x300.png"}


def txt(t):
    return {"type": "text", "text": t}


def img(key):
    return {"type": "image", "path": IMAGES[key]}


CASES = {
    "a_square": [{"role": "user", "content": [img("square"), txt("What is in this image?")]}],
    "b_very_wide": [{"role": "user", "content": [img("very_wide"), txt("Describe the colours you can see.")]}],
    "c_very_tall": [{"role": "user", "content": [img("very_tall"), txt("What shape is at the top?")]}],
    "d_two_images": [{"role": "user", "content": [img("wide"), img("tall"),
                                                  txt("How are these two pictures different?")]}],
    "e_multi_turn": [
        {"role": "user", "content": [img("tall"), txt("What shape is at the top?")]},
        {"role": "assistant", "content": [txt("A yellow circle.")]},
        {"role": "user", "content": [img("square"), txt("And what is in this picture?")]},
    ],
}
FEATURES_NOTE = ("packed image features: the projector output of every tile (CLS dropped), base tile first, then the "
                 "tiles' features rearranged to one (rows*4) x (cols*4) grid, unpadded, each grid row followed by "
                 "image_newline; all images of the case in prompt order: exactly the rows that replace the <image> "
                 "ids (LlavaNextModel.get_image_features(...).pooler_output concatenated)")


# ============================================================================= images
def make_images():
    rng = np.random.default_rng(17)
    (FIX / "images").mkdir(parents=True, exist_ok=True)

    fc.draw_very_wide(rng, FIX / IMAGES["very_wide"])
    fc.draw_very_tall(rng, FIX / IMAGES["very_tall"])
    log("images written")


# ============================================================================= model
def build_tokenizer():
    """make_llava_fixtures.build_tokenizer(): Llama-2 SPM vocab + <image>=32000, <pad>=32001 (checked against
    llama.cpp's test vectors there)."""
    import make_llava_fixtures
    return make_llava_fixtures.build_tokenizer()


def chat_template():
    import make_llava_fixtures
    return make_llava_fixtures.CHAT_TEMPLATE


def new_random_model(seed=SEED):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**TEXT), **TOP)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    norm_names = {n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.LayerNorm) or "RMSNorm" in type(m).__name__}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            mod, leaf = name.rsplit(".", 1)
            if mod in norm_names:
                v = (1.0 + (torch.rand(p.shape, generator=g) * 0.4 - 0.2)) if leaf == "weight" \
                    else torch.randn(p.shape, generator=g) * 0.05
            elif leaf == "image_newline":  # the separator row: as large as a token embedding, never zero
                v = torch.randn(p.shape, generator=g) * 0.5
            elif leaf == "bias":
                v = torch.randn(p.shape, generator=g) * 0.05
            elif "embed_tokens" in name:
                v = torch.randn(p.shape, generator=g) * 0.5
            elif "position_embedding" in name or "class_embedding" in name:
                v = torch.randn(p.shape, generator=g) * 0.3
            elif name == "lm_head.weight":  # wide logits: clear greedy margins
                v = torch.randn(p.shape, generator=g) * LM_HEAD_STD
            else:  # linear / conv weights: gain 1.6 / sqrt(fan_in)
                fan_in = int(np.prod(p.shape[1:]))
                v = torch.randn(p.shape, generator=g) * (1.6 / fan_in ** 0.5)
            p.copy_(v.to(p.dtype))
    return model


def image_processor():
    from transformers import LlavaNextImageProcessorPil
    return LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                      image_grid_pinpoints=PINPOINTS, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                                      do_pad=True)


def make_hf():
    from transformers import GenerationConfig, LlavaNextProcessor
    tok = build_tokenizer()
    model = new_random_model()
    out = FIX / MODEL
    if out.exists():
        shutil.rmtree(out)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.to(torch.bfloat16).save_pretrained(out)
    model.to(torch.float32)
    proc = LlavaNextProcessor(image_processor=image_processor(), tokenizer=tok, patch_size=PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=chat_template())
    proc.save_pretrained(out)
    fc.fix_modes(out)
    same = (out / "tokenizer.json").read_bytes() == (REPO / "tests/fixtures/llava/tiny-llava-new/tokenizer.json").read_bytes()
    log(f"wrote {out}: {sorted(p.name for p in out.iterdir())}; tokenizer.json == llava's: {same}")


# ============================================================================= anyres layout
def select_best_resolution(h, w):
    """transformers' select_best_resolution (image_processing_utils): the pinpoint [height, width] that keeps
    the most of the image (downscaled size int()-truncated, capped at the original area), ties to the least
    wasted area, first in list order on a full tie."""
    best, best_eff, best_waste = None, 0, float("inf")
    for ph, pw in PINPOINTS:
        scale = min(pw / w, ph / h)
        dw, dh = int(w * scale), int(h * scale)
        eff = min(dw * dh, w * h)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    return best


def anyres_layout(w, h):
    """The processor's and the model's arithmetic for one image of w x h pixels."""
    bh, bw = select_best_resolution(h, w)
    rows, cols = bh // TILE, bw // TILE
    # image processor: resize keeping the aspect ratio into the best resolution (get_patch_output_size: the
    # limiting side exact, the other ceil()), pad centred with zeros (the extra pixel of an odd padding at the
    # bottom / right), cut into rows x cols tiles of 56, row-major; tile 0 is the whole image squashed to 56x56
    sw, sh = bw / w, bh / h
    if sw < sh:
        nw, nh = bw, min(math.ceil(h * sw), bh)
    else:
        nh, nw = bh, min(math.ceil(w * sh), bw)
    pad_top, pad_left = (bh - nh) // 2, (bw - nw) // 2
    # unpadding of the (rows*4) x (cols*4) feature grid (unpad_image / _get_unpadded_features)
    ch, cw = rows * GRID, cols * GRID
    if w / h > cw / ch:
        new_h = int(round(h * (cw / w), 7))
        p = (ch - new_h) // 2
        uh, uw, crop = ch - 2 * p, cw, {"rows_removed_top": p, "rows_removed_bottom": p}
        scaled = new_h
    else:
        new_w = int(round(w * (ch / h), 7))
        p = (cw - new_w) // 2
        uh, uw, crop = ch, cw - 2 * p, {"cols_removed_left": p, "cols_removed_right": p}
        scaled = new_w
    base = GRID * GRID
    return {
        "size_wh": [w, h],
        "best_resolution_hw": [bh, bw],
        "grid_rows": rows, "grid_cols": cols,
        "n_patches": rows * cols + 1,
        "resized_for_tiles_wh": [nw, nh],
        "pad_top_left": [pad_top, pad_left],
        "pad_bottom_right": [bh - nh - pad_top, bw - nw - pad_left],
        "feature_grid_hw": [ch, cw],
        "feature_grid_scaled_side": scaled,
        "unpad": crop,
        "unpadded_grid_hw": [uh, uw],
        "base_tokens": base,
        "tile_tokens": uh * uw,
        "newline_tokens": uh,
        "image_tokens": base + uh * uw + uh,
    }


def pillow_pass(src, dst):
    """Which separable pass order Pillow (this venv's) used for one bicubic resize of a test image, found by
    comparing with the two single-axis orders: 'h-first', 'v-first', 'either' (same bytes) or 'single-axis'."""
    im = src
    w, h = dst
    if im.size[0] == w or im.size[1] == h:
        return "single-axis"
    direct = np.asarray(im.resize((w, h), Image.BICUBIC))
    hf = np.asarray(im.resize((w, im.size[1]), Image.BICUBIC).resize((w, h), Image.BICUBIC))
    vf = np.asarray(im.resize((im.size[0], h), Image.BICUBIC).resize((w, h), Image.BICUBIC))
    eh, ev = np.array_equal(direct, hf), np.array_equal(direct, vf)
    return "either" if eh and ev else "h-first" if eh else "v-first" if ev else "neither"


# ============================================================================= transformers references
def load_processor(folder: Path):
    """The folder's processor with its image processor forced to the PIL class (LlavaNextImageProcessorPil)."""
    from transformers import AutoProcessor, LlavaNextImageProcessorPil
    proc = AutoProcessor.from_pretrained(folder)
    fast = proc.image_processor
    proc.image_processor = LlavaNextImageProcessorPil.from_pretrained(folder)
    assert proc.patch_size == PATCH and proc.vision_feature_select_strategy == "default"
    assert proc.num_additional_image_tokens == 1
    assert proc.image_processor.image_grid_pinpoints == PINPOINTS
    return proc, fast


def hf_messages(messages):
    return [{"role": m["role"], "content": [{"type": "image"} if c["type"] == "image" else dict(c)
                                            for c in m["content"]]} for m in messages]


def case_images(messages):
    return [c["path"] for m in messages for c in m["content"] if c["type"] == "image"]


def load_models(folder=None):
    from transformers import LlavaNextForConditionalGeneration
    folder = folder or FIX / MODEL
    m32, info = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                                  output_loading_info=True)
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    assert not any(problems.values()), problems
    m64 = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float64)
    return m32.eval(), m64.eval()


def run_case(proc, m32, m64, messages, gen_check=True):
    """Everything about one case (no files written)."""
    tok = proc.tokenizer
    paths = case_images(messages)
    images = [Image.open(FIX / p) for p in paths]
    prompt = proc.apply_chat_template(hf_messages(messages), add_generation_prompt=True)
    inputs = proc(images=images, text=prompt, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    text_ids = tok(prompt).input_ids
    layouts = []
    for p, im in zip(paths, images):
        lay = anyres_layout(*im.size)
        rgb = im.convert("RGB")
        lay["image"] = p
        lay["pillow_pass_order"] = {
            "tiles": pillow_pass(rgb, tuple(lay["resized_for_tiles_wh"])),
            "base": pillow_pass(rgb, (TILE, TILE)),
        }
        layouts.append(lay)
    # input_ids = the text ids with each <image> repeated image_tokens times
    expected, k = [], 0
    for t in text_ids:
        if t == IMAGE_ID:
            expected += [IMAGE_ID] * layouts[k]["image_tokens"]
            k += 1
        else:
            expected.append(t)
    assert k == len(images) and expected == ids, "processor expansion differs from anyres_layout()"
    n_tok_proc = proc._get_num_multimodal_tokens(image_sizes=[[im.size[1], im.size[0]] for im in images])
    assert n_tok_proc["num_image_tokens"] == [la["image_tokens"] for la in layouts], n_tok_proc
    px, sizes = inputs["pixel_values"], inputs["image_sizes"]
    assert sizes.tolist() == [[im.size[1], im.size[0]] for im in images]
    n_patches = [la["n_patches"] for la in layouts]
    assert list(px.shape) == [len(images), max(n_patches), 3, TILE, TILE], px.shape
    for i, n in enumerate(n_patches):  # padding patches (for a batch of images with fewer tiles) are zeros
        assert bool((px[i, n:] == 0).all())
    kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
          "pixel_values": px, "image_sizes": sizes}
    t32, mg32, first = fc.greedy(m32, kw, N_NEW_TOKENS, [EOS_ID])
    t64, mg64, first64 = fc.greedy(m64, dict(kw, pixel_values=px.double()), N_NEW_TOKENS, [EOS_ID])
    if gen_check:
        with torch.no_grad():
            gen = m32.generate(**inputs, max_new_tokens=N_NEW_TOKENS, min_new_tokens=N_NEW_TOKENS,
                               do_sample=False, num_beams=1)
        assert gen[0, len(ids):].tolist() == t32, (gen[0, len(ids):].tolist(), t32)
    with torch.no_grad():
        feats = torch.cat(m32.model.get_image_features(px, sizes, return_dict=True).pooler_output, 0)
    assert feats.shape[0] == ids.count(IMAGE_ID)
    return dict(images=images, paths=paths, prompt=prompt, inputs=inputs, ids=ids, text_ids=text_ids,
                layouts=layouts, kw=kw, t32=t32, mg32=mg32, first=first, t64=t64, mg64=mg64, first64=first64,
                feats=feats)


def make_cases():
    torch.set_num_threads(2)
    from PIL import ImageOps
    fdir = FIX / MODEL
    proc, fast = load_processor(fdir)
    tok = proc.tokenizer
    m32, m64 = load_models()
    outdir = FIX / "cases"
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    summary = {}
    for case, messages in CASES.items():
        r = run_case(proc, m32, m64, messages)
        t32, t64, mg32, mg64, first, first64 = r["t32"], r["t64"], r["mg32"], r["mg64"], r["first"], r["first64"]
        assert t32 == t64, f"{case}: f32 greedy {t32} != f64 greedy {t64}"
        assert min(mg32) > MIN_MARGIN and min(mg64) > MIN_MARGIN, (case, min(mg32), min(mg64))
        px, layouts, ids = r["inputs"]["pixel_values"], r["layouts"], r["ids"]
        fast_px = fast(images=r["images"], return_tensors="pt")["pixel_values"]
        # the image matters: the same prompt with every image mirrored left-right
        mir = proc(images=[ImageOps.mirror(im.convert("RGB")) for im in r["images"]], text=r["prompt"],
                   return_tensors="pt")
        t_mir, _, first_mir = fc.greedy(m32, {k: mir[k] for k in r["kw"]}, N_NEW_TOKENS, [EOS_ID])
        write_f32(outdir / f"{case}.logits.f32", first)
        write_f32(outdir / f"{case}.logits_f64.f32", first64)
        write_f32(outdir / f"{case}.pixels.f32", px)
        write_f32(outdir / f"{case}.image_features.f32", r["feats"])
        top5 = torch.topk(first, 5)
        rec = {
            "case": case, "folder": MODEL, "stored_weight_dtype": "bfloat16",
            "reference": "transformers 5.23 LlavaNextForConditionalGeneration.from_pretrained(tiny-llava-next, "
                         "dtype=float32), CPU; processor = AutoProcessor.from_pretrained(tiny-llava-next) with the image "
                         "processor replaced by LlavaNextImageProcessorPil.from_pretrained(tiny-llava-next)",
            "messages": messages,
            "prompt": r["prompt"],
            "text_input_ids": r["text_ids"],
            "input_ids": ids,
            "image_token_id": IMAGE_ID,
            "num_image_tokens_per_image": [la["image_tokens"] for la in layouts],
            "num_patches_per_image": [la["n_patches"] for la in layouts],
            "image_sizes": r["inputs"]["image_sizes"].tolist(),
            "image_sizes_note": "as the processor returns them: [height, width] per image (the model's image_sizes input)",
            "anyres": layouts,
            "anyres_note": "per image: size_wh [w, h]; best_resolution_hw [h, w] = select_best_resolution over "
                           "image_grid_pinpoints; grid_rows x grid_cols tiles of 56x56; resized_for_tiles_wh: the image "
                           "resized (PIL bicubic) keeping its aspect ratio into best_resolution (limiting side exact, the "
                           "other ceil()), then zero-padded (pad_top_left / pad_bottom_right, in pixels, before rescale and "
                           "normalize, so padding pixels are -mean/std) and cut row-major; patch 0 = the whole image "
                           "squashed to 56x56 (no aspect ratio); feature_grid_hw = (rows*4, cols*4) features; unpad removes "
                           "whole feature rows (or columns) on both sides: scaled side = int(round(orig * grid/orig_other, "
                           "7)), removed = (grid - scaled) // 2 per side; image_tokens = 16 (base tile, CLS dropped) + "
                           "unpadded rows*cols + one image_newline per unpadded row; pillow_pass_order: which separable "
                           "pass order this venv's Pillow used for the two 2-axis resizes (python-pillow/Pillow#9549)",
            "pixel_values_file": f"{case}.pixels.f32",
            "pixel_values_shape": list(px.shape),
            "pixel_values_dtype": "float32 little-endian, C order; [n_images, max n_patches over the case's images, 3, "
                                  "56, 56]; per image: the base (whole image) then its tiles row-major; an image with "
                                  "fewer patches than the largest is padded with all-zero patches (the model drops them "
                                  "using image_sizes)",
            "pixel_values_max_abs_diff_vs_torchvision_processor": float((fast_px.float() - px.float()).abs().max())
            if fast_px.shape == px.shape else None,
            "image_features_file": f"{case}.image_features.f32",
            "image_features_shape": list(r["feats"].shape),
            "image_features_note": FEATURES_NOTE + "; float32 run",
            "greedy_tokens": t32,
            "greedy_text": tok.decode(t32, skip_special_tokens=True),
            "greedy_token_strings": tok.convert_ids_to_tokens(t32),
            "greedy_masked_ids": [EOS_ID],
            "greedy_tokens_f64_equal": t32 == t64,
            "logit_margin_min": min(mg32),
            "logit_margins": mg32,
            "logit_margin_min_f64": min(mg64),
            "logits_file": f"{case}.logits.f32",
            "logits_shape": [int(first.shape[0])],
            "logits_dtype": "float32 little-endian; logits at the last prompt position (first generated token)",
            "logits_f64_file": f"{case}.logits_f64.f32",
            "logits_f64_note": "the same logits computed in float64 (weights loaded as float64, same pixels), "
                               "stored rounded to float32",
            "logits_f32_max_abs_diff_vs_f64": float((first.double() - first64).abs().max()),
            "logits_first_step_top5": [[int(i), float(v)] for v, i in zip(top5.values, top5.indices)],
            "mirrored_images_greedy_tokens": t_mir,
            "mirrored_images_first_logits_max_abs_diff": float((first_mir - first).abs().max()),
            "mirrored_images_note": "the same prompt with every image mirrored left-right: the image changes the output",
        }
        dump_json(outdir / f"{case}.json", rec)
        summary[case] = {"greedy_tokens": t32, "margin_min": round(min(mg32), 5), "margin_min_f64": round(min(mg64), 5),
                         "f32_eq_f64": t32 == t64, "n_input_ids": len(ids),
                         "image_tokens": rec["num_image_tokens_per_image"],
                         "grids": [[la["grid_rows"], la["grid_cols"]] for la in layouts],
                         "unpadded": [la["unpadded_grid_hw"] for la in layouts]}
        log(f"{case}: {len(ids)} ids, grids {summary[case]['grids']}, image tokens {rec['num_image_tokens_per_image']}, "
            f"tokens {t32}, margin {min(mg32):.4f}")
    dump_json(outdir / "summary.json", summary)
    return summary


def seed_search(seeds):
    """Smallest greedy margin (f32 and f64) over all cases for each seed (models kept in memory, not saved;
    bf16 rounding applied as saving would)."""
    import tempfile
    from transformers import LlavaNextProcessor
    torch.set_num_threads(2)
    tok = build_tokenizer()
    proc = LlavaNextProcessor(image_processor=image_processor(), tokenizer=tok, patch_size=PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=chat_template())
    res = {}
    for s in seeds:
        with tempfile.TemporaryDirectory() as td:
            new_random_model(s).to(torch.bfloat16).save_pretrained(td)
            m32, m64 = load_models(Path(td))
        worst, eq = float("inf"), True
        for case, messages in CASES.items():
            r = run_case(proc, m32, m64, messages, gen_check=False)
            worst = min(worst, min(r["mg32"]), min(r["mg64"]))
            eq &= r["t32"] == r["t64"]
        res[s] = (worst, eq)
        log(f"seed {s}: min margin {worst:.4f}, f32 == f64 everywhere: {eq}")
    return res


# ============================================================================= GGUF
GGUF_DIR = FIX / "gguf"
F16 = GGUF_DIR / "tiny-llava-next-F16.gguf"
MMPROJ = GGUF_DIR / "mmproj-tiny-llava-next-F16.gguf"
LLAMACPP_CASES = ["a_square", "b_very_wide", "c_very_tall", "d_two_images"]
# the llava-1.6 keys of the vision config llama.cpp's docs/multimodal/llava.md have you download
# (cmp-nct/llava-1.6-gguf config_vit.json: the CLIP ViT-L/336 config plus these, copied from
# liuhaotian/llava-v1.6-vicuna-7b's config.json); no vision_feature_layer key
VIT_LLAVA16_KEYS = dict(image_aspect_ratio="anyres", image_crop_resolution=224, image_split_resolution=224,
                        mm_patch_merge_type="spatial_unpad", mm_projector_type="mlp2x_gelu")
MMPROJ_KEYS = ["general.name", "clip.projector_type", "clip.has_llava_projector", "clip.vision.image_size",
               "clip.vision.patch_size", "clip.vision.block_count", "clip.vision.embedding_length",
               "clip.vision.image_grid_pinpoints", "clip.vision.image_crop_resolution",
               "clip.vision.image_aspect_ratio", "clip.vision.image_split_resolution",
               "clip.vision.mm_patch_merge_type", "clip.vision.mm_projector_type", "clip.vision.feature_layer",
               "clip.vision.image_mean", "clip.vision.image_std", "clip.use_gelu"]


def hub_name(k):
    """transformers 5's checkpoint names (what tiny-llava-next/ holds) -> the 2024 llava-hf/llava-v1.6-* names:
    only the vision tower differs (vision_tower.* -> vision_tower.vision_model.*)."""
    if k.startswith("vision_tower."):
        return "vision_tower.vision_model." + k[len("vision_tower."):]
    return k


def write_text_only_folder(out: Path):
    """The Llama text model alone as a LlamaForCausalLM folder (what docs/multimodal/llava.md says to do when
    the LLaVA-1.6 text model does not convert: export model.language_model with transformers):
    convert_hf_to_gguf.py has no LlavaNextForConditionalGeneration entry.  Weights as stored (bfloat16)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    cfg = json.load(open(FIX / MODEL / "config.json"))
    tensors = {}
    with safe_open(str(FIX / MODEL / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.startswith("language_model."):
                tensors[k[len("language_model."):]] = f.get_tensor(k).contiguous()
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tcfg = dict(cfg["text_config"])
    tcfg.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16"})
    tcfg.pop("dtype", None)
    dump_json(out / "config.json", tcfg)
    GenerationConfig = __import__("transformers").GenerationConfig
    GenerationConfig(bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(out)


def write_hub_copy(out: Path):
    """tiny-llava-next/ with the 2024 hub weight names (vision_tower.vision_model.*), as llava_surgery_v2.py
    expects a LLaVA-1.6 checkpoint; only model.safetensors and config.json."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    out.mkdir(parents=True)
    with safe_open(str(FIX / MODEL / "model.safetensors"), "pt") as f:
        tensors = {hub_name(k): f.get_tensor(k).contiguous() for k in f.keys()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(FIX / MODEL / "config.json", out / "config.json")


def make_gguf():
    from make_llava_fixtures import build_vocab_gguf
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    legacy = fc.LLAMA_CPP / "tools" / "mtmd" / "legacy-models"
    env = {"LLAMA_CPP_DIR": str(fc.LLAMA_CPP), "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory(prefix="seer-llava-next-") as td:
        td = Path(td)
        # 1. text model: convert_hf_to_gguf.py (through convert_with_vocab.py: tokenizer.* keys from the same
        #    vocab GGUF as ../llava/gguf/tiny-llava-F16.gguf), F16
        text = td / "tiny-llava-next-text"
        write_text_only_folder(text)
        vocab = td / "llava-vocab.gguf"
        build_vocab_gguf(vocab)
        fc.run([py, fc.SHARED_BENCH / "convert_with_vocab.py", text, "--outtype", "f16", "--outfile", F16],
               env={**env, "VOCAB_GGUF": str(vocab)})
        # 2. mmproj: llama.cpp's documented LLaVA-1.6 path (docs/multimodal/llava.md, "LLaVA 1.6 gguf conversion")
        hub = td / "tiny-llava-next-hub"
        write_hub_copy(hub)
        fc.run([py, legacy / "llava_surgery_v2.py", "-C", "-m", hub], env=env)  # -> llava.clip, llava.projector
        vit = td / "vit"
        vit.mkdir()
        shutil.copy(hub / "llava.clip", vit / "pytorch_model.bin")
        shutil.copy(hub / "llava.projector", vit / "llava.projector")
        cfg = json.load(open(FIX / MODEL / "config.json"))
        vcfg = {"_name_or_path": "tiny-llava-next-clip-vision", "architectures": ["CLIPVisionModel"],
                "model_type": "clip_vision_model", "torch_dtype": "float32", **VISION,
                "image_grid_pinpoints": cfg["image_grid_pinpoints"], **VIT_LLAVA16_KEYS}
        dump_json(vit / "config.json", vcfg)
        out = td / "mmproj"
        fc.run([py, fc.SHARED_BENCH / "legacy_llava_mmproj.py", "-m", vit, "--llava-projector", vit / "llava.projector",
                "--output-dir", out, "--clip-model-is-vision"], env=env)
        shutil.move(str(out / "mmproj-model-f16.gguf"), MMPROJ)
    for p in (F16, MMPROJ):
        p.chmod(0o644)
    kv = fc.gguf_kv(MMPROJ, MMPROJ_KEYS)
    log("mmproj keys:", json.dumps(kv))
    gguf = fc.gguf_module()
    names = [t.name for t in gguf.GGUFReader(str(MMPROJ)).tensors]
    log("mmproj tensors:", names)
    return kv, names


# ============================================================================= llama.cpp references
# What llama.cpp 0c1e57098 does with a LLaVA-1.6 mmproj (legacy converter, clip.projector_type "mlp",
# clip.vision.image_grid_pinpoints set), read from tools/mtmd (mtmd.cpp init_vision / add_media,
# mtmd-image.cpp mtmd_image_preprocessor_llava_uhd + img_tool, clip.cpp load_hparams, models/llava.cpp) and
# checked against its debug output below (llamacpp_check()).
def llamacpp_candidates():
    """clip.vision.image_grid_pinpoints is the config's list flattened; clip.cpp reads it back in pairs as
    (width, height) (clip_image_size{pinpoints[i], pinpoints[i+1]}), in list order."""
    return [(a, b) for a, b in PINPOINTS]


def llamacpp_candidate_areas(w, h, cw, ch):
    """target (downscaled size), wasted and effective area of one candidate, as select_best_resolution logs them."""
    f = np.float32
    scale = min(f(cw) / f(w), f(ch) / f(h))
    tw, th = int(f(w) * scale), int(f(h) * scale)
    eff = min(tw * th, w * h)
    return {"target_wh": [tw, th], "wasted": cw * ch - eff, "effective": eff}


def llamacpp_select_best_resolution(w, h):
    """mtmd_image_preprocessor_llava_uhd::select_best_resolution: for each candidate (cw, ch), scale =
    min(cw/w, ch/h) in float32, downscaled = (int)(w*scale) x (int)(h*scale) (float32 products), effective =
    min(downscaled area, w*h), wasted = cw*ch - effective; the largest effective, then the least wasted
    (strictly: the first in list order on a full tie)."""
    f = np.float32
    best, best_eff, best_waste = None, 0, None
    for cw, ch in llamacpp_candidates():
        scale = min(f(cw) / f(w), f(ch) / f(h))
        tw, th = int(f(w) * scale), int(f(h) * scale)
        eff = min(tw * th, w * h)
        waste = cw * ch - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cw, ch), eff, waste
    return best


def llamacpp_layout(w, h):
    """The layout llama.cpp makes for one w x h image (sizes as [w, h])."""
    f = np.float32
    if not (w > TILE or h > TILE):  # has_slices false: the overview alone
        return {"size_wh": [w, h], "slices": False, "refined_wh": None, "grid_cols": 0, "grid_rows": 0,
                "resized_in_refined_wh": None, "pad_left_top": None, "n_chunks": 1, "image_tokens": GRID * GRID}
    rw, rh = llamacpp_select_best_resolution(w, h)
    # img_tool::resize with PAD_CEIL: scale = min(rw/w, rh/h) in float32, new side = min(ceil(side*scale), target)
    scale = min(f(rw) / f(w), f(rh) / f(h))
    nw, nh = min(int(np.ceil(f(w) * scale)), rw), min(int(np.ceil(f(h) * scale)), rh)
    cols, rows = rw // TILE, rh // TILE
    return {"size_wh": [w, h], "slices": True, "refined_wh": [rw, rh], "grid_cols": cols, "grid_rows": rows,
            "resized_in_refined_wh": [nw, nh], "pad_left_top": [(rw - nw) // 2, (rh - nh) // 2],
            "n_chunks": rows * cols + 1, "image_tokens": GRID * GRID * (rows * cols + 1)}


def resize_h_first(im, size):
    """Bicubic resize as llama.cpp's img_tool::resize_pillow does it: a port of Pillow's fixed-point separable
    resampling (a = -0.5, support 2 scaled by the downscale factor, 22-bit weights, u8 between the passes) that
    always runs the horizontal pass first (as Pillow <= 12).  Pillow 13 runs the vertical pass first in some
    shrinking cases (python-pillow/Pillow#9549); each single-axis PIL resize below is one pass, the same in all."""
    w, h = im.size
    if size == (w, h):
        return im.copy()
    if size[0] != w and size[1] != h:
        im = im.resize((size[0], h), Image.BICUBIC)
    return im.resize(size, Image.BICUBIC)


_STBI = []


def llamacpp_decode(path):
    """The image as llama-mtmd-cli decodes it: mtmd_helper_bitmap_init_from_buf -> stbi_load_from_memory(..., 3)
    (stb_image, vendored in llama.cpp and exported by $BENCH_DIR/build/bin/libmtmd.so, called here through
    ctypes).  PNGs decode as in PIL; JPEGs do not (stb_image's IDCT and chroma upsampling differ from libjpeg's:
    up to 2 levels on wide-120x72.jpg)."""
    import ctypes
    if not _STBI:
        lib = ctypes.CDLL(str(BIN / "libmtmd.so"))
        lib.stbi_load_from_memory.restype = ctypes.POINTER(ctypes.c_ubyte)
        lib.stbi_load_from_memory.argtypes = [ctypes.c_char_p, ctypes.c_int] + [ctypes.POINTER(ctypes.c_int)] * 3 + \
            [ctypes.c_int]
        _STBI.append(lib)
    lib = _STBI[0]
    b = (FIX / path).read_bytes()
    x, y, c = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    d = lib.stbi_load_from_memory(b, len(b), ctypes.byref(x), ctypes.byref(y), ctypes.byref(c), 3)
    assert d, f"stb_image cannot decode {path}"
    a = np.ctypeslib.as_array(d, shape=(y.value, x.value, 3)).copy()
    lib.stbi_image_free(d)
    return Image.fromarray(a)


def llamacpp_images_u8(path, decode=None):
    """(chunks as PIL images in prompt order: tiles row-major, then the overview; layout).  decode: how the
    file becomes RGB (llama.cpp's stb_image by default)."""
    im = (decode or llamacpp_decode)(path)
    lay = llamacpp_layout(*im.size)
    # overview: image_pad_ov = PAD_NONE: the whole image resized to 56x56 (squashed), bicubic
    overview = resize_h_first(im, (TILE, TILE))
    if not lay["slices"]:
        return [overview], lay
    rw, rh = lay["refined_wh"]
    nw, nh = lay["resized_in_refined_wh"]
    # refined: PAD_CEIL with image_pad_color_rf (0, 0, 0): resized keeping the aspect ratio, pasted at
    # ((rw-nw)//2, (rh-nh)//2) on a black canvas
    refined = Image.new("RGB", (rw, rh), (0, 0, 0))
    refined.paste(resize_h_first(im, (nw, nh)), tuple(lay["pad_left_top"]))
    tiles = [refined.crop((c * TILE, r * TILE, (c + 1) * TILE, (r + 1) * TILE))
             for r in range(lay["grid_rows"]) for c in range(lay["grid_cols"])]
    return tiles + [overview], lay


def llamacpp_pixels(path):
    """[n_chunks, 3, 56, 56] float32: clip_image_f32::from_u8 (v / 255.0f) then normalize ((v - mean) / std,
    float32, the mmproj's clip.vision.image_mean / image_std)."""
    chunks, lay = llamacpp_images_u8(path)
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    out = []
    for c in chunks:
        a = np.asarray(c, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        a = (a - mean) / std
        out.append(a.transpose(2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(np.stack(out))), lay


def llamacpp_chunk_features(model, px):
    """transformers modules wired the way llama.cpp 0c1e57098 runs this mmproj (models/llava.cpp), one 56x56
    chunk at a time: patch embedding (im2col in f16: the pixels rounded to f16 first), CLS embedding
    concatenated AFTER the 16 patch embeddings, position embeddings 0..16 added in that order, pre-LN,
    clip.vision.block_count - 1 = 0 encoder layers (the converter stored num_hidden_layers - 1 = 1 block, the
    graph runs n_layer - 1 of them), rows 1..16 kept (patch 0 dropped, CLS kept as the last), projector with
    tanh gelu (ggml_gelu).  ggml-org/llama.cpp#25814, #25817 (see ../llava/README.md)."""
    vt = model.model.vision_tower
    vm = getattr(vt, "vision_model", vt)
    emb = vm.embeddings
    n_run = (VISION["num_hidden_layers"] - 1) - 1
    pr = model.model.multi_modal_projector
    feats = []
    with torch.no_grad():
        for i in range(px.shape[0]):
            p = px[i:i + 1].to(torch.float16).to(torch.float32)
            x = emb.patch_embedding(p).flatten(2).transpose(1, 2)
            x = torch.cat([x, emb.class_embedding.view(1, 1, -1)], dim=1)
            x = x + emb.position_embedding.weight[None, : x.shape[1]]
            x = vm.pre_layrnorm(x)
            for layer in vm.encoder.layers[:n_run]:
                out = layer(x, None)
                x = out[0] if isinstance(out, tuple) else out
            x = x[:, 1:]
            feats.append(pr.linear_2(torch.nn.functional.gelu(pr.linear_1(x), approximate="tanh"))[0])
    return torch.cat(feats, 0)


def spm_piece_bytes(tok, ids):
    """What llama-mtmd-cli prints for these ids: the pieces, '▁' -> ' ', <0xNN> -> that byte; rows 32002..32063
    ([PADnnnnn], UNUSED in the GGUF) print nothing."""
    out = b""
    for t in tok.convert_ids_to_tokens(ids):
        if t is None or (t.startswith("[PAD") and t.endswith("]")):
            continue
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            out += bytes([int(t[3:5], 16)])
        else:
            out += t.replace("\u2581", " ").encode("utf-8")
    return out


def mtmd_prompt_ids(model, formatted, layouts):
    """Prompt ids as mtmd builds them: BOS (add_bos_token true) + each text segment tokenized on its own
    (parse_special, no BOS), then per image its chunks' 16 embedding positions each (written as 32000)."""
    segs = formatted.split(MEDIA)
    ids, k = [1], 0
    for i, s in enumerate(segs):
        ids += fc.llama_tokenize(model, s)
        if i < len(segs) - 1:
            ids += [IMAGE_ID] * layouts[k]["image_tokens"]
            k += 1
    assert k == len(layouts)
    return ids


_TS = re.compile(r"\d+\.\d+\.\d+\.\d+ [DIWE] ")


def mtmd_log_layout(stderr):
    """Per image, what llama-mtmd-cli -v logs about its slicing (get_slice_instructions, add_media) and the
    n_tokens of every image chunk it decodes."""
    imgs = []
    for m in re.finditer(r"get_slice_instructions: original size: (\d+) x (\d+), overview size: (\d+) x (\d+), "
                         r"refined size: (\d+) x (\d+)", stderr):
        imgs.append({"original_wh": [int(m.group(1)), int(m.group(2))], "overview_wh": [int(m.group(3)), int(m.group(4))],
                     "refined_wh": [int(m.group(5)), int(m.group(6))]})
    grids = [[int(a), int(b)] for a, b in re.findall(r"get_slice_instructions: grid size: (\d+) x (\d+)", stderr)]
    for d, g in zip(imgs, grids):
        d["grid_wh"] = g
    cands = re.findall(r"select_best_resolution: candidate: (\d+) x (\d+), target: (\d+) x (\d+), wasted: (-?\d+), "
                       r"effective: (\d+)", stderr)
    per = len(PINPOINTS)
    for i, d in enumerate(imgs):
        d["candidates"] = [{"candidate_wh": [int(c[0]), int(c[1])], "target_wh": [int(c[2]), int(c[3])],
                            "wasted": int(c[4]), "effective": int(c[5])} for c in cands[i * per:(i + 1) * per]]
    chunks = [int(n) for n in re.findall(r"decoding image batch \d+/\d+, n_tokens_batch = (\d+)", stderr)]
    return imgs, chunks


def llamacpp_debug_run(model, args):
    """The same command with MTMD_DEBUG_GRAPH=1 (every clip graph node printed to stdout: the f16 im2col of
    the pixels and its float32 sum) and MTMD_DEBUG_EMBEDDINGS=1 (per chunk: all 32 values of output token 0
    and the sum of the chunk's [16, 32] output, in the -v log), -n 1.  Returns per chunk (im2col sum,
    token-0 values, output sum)."""
    env = dict(os.environ, MTMD_DEBUG_GRAPH="1", MTMD_DEBUG_EMBEDDINGS="1")
    a = list(args)
    a[a.index("-n") + 1] = 1
    p = subprocess.run([str(BIN / "llama-mtmd-cli")] + [str(x) for x in a], cwd=FIX, capture_output=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout.decode("utf-8", errors="replace")
    sums = [float(s) for s in re.findall(r"IM2COL\(v\.patch_embd\.weight.*?\n\s+sum = (-?[\d.]+)", out, re.S)]
    err = _TS.sub("", p.stderr.decode("utf-8", errors="replace"))
    blocks = re.findall(r"=== MTMD_DEBUG_EMBEDDINGS ===\s*Shape: \[32, 16\]\s*Token 0 \(first 16 values\):([^\n]*)\n"
                        r"\s*Token 0 \(last 16 values\):([^\n]*)\n\s*Stats: .*?sum=(-?[\d.]+)", err)
    tok0 = [[float(v) for v in (b[0] + " " + b[1]).split()] for b in blocks]
    return sums, tok0, [float(b[2]) for b in blocks]


def im2col_sum(px):
    """common_debug_print_tensor's sum of the im2col node: the pixels rounded to f16, summed in float32 in
    im2col order (output y, output x, then channel, kernel y, kernel x)."""
    a = px.to(torch.float16).to(torch.float32).numpy()  # [3, 56, 56]
    a = a.reshape(3, GRID, PATCH, GRID, PATCH).transpose(1, 3, 0, 2, 4).reshape(-1)
    s = np.float32(0)
    for v in a:
        s = np.float32(s + v)
    return float(s)


def llamacpp_args(case):
    messages = CASES[case]
    assert len(messages) == 1 and messages[0]["role"] == "user"
    prompt = " ".join(c["text"] for c in messages[0]["content"] if c["type"] == "text")
    paths = case_images(messages)
    args = ["-m", F16.relative_to(FIX), "--mmproj", MMPROJ.relative_to(FIX)]
    for p in paths:
        args += ["--image", p]
    args += ["-p", prompt, "-n", N_NEW_TOKENS, "--temp", "0", "--ignore-eos", "-c", "512", "-t", "1", "--seed", "0",
             "--jinja", "-v"]
    return prompt, paths, [str(a) for a in args]


def make_llamacpp():
    torch.set_num_threads(1)
    proc, _ = load_processor(FIX / MODEL)
    tok = proc.tokenizer
    m32, _ = load_models()

    def piece_bytes(ids):
        return spm_piece_bytes(tok, ids)

    def mtmd(args):
        cmd = [str(BIN / "llama-mtmd-cli")] + [str(a) for a in args]
        log("RUN", " ".join(cmd))
        return subprocess.run(cmd, cwd=FIX, capture_output=True)  # bytes: a piece can be part of a character

    results = {}
    for case in LLAMACPP_CASES:
        prompt, paths, args = llamacpp_args(case)
        p = fc.run_complete(mtmd, args)
        stderr = p.stderr.decode("utf-8", errors="replace")
        formatted_parts, n_eval = fc.mtmd_log_info(stderr)
        assert len(formatted_parts) == 1
        formatted = formatted_parts[0]
        eog = fc.eog_ids_from_log(stderr)
        gen = fc.mtmd_stdout_text(p.stdout, 1)
        logged, chunk_tokens = mtmd_log_layout(stderr)
        # the emulation: pixels, layout, features
        pxs, layouts = zip(*[llamacpp_pixels(pth) for pth in paths])
        layouts = [dict(la, image=pth) for la, pth in zip(layouts, paths)]
        assert len(logged) == sum(la["slices"] for la in layouts)
        for la, lg in zip([la for la in layouts if la["slices"]], logged):
            assert lg["original_wh"] == la["size_wh"] and lg["refined_wh"] == la["refined_wh"], (lg, la)
            assert lg["grid_wh"] == [la["grid_cols"], la["grid_rows"]], (lg, la)
            assert lg["overview_wh"] == [TILE, TILE]
            assert [c["candidate_wh"] for c in lg["candidates"]] == [list(c) for c in llamacpp_candidates()]
            assert lg["candidates"] == [{"candidate_wh": [cw, ch], **llamacpp_candidate_areas(*la["size_wh"], cw, ch)}
                                        for cw, ch in llamacpp_candidates()], lg["candidates"]
        assert chunk_tokens == [GRID * GRID] * sum(la["n_chunks"] for la in layouts), chunk_tokens
        ids = mtmd_prompt_ids(F16, formatted, layouts)
        assert n_eval == len(ids), (n_eval, len(ids))
        px = torch.cat(pxs)
        feats = torch.cat([llamacpp_chunk_features(m32, x) for x in pxs])
        assert feats.shape[0] == ids.count(IMAGE_ID)
        # llama.cpp's own numbers for the same command (debug run): im2col sums and output token 0 per chunk
        sums, tok0, outsums = llamacpp_debug_run(F16, args)
        assert len(sums) == len(tok0) == px.shape[0], (len(sums), len(tok0), px.shape)
        emu_sums = [im2col_sum(px[i]) for i in range(px.shape[0])]
        emu_tok0 = feats.view(px.shape[0], GRID * GRID, -1)[:, 0]
        emu_outsums = feats.view(px.shape[0], GRID * GRID, -1).double().sum((1, 2)).tolist()
        tok0_diff = float((torch.tensor(tok0, dtype=torch.float64) - emu_tok0.double()).abs().max())
        # transformers (the hf case) for comparison
        hf_case = json.load(open(FIX / "cases" / f"{case}.json"))
        hf_px = torch.from_numpy(np.fromfile(FIX / "cases" / f"{case}.pixels.f32", dtype="<f4")
                                 .reshape(hf_case["pixel_values_shape"]))
        px_vs_hf, k = [], 0
        for i, la in enumerate(layouts):
            dec = np.abs(np.asarray(llamacpp_decode(la["image"]), dtype=np.int16) -
                         np.asarray(Image.open(FIX / la["image"]).convert("RGB"), dtype=np.int16))
            la["stb_image_vs_pil_decode_max_abs_diff"] = int(dec.max())
            hf_bh, hf_bw = anyres_layout(*la["size_wh"])["best_resolution_hw"]
            la["hf_best_resolution_wh"] = [hf_bw, hf_bh] if la["slices"] else None
            la["best_resolution_equal_hf"] = (la["refined_wh"] == [hf_bw, hf_bh]) if la["slices"] else None
            n = la["n_chunks"]
            same_grid = la["slices"] and hf_case["anyres"][i]["grid_rows"] == la["grid_rows"] and \
                hf_case["anyres"][i]["grid_cols"] == la["grid_cols"]
            tiles = [float((px[k + j] - hf_px[i, 1 + j]).abs().max()) for j in range(n - 1)] if same_grid else None
            px_vs_hf.append({"image": la["image"], "overview_vs_hf_base_patch": float((px[k + n - 1] - hf_px[i, 0]).abs().max()),
                             "tiles_vs_hf_tiles": tiles})
            k += n
        with torch.no_grad():
            embeds = m32.get_input_embeddings()(torch.tensor([ids])).clone()
            embeds[0, torch.tensor(ids) == IMAGE_ID] = feats
        kw = {"inputs_embeds": embeds, "attention_mask": torch.ones((1, len(ids)), dtype=torch.long)}
        toks, mg, _ = fc.greedy(m32, kw, N_NEW_TOKENS, eog)
        text = piece_bytes(toks)
        agree = fc.agreeing(piece_bytes, gen, toks)
        hf_toks = hf_case["greedy_tokens"]
        hf_text = piece_bytes(hf_toks)
        rec = {
            "llama_cpp": LLAMA_CPP_COMMIT, "model": F16.name, "mmproj": MMPROJ.name, "case": case,
            "cwd": "tests/fixtures/llava_next", "messages": CASES[case], "prompt_given": prompt, "images": paths,
            "command": ["llama-mtmd-cli"] + args,
            "formatted_prompt": formatted,
            "formatted_prompt_note": "the GGUF's chat template (llava-hf's) through llama.cpp's jinja engine, as logged "
                                     "by -v: one user message whose text starts with one <__media__> per image, so the "
                                     "template's '<image>\\n' is not produced",
            "hf_chat_template_prompt": hf_case["prompt"],
            "prompt_token_ids": ids,
            "prompt_token_ids_note": "reconstructed: BOS, then each text segment tokenized on its own with llama-tokenize "
                                     "(SPM adds its space prefix to each), each image as 16 embedding positions per chunk "
                                     "(written as 32000): its tiles row by row, then the overview; nothing between chunks",
            "n_prompt_tokens_logged": n_eval,
            "num_image_tokens_per_image": [la["image_tokens"] for la in layouts],
            "hf_num_image_tokens_per_image": hf_case["num_image_tokens_per_image"],
            "image_chunk_n_tokens_logged": chunk_tokens,
            "llamacpp_layout": layouts,
            "llamacpp_layout_note": "per image: size_wh; slices (false when neither side exceeds 56: the overview alone); "
                                    "refined_wh = select_best_resolution over the pinpoints read as (width, height); "
                                    "resized_in_refined_wh / pad_left_top: the image resized keeping its aspect ratio "
                                    "(float32 scale, ceil) and pasted on a black refined canvas; grid_cols x grid_rows "
                                    "tiles of 56; n_chunks = tiles + overview; image_tokens = 16 per chunk",
            "llamacpp_log_slicing": logged,
            "eog_ids_masked": eog,
            "stdout": fc.text_of(p.stdout),
            "generated_text": fc.text_of(gen),
            "generated_bytes_hex": gen.hex(),
            "generated_text_note": "stdout without the newline printed before the text and the two after it; "
                                   "generated_bytes_hex: the exact bytes (comparisons are on the bytes)",
            "retokenized_ids": fc.llama_tokenize(F16, gen),
            "retokenized_ids_note": "llama-tokenize of generated_text (no BOS): a re-tokenization, not the sampled ids "
                                    "(llama-mtmd-cli does not print those)",
            "pixels_file": f"llamacpp-F16-{case}.pixels.f32",
            "pixels_shape": list(px.shape),
            "pixels_note": "the chunks llama.cpp encodes, emulated in Python (llamacpp_pixels() in the script), float32 "
                           "little-endian [n_chunks of all images, 3, 56, 56], in prompt order: per image its tiles "
                           "row by row, then the overview; checked against llama.cpp: llamacpp_im2col_sums",
            "llamacpp_im2col_sums": sums,
            "emulated_im2col_sums": emu_sums,
            "im2col_sums_equal": sums == [round(s, 6) for s in emu_sums],
            "im2col_note": "per chunk, the sum llama.cpp prints (MTMD_DEBUG_GRAPH=1, %f) of its patch-embedding im2col "
                           "node (the pixels rounded to f16, summed in float32 in im2col order), and the same sum of "
                           "pixels_file: equal to the printed 6 decimals means the same pixels (one u8 level moves a "
                           "sum by about 0.015)",
            "pixels_vs_hf": px_vs_hf,
            "pixels_vs_hf_note": "max |llama.cpp chunk - transformers patch| (cases/<case>.pixels.f32): the overview vs "
                                 "transformers' base patch 0, tile k vs patch 1+k where both chose the same grid",
            "image_features_file": f"llamacpp-F16-{case}.image_features.f32",
            "image_features_shape": list(feats.shape),
            "image_features_note": "the emulation's image embeddings (llamacpp_chunk_features(): float32 transformers "
                                   "modules on pixels_file, wired as llama.cpp's graph), in prompt order: the rows that "
                                   "replace the 32000 positions of prompt_token_ids",
            "llamacpp_token0_per_chunk": tok0,
            "image_features_token0_max_abs_diff_vs_llamacpp": tok0_diff,
            "llamacpp_output_sum_per_chunk": outsums,
            "emulated_output_sum_per_chunk": emu_outsums,
            "image_features_check_note": "MTMD_DEBUG_EMBEDDINGS=1: llama.cpp prints all 32 values of each chunk's first "
                                         "output row (6 decimals) and the sum of the chunk's 16 x 32 outputs; llama.cpp "
                                         "computes with f16 weights and f16-rounded activations in its matrix products",
            "llamacpp_emulation_greedy_tokens": toks,
            "llamacpp_emulation_text": fc.text_of(text),
            "llamacpp_emulation_text_equal": text == gen,
            "llamacpp_emulation_tokens_agreeing": agree,
            "llamacpp_emulation_margin_at_first_difference": mg[agree] if agree < N_NEW_TOKENS else None,
            "llamacpp_emulation_min_margin": min(mg),
            "llamacpp_emulation_margins": mg,
            "llamacpp_emulation_note": "transformers (tiny-llava-next, float32): the text model given prompt_token_ids "
                                       "with image_features_file at the image positions (inputs_embeds), EOG masked; "
                                       "text = pieces as llama.cpp prints them",
        }
        if text != gen:
            ftoks, devs, complete = fc.follow_llamacpp(m32, kw, piece_bytes, gen, N_NEW_TOKENS, eog)
            rec.update({"llamacpp_emulation_follow_llamacpp_tokens": ftoks,
                        "llamacpp_emulation_follow_llamacpp_deviations": devs,
                        "llamacpp_emulation_follow_llamacpp_complete": complete})
        rec["sampled_ids_inferred"] = toks if text == gen else (
            rec["llamacpp_emulation_follow_llamacpp_tokens"] if rec["llamacpp_emulation_follow_llamacpp_complete"] else None)
        rec["sampled_ids_inferred_note"] = ("the ids llama.cpp sampled, inferred: llamacpp_emulation_greedy_tokens where "
                                            "their text equals generated_text, else the emulation walked along the text")
        sampled = rec["sampled_ids_inferred"]
        rec.update({
            "hf_greedy_tokens": hf_toks,
            "hf_greedy_text": fc.text_of(hf_text),
            "hf_tokens_equal": sampled == hf_toks,
            "hf_text_equal": hf_text == gen,
            "hf_tokens_agreeing": fc.agreeing(piece_bytes, gen, hf_toks),
            "hf_input_ids_equal": ids == hf_case["input_ids"],
            "hf_note": "transformers' own greedy run of this case (cases/<case>.json: its prompt, its preprocessing and "
                       "packing); hf_tokens_agreeing = leading transformers tokens whose text llama.cpp printed too",
        })
        write_f32(GGUF_DIR / rec["pixels_file"], px)
        write_f32(GGUF_DIR / rec["image_features_file"], feats)
        dump_json(GGUF_DIR / f"llamacpp-F16-{case}.json", rec)
        results[case] = {"text": fc.text_of(gen), "emulation_equal": text == gen, "emulation_agree": agree,
                         "im2col_equal": rec["im2col_sums_equal"], "tok0_diff": tok0_diff,
                         "hf_equal": rec["hf_tokens_equal"], "hf_agree": rec["hf_tokens_agreeing"],
                         "tokens": [la["image_tokens"] for la in layouts], "hf_tokens": hf_case["num_image_tokens_per_image"]}
        log(f"llama.cpp F16 {case}: {fc.text_of(gen)!r}; emulation equal {text == gen} ({agree}/{N_NEW_TOKENS}), "
            f"im2col sums equal {rec['im2col_sums_equal']}, token-0 diff {tok0_diff:.2g}; HF equal {sampled == hf_toks}")
    return results


# ============================================================================= patched llama.cpp (LLaVA-1.6 packing)
NEXT_PATCH = GGUF_DIR / "llamacpp-llava-next.patch"
LLAVA_FIXES_PATCH = FIX.parent / "llava" / "gguf" / "llamacpp-fixes.patch"
FIXED_SRC = fc.BENCH_DIR / "src-fixed" / "llama.cpp"
FIXED_BUILD = fc.BENCH_DIR / "build-fixed"
NEXT_MARK = "clip_llava_next_encode"


def build_next_llama_cpp():
    """llama-mtmd-cli from a copy of the llama.cpp source with ../llava/gguf/llamacpp-fixes.patch (class token
    first, every stored encoder layer run) and gguf/llamacpp-llava-next.patch (LLaVA-1.6 anyres for the legacy
    "mlp" projector, through the Granite4-Vision preprocessor already in mtmd: overview first, the unpadded grid,
    image_newline after each row) applied; built with setup.sh's cmake flags.  The same tree and build folder as
    make_llava_fixtures.py's llamacpp-fixed step (the second patch changes nothing for a projector without
    image_grid_pinpoints)."""
    if not FIXED_SRC.exists():
        FIXED_SRC.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(fc.llama_cpp_dir(), FIXED_SRC, symlinks=True)
        subprocess.run(["patch", "-p1", "-d", str(FIXED_SRC), "-i", str(LLAVA_FIXES_PATCH)], check=True)
    if NEXT_MARK not in (FIXED_SRC / "tools" / "mtmd" / "clip.cpp").read_text():
        subprocess.run(["patch", "-p1", "-d", str(FIXED_SRC), "-i", str(NEXT_PATCH)], check=True)
    if not (FIXED_BUILD / "CMakeCache.txt").exists():
        subprocess.run(["cmake", "-S", str(FIXED_SRC), "-B", str(FIXED_BUILD), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", f"-DLLAMA_BUILD_COMMIT={LLAMA_CPP_COMMIT}"], check=True)
    subprocess.run(["cmake", "--build", str(FIXED_BUILD), "--config", "Release", "-j", os.environ.get("JOBS", "2"),
                    "--target", "llama-mtmd-cli"], check=True)
    return FIXED_BUILD / "bin" / "llama-mtmd-cli"


def pil_decode(path):
    return Image.open(FIX / path).convert("RGB")


def next_pixels(path):
    """[1 + tiles, 3, 56, 56]: the image as seer preprocesses it for this GGUF (Pillow-equal decoding, llama.cpp's
    resizes: bicubic, horizontal pass first), in transformers' order (the base patch first, then the tiles)."""
    px, lay = llamacpp_pixels_from(llamacpp_images_u8(path, decode=pil_decode))
    return torch.cat([px[-1:], px[:-1]]), lay


def llamacpp_pixels_from(chunks_lay):
    chunks, lay = chunks_lay
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    out = [((np.asarray(c, dtype=np.uint8).astype(np.float32) / np.float32(255.0) - mean) / std).transpose(2, 0, 1)
           for c in chunks]
    return torch.from_numpy(np.ascontiguousarray(np.stack(out))), lay


def make_llamacpp_next():
    """llama-mtmd-cli with both patches on the single-turn cases, and transformers on the same prompt."""
    torch.set_num_threads(1)
    cli = build_next_llama_cpp()
    proc, _ = load_processor(FIX / MODEL)
    tok = proc.tokenizer
    m32, m64 = load_models()
    results = {}

    def mtmd(args):
        return subprocess.run([str(cli)] + [str(a) for a in args], cwd=FIX, capture_output=True)

    for case in LLAMACPP_CASES:
        prompt, paths, args = llamacpp_args(case)
        p = fc.run_complete(mtmd, args)
        stderr = p.stderr.decode("utf-8", errors="replace")
        (formatted,), n_eval = fc.mtmd_log_info(stderr)
        eog = fc.eog_ids_from_log(stderr)
        gen = fc.mtmd_stdout_text(p.stdout, 1)
        chunk_tokens = [int(n) for n in re.findall(r"decoding image batch \d+/\d+, n_tokens_batch = (\d+)", stderr)]
        hf_case = json.load(open(FIX / "cases" / f"{case}.json"))
        counts = hf_case["num_image_tokens_per_image"]
        ids = mtmd_prompt_ids(F16, formatted, [{"image_tokens": n} for n in counts])
        assert n_eval == len(ids), (n_eval, len(ids))
        # transformers: the same prompt ids, the pixels seer computes for the GGUF, its own packing
        pxs = [next_pixels(pth)[0] for pth in paths]
        most = max(x.shape[0] for x in pxs)
        px = torch.stack([torch.cat([x, torch.zeros(most - x.shape[0], *x.shape[1:])]) for x in pxs])
        sizes = torch.tensor([[Image.open(FIX / pth).height, Image.open(FIX / pth).width] for pth in paths])
        hf_px = torch.from_numpy(np.fromfile(FIX / "cases" / f"{case}.pixels.f32", dtype="<f4").reshape(hf_case["pixel_values_shape"]))
        kw = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
              "pixel_values": px, "image_sizes": sizes}
        t32, mg32, first = fc.greedy(m32, kw, N_NEW_TOKENS, eog)
        t64, mg64, first64 = fc.greedy(m64, dict(kw, pixel_values=px.double()), N_NEW_TOKENS, eog)
        text = spm_piece_bytes(tok, t32)
        agree = fc.agreeing(lambda i: spm_piece_bytes(tok, i), gen, t32)
        rec = {
            "llama_cpp": LLAMA_CPP_COMMIT + " + ../llava/gguf/llamacpp-fixes.patch + gguf/llamacpp-llava-next.patch",
            "binary": "$BENCH_DIR/build-fixed/bin/llama-mtmd-cli", "case": case, "cwd": "tests/fixtures/llava_next",
            "messages": CASES[case], "prompt_given": prompt, "images": paths, "command": ["llama-mtmd-cli"] + args,
            "formatted_prompt": formatted,
            "prompt_token_ids": ids,
            "prompt_token_ids_note": "BOS, each text segment of formatted_prompt tokenized on its own (llama-tokenize), "
                                     "each image as num_image_tokens_per_image positions (written as 32000); its length "
                                     "equals the prompt token count the patched llama.cpp logs",
            "n_prompt_tokens_logged": n_eval,
            "num_image_tokens_per_image": counts,
            "image_chunk_n_tokens_logged": chunk_tokens,
            "generated_text": fc.text_of(gen),
            "generated_bytes_hex": gen.hex(),
            "pixels_file": f"llamacpp-next-F16-{case}.pixels.f32",
            "pixels_shape": list(px.shape),
            "pixels_note": "[images, most blocks, 3, 56, 56] float32, each image's base patch then its tiles (zero "
                           "blocks pad an image with fewer): PIL decoding (as seer's), llama.cpp's resizes (horizontal "
                           "pass first) and normalisation",
            "pixels_max_abs_diff_vs_hf_processor": float((px - hf_px).abs().max()) if px.shape == hf_px.shape else None,
            "hf_same_prompt_greedy_tokens": t32,
            "hf_same_prompt_text": fc.text_of(text),
            "hf_same_prompt_margins": mg32,
            "hf_same_prompt_min_margin": min(mg32),
            "hf_same_prompt_f64_tokens_equal": t64 == t32,
            "hf_same_prompt_logits_f64_file": f"llamacpp-next-F16-{case}.logits_f64.f32",
            "hf_same_prompt_note": "transformers (tiny-llava-next, float32; float64 for the logits file) on "
                                   "prompt_token_ids with pixels_file and image_sizes, EOG masked",
            "text_equal": text == gen,
            "tokens_agreeing": agree,
        }
        write_f32(GGUF_DIR / rec["pixels_file"], px)
        write_f32(GGUF_DIR / rec["hf_same_prompt_logits_f64_file"], first64.float())
        dump_json(GGUF_DIR / f"llamacpp-next-F16-{case}.json", rec)
        results[case] = {"text": fc.text_of(gen), "equal": text == gen, "agree": agree, "counts": counts,
                         "chunks": chunk_tokens, "min_margin": min(mg32), "f64_equal": t64 == t32,
                         "px_vs_hf": rec["pixels_max_abs_diff_vs_hf_processor"]}
        log(f"patched llama.cpp {case}: {fc.text_of(gen)!r}; transformers same prompt equal {text == gen} ({agree}/16)")
    return results


# ============================================================================= README
def readme_gguf_section():
    """README part for gguf/ (empty if the gguf step has not run)."""
    if not MMPROJ.exists() or not all((GGUF_DIR / f"llamacpp-F16-{c}.json").exists() for c in LLAMACPP_CASES):
        return ""
    kv = fc.gguf_kv(MMPROJ, MMPROJ_KEYS)
    recs = {c: json.load(open(GGUF_DIR / f"llamacpp-F16-{c}.json")) for c in LLAMACPP_CASES}
    hf = {c: json.load(open(FIX / "cases" / f"{c}.json")) for c in LLAMACPP_CASES}
    kv_rows = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in kv.items() if v is not None)
    lay_rows, seen = [], set()
    for c in LLAMACPP_CASES:
        for la, hla in zip(recs[c]["llamacpp_layout"], hf[c]["anyres"]):
            if la["image"] in seen:
                continue
            seen.add(la["image"])
            lay_rows.append(
                f"| `{la['image']}` | {la['size_wh'][0]}x{la['size_wh'][1]} | {la['refined_wh'][0]}x{la['refined_wh'][1]} "
                f"({'= HF' if la['best_resolution_equal_hf'] else 'HF: %dx%d' % tuple(la['hf_best_resolution_wh'])}) | "
                f"{la['grid_rows']} x {la['grid_cols']} | {la['resized_in_refined_wh'][0]}x{la['resized_in_refined_wh'][1]} at "
                f"{tuple(la['pad_left_top'])} | {la['n_chunks']} | **{la['image_tokens']}** | {hla['image_tokens']} | "
                f"{la['stb_image_vs_pil_decode_max_abs_diff']} |")
    px_rows = []
    for c in LLAMACPP_CASES:
        for d in recs[c]["pixels_vs_hf"]:
            t = d["tiles_vs_hf_tiles"]
            px_rows.append(f"| {c} | `{d['image']}` | {d['overview_vs_hf_base_patch']:.3g} | "
                           f"{', '.join(f'{v:.3g}' for v in t) if t is not None else '(other grid)'} |")
    case_rows = []
    for c in LLAMACPP_CASES:
        r = recs[c]
        case_rows.append(
            f"| {c} | {r['num_image_tokens_per_image']} / {r['hf_num_image_tokens_per_image']} | "
            f"{len(r['prompt_token_ids'])} / {len(hf[c]['input_ids'])} | {json.dumps(r['generated_text'], ensure_ascii=False)} | "
            f"{r['im2col_sums_equal']} | {r['image_features_token0_max_abs_diff_vs_llamacpp']:.2g} | "
            f"{r['llamacpp_emulation_tokens_agreeing']}/{N_NEW_TOKENS} | `{r['sampled_ids_inferred']}` | "
            f"`{r['hf_greedy_tokens']}` | {r['hf_tokens_equal']} ({r['hf_tokens_agreeing']}/{N_NEW_TOKENS}) |")
    devs = [(c, d) for c in LLAMACPP_CASES for d in recs[c].get("llamacpp_emulation_follow_llamacpp_deviations", [])]
    dev_text = ("The emulation's greedy text equals llama.cpp's in every case, so `sampled_ids_inferred` are its tokens."
                if not devs else
                "Where llama.cpp's text leaves the emulation's greedy tokens: " + "; ".join(
                    f"{c} step {d[0]}: llama.cpp took {d[2]} ({json.dumps(d[3], ensure_ascii=False)}, rank {d[1]} in the "
                    f"emulation's logits, {d[4]:.2g} below its top-1)" for c, d in devs) +
                " (f16 activations in llama.cpp's matrix products move the logits by about 1e-3).")
    a = recs["a_square"]
    same_best = all(la["best_resolution_equal_hf"] for r in recs.values() for la in r["llamacpp_layout"] if la["slices"])
    n_img = len({la["image"] for r in recs.values() for la in r["llamacpp_layout"]})
    best_text = (f"the same choice for all {n_img} test images here" if same_best else
                 "a different choice for some test images here (`best_resolution_equal_hf`)")
    first_diff = [r["hf_tokens_agreeing"] for r in recs.values()]
    if not any(r["hf_tokens_equal"] for r in recs.values()) and not any(first_diff):
        verdict = "**llama.cpp's tokens differ from transformers' from the first token in every case.**"
    else:
        verdict = ("**llama.cpp's tokens equal transformers' in " +
                   f"{sum(r['hf_tokens_equal'] for r in recs.values())} of {len(recs)} cases** (leading tokens agreeing: "
                   + ", ".join(f"{c} {r['hf_tokens_agreeing']}" for c, r in recs.items()) + ").")
    return f"""
## GGUF (`gguf/`)

Made by step `gguf` with llama.cpp {LLAMA_CPP_COMMIT}'s own converters (the source vendored in llama-cpp-python 0.3.36). F16 only
(a Q8_0 text model would add about 2.7 MB and nothing LLaVA-NeXT-specific; `../llava/gguf` has Q8_0 references).

* `tiny-llava-next-F16.gguf` (text model): `convert_hf_to_gguf.py` has no `LlavaNextForConditionalGeneration` entry
  at {LLAMA_CPP_COMMIT}, so, as `docs/multimodal/llava.md` (LLaVA 1.6, last note) says, the Llama text model is exported
  alone: a temporary `LlamaForCausalLM` folder (`text_config` + the `language_model.*` weights without that prefix,
  bfloat16 as stored) converted with `--outtype f16` through `/work/shared/bench/convert_with_vocab.py`, which takes the
  `tokenizer.*` keys from a vocab GGUF built by `make_llava_fixtures.build_vocab_gguf()` (the same keys as
  `../llava/gguf/tiny-llava-F16.gguf`: the Llama-2 SPM pieces, `<image>`/`<pad>` CONTROL, `[PAD32002..32063]` UNUSED,
  add_bos true, llava-hf's chat template). bf16 values are exact in f16, so the weights are transformers' own.
* `mmproj-tiny-llava-next-F16.gguf`: the documented LLaVA-1.6 path (`docs/multimodal/llava.md`, "LLaVA 1.6 gguf
  conversion"): a temporary copy of `{MODEL}/` with the 2024 hub weight names (`vision_tower.vision_model.*`),
  `tools/mtmd/legacy-models/llava_surgery_v2.py -C -m <copy>` (-> `llava.clip`: the `vision_model.*` tensors;
  `llava.projector`: `multi_modal_projector.*` and `image_newline`, float32), then a `vit/` folder with
  `pytorch_model.bin` = `llava.clip` and a `config.json` like the `config_vit.json` the docs download
  (cmp-nct/llava-1.6-gguf: the CLIP vision config plus LLaVA-1.6's `image_grid_pinpoints`, `image_aspect_ratio`
  anyres, `image_crop_resolution` 224, `image_split_resolution` 224, `mm_patch_merge_type` spatial_unpad,
  `mm_projector_type` mlp2x_gelu; no `vision_feature_layer`), converted with
  `convert_image_encoder_to_gguf.py -m vit --llava-projector vit/llava.projector --clip-model-is-vision` through
  `/work/shared/bench/legacy_llava_mmproj.py` (transformers 5 shim). F16 (1-D tensors f32).

mmproj metadata:

| key | value |
|---|---|
{kv_rows}

Tensors: `mm.0.*`, `mm.2.*` (projector linear_1 / linear_2), `model.image_newline`, `v.class_embd`, `v.patch_embd.weight`,
`v.position_embd.weight`, `v.pre_ln.*`, `v.blk.0.*` (block 1 of 2 dropped; no post-LN; CLIP's `fc1`/`fc2` stored as
`ffn_down`/`ffn_up`, which clip.cpp swaps back: "ffn up/down are swapped").

What clip.cpp / mtmd read of this (checked in the source):

* `clip.vision.image_grid_pinpoints`: read (`load_hparams`) into `image_res_candidates`, in pairs **(width, height)**
  (transformers reads the same config list as [height, width]; this list is symmetric, so the candidates are the
  same, only their order differs). Its presence is what makes mtmd use the LLaVA-UHD slicer
  (`mtmd_image_preprocessor_llava_uhd`) instead of the fixed-size LLaVA-1.5 path.
* `clip.vision.mm_patch_merge_type`: read into `hparams.mm_patch_merge_type`, then never used (its only reader,
  `clip_patch_merge_type()`, has no caller): no unpadding, no newline.
* `clip.vision.image_crop_resolution`, `image_aspect_ratio`, `image_split_resolution`, `mm_projector_type`: written
  by the converter, never read.
* `model.image_newline`: the legacy converter renames `image_newline` to `model.image_newline`; clip.cpp only looks
  for `v.image_newline` (optional, so it loads without it), and the LLaVA graph (`models/llava.cpp`) has no use for it
  anyway.
* `clip.vision.block_count` {kv['clip.vision.block_count']}: without `vision_feature_layer` in the vit config the
  converter drops the last layer; the graph then runs `block_count - 1` = **0** encoder layers (the layer-count
  defect of `../llava/README.md`, ggml-org/llama.cpp#25817; with 2 layers nothing is left). Adding
  `"vision_feature_layer": -2` to the vit config would write `clip.vision.feature_layer` [1] and make the graph run
  exactly 1 layer; the documented `config_vit.json` has no such key, so these fixtures follow the docs.

## llama.cpp references (`gguf/llamacpp-F16-<case>.json`)

`llama-mtmd-cli -m gguf/tiny-llava-next-F16.gguf --mmproj gguf/mmproj-tiny-llava-next-F16.gguf --image <img>
[--image <img>] -p <text> -n 16 --temp 0 --ignore-eos -c 512 -t 1 --seed 0 --jinja -v`, run in this folder, for the
single-turn cases a_square, b_very_wide, c_very_tall, d_two_images (step `llamacpp`; the GGUF's template through
llama.cpp's jinja engine: `{json.dumps(a['formatted_prompt'])}`, one `<__media__>` per image at the start of the user
text, so no `<image>\\n`). With each: `<case>.pixels.f32` and `<case>.image_features.f32` (what llama.cpp feeds its
vision encoder and what comes out, emulated in Python and checked against llama.cpp's own debug output).

### What llama.cpp {LLAMA_CPP_COMMIT} does with a LLaVA-1.6 image (tools/mtmd: mtmd-helper.cpp, mtmd.cpp, mtmd-image.cpp, clip.cpp, models/llava.cpp)

1. **Decode**: `stbi_load_from_memory(..., 3)` (stb_image). PNGs decode as in PIL; JPEGs do not: stb_image's IDCT and
   chroma upsampling differ from libjpeg's by up to 2 levels here (`wide-120x72.jpg`). The emulation calls the
   stb_image of `libmtmd.so` through ctypes (`llamacpp_decode()`).
2. **Slices or not**: only if width > 56 or height > 56 (`image_size`); otherwise the image is the overview alone,
   16 tokens (transformers always tiles). All test images here have a side > 56.
3. **Best resolution** (`select_best_resolution`): candidates in list order as (w, h); `scale = min(cw/w, ch/h)` in
   float32, downscaled `(int)(w*scale) x (int)(h*scale)`, effective = `min(that area, w*h)`, wasted = `cw*ch -
   effective`; the largest effective, then the least wasted (strict `<`: the first in list order on a full tie).
   Same rule as transformers (which computes in float64); {best_text}.
4. **Refined image** (`img_tool::resize`, `PAD_CEIL`): `scale = min(rw/w, rh/h)` (float32), resized to
   `min(ceil(w*scale), rw) x min(ceil(h*scale), rh)`, pasted at `((rw-nw)/2, (rh-nh)/2)` (integer division: the extra
   pixel right/bottom) on a canvas of **(0, 0, 0)** (`image_pad_color_rf`, default black: clip.cpp sets the grey
   (122, 116, 104) for the refined image only in the branch *without* pinpoints, the one commented "llava-1.6 default
   params", so a LLaVA-1.6 mmproj never gets it; `image_pad_color` (122, 116, 104) is set but only the fixed-size
   LLaVA-1.5 path uses it). Same sizes, offsets and colour as transformers (which pads with 0 = black before
   normalisation).
5. **Resize filter**: `resize_pillow`, a port of Pillow's fixed-point separable resampling, BICUBIC (a = -0.5,
   support 2 widened by the downscale factor, 22-bit integer weights, u8 between passes), always the **horizontal pass
   first** (Pillow <= 12 order). transformers' `LlavaNextImageProcessorPil` with Pillow 13 resamples vertically first
   in some shrinking cases (python-pillow/Pillow#9549), so its pixels differ there (the tall images below).
6. **Tiles**: 56x56 crops of the refined image, row by row (y outer, x inner), as transformers.
7. **Overview** (`image_pad_ov` = `PAD_NONE`): the whole decoded image resized straight to 56x56 (squashed, aspect
   ratio not kept), same filter: transformers' base patch.
8. **Normalise**: `v / 255.0f`, then `(v - mean) / std` in float32 with the mmproj's `image_mean` / `image_std`.
   The patch embedding's im2col then rounds the pixels to f16.
9. **Encode**: every chunk (tile or overview) separately with the LLaVA graph: patch embeddings, CLS appended
   **after** them with positions 0..16, pre-LN, 0 encoder layers (above), rows 1..16 kept (patch 0 dropped, CLS kept
   last), projector `mm.2(gelu(mm.0(x)))` with ggml's tanh gelu (on CPU: a table over f16 inputs and outputs);
   16 embeddings per chunk (`clip_n_output_tokens`). The CLS-order and layer-count defects are those of
   `../llava/README.md` (ggml-org/llama.cpp#25814, #25817).
10. **Pack** (`mtmd_tokenizer::add_media`): for this projector there is no slice template (`MTMD_SLICE_TMPL_NONE`,
   no tokens between chunks) and `ov_img_first` is false: the **tiles row by row first, then the overview last**,
   each its own image chunk of 16 positions; **no unpadding and no image_newline**. Image tokens per image =
   **16 x (rows x cols + 1)**, against transformers' `16 + uh*uw + uh` (base first, unpadded grid, one newline per
   row).
11. **Prompt**: BOS, then each text segment tokenized on its own (SPM space prefix on each), chunks in between.

Per image (llama.cpp; `stb vs PIL`: max difference of the decoded u8 pixels):

| image | size | refined (best) w x h | tiles rows x cols | resized in refined, at (left, top) | chunks | llama.cpp tokens | transformers tokens | stb vs PIL |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(lay_rows)}

Pixels against transformers' (`cases/<case>.pixels.f32`; max abs difference after normalisation, same chunk):

| case | image | overview vs base patch | tiles vs tiles |
|---|---|---|---|
{chr(10).join(px_rows)}

(One u8 level is 0.0142 to 0.0150 after normalisation. The tall images' differences are the Pillow 13 pass order (see the
HF layout table above), the JPEG's the decoder; otherwise llama.cpp's pixels are transformers'.)

### Fields and checks

`formatted_prompt` (from the -v log), `prompt_token_ids` (reconstructed: BOS + llama-tokenize per segment + 16 x 32000
per chunk; equal in length to the logged prompt token count `n_prompt_tokens_logged`), `num_image_tokens_per_image`
(and transformers' `hf_num_image_tokens_per_image`), `image_chunk_n_tokens_logged` (every image chunk llama.cpp
decoded: 16 each), `llamacpp_layout` (above), `llamacpp_log_slicing` (what llama.cpp logs: candidates with their
effective / wasted areas, refined size, grid), `stdout`, `generated_text` / `generated_bytes_hex` (stdout without the
newline before and the two after), `retokenized_ids`.

* `pixels_file` (`llamacpp-F16-<case>.pixels.f32`, float32 [chunks of all images, 3, 56, 56], prompt order): the
  emulation (`llamacpp_pixels()`); **checked exact**: llama.cpp run again with `MTMD_DEBUG_GRAPH=1` prints the float32
  sum of its im2col node per chunk, and the same sum of these pixels (f16-rounded, same order) equals it to the printed
  6 decimals for every chunk of every case (`llamacpp_im2col_sums` / `emulated_im2col_sums`; one u8 level would move
  it by about 0.015).
* `image_features_file` (`llamacpp-F16-<case>.image_features.f32`, float32 [image tokens, 32]): transformers modules
  wired as llama.cpp's graph (`llamacpp_chunk_features()`) on those pixels; `MTMD_DEBUG_EMBEDDINGS=1` prints all 32
  values of each chunk's first output row: they agree to `image_features_token0_max_abs_diff_vs_llamacpp` (llama.cpp's
  f16 weights are exact, its matrix products round the activations to f16).
* `llamacpp_emulation_*`: transformers' text model (float32) given `prompt_token_ids` with those features at the image
  positions (inputs_embeds), EOS masked; its greedy text is compared with llama.cpp's bytes. {dev_text}
* `sampled_ids_inferred`: the ids llama.cpp sampled (it prints text only).
* `hf_*`: transformers' own greedy run of the case (`cases/<case>.json`).

| case | image tokens llama.cpp / HF | prompt length llama.cpp / HF | llama.cpp text | pixels exact | token-0 diff | emulation tokens agreeing | llama.cpp tokens (inferred) | transformers tokens | equal (HF tokens agreeing) |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(case_rows)}

{verdict} Everything that goes in differs:
the prompt text (no `<image>\\n`, per-segment tokenization), the number and order of image positions (tiles then
overview, no unpadding, no newline rows), the image features themselves (0 of the 1 encoder layer transformers runs,
CLS order, tanh gelu) and, for JPEGs and the tall images, a few pixel levels. The preprocessing proper (best
resolution, resize sizes, padding, tile order within the grid, base image) is transformers'. To follow llama.cpp
exactly, the Rust side needs steps 1-11 above; `*.pixels.f32`, `*.image_features.f32` and `prompt_token_ids` pin
down each stage, `sampled_ids_inferred` the result.
""" + readme_next_section()


def readme_next_section():
    """README part for the patched llama.cpp references (empty before step llamacpp-next)."""
    if not all((GGUF_DIR / f"llamacpp-next-F16-{c}.json").exists() for c in LLAMACPP_CASES):
        return ""
    recs = {c: json.load(open(GGUF_DIR / f"llamacpp-next-F16-{c}.json")) for c in LLAMACPP_CASES}
    rows = "\n".join(
        f"| {c} | {r['num_image_tokens_per_image']} | {r['n_prompt_tokens_logged']} | "
        f"{json.dumps(r['generated_text'], ensure_ascii=False)} | {r['text_equal']} ({r['tokens_agreeing']}/{N_NEW_TOKENS}) | "
        f"{r['hf_same_prompt_min_margin']:.3g} | {r['hf_same_prompt_f64_tokens_equal']} | "
        f"{r['pixels_max_abs_diff_vs_hf_processor']:.3g} |" for c, r in recs.items())
    return f"""
## Patched llama.cpp references (`gguf/llamacpp-next-F16-<case>.json`, `gguf/llamacpp-llava-next.patch`)

What seer does with this GGUF pair is what the model was trained with (transformers' packing), not what llama.cpp
0c1e57098 does (above). The evidence that seer reads the files right is therefore llama.cpp with the packing put
back: step `llamacpp-next` applies `../llava/gguf/llamacpp-fixes.patch` (class token first, every stored encoder
layer run: the LLaVA graph defects) and `gguf/llamacpp-llava-next.patch` (unified diff of `tools/mtmd/clip.cpp`,
`clip.h`, `mtmd.cpp`; llama.cpp is MIT; `patch -p1` in the llama.cpp root) to `$BENCH_DIR/src-fixed/llama.cpp` and
builds `llama-mtmd-cli` in `$BENCH_DIR/build-fixed` (the tree and folder of `../llava`'s `llamacpp-fixed` step;
the second patch changes nothing for a projector without pinpoints). The patch:

1. an `mlp` projector with `clip.vision.image_grid_pinpoints` and an image_newline tensor (the legacy converter
   names it `model.image_newline`; clip.cpp looked only for `v.image_newline`) gets mtmd's existing LLaVA-NeXT
   "anyres" preprocessor, the one Granite 4 Vision uses (`mtmd_image_preprocessor_granite`: overview first, then
   the tiles of the best resolution, stacked into one image with the original size attached);
2. `clip_n_output_tokens` counts such an image as the overview's 16 plus `h * (w + 1)` for the unpadded grid
   (`clip_anyres_unpad`, transformers' `unpad_image`);
3. `clip_image_batch_encode` runs each 56x56 tile of the stacked image through the LLaVA graph and packs the
   features on the CPU as transformers' `pack_image_features` does: overview, then the kept rows of the grid, each
   followed by `image_newline`.

The projector's GELU stays llama.cpp's tanh approximation, and JPEGs stay stb_image-decoded. The command, prompt and
text handling are those of `llamacpp-F16-*` (above).

With each: transformers (float32, and float64 for `hf_same_prompt_logits_f64_file`) on the prompt ids llama.cpp
builds (`prompt_token_ids`: BOS, each text segment of `formatted_prompt` tokenized on its own, each image as its
transformers token count), with `pixels_file` (`[images, most blocks, 3, 56, 56]`, the base patch then the tiles, zero
blocks padding an image with fewer): PIL decoding and llama.cpp's resizes (horizontal pass first), i.e. what seer
computes for this GGUF. `pixels_max_abs_diff_vs_hf_processor` is their distance from transformers' own pixels (the
Pillow 13 pass order of the tall images).

| case | image tokens | prompt tokens (logged) | patched llama.cpp text | = transformers, same prompt (tokens agreeing) | min margin | f32 = f64 | pixels vs HF processor |
|---|---|---|---|---|---|---|---|
{rows}

With its packing put back, llama.cpp's image positions equal transformers' count in every case, and its greedy text
equals transformers' on the same prompt, token for token.
"""


def make_readme():
    import PIL
    import transformers
    summary = json.load(open(FIX / "cases" / "summary.json"))
    recs = {c: json.load(open(FIX / "cases" / f"{c}.json")) for c in CASES}
    cfg = json.load(open(FIX / MODEL / "config.json"))
    pcfg = json.load(open(FIX / MODEL / "processor_config.json"))
    table, total = fc.file_table(FIX)
    case_rows = []
    for c, v in summary.items():
        r = recs[c]
        grids = ", ".join(f"{a}x{b}" for a, b in v["grids"])
        unp = ", ".join(f"{a}x{b}" for a, b in v["unpadded"])
        case_rows.append(f"| {c} | {v['n_input_ids']} | {grids} | {unp} | {v['image_tokens']} | "
                         f"`{r['pixel_values_shape']}` | `{v['greedy_tokens']}` | {v['margin_min']} | {v['f32_eq_f64']} | "
                         f"{json.dumps(r['greedy_text'], ensure_ascii=False)} |")
    lay_rows, seen = [], set()
    for c in CASES:
        for la in recs[c]["anyres"]:
            if la["image"] in seen:
                continue
            seen.add(la["image"])
            unpad = ", ".join(f"{k} {v}" for k, v in la["unpad"].items())
            lay_rows.append(
                f"| `{la['image']}` | {la['size_wh'][0]}x{la['size_wh'][1]} | {la['best_resolution_hw'][1]}x"
                f"{la['best_resolution_hw'][0]} | {la['grid_rows']} x {la['grid_cols']} | {la['resized_for_tiles_wh'][0]}x"
                f"{la['resized_for_tiles_wh'][1]}, pad {la['pad_top_left']}/{la['pad_bottom_right']} | "
                f"{la['feature_grid_hw'][0]}x{la['feature_grid_hw'][1]} | {la['feature_grid_scaled_side']} | {unpad} | "
                f"{la['unpadded_grid_hw'][0]}x{la['unpadded_grid_hw'][1]} | 16 + {la['tile_tokens']} + {la['newline_tokens']}"
                f" = **{la['image_tokens']}** | {la['pillow_pass_order']['tiles']} / {la['pillow_pass_order']['base']} |")
    a = recs["a_square"]
    e = recs["e_multi_turn"]
    pxd = max(r["pixel_values_max_abs_diff_vs_torchvision_processor"] or 0 for r in recs.values())
    from safetensors import safe_open
    with safe_open(str(FIX / MODEL / "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    groups = []
    for k in keys:
        g = k if k in ("image_newline", "language_model.lm_head.weight") else ".".join(k.split(".")[:2]) + ".*"
        if g not in groups:
            groups.append(g)
    names = ", ".join(f"`{g}`" for g in groups)
    text = f"""# LLaVA-NeXT reference fixtures

Made by `scripts/make_llava_next_fixtures.py` (run it to rebuild; its docstring says how).
Deterministic: a re-run rewrites the same bytes (fixed seeds, no timestamps).

Versions: transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}, Pillow {PIL.__version__},
numpy {np.__version__}.  All on CPU, 2 threads.

## Files

| path | bytes |
|---|---|
{table}

* `images/`: drawn by the script: `very-wide-300x40.png`, `very-tall-40x300.png` (gradients, shapes, noise).
  The other cases use `../llava/images/` (`square-64x64.png`, `wide-120x72.jpg`, `tall-40x90.png`, made by
  `scripts/make_llava_fixtures.py`); image paths in the case files are relative to this folder.
* `{MODEL}/`: the model exactly as transformers 5 `save_pretrained` writes it: `config.json`
  (`model_type` llava_next, `image_grid_pinpoints`, `rope_parameters` inside `text_config`, `dtype` bfloat16),
  `model.safetensors` (**bfloat16**; transformers 5 writes llava_next weights back under the checkpoint names of
  its conversion mapping: {names}; i.e. the 2024 hub repos' llava-hf/llava-v1.6-* names except the vision tower,
  which lacks their `vision_model.` level (`vision_tower.vision_model.*` on the hub): CLIPVisionModel's prefix
  is dropped), `generation_config.json`, `processor_config.json`
  (the image processor nested; its `image_processor_type` is written as `{pcfg['image_processor']['image_processor_type']}`:
  transformers strips the `Pil` suffix when saving), `chat_template.jinja`, `tokenizer.json`, `tokenizer_config.json`.
* `cases/<case>.json` + `<case>.pixels.f32` + `<case>.logits.f32` + `<case>.logits_f64.f32` +
  `<case>.image_features.f32`, and `cases/summary.json`.
* `gguf/`: the model converted with llama.cpp's own tools (text model F16, LLaVA-1.6 mmproj F16) and
  llama-mtmd-cli's greedy outputs for the single-turn cases (`llamacpp-F16-<case>.json` + `.pixels.f32` +
  `.image_features.f32`), and those of llama-mtmd-cli with LLaVA-1.6's packing patched back in, with transformers on
  the same prompts (`llamacpp-next-F16-<case>.json` + `.pixels.f32` + `.logits_f64.f32`, `llamacpp-llava-next.patch`);
  see "GGUF", "llama.cpp references" and "Patched llama.cpp references" below.

## Model

Real classes (`LlavaNextForConditionalGeneration`, `LlavaNextConfig`, `CLIPVisionConfig`, `LlamaConfig`), tiny sizes:

* vision (CLIP ViT): image 56, patch 14 (4x4 = 16 patches + CLS per tile), hidden 48, 2 layers, 3 heads,
  intermediate 96, `quick_gelu`, layer_norm_eps 1e-5, pre-LN; `post_layernorm` present but unused.
* LLaVA-NeXT: `vision_feature_layer` -2 (the output of encoder layer 1 of 2), `vision_feature_select_strategy`
  default (CLS dropped), projector linear(48->32) + gelu (exact) + linear(32->32) with biases,
  `image_newline` (32 values, random N(0, 0.5^2), not zero), `image_token_index` 32000,
  `image_grid_pinpoints` {json.dumps(cfg['image_grid_pinpoints'])} ([height, width]: llava-hf's
  [[336,672],[672,336],[672,672],[1008,336],[336,1008]] scaled by 56/336), `image_seq_length` 16.
* text (Llama): vocab 32064, hidden **32** (64 would double the 4 MB of untied embedding + lm_head in bf16 and
  put the folder over budget), intermediate 96, 2 layers, 4 heads, 2 KV heads (GQA), head_dim 8, silu,
  rms_norm_eps 1e-5, rope_theta 10000, max_position_embeddings 2048, no biases, untied lm_head.
* Weights: random (seed {SEED}, chosen among 1..8 with lm_head std 1.6 and 2.4 for the largest smallest greedy margin), linear/conv weights
  N(0, (1.6/sqrt(fan_in))^2), token embeddings N(0, 0.5^2), CLIP class/position embeddings N(0, 0.3^2), lm_head
  N(0, {LM_HEAD_STD}^2), biases N(0, 0.05^2), norm scales U(0.8, 1.2), norm biases N(0, 0.05^2), image_newline N(0, 0.5^2).
  Saved in bfloat16; the references load them back (float32 / float64), so the rounding is included.

## Tokenizer and chat template

The same tokenizer as `../llava/tiny-llava-new` (the file `tokenizer.json` is byte-identical): the real
Llama-2 SentencePiece vocabulary from llama.cpp's `models/ggml-vocab-llama-spm.gguf` as a transformers 5
`LlamaTokenizer` (`legacy` false, BOS added) with `<image>` = 32000 and `<pad>` = 32001 special; see
`../llava/README.md` for its details (text right after `<image>` gets no `▁` prefix).
Chat template: llava-hf's LLaVA-1.5 / vicuna-style template (the same as the LLaVA fixtures): per message
`ROLE: ` (not for system), one `<image>\\n` per image part first, then each text part followed by a space;
`ASSISTANT:` as generation prompt; assistant text is followed by a space (no `</s>`).
Example (a_square): {json.dumps(a['prompt'])}; e_multi_turn: {json.dumps(e['prompt'])}.

## Processor

`AutoProcessor.from_pretrained({MODEL})` (`LlavaNextProcessor`: `patch_size` 14, `vision_feature_select_strategy`
default, `num_additional_image_tokens` 1) with its image processor replaced by
**`LlavaNextImageProcessorPil.from_pretrained({MODEL})`** (the PIL class, named explicitly; the default with
torchvision installed is the torchvision class `LlavaNextImageProcessor`, whose pixels differ from these by at most
{pxd:.3g} here). Settings: `size` shortest_edge 56, `crop_size` 56x56, resample bicubic, CLIP mean/std,
`do_pad` true (pad the patch dimension over a batch of images).

Per image (checked against the processor and the model by the script, `anyres` in each case file):

1. `best = select_best_resolution((h, w), pinpoints)`: for each pinpoint (ph, pw), `scale = min(pw/w, ph/h)`,
   effective = `min(int(w*scale) * int(h*scale), w*h)`, wasted = `pw*ph - effective`; the largest effective,
   then the least wasted, then the first in list order.
2. Tiles: the image resized (bicubic, keeping the aspect ratio) so that the limiting side equals best's and the
   other is `ceil(side*scale)`, pasted centred on a zero (black, before normalisation: `-mean/std` after)
   canvas of `best` (odd padding: the extra row/column at the bottom/right), cut into `best/56` tiles row-major.
   Each tile and the base then go through resize shortest-edge 56 + centre crop 56 (no-ops at this size),
   rescale 1/255, normalize.
3. Base patch (first): the whole image resized to exactly 56x56 (squashed, no aspect ratio kept).
4. `pixel_values` `[n_images, max_patches, 3, 56, 56]`: images with fewer patches are padded with all-zero
   patches (d_two_images: 5 and 3 patches, the second image has 2 zero patches); `image_sizes` `[h, w]`.
5. Tokens per image = 16 (base) + `uh*uw` + `uh` (one `image_newline` after each row of the unpadded
   tile grid), where the tile grid has `(rows*4) x (cols*4)` features and unpadding removes, if the image is
   relatively wider than the grid, `(gh - int(round(h * gw / w, 7))) // 2` feature rows at the top and as many at
   the bottom, else the same for columns. The processor computes this count from the image size alone (it never
   looks at the padded pixels), and the model's `pack_image_features` must produce the same number of rows or
   it raises. `num_additional_image_tokens` must be 1 with the `default` strategy: the processor adds it to
   the base and subtracts 1 again for `default`; with 0 the prompt gets one `<image>` too few.
   Note the rounding: the very wide image (300x40) scaled into 168 px of width is 22.4 px high (23 after
   `ceil`, 16+17 px of padding), i.e. 1.6 feature rows of 14 px, but unpadding keeps `int(1.6)` = 1 →
   removes `(4-1)//2` = 1 row on each side and keeps **2** rows (the processor count agrees: it uses the same
   formula), so one feature row of mostly padding remains.
6. The packed features (`<case>.image_features.f32`): base tile's 16 rows, then for each unpadded grid row its
   `uw` features followed by `image_newline`; images in prompt order. Exactly the rows that replace the
   `<image>` ids.

| image | size | best (w x h) | tiles rows x cols | resized for tiles, pad (top,left)/(bottom,right) | feature grid | scaled side | unpad | unpadded | tokens | Pillow pass order (tiles / base) |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(lay_rows)}

The last column says which separable pass order this Pillow ({PIL.__version__}) used for the two
resizes that change both axes (found by comparing with the two single-axis orders; "either" = both give the same
bytes): Pillow 13 resamples vertically first in some shrinking cases (python-pillow/Pillow#9549), Pillow <= 12
and llama.cpp always horizontally first.

## Cases (`cases/<case>.json`)

a_square: one square image (64x64) + question; b_very_wide: the 300x40 image; c_very_tall: the 40x300 image;
d_two_images: two images in one user message (wide 120x72 JPEG, tall 40x90: 5 and 3 patches);
e_multi_turn: user(tall image + text), assistant(text), user(square image + text).

Fields: `messages` (content parts `{{"type": "text", "text": ...}}` and `{{"type": "image", "path": ...}}`, for
transformers `{{"type": "image"}}`), `prompt` (chat template with add_generation_prompt), `text_input_ids` (the
prompt tokenized, one `<image>` each), `input_ids` (after the processor's expansion), `num_image_tokens_per_image`,
`num_patches_per_image`, `image_sizes` ([h, w]), `anyres` (the layout above), `pixel_values_shape` +
`<case>.pixels.f32` (float32 little-endian, C order), `image_features_shape` + `<case>.image_features.f32`
([image tokens of all images, 32], float32 run), `greedy_tokens` (16 new tokens), `greedy_text` (decoded,
skip_special_tokens), `greedy_token_strings`, `logit_margins` / `logit_margin_min` (top1 - top2 at each step),
`logit_margin_min_f64`, `greedy_tokens_f64_equal`, `<case>.logits.f32` (float32 logits at the last prompt
position, 32064 values), `<case>.logits_f64.f32` (the float64 run's logits stored as float32: the exact answer;
`logits_f32_max_abs_diff_vs_f64` says how far transformers' own float32 run is from it),
`logits_first_step_top5`, `mirrored_images_*` (the same prompt with the images mirrored: other tokens, so the
image matters).

* Greedy: hand-written loop with the KV cache (checked equal to `generate(min_new_tokens=16, max_new_tokens=16,
  do_sample=False)`); EOS (2) is never chosen (masked, like `min_new_tokens` and llama.cpp's `--ignore-eos`);
  the first-step logits files are unmasked.
* Every case was also run in float64: greedy tokens equal in all cases, all margins > {MIN_MARGIN}.
* The first-step logits are near {max(abs(r['logits_first_step_top5'][0][1]) for r in recs.values()):.0f}; transformers' own float32
  run is up to {max(r['logits_f32_max_abs_diff_vs_f64'] for r in recs.values()):.2g} from the float64 logits (per case:
  `logits_f32_max_abs_diff_vs_f64`), so compare an f32 implementation with `<case>.logits_f64.f32`.
* The torchvision image processor's pixels differ from the PIL class's by up to {pxd:.3g} (per case:
  `pixel_values_max_abs_diff_vs_torchvision_processor`; elsewhere 0.015; the large values are in the patches whose
  resize Pillow 13 runs vertical pass first: the base patches of the two tall images, a tile of the very tall one);
  these fixtures are the PIL class's.

| case | n input ids | grids | unpadded | image tokens | pixel_values shape | greedy tokens | min margin | f32 == f64 | greedy text |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(case_rows)}
""" + readme_gguf_section()
    (FIX / "README.md").write_text(text, encoding="utf-8")
    log("README written")


# ============================================================================= main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="images,hf,cases,gguf,llamacpp,llamacpp-next,readme")
    ap.add_argument("--seed-search", default="", help="comma-separated seeds: print the smallest greedy margin "
                                                      "of each (nothing written)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.seed_search:
        print(json.dumps(seed_search([int(s) for s in a.seed_search.split(",")]), indent=1))
        return
    steps = a.steps.split(",")
    if "images" in steps:
        make_images()
    if "hf" in steps:
        make_hf()
    if "cases" in steps:
        print(json.dumps(make_cases(), indent=1))
    if "gguf" in steps:
        make_gguf()
    if "llamacpp" in steps:
        print(json.dumps(make_llamacpp(), indent=1, ensure_ascii=False))
    if "llamacpp-next" in steps:
        print(json.dumps(make_llamacpp_next(), indent=1, ensure_ascii=False))
    if "readme" in steps:
        make_readme()


if __name__ == "__main__":
    main()
