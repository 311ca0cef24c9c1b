#!/usr/bin/env python3
"""Reference fixtures for seer's Qwen2-VL and Qwen2.5-VL implementations (tests/fixtures/qwen2vl/).

What it builds (all deterministic; re-running rewrites the same files):
  images/               three small PNG test images drawn here: square 128x128, wide 200x50, tall 40x150
  tiny-qwen2-vl/        a tiny random Qwen2VLForConditionalGeneration exactly as transformers 5 `save_pretrained`
                        writes it (config.json, model.safetensors in bfloat16, generation_config.json,
                        processor_config.json with Qwen2VLImageProcessorPil and the video processor nested,
                        chat_template.jinja = Qwen2-VL's template, tokenizer.json + tokenizer_config.json)
  tiny-qwen2.5-vl/      the same for Qwen2_5_VLForConditionalGeneration (window attention, RMSNorm, SwiGLU vision)
  cases/<model>/<case>.json (+ .pixels.f32, .logits.f32, .logits_f64.f32)
                        transformers references: messages, prompt, input_ids after the processor's expansion,
                        image_grid_thw, M-RoPE position ids, pixels, first-step logits (float32 and float64 runs),
                        16 greedy tokens, margins; computed by loading the folder back (float32, and float64)
  gguf/                 each model converted with llama.cpp's convert_hf_to_gguf.py (text F16, --mmproj F16),
                        llama-quantize Q8_0; llamacpp-<model>-<quant>-<case>.json: llama-mtmd-cli --jinja greedy
                        outputs, with transformers run on llama.cpp's prompt ids and llama.cpp-style pixels
  README.md             what is there and how it was made

Models: real config / model / processor classes (Qwen2VLConfig, Qwen2VLForConditionalGeneration,
Qwen2VLProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
Qwen2VLImageProcessorPil named explicitly, Qwen2VLVideoProcessor).  Vision: patch 14, temporal patch 2,
2x2 merge, 2-D rotary ViT (Qwen2-VL: 3 blocks, LayerNorm, QuickGELU MLP; Qwen2.5-VL: 4 blocks, RMSNorm,
SwiGLU, window attention with window_size 112 = 4x4 merged tokens and full attention in blocks 1 and 3).
Text: Qwen2 decoder with M-RoPE (mrope_section [2, 3, 3] of head_dim 16), tied embeddings.  Images resized
by smart_resize to multiples of 28 within min_pixels 4704 / max_pixels 11760: the square image takes the
max_pixels branch (84x84, 36 patches), the wide one the plain rounding (196x56, 56 patches: 2x7 merged tokens,
so that Qwen2.5-VL's 4x4 windows reorder them), the tall one the min_pixels branch (56x140, 40 patches).

Tokenizer: Qwen2's own BPE (151k tokens) would make each model's files ~40 MB, so the stand-in is the real
GPT-2 byte-level BPE of llama.cpp's models/ggml-vocab-gpt-2.gguf (50257 tokens; <|endoftext|> 50256, the
position of Qwen2's <|endoftext|> after its BPE), with Qwen2-VL's special tokens appended in Qwen2's order
(<|im_start|> 50257, <|im_end|> 50258, ..., <|vision_start|> 50265, <|vision_end|> 50266, <|vision_pad|>
50267, <|image_pad|> 50268, <|video_pad|> 50269; Qwen2.5-VL also <tool_call> .. <|file_sep|> 50270..50277)
and the config's vocab_size padded to 50304 as Qwen pads 151657 to 151936.  llama.cpp's converter
recognises it by its pre-tokenizer hash ("gpt-2").

How to run (the benchmark venv and llama.cpp build of /work/shared/bench/setup.sh):

    ~/.cache/seer-bench/venv/bin/python scripts/make_qwen2vl_fixtures.py                 # everything
    ~/.cache/seer-bench/venv/bin/python scripts/make_qwen2vl_fixtures.py --steps cases   # some steps
    ... --models qwen2-vl                                                                 # one model

Steps: images, hf, cases, gguf, llamacpp, llamacpp-f32, readme.  Environment: see scripts/fixture_common.py.
Runs on CPU with 2 threads in a few minutes.
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
from fixture_common import BIN, LLAMA_CPP, LLAMA_CPP_COMMIT, MEDIA, REPO, dump_json, log, write_f32  # noqa: E402

fc.set_log_tag("qwen2vl")
FIX = REPO / "tests" / "fixtures" / "qwen2vl"
VOCAB_GGUF = LLAMA_CPP / "models" / "ggml-vocab-gpt-2.gguf"
N_NEW_TOKENS = 16
MIN_MARGIN = 2e-2

# ----------------------------------------------------------------------------- tokens
N_BASE = 50257                 # GPT-2 BPE incl. <|endoftext|> = 50256
ENDOFTEXT = 50256
QWEN2VL_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                   "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]           # 50257..50269
QWEN25VL_EXTRA = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                  "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]                # 50270..50277 (not special)
IM_START, IM_END = 50257, 50258
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 50265, 50266, 50268, 50269
VOCAB_SIZE = 50304  # padded to a multiple of 128, as Qwen2-VL's 151936 for its 151657 tokens

# ----------------------------------------------------------------------------- processor
PATCH, MERGE, TPATCH = 14, 2, 2
FACTOR = PATCH * MERGE
MIN_PIXELS, MAX_PIXELS = FACTOR * FACTOR * 6, FACTOR * FACTOR * 15   # 4704, 11760
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Qwen2-VL's chat template (Qwen/Qwen2-VL-2B-Instruct and Qwen2.5-VL-3B-Instruct, chat_template.json): a default
# system message when the first message is not one, ChatML turns, "<|vision_start|><|image_pad|><|vision_end|>"
# per image part.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")

# ----------------------------------------------------------------------------- models
# Random weights: with tied embeddings a random decoder tends to repeat the current token (its own embedding
# is the best match of the residual stream); text-layer output projections with a larger gain keep the
# greedy tokens varied, and embeddings of std EMB_STD give wide logits (clear margins).
EMB_STD, OUT_GAIN = 1.2, 4.0
TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-6,
            use_sliding_window=False, tie_word_embeddings=True, bos_token_id=ENDOFTEXT, eos_token_id=IM_END,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
IDS = dict(image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
           vision_end_token_id=VISION_END, tie_word_embeddings=True)
MODELS = {
    "qwen2-vl": {
        "folder": "tiny-qwen2-vl",
        "seed": 8,  # seeds 1..20 (EMB_STD 1.2, OUT_GAIN 4; 1.6 and 6 tried): a large smallest greedy margin, varied tokens
        "vision": dict(depth=3, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=2, in_channels=3,
                       patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TPATCH, hidden_act="quick_gelu"),
        "special": QWEN2VL_SPECIAL,
        "quants": ["F16", "Q8_0"],
    },
    "qwen2.5-vl": {
        "folder": "tiny-qwen2.5-vl",
        "seed": 12,  # seeds 1..20: the largest smallest greedy margin
        "vision": dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, out_hidden_size=32,
                       patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TPATCH, hidden_act="silu",
                       window_size=112, fullatt_block_indexes=[1, 3], tokens_per_second=2),
        "special": QWEN2VL_SPECIAL + QWEN25VL_EXTRA,
        # the text GGUF has the same architecture (qwen2vl) as Qwen2-VL's, whose Q8_0 covers that: F16 only here,
        # to keep the folder near 30 MB
        "quants": ["F16"],
    },
}

# ----------------------------------------------------------------------------- cases
IMAGES = {"square": "images/square-128x128.png", "wide": "images/wide-200x50.png", "tall": "images/tall-40x150.png"}


def txt(t):
    return {"type": "text", "text": t}


def img(key):
    return {"type": "image", "path": IMAGES[key]}


CASES = {
    "a_square": [{"role": "user", "content": [img("square"), txt("What is in this image?")]}],
    "b_wide": [{"role": "user", "content": [img("wide"), txt("Describe the colours you can see.")]}],
    "c_tall": [{"role": "user", "content": [img("tall"), txt("What shape is at the top?")]}],
    "d_two_images": [{"role": "user", "content": [img("wide"), img("tall"),
                                                  txt("How are these two pictures different?")]}],
    "e_system": [
        {"role": "system", "content": [txt("You are a careful assistant that answers briefly.")]},
        {"role": "user", "content": [img("square"), txt("Is there any text in the picture?")]},
    ],
}


# ============================================================================= images
def make_images():
    rng = np.random.default_rng(23)
    (FIX / "images").mkdir(parents=True, exist_ok=True)

    # square 128x128: diagonal gradient, a red disc, a dark square, a white stripe, light noise
    h = w = 128
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([x * 2, y * 2, 255 - (x + y)], -1) + rng.normal(0, 6, (h, w, 3))
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse([16, 20, 72, 76], fill=(220, 30, 40))
    d.rectangle([80, 72, 116, 112], fill=(20, 20, 60))
    d.rectangle([0, 100, 60, 106], fill=(250, 250, 250))
    im.save(FIX / IMAGES["square"], optimize=False)

    # wide 200x50: horizontal colour waves, a white bar with dark marks, a green triangle, noise
    h, w = 50, 200
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([127 + 120 * np.sin(x / 7.0), 127 + 120 * np.sin(x / 11.0 + 1), 200 - y * 3.2], -1)
    a += rng.normal(0, 10, (h, w, 3))
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.rectangle([8, 32, 190, 44], fill=(245, 245, 240))
    for i in range(14):
        d.rectangle([14 + i * 12, 34, 19 + i * 12, 42], fill=(10, 10, 10))
    d.polygon([(40, 2), (60, 28), (20, 28)], fill=(30, 160, 60))
    im.save(FIX / IMAGES["wide"], optimize=False)

    # tall 40x150: vertical gradient, a yellow circle at the top, a blue rectangle, a red bar, noise
    h, w = 150, 40
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([200 - y, 40 + y * 1.2, 120 + x * 2], -1) + rng.normal(0, 8, (h, w, 3))
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse([8, 6, 32, 30], fill=(250, 220, 20))
    d.rectangle([6, 50, 34, 96], fill=(30, 60, 200))
    d.rectangle([4, 120, 36, 130], fill=(200, 30, 30))
    im.save(FIX / IMAGES["tall"], optimize=False)
    log("images written")


# ============================================================================= tokenizer
def build_tokenizer(special):
    """GPT-2's BPE from llama.cpp's vocab GGUF as a tokenizers pipeline (as openai-community/gpt2's tokenizer.json),
    Qwen2-VL's special tokens appended, wrapped as transformers 5's tokenizers-backed class."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    gguf = fc.gguf_module()
    r = gguf.GGUFReader(str(VOCAB_GGUF))
    toks = list(r.fields["tokenizer.ggml.tokens"].contents())
    merges = [tuple(m.split(" ")) for m in r.fields["tokenizer.ggml.merges"].contents()]
    assert len(toks) == N_BASE and toks[ENDOFTEXT] == "<|endoftext|>"
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(toks)}, merges=merges, fuse_unk=False,
                              byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tk.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tk.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tk.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    for t in special:  # Qwen2.5-VL's <tool_call> .. <|file_sep|> are added tokens with special false
        tk.add_tokens([AddedToken(t, special=t not in QWEN25VL_EXTRA, normalized=False)])
    assert tk.get_vocab_size() == N_BASE + len(special)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  errors="replace", model_max_length=32768)
    for i, t in enumerate(special):
        assert tok.convert_tokens_to_ids(t) == N_BASE + i
    assert tok.convert_tokens_to_ids("<|image_pad|>") == IMAGE_PAD
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok):
    """llama.cpp's test vectors for this vocabulary and the pre-tokenizer hash convert_hf_to_gguf.py checks."""
    import ast
    from hashlib import sha256
    raw = open(str(VOCAB_GGUF) + ".inp", encoding="utf-8").read().split("\n__ggml_vocab_test__\n")
    out = open(str(VOCAB_GGUF) + ".out", encoding="utf-8").read().split("\n")
    n = 0
    for s, o in zip(raw, out):
        exp = [int(t) for t in o.split()]
        got = tok.encode(s, add_special_tokens=False)
        assert got == exp, f"tokenizer differs from llama.cpp test vector {s!r}: {got} vs {exp}"
        n += 1
    src = open(LLAMA_CPP / "conversion" / "base.py", encoding="utf-8").read()
    chktxt = ast.literal_eval(src.split("chktxt = ", 1)[1].split("\n", 1)[0])
    chk = sha256(str(tok.encode(chktxt)).encode()).hexdigest()
    assert chk == "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454", chk  # "gpt-2"
    log(f"tokenizer: all {n} llama.cpp test vectors match; pre-tokenizer hash = llama.cpp's 'gpt-2'")


# ============================================================================= model
def model_classes(key):
    import transformers as T
    if key == "qwen2-vl":
        return (T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration, T.Qwen2VLProcessor)
    return (T.Qwen2_5_VLConfig, T.Qwen2_5_VLForConditionalGeneration, T.Qwen2_5_VLProcessor)


def new_random_model(key, seed):
    cfg_cls, model_cls, _ = model_classes(key)
    cfg = cfg_cls(text_config=dict(TEXT), vision_config=dict(MODELS[key]["vision"]), **IDS)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    norm_names = {n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.LayerNorm) or "RMSNorm" in type(m).__name__}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            mod, leaf = name.rsplit(".", 1)
            if mod in norm_names:
                v = (1.0 + (torch.rand(p.shape, generator=g) * 0.4 - 0.2)) if leaf == "weight" \
                    else torch.randn(p.shape, generator=g) * 0.05
            elif leaf == "bias":
                v = torch.randn(p.shape, generator=g) * 0.05
            elif "embed_tokens" in name:  # also the output matrix (tied): wide logits, clear greedy margins
                v = torch.randn(p.shape, generator=g) * EMB_STD
            else:  # linear / conv weights: gain 1.6 / sqrt(fan_in); the text layers' output projections OUT_GAIN
                fan_in = int(np.prod(p.shape[1:]))
                gain = OUT_GAIN if name.startswith("model.language_model.") and \
                    name.endswith(("o_proj.weight", "down_proj.weight")) else 1.6
                v = torch.randn(p.shape, generator=g) * (gain / fan_in ** 0.5)
            p.copy_(v.to(p.dtype))
    return model


def image_processor():
    from transformers import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH,
                                    temporal_patch_size=TPATCH, merge_size=MERGE, image_mean=CLIP_MEAN,
                                    image_std=CLIP_STD)


def make_hf(key):
    from transformers import GenerationConfig, Qwen2VLVideoProcessor
    spec = MODELS[key]
    tok = build_tokenizer(spec["special"])
    model = new_random_model(key, spec["seed"])
    out = FIX / spec["folder"]
    if out.exists():
        shutil.rmtree(out)
    model.generation_config = GenerationConfig(bos_token_id=ENDOFTEXT, eos_token_id=[IM_END, ENDOFTEXT],
                                               pad_token_id=ENDOFTEXT)
    model.to(torch.bfloat16).save_pretrained(out)
    vp = Qwen2VLVideoProcessor(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, patch_size=PATCH,
                               temporal_patch_size=TPATCH, merge_size=MERGE, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    proc = model_classes(key)[2](image_processor=image_processor(), tokenizer=tok, video_processor=vp,
                                 chat_template=CHAT_TEMPLATE)
    proc.save_pretrained(out)
    fc.fix_modes(out)
    log(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")


# ============================================================================= resize
def smart_resize(h, w):
    """transformers' smart_resize (Python floats, round() half to even)."""
    h_bar, w_bar = round(h / FACTOR) * FACTOR, round(w / FACTOR) * FACTOR
    branch = "round"
    if h_bar * w_bar > MAX_PIXELS:
        beta = math.sqrt(h * w / MAX_PIXELS)
        h_bar = max(FACTOR, math.floor(h / beta / FACTOR) * FACTOR)
        w_bar = max(FACTOR, math.floor(w / beta / FACTOR) * FACTOR)
        branch = "max_pixels"
    elif h_bar * w_bar < MIN_PIXELS:
        beta = math.sqrt(MIN_PIXELS / (h * w))
        h_bar = math.ceil(h * beta / FACTOR) * FACTOR
        w_bar = math.ceil(w * beta / FACTOR) * FACTOR
        branch = "min_pixels"
    return h_bar, w_bar, branch


def llamacpp_size(w, h, min_px=MIN_PIXELS, max_px=MAX_PIXELS):
    """llama.cpp 0c1e57098's img_tool::calc_size_preserved_ratio (tools/mtmd/mtmd-image.cpp) in float32 with
    std::round (half away from zero) and max(align, .) on the rounded sizes; returns (w, h)."""
    f32 = np.float32
    f = f32(FACTOR)

    def rnd(x):
        return int(np.floor(f32(x) / f + f32(0.5)) if x >= 0 else -np.floor(-f32(x) / f + f32(0.5))) * FACTOR

    w_bar, h_bar = max(FACTOR, rnd(w)), max(FACTOR, rnd(h))
    if max_px > 0 and h_bar * w_bar > max_px:
        beta = np.sqrt(f32(h) * f32(w) / f32(max_px))
        h_bar = max(FACTOR, int(np.floor(f32(h) / beta / f)) * FACTOR)
        w_bar = max(FACTOR, int(np.floor(f32(w) / beta / f)) * FACTOR)
    elif min_px > 0 and h_bar * w_bar < min_px:
        beta = np.sqrt(f32(min_px) / (f32(h) * f32(w)))
        h_bar = int(np.ceil(f32(h) * beta / f)) * FACTOR
        w_bar = int(np.ceil(f32(w) * beta / f)) * FACTOR
    return w_bar, h_bar


def resize_h_first(im, size, resample):
    """A resize as llama.cpp's img_tool::resize_pillow does it (Pillow's fixed-point resampling, horizontal pass
    first as Pillow <= 12); each single-axis PIL resize is one pass, identical in both."""
    w, h = im.size
    if size == (w, h):
        return im
    if size[0] != w and size[1] != h:
        im = im.resize((size[0], h), resample)
    return im.resize(size, resample)


def pillow13_vertical_first(src, dst):
    """Pillow 13 (python-pillow/Pillow#9549) resamples vertically first when the height shrinks by more than twice
    as many pixels as the width; (w, h) sizes."""
    return src[0] != dst[0] and src[1] != dst[1] and dst[1] < src[1] and src[1] - dst[1] > 2 * (src[0] - dst[0])


def llamacpp_image(path, min_px=MIN_PIXELS, max_px=MAX_PIXELS):
    """Emulation of llama.cpp's Qwen2-VL preprocessing (mtmd_image_preprocessor_dyn_size with the default
    PAD_CEIL): target = calc_size_preserved_ratio; the image is resized keeping its aspect ratio to fit the target
    (ceil), bicubic, pasted centred on a black canvas of the target size; (x/255 - mean)/std.
    Returns (CHW float32 tensor, info)."""
    im = Image.open(FIX / path).convert("RGB")
    w, h = im.size
    tw, th = llamacpp_size(w, h, min_px, max_px)
    scale = min(np.float32(tw) / np.float32(w), np.float32(th) / np.float32(h))
    nw = min(int(np.ceil(np.float32(w) * scale)), tw)
    nh = min(int(np.ceil(np.float32(h) * scale)), th)
    resized = resize_h_first(im, (nw, nh), Image.BICUBIC)
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(resized, ((tw - nw) // 2, (th - nh) // 2))
    a = np.asarray(canvas, dtype=np.float32) / np.float32(255.0)
    a = (a - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    info = {"size": [w, h], "target": [tw, th], "content": [nw, nh], "offset": [(tw - nw) // 2, (th - nh) // 2],
            "grid_thw": [1, th // PATCH, tw // PATCH], "tokens": (th // FACTOR) * (tw // FACTOR)}
    return torch.from_numpy(a.transpose(2, 0, 1).copy()), info


def flatten_patches(chw):
    """One image (CHW float32, H and W multiples of 28) -> Qwen2-VL's pixel_values rows, exactly as the image
    processor lays them out: the frame repeated to temporal_patch_size 2, patches grouped by 2x2 merge blocks,
    each row = [C, T, 14, 14] flattened (1176 values)."""
    c, h, w = chw.shape
    gh, gw = h // PATCH, w // PATCH
    x = chw.unsqueeze(0).repeat(TPATCH, 1, 1, 1)  # [T, C, H, W]
    x = x.reshape(1, TPATCH, c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, c * TPATCH * PATCH * PATCH), [1, gh, gw]


# ============================================================================= transformers references
def load_processor(folder: Path):
    """The folder's processor with its image processor forced to the PIL class (Qwen2VLImageProcessorPil)."""
    from transformers import AutoProcessor, Qwen2VLImageProcessorPil
    proc = AutoProcessor.from_pretrained(folder)
    fast = proc.image_processor
    proc.image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
    return proc, fast


def load_models(key):
    _, model_cls, _ = model_classes(key)
    folder = FIX / MODELS[key]["folder"]
    m32, info = model_cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    assert not any(problems.values()), problems
    m64 = model_cls.from_pretrained(folder, dtype=torch.float64)
    return m32.eval(), m64.eval()


def hf_messages(messages):
    return [{"role": m["role"], "content": [{"type": "image"} if c["type"] == "image" else dict(c)
                                            for c in m["content"]]} for m in messages]


def case_images(messages):
    return [c["path"] for m in messages for c in m["content"] if c["type"] == "image"]


def prefill_kwargs(inputs, dtype=torch.float32):
    kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
          "pixel_values": inputs["pixel_values"].to(dtype), "image_grid_thw": inputs["image_grid_thw"],
          "mm_token_type_ids": inputs["mm_token_type_ids"]}
    return kw


def make_cases(key):
    torch.set_num_threads(2)
    spec = MODELS[key]
    fdir = FIX / spec["folder"]
    proc, fast = load_processor(fdir)
    tok = proc.tokenizer
    m32, m64 = load_models(key)
    eos = m32.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    outdir = FIX / "cases" / spec["folder"]
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    summary = {}
    for case, messages in CASES.items():
        paths = case_images(messages)
        images = [Image.open(FIX / p) for p in paths]
        prompt = proc.apply_chat_template(hf_messages(messages), add_generation_prompt=True)
        inputs = proc(images=images, text=prompt, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        text_ids = tok(prompt).input_ids
        grid = inputs["image_grid_thw"].tolist()
        px = inputs["pixel_values"]
        fast_px = fast(images=images, return_tensors="pt")["pixel_values"]
        sizes = []
        for p, im, g in zip(paths, images, grid):
            w, h = im.size
            hb, wb, branch = smart_resize(h, w)
            assert [1, hb // PATCH, wb // PATCH] == g, (g, hb, wb)
            cw, chh = llamacpp_size(w, h)
            sizes.append({"image": p, "size": [w, h], "resized": [wb, hb], "smart_resize_branch": branch,
                          "image_grid_thw": g, "patches": g[0] * g[1] * g[2], "tokens": g[0] * g[1] * g[2] // MERGE ** 2,
                          "pillow13_vertical_first": pillow13_vertical_first((w, h), (wb, hb)),
                          "llamacpp_same_size": [cw, chh] == [wb, hb]})
        assert ids.count(IMAGE_PAD) == sum(s["tokens"] for s in sizes)
        # the processor's pixels = the PIL-resized images laid out by flatten_patches()
        ref = torch.cat([flatten_patches(torch.from_numpy(
            ((np.asarray(Image.open(FIX / p).convert("RGB").resize(tuple(s["resized"]), Image.BICUBIC), np.float32)
              / np.float32(255.0) - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32))
            .transpose(2, 0, 1).copy()))[0] for p, s in zip(paths, sizes)])
        kw = prefill_kwargs(inputs)
        with torch.no_grad():
            pos, deltas = m32.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                   image_grid_thw=inputs["image_grid_thw"],
                                                   attention_mask=inputs["attention_mask"])
        t32, mg32, first = fc.greedy(m32, kw, N_NEW_TOKENS, eos, step_mask=False)
        t64, mg64, first64 = fc.greedy(m64, prefill_kwargs(inputs, torch.float64), N_NEW_TOKENS, eos, step_mask=False)
        with torch.no_grad():
            gen = m32.generate(**inputs, max_new_tokens=N_NEW_TOKENS, min_new_tokens=N_NEW_TOKENS,
                               do_sample=False, num_beams=1, top_k=None, top_p=None, temperature=None)
        assert gen[0, len(ids):].tolist() == t32, (case, gen[0, len(ids):].tolist(), t32)
        assert t32 == t64, f"{key}/{case}: f32 greedy {t32} != f64 greedy {t64}"
        assert min(mg32) > MIN_MARGIN and min(mg64) > MIN_MARGIN, (case, min(mg32), min(mg64))
        from PIL import ImageOps
        mir = proc(images=[ImageOps.mirror(im.convert("RGB")) for im in images], text=prompt, return_tensors="pt")
        t_mir, _, first_mir = fc.greedy(m32, prefill_kwargs(mir), N_NEW_TOKENS, eos, step_mask=False)
        write_f32(outdir / f"{case}.logits.f32", first)
        write_f32(outdir / f"{case}.logits_f64.f32", first64)
        write_f32(outdir / f"{case}.pixels.f32", px)
        top5 = torch.topk(first, 5)
        rec = {
            "case": case, "model": key, "folder": spec["folder"], "stored_weight_dtype": "bfloat16",
            "reference": f"transformers 5.23 {type(m32).__name__}.from_pretrained({spec['folder']}, dtype=float32), "
                         f"CPU; processor = AutoProcessor.from_pretrained({spec['folder']}) with the image processor "
                         "replaced by Qwen2VLImageProcessorPil.from_pretrained(folder)",
            "messages": messages,
            "prompt": prompt,
            "text_input_ids": text_ids,
            "input_ids": ids,
            "image_token_id": IMAGE_PAD,
            "num_image_tokens_per_image": [s["tokens"] for s in sizes],
            "image_grid_thw": grid,
            "images": sizes,
            "images_note": "per image: size [w, h]; resized [w, h] by smart_resize (factor 28, min_pixels 4704, "
                           "max_pixels 11760; which branch); image_grid_thw [t, h, w] in 14-px patches; patches; "
                           "tokens = patches / 4 (2x2 merge); pillow13_vertical_first: the bicubic resize ran its "
                           "vertical pass first (Pillow 13, python-pillow/Pillow#9549; Pillow <= 12 and llama.cpp: "
                           "horizontal first); llamacpp_same_size: llama.cpp's calc_size_preserved_ratio gives the "
                           "same size with the same min/max pixels",
            "position_ids": pos[:, 0].tolist(),
            "position_ids_note": "M-RoPE position ids [3 (temporal, height, width), seq] of the prompt from "
                                 "model.model.get_rope_index: text tokens count up on all three; an image's tokens "
                                 "(row-major over the merged grid) get t = p, h = p + row, w = p + col where p is the "
                                 "next text position, and the text after it continues at p + max(rows, cols)",
            "rope_delta": int(deltas.reshape(-1)[0]),
            "rope_delta_note": "max position + 1 - prompt length: generated token k (0-based) has position "
                               "len(input_ids) + k + rope_delta on all three sections",
            "pixel_values_file": f"{case}.pixels.f32",
            "pixel_values_shape": list(px.shape),
            "pixel_values_dtype": "float32 little-endian, C order; [patches of all images, 3 * 2 * 14 * 14]: per image "
                                  "the 2x2 merge blocks row-major, inside a block its 4 patches row-major, each row "
                                  "[channel, temporal (the frame twice), 14, 14]",
            "pixel_values_max_abs_diff_vs_pil_resize_and_flatten": float((ref - px).abs().max()),
            "pixel_values_max_abs_diff_vs_torchvision_processor": float((fast_px.float() - px.float()).abs().max()),
            "greedy_tokens": t32,
            "greedy_text": tok.decode(t32, skip_special_tokens=True),
            "greedy_token_strings": tok.convert_ids_to_tokens(t32),
            "greedy_masked_ids": eos,
            "greedy_tokens_f64_equal": t32 == t64,
            "logit_margin_min": min(mg32),
            "logit_margins": mg32,
            "logit_margin_min_f64": min(mg64),
            "logits_file": f"{case}.logits.f32",
            "logits_shape": [int(first.shape[0])],
            "logits_dtype": "float32 little-endian; logits at the last prompt position (first generated token)",
            "logits_f64_file": f"{case}.logits_f64.f32",
            "logits_f64_note": "the same logits computed in float64 (weights loaded as float64, same pixels), stored "
                               "rounded to float32",
            "logits_f32_max_abs_diff_vs_f64": float((first.double() - first64).abs().max()),
            "logits_first_step_top5": [[int(i), float(v)] for v, i in zip(top5.values, top5.indices)],
            "mirrored_images_greedy_tokens": t_mir,
            "mirrored_images_first_logits_max_abs_diff": float((first_mir - first).abs().max()),
            "mirrored_images_note": "the same prompt with every image mirrored left-right: the image changes the output",
        }
        if key == "qwen2.5-vl":
            from transformers.vision_utils import get_vision_window_index
            vc = m32.config.vision_config
            widx, cu = get_vision_window_index(inputs["image_grid_thw"], vc.spatial_merge_size, vc.window_size,
                                               vc.patch_size)
            rec["vision_window_index"] = widx.tolist()
            rec["vision_cu_window_seqlens"] = [int(x) for x in cu]
            rec["vision_window_note"] = ("window attention layout of the vision tower (transformers' "
                                         "get_vision_window_index): window_index = the merged-token order in which "
                                         "the patches are regrouped so that each window is contiguous; "
                                         "cu_window_seqlens = window boundaries in patches (4 per merged token); "
                                         "blocks 1 and 3 attend over the whole image instead")
        dump_json(outdir / f"{case}.json", rec)
        summary[case] = {"greedy_tokens": t32, "margin_min": round(min(mg32), 5), "margin_min_f64": round(min(mg64), 5),
                         "f32_eq_f64": t32 == t64, "n_input_ids": len(ids), "image_grid_thw": grid,
                         "image_tokens": rec["num_image_tokens_per_image"]}
        log(f"{key}/{case}: {len(ids)} ids, grids {grid}, tokens {t32}, margin {min(mg32):.4f}")
    dump_json(outdir / "summary.json", summary)
    return summary


# ============================================================================= GGUF
GGUF_DIR = FIX / "gguf"


def gguf_paths(key):
    f = MODELS[key]["folder"]
    return {"F16": GGUF_DIR / f"{f}-F16.gguf", "Q8_0": GGUF_DIR / f"{f}-Q8_0.gguf",
            "mmproj": GGUF_DIR / f"mmproj-{f}-F16.gguf"}


def make_gguf(key):
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    conv = LLAMA_CPP / "convert_hf_to_gguf.py"
    env = {"PYTHONDONTWRITEBYTECODE": "1"}  # without NO_LOCAL_GGUF the converter uses its own gguf-py
    p = gguf_paths(key)
    folder = FIX / MODELS[key]["folder"]
    fc.run([py, conv, folder, "--outtype", "f16", "--outfile", p["F16"]], env=env)
    fc.run([py, conv, folder, "--mmproj", "--outtype", "f16", "--outfile", p["mmproj"]], env=env)
    if "Q8_0" in MODELS[key]["quants"]:
        fc.run([BIN / "llama-quantize", p["F16"], p["Q8_0"], "Q8_0", "2"])
    elif p["Q8_0"].exists():
        p["Q8_0"].unlink()
    for f in p.values():
        if f.exists():
            f.chmod(0o644)


# ============================================================================= llama.cpp references
TOKEN_LIMITS = ["--image-min-tokens", str(MIN_PIXELS // FACTOR ** 2), "--image-max-tokens", str(MAX_PIXELS // FACTOR ** 2)]


def mtmd_prompt_ids(model, parts, infos):
    """Prompt ids as mtmd builds them: no BOS; each evaluated message (`parts`: the formatted system message, then
    the user's) on its own, each text segment tokenized on its own (parse_special), each image as
    <|vision_start|> + its embeddings + <|vision_end|> (embedding positions shown as <|image_pad|>)."""
    ids, k = [], 0
    for part in parts:
        segs = part.split(MEDIA)
        for i, s in enumerate(segs):
            ids += fc.llama_tokenize(model, s)
            if i < len(segs) - 1:
                ids += [VISION_START] + [IMAGE_PAD] * infos[k]["tokens"] + [VISION_END]
                k += 1
    assert k == len(infos)
    return ids


def make_llamacpp(key):
    torch.set_num_threads(2)
    spec = MODELS[key]
    cli = BIN / "llama-mtmd-cli"
    m32, _ = load_models(key)
    proc, _ = load_processor(FIX / spec["folder"])
    tok = proc.tokenizer
    paths = gguf_paths(key)
    types = fc.gguf_kv(paths["F16"], ["tokenizer.ggml.token_type"])["tokenizer.ggml.token_type"]
    unused = {i for i, t in enumerate(types) if t == 5}
    add_bos = fc.gguf_kv(paths["F16"], ["tokenizer.ggml.add_bos_token"])["tokenizer.ggml.add_bos_token"]

    def piece_bytes(ids):
        return fc.bpe_piece_bytes(tok, ids, unused)

    def mtmd(args):
        cmd = [str(cli)] + [str(a) for a in args]
        log("RUN", " ".join(cmd))
        return fc.subprocess.run(cmd, cwd=FIX, capture_output=True)

    def run_case(model, messages, extra, limits):
        imgs = case_images(messages)
        sys_msg = [m for m in messages if m["role"] == "system"]
        user = [m for m in messages if m["role"] == "user"]
        prompt = " ".join(c["text"] for c in user[0]["content"] if c["type"] == "text")
        args = ["-m", model.relative_to(FIX), "--mmproj", paths["mmproj"].relative_to(FIX)]
        for p in imgs:
            args += ["--image", p]
        if sys_msg:
            args += ["-sys", " ".join(c["text"] for c in sys_msg[0]["content"])]
        args += ["-p", prompt, "-n", N_NEW_TOKENS, "--temp", "0", "--ignore-eos", "-c", "4096", "-t", "2",
                 "--seed", "0", "--jinja"] + extra + ["-v"]
        p = fc.run_complete(mtmd, args)
        stderr = p.stderr.decode("utf-8", errors="replace")
        formatted_parts, n_eval = fc.mtmd_log_info(stderr)
        formatted = "".join(formatted_parts)
        gen = fc.mtmd_stdout_text(p.stdout, len(formatted_parts))
        eog = fc.eog_ids_from_log(stderr)
        ims = [llamacpp_image(pth, *limits) for pth in imgs]
        infos = [i[1] for i in ims]
        ids = mtmd_prompt_ids(model, formatted_parts, infos)
        assert not add_bos
        assert n_eval == len(ids), (n_eval, len(ids))
        flat = [flatten_patches(i[0]) for i in ims]
        px = torch.cat([f[0] for f in flat])
        grid = torch.tensor([f[1] for f in flat])
        idt = torch.tensor([ids])
        kw = {"input_ids": idt, "attention_mask": torch.ones_like(idt), "pixel_values": px, "image_grid_thw": grid,
              "mm_token_type_ids": (idt == IMAGE_PAD).long()}
        toks, mg, _ = fc.greedy(m32, kw, N_NEW_TOKENS, eog, step_mask=False)
        text = piece_bytes(toks)
        k = fc.agreeing(piece_bytes, gen, toks)
        rec = {"command": ["llama-mtmd-cli"] + [str(a) for a in args], "formatted_prompt": formatted,
               "prompt_token_ids": ids, "n_prompt_tokens_logged": n_eval, "llamacpp_images": infos,
               "eog_ids_masked": eog, "stdout": fc.text_of(p.stdout), "generated_text": fc.text_of(gen),
               "generated_bytes_hex": gen.hex(), "retokenized_ids": fc.llama_tokenize(model, gen),
               "hf_same_prompt_greedy_tokens": toks, "hf_same_prompt_text": fc.text_of(text),
               "hf_same_prompt_text_equal": text == gen, "hf_same_prompt_tokens_agreeing": k,
               "hf_same_prompt_margin_at_first_difference": mg[k] if k < N_NEW_TOKENS else None,
               "hf_same_prompt_min_margin": min(mg), "hf_same_prompt_margins": mg}
        if text != gen:
            ftoks, devs, complete = fc.follow_llamacpp(m32, kw, piece_bytes, gen, N_NEW_TOKENS, eog, step_mask=False)
            rec.update({"hf_same_prompt_follow_llamacpp_tokens": ftoks,
                        "hf_same_prompt_follow_llamacpp_deviations": devs,
                        "hf_same_prompt_follow_llamacpp_complete": complete})
        rec["sampled_ids_inferred"] = toks if text == gen else (
            rec["hf_same_prompt_follow_llamacpp_tokens"] if rec["hf_same_prompt_follow_llamacpp_complete"] else None)
        return rec, px

    for f in GGUF_DIR.glob(f"llamacpp-{spec['folder']}-*.json"):
        f.unlink()
    results = {}
    for quant in spec["quants"]:
        model = paths[quant]
        for case, messages in CASES.items():
            hf_case = json.load(open(FIX / "cases" / spec["folder"] / f"{case}.json"))
            r, px = run_case(model, messages, TOKEN_LIMITS, (MIN_PIXELS, MAX_PIXELS))
            hf_px = torch.from_numpy(np.fromfile(FIX / "cases" / spec["folder"] / f"{case}.pixels.f32", dtype="<f4")
                                     .reshape(hf_case["pixel_values_shape"]))
            rec = {"llama_cpp": LLAMA_CPP_COMMIT, "model": model.name, "mmproj": paths["mmproj"].name, "case": case,
                   "cwd": "tests/fixtures/qwen2vl", "messages": messages, "images": case_images(messages), **r,
                   "hf_chat_template_prompt": hf_case["prompt"],
                   "hf_input_ids_equal": r["prompt_token_ids"] == hf_case["input_ids"],
                   "llamacpp_style_pixels_max_abs_diff_vs_hf_processor":
                       float((hf_px - px).abs().max()) if hf_px.shape == px.shape else None}
            rec["notes"] = {
                "command": "--image-min-tokens 6 --image-max-tokens 15 = the processor's min_pixels / max_pixels in "
                           "merged tokens (784 pixels each); without them llama.cpp uses 8 .. 4096 tokens",
                "formatted_prompt": "the GGUF's chat template through llama.cpp's jinja engine, as logged by -v (with "
                                    "-sys: the system message's text, then the user's)",
                "prompt_token_ids": "reconstructed: each text segment tokenized on its own with llama-tokenize (no "
                                    "BOS), each image as <|vision_start|> + one position per merged token (written "
                                    "as <|image_pad|>) + <|vision_end|>; the logged prompt token count matches",
                "generated_text": "stdout without the newline printed after each evaluated message and the two after "
                                  "the text; generated_bytes_hex: the exact bytes; comparisons are on the bytes",
                "hf_same_prompt": "transformers (float32) on prompt_token_ids with pixels made the way llama.cpp makes "
                                  "them (llamacpp_image(): its size rule, aspect-preserving bicubic resize with the "
                                  "horizontal pass first, centred on black), mm_token_type_ids = the image positions, "
                                  "llama.cpp's EOG ids masked; text = pieces as llama.cpp prints them",
            }
            dump_json(GGUF_DIR / f"llamacpp-{spec['folder']}-{quant}-{case}.json", rec)
            results[f"{quant}/{case}"] = {"text": rec["generated_text"], "hf_equal": rec["hf_same_prompt_text_equal"],
                                          "agree": rec["hf_same_prompt_tokens_agreeing"],
                                          "ids_equal_hf": rec["hf_input_ids_equal"]}
            k = rec["hf_same_prompt_tokens_agreeing"]
            log(f"llama.cpp {key} {quant} {case}: {rec['generated_text']!r} (HF same prompt equal: "
                f"{rec['hf_same_prompt_text_equal']}, {k}/{N_NEW_TOKENS}"
                f"{'' if k == N_NEW_TOKENS else ', HF margin there %.3g' % rec['hf_same_prompt_margins'][k]})")
    # llama.cpp's default token limits (no --image-min/max-tokens): another image size than transformers'
    r, _ = run_case(paths["F16"], CASES["a_square"], [], (8 * FACTOR ** 2, 4096 * FACTOR ** 2))
    dump_json(GGUF_DIR / f"llamacpp-{spec['folder']}-F16-a_square-default-limits.json", {
        "llama_cpp": LLAMA_CPP_COMMIT, "model": paths["F16"].name, "case": "a_square", **r,
        "note": "the a_square command without --image-min-tokens / --image-max-tokens: llama.cpp's defaults for "
                "Qwen2-VL (8 .. 4096 merged tokens, clip.cpp) instead of the processor's min_pixels / max_pixels"})
    results["F16/a_square/default-limits"] = {"text": r["generated_text"], "hf_equal": r["hf_same_prompt_text_equal"],
                                              "images": r["llamacpp_images"]}
    return results


# ============================================================================= llama.cpp with F32 files
def make_llamacpp_f32(key):
    """The F16 runs again with everything in float32 (text GGUF and mmproj converted with --outtype f32 into a
    temporary folder, not kept; KV cache f32): shows whether a difference from transformers in the F16 runs is
    f16 rounding (gone here) or a difference in what llama.cpp computes.  Flash attention off: on CPU its kernel
    rounds to f16 inside (with the default -fa auto, one Qwen2.5-VL case still parted from transformers in F32)."""
    import tempfile
    spec = MODELS[key]
    cli = BIN / "llama-mtmd-cli"
    proc, _ = load_processor(FIX / spec["folder"])
    tok = proc.tokenizer
    out = {"llama_cpp": LLAMA_CPP_COMMIT, "model": spec["folder"],
           "note": "the commands of llamacpp-<model>-F16-<case>.json with -m/--mmproj replaced by F32 conversions of "
                   "the same folder (convert_hf_to_gguf.py --outtype f32, not kept), -ctk f32 -ctv f32 and -fa off (flash attention "
                   "rounds to f16 inside); "
                   "hf_same_prompt_text_equal compares with transformers on the same prompt ids and pixels (the F16 "
                   "file's hf_same_prompt_greedy_tokens, as llama.cpp prints them)", "cases": {}}
    with tempfile.TemporaryDirectory(prefix="seer-qwen2vl-f32-") as td:
        t32, m32 = Path(td) / "text-F32.gguf", Path(td) / "mmproj-F32.gguf"
        conv = LLAMA_CPP / "convert_hf_to_gguf.py"
        fc.run([sys.executable, conv, FIX / spec["folder"], "--outtype", "f32", "--outfile", t32],
               env={"PYTHONDONTWRITEBYTECODE": "1"}, capture=True)
        fc.run([sys.executable, conv, FIX / spec["folder"], "--mmproj", "--outtype", "f32", "--outfile", m32],
               env={"PYTHONDONTWRITEBYTECODE": "1"}, capture=True)
        types = fc.gguf_kv(t32, ["tokenizer.ggml.token_type"])["tokenizer.ggml.token_type"]
        unused = {i for i, t in enumerate(types) if t == 5}
        for case in CASES:
            f16 = json.load(open(GGUF_DIR / f"llamacpp-{spec['folder']}-F16-{case}.json"))
            args = [str(a) for a in f16["command"][1:]]
            args[args.index("-m") + 1] = str(t32)
            args[args.index("--mmproj") + 1] = str(m32)
            args += ["-ctk", "f32", "-ctv", "f32", "-fa", "off"]

            def mtmd(a):
                log("RUN llama-mtmd-cli", " ".join(a))
                return fc.subprocess.run([str(cli)] + a, cwd=FIX, capture_output=True)
            p = fc.run_complete(mtmd, args)
            parts, n_eval = fc.mtmd_log_info(p.stderr.decode("utf-8", errors="replace"))
            assert "".join(parts) == f16["formatted_prompt"] and n_eval == f16["n_prompt_tokens_logged"]
            gen = fc.mtmd_stdout_text(p.stdout, len(parts))
            hf = fc.bpe_piece_bytes(tok, f16["hf_same_prompt_greedy_tokens"], unused)
            k = fc.agreeing(lambda t: fc.bpe_piece_bytes(tok, t, unused), gen, f16["hf_same_prompt_greedy_tokens"])
            out["cases"][case] = {"generated_text": fc.text_of(gen), "hf_same_prompt_text_equal": gen == hf,
                                  "hf_same_prompt_tokens_agreeing": k,
                                  "f16_generated_text_equal": fc.text_of(gen) == f16["generated_text"]}
            log(f"llama.cpp F32 {key} {case}: {fc.text_of(gen)!r} (HF same prompt equal: {gen == hf})")
    dump_json(GGUF_DIR / f"llamacpp-{spec['folder']}-F32-check.json", out)
    return out


# ============================================================================= main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="images,hf,cases,gguf,llamacpp,llamacpp-f32,readme")
    ap.add_argument("--models", default="qwen2-vl,qwen2.5-vl")
    a = ap.parse_args()
    steps = a.steps.split(",")
    keys = a.models.split(",")
    torch.set_num_threads(2)
    if "images" in steps:
        make_images()
    for key in keys:
        if "hf" in steps:
            make_hf(key)
        if "cases" in steps:
            print(json.dumps(make_cases(key), indent=1))
        if "gguf" in steps:
            make_gguf(key)
        if "llamacpp" in steps:
            print(json.dumps(make_llamacpp(key), indent=1, ensure_ascii=False))
        if "llamacpp-f32" in steps:
            print(json.dumps(make_llamacpp_f32(key), indent=1, ensure_ascii=False))
    if "readme" in steps:
        make_readme()


def fmt_devs(devs):
    if not devs:
        return "none"
    return "; ".join(f"new token {st + 1}: rank {rk + 1} ({json.dumps(pc, ensure_ascii=False)}), {gap:.3g} below the "
                     f"top-1" for st, rk, i, pc, gap in devs)


def rank_range(devs):
    lo, hi = min(d[1] for d in devs) + 1, max(d[1] for d in devs) + 1
    return f"{lo}" if lo == hi else f"{lo} to {hi}"


def make_readme():
    import PIL
    import tokenizers
    import transformers
    table, total = fc.file_table(FIX)
    recs, sums, case_rows = {}, {}, []
    for key, spec in MODELS.items():
        sums[key] = json.load(open(FIX / "cases" / spec["folder"] / "summary.json"))
        for c, v in sums[key].items():
            r = recs[(key, c)] = json.load(open(FIX / "cases" / spec["folder"] / f"{c}.json"))
            grids = ", ".join("x".join(str(x) for x in g) for g in v["image_grid_thw"])
            case_rows.append(f"| {spec['folder']} | {c} | {v['n_input_ids']} | {grids} | {v['image_tokens']} | "
                             f"`{v['greedy_tokens']}` | {v['margin_min']} | {v['f32_eq_f64']} | "
                             f"{json.dumps(r['greedy_text'], ensure_ascii=False)} |")
    size_rows, seen = [], set()
    for c in CASES:
        for im in recs[("qwen2-vl", c)]["images"]:
            if im["image"] in seen:
                continue
            seen.add(im["image"])
            size_rows.append(f"| `{im['image']}` | {im['size'][0]}x{im['size'][1]} | {im['smart_resize_branch']} | "
                             f"{im['resized'][0]}x{im['resized'][1]} | {im['image_grid_thw']} | {im['patches']} | "
                             f"{im['tokens']} | {im['pillow13_vertical_first']} | {im['llamacpp_same_size']} |")
    cpp_rows, cpp = [], {}
    for key, spec in MODELS.items():
        for quant in spec["quants"]:
            for c in CASES:
                f = GGUF_DIR / f"llamacpp-{spec['folder']}-{quant}-{c}.json"
                if not f.exists():
                    continue
                r = cpp[(key, quant, c)] = json.load(open(f))
                k = r["hf_same_prompt_tokens_agreeing"]
                devs = "-" if k == N_NEW_TOKENS else fmt_devs(r.get("hf_same_prompt_follow_llamacpp_deviations")) + (
                    "" if r.get("hf_same_prompt_follow_llamacpp_complete") else "; the rest not reproduced")
                cont = ", ".join(f"{i['content'][0]}x{i['content'][1]} in {i['target'][0]}x{i['target'][1]}"
                                 for i in r["llamacpp_images"])
                cpp_rows.append(f"| {spec['folder']} | {quant} | {c} | {json.dumps(r['generated_text'], ensure_ascii=False)} | "
                                f"{r['hf_same_prompt_text_equal']} | {k}/{N_NEW_TOKENS} | {devs} | {r['hf_input_ids_equal']} | "
                                f"{cont} | {r['llamacpp_style_pixels_max_abs_diff_vs_hf_processor']:.3g} |")
    f32 = {}
    for key, spec in MODELS.items():
        f = GGUF_DIR / f"llamacpp-{spec['folder']}-F32-check.json"
        if f.exists():
            f32[key] = json.load(open(f))["cases"]
    n_f32 = sum(v["hf_same_prompt_text_equal"] for d in f32.values() for v in d.values())
    n_f32_all = sum(len(d) for d in f32.values())
    n16 = {key: sum(cpp[k]["hf_same_prompt_text_equal"] for k in cpp if k[0] == key and k[1] == "F16") for key in MODELS}
    q8 = [cpp[k] for k in cpp if k[1] == "Q8_0"]
    q8_devs = [d for r in q8 for d in (r.get("hf_same_prompt_follow_llamacpp_deviations") or [])]
    e16 = cpp.get(("qwen2-vl", "F16", "e_system"))
    f16_parts = [f"{MODELS[k[0]]['folder']} {k[2]}: new token {d[0][0] + 1}, transformers' second choice, "
                 f"{d[0][4]:.2g} below its top-1" for k, r in cpp.items() if k[1] == "F16"
                 for d in [r.get("hf_same_prompt_follow_llamacpp_deviations") or []] if d]
    f16_text = "" if not f16_parts else (
        " (where llama.cpp parts: " + "; ".join(f16_parts) + ": f16 rounding, gone in the F32 check below)")
    dflt = {key: json.load(open(GGUF_DIR / f"llamacpp-{MODELS[key]['folder']}-F16-a_square-default-limits.json"))
            for key in MODELS if (GGUF_DIR / f"llamacpp-{MODELS[key]['folder']}-F16-a_square-default-limits.json").exists()}
    d0 = dflt.get("qwen2-vl")
    a = cpp.get(("qwen2-vl", "F16", "b_wide"))
    ex = recs[("qwen2-vl", "b_wide")]
    allr = list(recs.values())
    mir_lo = min(r["mirrored_images_first_logits_max_abs_diff"] for r in allr)
    mir_hi = max(r["mirrored_images_first_logits_max_abs_diff"] for r in allr)
    mir_same = max(sum(a == b for a, b in zip(r["greedy_tokens"], r["mirrored_images_greedy_tokens"])) for r in allr)
    tv_max = max(r["pixel_values_max_abs_diff_vs_torchvision_processor"] for r in allr)
    f64_lo = min(r["logits_f32_max_abs_diff_vs_f64"] for r in allr)
    f64_hi = max(r["logits_f32_max_abs_diff_vs_f64"] for r in allr)
    win_b = recs[("qwen2.5-vl", "b_wide")]["vision_window_index"]

    def letterbox(case):
        r = cpp.get(("qwen2-vl", "F16", case))
        if not r:
            return "?"
        i = r["llamacpp_images"][0]
        (cw, ch), (tw, th), (ox, oy) = i["content"], i["target"], i["offset"]
        side = (f"{ox} and {tw - cw - ox} black columns left and right" if tw != cw else
                f"{oy} and {th - ch - oy} black rows above and below")
        return f"{cw}x{ch} inside {tw}x{th} ({side})"
    lb_wide, lb_tall = letterbox("b_wide"), letterbox("c_tall")
    mm2 = fc.gguf_kv(gguf_paths("qwen2-vl")["mmproj"], ["clip.projector_type", "clip.vision.feed_forward_length",
                                                       "clip.vision.image_size", "clip.vision.block_count"])
    mm25 = fc.gguf_kv(gguf_paths("qwen2.5-vl")["mmproj"], ["clip.projector_type", "clip.vision.n_wa_pattern",
                                                          "clip.use_silu", "clip.vision.block_count"])
    q8_text = "" if not q8 else (
        f"Q8_0 (Qwen2-VL only; text weights and, in the matrix products, activations quantized to 8 bits): "
        f"{sum(r['hf_same_prompt_text_equal'] for r in q8)} of {len(q8)}"
        + ("" if not q8_devs else
           f"; elsewhere llama.cpp leaves transformers' greedy tokens {len(q8_devs)} times, each time for a token "
           f"transformers ranks {rank_range(q8_devs)}, "
           f"{min(d[4] for d in q8_devs):.2g} to {max(d[4] for d in q8_devs):.2g} below its top-1") + ".")
    text = f"""# Qwen2-VL / Qwen2.5-VL reference fixtures

Made by `scripts/make_qwen2vl_fixtures.py` (run it to rebuild everything; its docstring says how; shared helpers in
`scripts/fixture_common.py`). Deterministic: a re-run rewrites the same bytes (fixed seeds, no timestamps).

Versions: transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}, tokenizers {tokenizers.__version__},
Pillow {PIL.__version__}, llama.cpp {LLAMA_CPP_COMMIT} (vendored in llama-cpp-python 0.3.36: its `convert_hf_to_gguf.py` with
its own `gguf-py`, `llama-quantize`, `llama-mtmd-cli`, `llama-tokenize`). All on CPU.

## Files

| path | bytes |
|---|---|
{table}

* `images/`: drawn by the script, RGB PNG: `square-128x128.png` (gradient, red disc, dark square, white stripe),
  `wide-200x50.png` (colour waves, white bar with dark marks, green triangle), `tall-40x150.png` (gradient, yellow
  circle at the top, blue rectangle, red bar); light noise on all.
* `tiny-qwen2-vl/`, `tiny-qwen2.5-vl/`: each model exactly as transformers 5 `save_pretrained` writes it (model and
  processor): `config.json` (nested `text_config` with `rope_parameters` {{rope_type default, rope_theta 1e6,
  mrope_section [2, 3, 3]}}, `vision_config`, `dtype` bfloat16, `tie_word_embeddings` true), `model.safetensors`
  (**bfloat16**, the hub's names: `model.embed_tokens`, `model.layers.*`, `model.norm`, `visual.*`; no `lm_head`: tied),
  `generation_config.json` (bos 50256, eos [50258, 50256], pad 50256), `processor_config.json` (`Qwen2VLProcessor` /
  `Qwen2_5_VLProcessor` with the image processor (`Qwen2VLImageProcessor` settings: size shortest_edge = min_pixels
  {MIN_PIXELS}, longest_edge = max_pixels {MAX_PIXELS}, patch 14, temporal patch 2, merge 2, bicubic, CLIP mean/std) and a
  `Qwen2VLVideoProcessor` nested), `chat_template.jinja`, `tokenizer.json`, `tokenizer_config.json` (TokenizersBackend).
* `cases/<model folder>/<case>.json` + `.pixels.f32` + `.logits.f32` + `.logits_f64.f32`, `summary.json`: transformers
  references computed by loading that folder back (float32, and float64 for the check).
* `gguf/`: `tiny-qwen2-vl-F16.gguf`, `tiny-qwen2-vl-Q8_0.gguf`, `mmproj-tiny-qwen2-vl-F16.gguf`, `tiny-qwen2.5-vl-F16.gguf`,
  `mmproj-tiny-qwen2.5-vl-F16.gguf`; `llamacpp-<model folder>-<quant>-<case>.json` (llama-mtmd-cli references),
  `llamacpp-<model folder>-F16-a_square-default-limits.json`, `llamacpp-<model folder>-F32-check.json`. Qwen2.5-VL's text
  GGUF has the same architecture (`qwen2vl`) as Qwen2-VL's, so only Qwen2-VL's is also quantized (to stay near 30 MB).

## Models

Real classes (`Qwen2VLConfig` / `Qwen2VLForConditionalGeneration` / `Qwen2VLProcessor` and `Qwen2_5_VLConfig` /
`Qwen2_5_VLForConditionalGeneration` / `Qwen2_5_VLProcessor`; `Qwen2VLImageProcessorPil` named explicitly,
`Qwen2VLVideoProcessor`). Tiny sizes:

* text (both; Qwen2 decoder): vocab {VOCAB_SIZE}, hidden 32, intermediate 96, 2 layers, 2 heads, 1 KV head, head_dim 16,
  q/k/v biases, silu, rms_norm_eps 1e-6, rope_theta 1e6, **M-RoPE** `mrope_section` [2, 3, 3] (the 8 rotary frequency
  pairs of head_dim 16 split temporal / height / width in Qwen2-VL's 16:24:24 proportion), max_position_embeddings 4096,
  **tied** embeddings (as Qwen2-VL-2B and Qwen2.5-VL-3B).
* Qwen2-VL vision: patch 14 (Conv3d over 2 frames, no bias), embed_dim 32, 3 blocks (llama.cpp's converter maps the merger
  MLP by block index and needs at least 3), 2 heads, mlp_ratio 2 (64), `quick_gelu`, LayerNorm, 2-D rotary (head_dim 16:
  4 frequencies for rows, 4 for columns); merger: LayerNorm, 2x2 patches -> 128 -> Linear(128,128) -> GELU -> Linear(128,32).
* Qwen2.5-VL vision: the same patching, hidden 32, 4 blocks, 2 heads, intermediate 64, SwiGLU (silu) MLP with biases,
  RMSNorm, window attention with `window_size` 112 (4x4 merged tokens = 8x8 patches per window) in blocks 0 and 2 and full
  attention in `fullatt_block_indexes` [1, 3]; merger with RMSNorm. `window_size` 112 is the real value and the only one
  llama.cpp runs (see GGUF below).
* `image_token_id` {IMAGE_PAD} (`<|image_pad|>`), `video_token_id` {VIDEO_PAD}, `vision_start_token_id` {VISION_START},
  `vision_end_token_id` {VISION_END}.
* Weights: random (Qwen2-VL seed {MODELS['qwen2-vl']['seed']}, Qwen2.5-VL seed {MODELS['qwen2.5-vl']['seed']}), linear/conv
  weights N(0, (1.6/sqrt(fan_in))^2) except the text layers' `o_proj` / `down_proj` N(0, ({OUT_GAIN}/sqrt(fan_in))^2) (with
  tied embeddings a random decoder tends to repeat the current token; stronger layer outputs keep the tokens varied),
  token embeddings (= output matrix) N(0, {EMB_STD}^2), biases N(0, 0.05^2), norm scales U(0.8, 1.2), norm biases N(0, 0.05^2);
  stored in bfloat16. The images matter: with every image mirrored left-right the first-step logits move by {mir_lo:.0f} to
  {mir_hi:.0f} and the greedy tokens change (at most {mir_same} of the 16 positions keeps its token; `mirrored_images_*`).

## Processor, image sizes, pixel layout, positions

`Qwen2VLImageProcessorPil` (PIL; the torchvision class `AutoProcessor` loads differs by
`pixel_values_max_abs_diff_vs_torchvision_processor`, up to {tv_max:.2g}): `smart_resize` to multiples of 28 (patch 14 x merge 2):
`round(h/28)*28` x `round(w/28)*28`; above max_pixels {MAX_PIXELS}: `floor(x / beta / 28) * 28` with `beta = sqrt(h*w /
max_pixels)`; below min_pixels {MIN_PIXELS}: `ceil(x * beta / 28) * 28` with `beta = sqrt(min_pixels / (h*w))`. Then bicubic
resize (PIL), rescale 1/255, CLIP mean/std.

| image | size | smart_resize branch | resized (w x h) | image_grid_thw | patches | tokens | Pillow 13 vertical first | llama.cpp same size |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(size_rows)}

* `pixel_values` [patches of all images, 1176]: per image the 2x2 merge blocks in row-major order, inside a block its 4
  patches row-major, each row = [channel 3, temporal 2 (the image twice), 14, 14] flattened (`flatten_patches()` in the script
  reproduces the processor's rows exactly from the resized image: `pixel_values_max_abs_diff_vs_pil_resize_and_flatten` 0).
* Each `<|image_pad|>` of the prompt becomes `t*h*w/4` `<|image_pad|>` tokens between `<|vision_start|>` and `<|vision_end|>`.
* M-RoPE (`position_ids` [3, seq] in every case file, from `model.model.get_rope_index`): text tokens count up on all three
  sections; an image's tokens (row-major over its merged grid) get (p, p + row, p + col), p = the next text position; the
  text after it continues at p + max(rows, cols). `rope_delta` = max position + 1 - prompt length: generated token k has
  position len(input_ids) + k + rope_delta on all three sections. Example (b_wide, Qwen2-VL), the three sections over the
  prompt: `{ex['position_ids']}`.
* Qwen2.5-VL case files also hold `vision_window_index` / `vision_cu_window_seqlens` (transformers'
  `get_vision_window_index`): with window 112 (4x4 merged tokens) the wide image's 2x7 merged tokens form windows of 8
  (columns 0-3) and 6 (columns 4-6), so the window order is {win_b} (merged tokens, row-major numbering); the tall
  image's 5x2 form windows of 8 and 2, the square's 3x3 one window.
* Pillow 13 runs a resize's vertical pass first when the height shrinks by more than twice as many pixels as the width
  (python-pillow/Pillow#9549; seer's `resample::PassOrder`); transformers' pixels here are Pillow 13's.

## Tokenizer and chat template

Qwen2's own BPE vocabulary (151643 tokens, llama.cpp's `models/ggml-vocab-qwen2.gguf`) makes a `tokenizer.json` of 11.4 MB and
a 151936 x 32 embedding of 9.7 MB in each of the folder, the F16 GGUF and (5 MB) the Q8_0 GGUF: over 80 MB for the two
models. The stand-in is the real **GPT-2** byte-level BPE of llama.cpp's `models/ggml-vocab-gpt-2.gguf` (50257 tokens, 50000
merges; MIT licence, llama.cpp project), rebuilt as openai-community/gpt2's `tokenizer.json` pipeline (BPE, no normalizer,
ByteLevel pre-tokenizer with GPT-2's regex, ByteLevel decoder and post-processor). Qwen2's own tokenizer is the same kind
(byte-level BPE) with another split regex (single digits, letters with one leading non-letter) and NFC normalisation.

* `<|endoftext|>` 50256 is GPT-2's, at the place of Qwen2's 151643 right after the BPE; Qwen2-VL's added tokens follow in
  Qwen2's order: `<|im_start|>` 50257, `<|im_end|>` 50258, `<|object_ref_start|>` .. `<|quad_end|>` 50259..50264,
  `<|vision_start|>` 50265, `<|vision_end|>` 50266, `<|vision_pad|>` 50267, `<|image_pad|>` 50268, `<|video_pad|>` 50269
  (special); Qwen2.5-VL also `<tool_call>`, `</tool_call>`, `<|fim_prefix|>`, `<|fim_middle|>`, `<|fim_suffix|>`,
  `<|fim_pad|>`, `<|repo_name|>`, `<|file_sep|>` 50270..50277 (added, `special` false, as in Qwen2.5). The config's
  vocab_size {VOCAB_SIZE} leaves rows 50270 (50278) .. 50303 unused, as Qwen2-VL's 151936 does for its 151657 tokens.
* eos `<|im_end|>`, pad `<|endoftext|>`, no BOS added.
* Checked: all 47 of llama.cpp's test vectors for this vocabulary give the same ids, and the pre-tokenizer hash
  `convert_hf_to_gguf.py` computes is its "gpt-2" one, so the converter accepts the folders as they are.

Chat template: Qwen2-VL's (`chat_template.jinja`, the same text in Qwen2.5-VL-3B-Instruct): a default system message
"You are a helpful assistant." unless the first message is a system message, ChatML turns, each image part as
`<|vision_start|><|image_pad|><|vision_end|>`, `<|im_start|>assistant\\n` as generation prompt. Example (case b):
{json.dumps(ex['prompt'])}.

## Cases (`cases/<model folder>/<case>.json`)

a_square: the 128x128 image + question; b_wide: 200x50; c_tall: 40x150; d_two_images: wide and tall in one user message;
e_system: system message + user(square image + question).

Fields: `messages`, `prompt`, `text_input_ids`, `input_ids` (after the expansion), `num_image_tokens_per_image`,
`image_grid_thw`, `images` (per image: size, resized, branch, grid, patches, tokens, `pillow13_vertical_first`,
`llamacpp_same_size`), `position_ids`, `rope_delta`, `pixel_values_shape` + `<case>.pixels.f32` (float32 LE, C order),
`greedy_tokens` (16), `greedy_text` (skip_special_tokens), `greedy_token_strings`, `greedy_masked_ids` ([50258, 50256]:
the generation config's eos, never chosen, as `generate(min_new_tokens=16)`), `logit_margins` / `logit_margin_min` (top1 -
top2, float32), `logit_margin_min_f64`, `greedy_tokens_f64_equal`, `<case>.logits.f32` (float32 logits at the last prompt
position, {VOCAB_SIZE} values, unmasked), `<case>.logits_f64.f32` (the float64 run's, stored as float32;
`logits_f32_max_abs_diff_vs_f64` {f64_lo:.1g} to {f64_hi:.1g}), `logits_first_step_top5`, `mirrored_images_*`, and for Qwen2.5-VL the
window layout.

Greedy: hand-written loop with the KV cache (decode steps without an attention mask, so that Qwen2-VL takes the M-RoPE
positions from the cache length and its `rope_deltas`), checked equal to `generate(min_new_tokens=16, max_new_tokens=16,
do_sample=False)`. Every case was also run in float64: greedy tokens equal in all cases, all margins > {MIN_MARGIN}.

| model | case | n input ids | grids (t x h x w) | tokens per image | greedy tokens | min margin | f32 == f64 | greedy text |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(case_rows)}

## GGUF (`gguf/`)

* Text: `convert_hf_to_gguf.py <folder> --outtype f16` on each folder as it is (architecture `qwen2vl` for both,
  `rope.dimension_sections` [2, 3, 3, 0], tokenizer recognised as "gpt-2", rows 50270.. as `[PADnnnnn]` UNUSED, the `<|..|>`
  added tokens CONTROL, `<tool_call>` / `</tool_call>` USER_DEFINED, bos 50256, eos 50258, pad 50256, `add_bos_token`
  false, template from `chat_template.jinja`; no `output.weight`: tied). Qwen2-VL's also `llama-quantize ... Q8_0`.
  Run the converter without `NO_LOCAL_GGUF` so that it uses its own `gguf-py`.
* mmproj (`--mmproj --outtype f16`): Qwen2-VL: projector {mm2['clip.projector_type']!r}, {mm2['clip.vision.block_count']} blocks,
  the Conv3d split into `v.patch_embd.weight` / `.weight.1`, qkv split into q/k/v; `clip.vision.feed_forward_length` is
  written as {mm2['clip.vision.feed_forward_length']} (the converter takes Qwen2-VL's `vision_config.hidden_size`, the output size, for it; the
  real MLP is 64 wide; llama.cpp uses the tensors' shapes), `clip.vision.image_size` {mm2['clip.vision.image_size']} (a default, unused for dynamic
  sizes). Qwen2.5-VL: {mm25['clip.projector_type']!r}, `use_silu` {mm25['clip.use_silu']}, `n_wa_pattern` {mm25['clip.vision.n_wa_pattern']}
  (from `fullatt_block_indexes`: blocks with (i+1) % 2 == 0 attend fully). **`window_size` is not written**, and llama.cpp
  0c1e57098 always uses 112 for Qwen2.5-VL (`attn_window_size` is only read for other projectors): with `window_size` 56 in
  the config (tried first) llama.cpp's image embeddings differed from transformers' by as much as the embeddings themselves.
  The folder therefore has the real value, 112.
* min/max pixels are not written either (see below).

## llama.cpp references (`gguf/llamacpp-<model folder>-<quant>-<case>.json`)

`llama-mtmd-cli -m gguf/<model> --mmproj gguf/<mmproj> --image <img> [--image <img>] [-sys <system text>] -p <user text>
-n 16 --temp 0 --ignore-eos -c 4096 -t 2 --seed 0 --jinja --image-min-tokens 6 --image-max-tokens 15 -v`, run in this folder.

* Token limits: the GGUF has no min/max pixels; llama.cpp's own defaults for Qwen2-VL are 8 .. 4096 merged tokens (6272 ..
  3211264 pixels). `--image-min-tokens 6 --image-max-tokens 15` are the processor's {MIN_PIXELS} / {MAX_PIXELS} pixels in tokens
  of 784 pixels. Without them (`..-a_square-default-limits.json`) the square image becomes
  {d0['llamacpp_images'][0]['target'][0] if d0 else '?'}x{d0['llamacpp_images'][0]['target'][1] if d0 else '?'} ({d0['llamacpp_images'][0]['tokens'] if d0 else '?'} tokens) instead of 84x84 (9 tokens).
* Size rule (`img_tool::calc_size_preserved_ratio`): transformers' smart_resize in float32, with `std::round` (halves away
  from zero; Python's `round` goes to even) and at least 28 per side. Same sizes for all images here.
* **Aspect ratio (the main difference).** llama.cpp does not stretch the image to that size: Qwen2-VL uses the default
  `PAD_CEIL` of `img_tool::resize`, which resizes the image keeping its aspect ratio to fit inside the target (sizes rounded
  up) and centres it on a **black** canvas. The square image is unchanged (84x84 fills 84x84), but the wide one becomes
  {lb_wide} and the tall one {lb_tall};
  so llama.cpp's pixels differ from transformers' (`llamacpp_style_pixels_max_abs_diff_vs_hf_processor` ~3.8 in normalised
  units) and so do its outputs on those images. Resizes are bicubic with llama.cpp's port of Pillow's resampling,
  horizontal pass first. `llamacpp_image()` in the script emulates all of this: with it, llama.cpp's image embeddings
  (dumped with `MTMD_DEBUG_EMBEDDINGS`, F32 mmproj) matched transformers' to ~1e-2 on the images checked while building
  this, and the F32 check below agrees on every case.
* Prompt (`formatted_prompt`): the GGUF's template through llama.cpp's jinja engine with one user message (one
  `<__media__>` per image, then the text). Qwen's template prints string content as it is, so it equals transformers'
  prompt with `<|vision_start|><|image_pad|><|vision_end|>` in place of each marker (mtmd puts `<|vision_start|>`,
  the embeddings, `<|vision_end|>` there): `prompt_token_ids` equal transformers' `input_ids` in cases a..d. With `-sys`,
  llama.cpp's `common_chat_format_single` adds a `\\n` after the system turn (its rendering ends with one):
  {json.dumps(e16['formatted_prompt'] if e16 else None)}: one more token.
* M-RoPE: mtmd gives the image's tokens (p, p + row, p + col) and advances by max(rows, cols), as transformers.
* `--ignore-eos` masks llama.cpp's end-of-generation ids, {cpp[('qwen2-vl', 'F16', 'a_square')]['eog_ids_masked'] if ('qwen2-vl', 'F16', 'a_square') in cpp else '?'} for Qwen2-VL
  (`<|endoftext|>`, `<|im_end|>`) and {cpp[('qwen2.5-vl', 'F16', 'a_square')]['eog_ids_masked'] if ('qwen2.5-vl', 'F16', 'a_square') in cpp else '?'} for Qwen2.5-VL (also
  `<|fim_pad|>`, `<|repo_name|>`, `<|file_sep|>` by their names); the transformers runs on llama.cpp's prompt mask the same.
* Fields as in the Idefics3 fixtures: `generated_text` (stdout without the newline after each evaluated message and the two
  after the text), `generated_bytes_hex`, `retokenized_ids` (a re-tokenization), `hf_same_prompt_*` (transformers,
  float32, on `prompt_token_ids` with `llamacpp_image()` pixels and `mm_token_type_ids` = the image positions), where they
  part `hf_same_prompt_follow_llamacpp_*` (top-1 where it continues llama.cpp's text, else the best of the top 20;
  deviations = [step, rank (0 = top-1), id, piece, logit gap]), `sampled_ids_inferred`, `llamacpp_images` (target size,
  content size, offset, grid, tokens).

**F16: llama.cpp prints exactly transformers' greedy text on the same prompt ids and pixels in {n16['qwen2-vl']} of 5 Qwen2-VL
cases and {n16['qwen2.5-vl']} of 5 Qwen2.5-VL cases**{f16_text}. {q8_text}
Columns: tokens of transformers' greedy output that llama.cpp printed too; llama.cpp's prompt ids equal transformers'
`input_ids`; llama.cpp's image content inside its canvas; max |pixel difference| from transformers' processor.

| model | quant | case | llama.cpp text | = HF same prompt | HF tokens agreeing | where llama.cpp took another token | ids = HF | llama.cpp image | pixels vs HF |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(cpp_rows)}

`llamacpp-<model folder>-F32-check.json`: the F16 commands again with text model and mmproj converted to F32 (`--outtype
f32`, in a temporary folder), `-ctk f32 -ctv f32` and `-fa off` (llama.cpp's CPU flash attention, on by default, rounds to
f16 inside: with it one Qwen2.5-VL case still parted in F32): llama.cpp prints transformers' greedy text on the same prompt
ids and pixels in {n_f32} of {n_f32_all} cases.

So for a seer GGUF path: the transformers cases are the reference for transformers semantics (stretched images); the
llama.cpp files are the reference for what llama.cpp does (letterboxed images, its token limits, the extra `\\n` after a
system message).
"""
    (FIX / "README.md").write_text(text, encoding="utf-8")
    log(f"README written ({total:,} bytes of fixtures)")


if __name__ == "__main__":
    main()
