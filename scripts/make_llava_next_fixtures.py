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
transformers 5.23, safetensors, pillow, numpy; the llama.cpp source; tests/fixtures/llava/images must exist):

    ~/.cache/seer-bench/venv/bin/python scripts/make_llava_next_fixtures.py                  # images,hf,cases,readme
    ~/.cache/seer-bench/venv/bin/python scripts/make_llava_next_fixtures.py --steps cases    # some steps

Steps: images, hf, cases, readme.  `--seed-search 1,2,...` prints the smallest greedy margin of each seed (how SEED
was chosen; writes nothing).  Environment: see scripts/fixture_common.py (BENCH_DIR, LLAMA_CPP_DIR: the llama.cpp
source, for its vocabulary GGUF).  No GGUF files: llama.cpp conversion is not done for this family (yet).
Runs on CPU with 2 threads in about 20 seconds.
"""
import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture_common as fc  # noqa: E402
from fixture_common import REPO, dump_json, log, write_f32  # noqa: E402

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

    # very wide 300x40: horizontal colour waves, a white bar with dark "text" marks, a green triangle,
    # a red disc near the right end, noise
    h, w = 40, 300
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([127 + 120 * np.sin(x / 17.0), 127 + 120 * np.sin(x / 29.0 + 2), 50 + y * 4], -1)
    a += rng.normal(0, 10, (h, w, 3))
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.rectangle([10, 26, 200, 36], fill=(245, 245, 240))
    for i in range(15):
        d.rectangle([16 + i * 12, 28, 21 + i * 12, 34], fill=(10, 10, 10))
    d.polygon([(60, 2), (78, 22), (42, 22)], fill=(30, 160, 60))
    d.ellipse([250, 6, 280, 34], fill=(220, 30, 40))
    im.save(FIX / IMAGES["very_wide"], optimize=False)

    # very tall 40x300: vertical gradient, a yellow circle at the top, a blue rectangle, a red bar, a dark
    # square at the bottom, noise
    h, w = 300, 40
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([30 + y * 0.7, 220 - y * 0.6, 100 + x * 3], -1) + rng.normal(0, 8, (h, w, 3))
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse([6, 6, 34, 34], fill=(250, 220, 20))
    d.rectangle([6, 70, 34, 150], fill=(30, 60, 200))
    d.rectangle([2, 190, 38, 202], fill=(200, 30, 30))
    d.rectangle([10, 250, 30, 290], fill=(20, 20, 60))
    im.save(FIX / IMAGES["very_tall"], optimize=False)
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


# ============================================================================= README
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
"""
    (FIX / "README.md").write_text(text, encoding="utf-8")
    log("README written")


# ============================================================================= main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="images,hf,cases,readme")
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
    if "readme" in steps:
        make_readme()


if __name__ == "__main__":
    main()
