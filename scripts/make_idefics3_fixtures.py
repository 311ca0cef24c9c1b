#!/usr/bin/env python3
"""Reference fixtures for seer's Idefics3 / SmolVLM implementation (tests/fixtures/idefics3/).

What it builds (all deterministic; re-running rewrites the same files):
  images/             three small PNG test images drawn here: square 64x64, wide 160x40, tall 40x150
  tiny-smolvlm/       a tiny random SmolVLM (Idefics3ForConditionalGeneration) exactly as transformers 5
                      `save_pretrained` writes it (config.json, model.safetensors in bfloat16 with the hub's
                      names model.text_model.* / model.vision_model.* / model.connector.* / lm_head,
                      generation_config.json, processor_config.json with the Idefics3ImageProcessorPil settings
                      nested, chat_template.jinja = SmolVLM's chat template, tokenizer.json + tokenizer_config.json)
  cases/<case>.json (+ .pixels.f32, .pixel_mask.u8, .logits.f32, .logits_f64.f32)
                      transformers references: messages, prompt, input_ids after the processor's expansion,
                      tile layout, pixels, first-step logits (float32 run and float64 run), 16 greedy tokens,
                      margins; computed by loading tiny-smolvlm/ back (float32, and float64 for the check)
  gguf/               the same model converted with llama.cpp's own tools: convert_hf_to_gguf.py (text, F16),
                      convert_hf_to_gguf.py --mmproj (vision tower + connector, F16), llama-quantize Q8_0;
                      llamacpp-<quant>-<case>.json: llama-mtmd-cli --jinja greedy outputs, with transformers run
                      on llama.cpp's prompt ids and llama.cpp-style tiles
  README.md           what is there and how it was made

Model: Idefics3Config / Idefics3ForConditionalGeneration (SigLIP-style vision tower with NaViT position
buckets, pixel-shuffle connector with scale_factor 2, Llama text model), Idefics3Processor with
Idefics3ImageProcessorPil (the PIL class, named explicitly).  Tiles of 32 px: `size.longest_edge` 96,
`max_image_size.longest_edge` 32 = vision `image_size` 32, patch 4 -> 64 patches per tile -> 16 image
tokens per tile after the 2x2 pixel shuffle.  The square image is split into 3x3 tiles + the global image,
the wide one into 1x3 + global, the tall one into 3x1 + global.

Tokenizer: the real StarCoder2 byte-level BPE (49152 tokens, pre-tokenizer Digits(individual) + ByteLevel)
from llama.cpp's models/ggml-vocab-starcoder.gguf, as a stand-in for SmolLM2's tokenizer (same size and
StarCoder-style layout, not available offline), with ids 1/2 renamed <|im_start|>/<|im_end|> as in SmolLM2
and SmolVLM's 128 added tokens at their real ids (<global-img> 49152, <row_r_col_c> 49153..49188,
<fake_token_around_image> 49189, <image> 49190, reserved 49191..49278, <end_of_utterance> 49279).
llama.cpp's converter recognises it by its pre-tokenizer hash ("starcoder"), so the GGUF is converted from
the folder itself, with no vocabulary substitution.

How to run (the benchmark tree of /work/shared/bench/setup.sh: its venv with torch, torchvision,
transformers 5.23, safetensors, gguf, pillow, numpy; llama.cpp's source and tools in $BENCH_DIR/build/bin):

    ~/.cache/seer-bench/venv/bin/python scripts/make_idefics3_fixtures.py                 # everything
    ~/.cache/seer-bench/venv/bin/python scripts/make_idefics3_fixtures.py --steps cases   # some steps

Steps: images, hf, cases, gguf, llamacpp, llamacpp-f32, readme.  Environment: see scripts/fixture_common.py.
Runs on CPU with 2 threads in a few minutes.
"""
import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture_common as fc  # noqa: E402
from fixture_common import (BIN, LLAMA_CPP, LLAMA_CPP_COMMIT, MEDIA, REPO, dump_json, log,  # noqa: E402
                            write_f32)

fc.set_log_tag("idefics3")
FIX = REPO / "tests" / "fixtures" / "idefics3"
MODEL = "tiny-smolvlm"
VOCAB_GGUF = LLAMA_CPP / "models" / "ggml-vocab-starcoder.gguf"
N_NEW_TOKENS = 16
MIN_MARGIN = 2e-2
SEED = 5  # chosen (seeds 1..16, lm_head std 0.8/1.2/1.6) for the largest smallest greedy margin over all cases

# ----------------------------------------------------------------------------- tokens
N_BASE = 49152
VOCAB_SIZE = 49280
GLOBAL_IMG, GLOBAL_IMG_ID = "<global-img>", 49152
ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]  # 49153..49188
FAKE, FAKE_ID = "<fake_token_around_image>", 49189
IMAGE, IMAGE_ID = "<image>", 49190
EOU, EOU_ID = "<end_of_utterance>", 49279
BOS, BOS_ID = "<|im_start|>", 1
PAD, PAD_ID = "<|im_end|>", 2

# ----------------------------------------------------------------------------- model config
LONGEST_EDGE = 96   # processor size.longest_edge (first resize)
TILE = 32           # max_image_size.longest_edge == vision image_size
PATCH = 4
SCALE = 2
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // SCALE ** 2  # 16
MEAN = STD = [0.5, 0.5, 0.5]

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_channels=3,
              image_size=TILE, patch_size=PATCH, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
TEXT = dict(architectures=["VLlama3ForCausalLM"],  # as SmolVLM's hub config; llama.cpp's text converter needs it
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_act="silu", rms_norm_eps=1e-5,
            rope_theta=100000.0, max_position_embeddings=2048, attention_bias=False, mlp_bias=False,
            tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOU_ID, pad_token_id=PAD_ID)
TOP = dict(image_token_id=IMAGE_ID, scale_factor=SCALE, tie_word_embeddings=False)

# SmolVLM's chat template (HuggingFaceTB/SmolVLM-Instruct / -256M-Instruct): "<|im_start|>" once, then per
# message "Role" + ":" (first part an image) or ": " (otherwise), the parts in order (<image> for an image),
# "<end_of_utterance>\n"; "Assistant:" as generation prompt.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] "
    "== 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

# ----------------------------------------------------------------------------- cases
IMAGES = {"square": "images/square-64x64.png", "wide": "images/wide-160x40.png", "tall": "images/tall-40x150.png"}


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
    rng = np.random.default_rng(11)
    (FIX / "images").mkdir(parents=True, exist_ok=True)

    # square 64x64: diagonal gradient, a red disc, a dark square, light noise
    h = w = 64
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([x * 4, y * 4, 255 - (x + y) * 2], -1) + rng.normal(0, 6, (h, w, 3))
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse([8, 10, 36, 38], fill=(220, 30, 40))
    d.rectangle([40, 36, 58, 56], fill=(20, 20, 60))
    im.save(FIX / IMAGES["square"], optimize=False)

    fc.draw_wide(rng, FIX / IMAGES["wide"])
    fc.draw_tall(rng, FIX / IMAGES["tall"])
    log("images written")


# ============================================================================= tokenizer
def build_tokenizer():
    """StarCoder2's BPE from llama.cpp's vocab GGUF as a tokenizers pipeline (BPE + Digits(individual) +
    ByteLevel, as bigcode's tokenizer.json), SmolVLM's token layout, wrapped as transformers 5's
    tokenizers-backed class."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    gguf = fc.gguf_module()
    r = gguf.GGUFReader(str(VOCAB_GGUF))
    toks = list(r.fields["tokenizer.ggml.tokens"].contents())
    types = list(r.fields["tokenizer.ggml.token_type"].contents())
    merges = [tuple(m.split(" ")) for m in r.fields["tokenizer.ggml.merges"].contents()]
    assert len(toks) == N_BASE and r.fields["tokenizer.ggml.pre"].contents() == "starcoder"
    n_ctrl = sum(1 for t in types if t == int(gguf.TokenType.CONTROL))
    toks[BOS_ID], toks[PAD_ID] = BOS, PAD  # SmolLM2's ids 1 and 2 (StarCoder2: <fim_prefix>, <fim_middle>)
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(toks)}, merges=merges, fuse_unk=False,
                              byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                                         use_regex=True)])
    tk.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tk.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in toks[:n_ctrl]])
    # SmolVLM's added tokens: <global-img> and <row_r_col_c> plain added tokens, the others special
    added = [AddedToken(GLOBAL_IMG, special=False, normalized=False)]
    added += [AddedToken(t, special=False, normalized=False) for t in ROW_COL]
    tk.add_tokens(added)
    special = [FAKE, IMAGE] + [f"<|reserved_special_token_{i}|>" for i in range(EOU_ID - IMAGE_ID - 1)] + [EOU]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    assert tk.get_vocab_size() == VOCAB_SIZE
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOU, pad_token=PAD,
                                  unk_token="<|endoftext|>", model_max_length=8192)
    for t, i in ((GLOBAL_IMG, GLOBAL_IMG_ID), (ROW_COL[0], 49153), (ROW_COL[-1], 49188), (FAKE, FAKE_ID),
                 (IMAGE, IMAGE_ID), (EOU, EOU_ID), (BOS, BOS_ID), (PAD, PAD_ID)):
        assert tok.convert_tokens_to_ids(t) == i, (t, i)
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok):
    """llama.cpp's test vectors for this vocabulary (made with bigcode/starcoder2's tokenizer) and the
    pre-tokenizer hash convert_hf_to_gguf.py checks."""
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
    chktxt = src.split("chktxt = ", 1)[1].split("\n", 1)[0]
    import ast
    chk = sha256(str(tok.encode(ast.literal_eval(chktxt))).encode()).hexdigest()
    assert chk == "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34", chk  # "starcoder"
    log(f"tokenizer: all {n} llama.cpp test vectors match; pre-tokenizer hash = llama.cpp's 'starcoder'")
    return n


# ============================================================================= model
def new_random_model():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig, LlamaConfig
    cfg = Idefics3Config(vision_config=Idefics3VisionConfig(**VISION), text_config=LlamaConfig(**TEXT), **TOP)
    torch.manual_seed(SEED)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(SEED)
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
            elif "embed_tokens" in name:
                v = torch.randn(p.shape, generator=g) * 0.5
            elif "position_embedding" in name:
                v = torch.randn(p.shape, generator=g) * 0.3
            elif name == "lm_head.weight":  # wide logits: clear greedy margins
                v = torch.randn(p.shape, generator=g) * 1.6
            else:  # linear / conv weights: gain 1.6 / sqrt(fan_in)
                fan_in = int(np.prod(p.shape[1:]))
                v = torch.randn(p.shape, generator=g) * (1.6 / fan_in ** 0.5)
            p.copy_(v.to(p.dtype))
    return model


def image_processor():
    from transformers import Idefics3ImageProcessorPil
    from transformers.image_utils import PILImageResampling
    return Idefics3ImageProcessorPil(size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": TILE},
                                     do_image_splitting=True, do_pad=True, resample=PILImageResampling.LANCZOS,
                                     image_mean=MEAN, image_std=STD)


def make_hf():
    from transformers import GenerationConfig, Idefics3Processor
    tok = build_tokenizer()
    model = new_random_model()
    out = FIX / MODEL
    if out.exists():
        shutil.rmtree(out)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOU_ID, pad_token_id=PAD_ID)
    model.to(torch.bfloat16).save_pretrained(out)
    model.to(torch.float32)
    proc = Idefics3Processor(image_processor=image_processor(), tokenizer=tok, image_seq_len=IMAGE_SEQ_LEN,
                             chat_template=CHAT_TEMPLATE)
    proc.save_pretrained(out)
    fc.fix_modes(out)
    log(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")


# ============================================================================= tiles
def idefics3_layout(w, h):
    """The tile layout of transformers' Idefics3ImageProcessor (resize longest edge to LONGEST_EDGE keeping
    the aspect ratio, other side int() and made even; then resize_for_vision_encoder to multiples of TILE;
    rows x cols tiles of TILE + the global image)."""
    aspect = w / h
    if w >= h:
        w1, h1 = LONGEST_EDGE, int(LONGEST_EDGE / aspect)
        h1 += h1 % 2
    else:
        h1, w1 = LONGEST_EDGE, int(LONGEST_EDGE * aspect)
        w1 += w1 % 2
    a1 = w1 / h1
    if w1 >= h1:
        w2 = math.ceil(w1 / TILE) * TILE
        h2 = math.ceil(int(w2 / a1) / TILE) * TILE
    else:
        h2 = math.ceil(h1 / TILE) * TILE
        w2 = math.ceil(int(h2 * a1) / TILE) * TILE
    rows, cols = (h2 // TILE, w2 // TILE) if (h2 > TILE or w2 > TILE) else (0, 0)
    steps = {"resize": ([w, h], [w1, h1]), "resize_for_vision_encoder": ([w1, h1], [w2, h2]),
             "global_image": ([w2, h2], [TILE, TILE])}
    vfirst = [k for k, (a, b) in steps.items() if a[0] != b[0] and a[1] != b[1] and pillow13_vertical_first(a, b)]
    return {"size": [w, h], "resized": [w1, h1], "refined": [w2, h2], "rows": rows, "cols": cols,
            "pillow13_vertical_first": vfirst}


def llamacpp_layout(w, h):
    """llama.cpp 0c1e57098's mtmd_image_preprocessor_idefics3 (tools/mtmd/mtmd-image.cpp): the same first
    resize (aspect ratio in double, int(), made even), then grid = ceil(resized / TILE) per side."""
    aspect = w / h
    if w >= h:
        w1, h1 = LONGEST_EDGE, int(LONGEST_EDGE / aspect)
        h1 += h1 % 2
    else:
        h1, w1 = LONGEST_EDGE, int(LONGEST_EDGE * aspect)
        w1 += w1 % 2
    gx, gy = -(-w1 // TILE), -(-h1 // TILE)
    return {"size": [w, h], "resized": [w1, h1], "refined": [gx * TILE, gy * TILE], "rows": gy, "cols": gx}


def resize_h_first(im, size):
    """Lanczos resize as llama.cpp's img_tool::resize_pillow does it: a port of Pillow's fixed-point
    resampling that always runs the horizontal pass first (as Pillow up to 12.x).  Pillow 13 runs the
    vertical pass first when the height shrinks by more than twice as many pixels as the width
    (python-pillow/Pillow#9549); the u8 intermediate then differs by a level here and there.  Each single-axis
    PIL resize below is one pass, identical in both."""
    w, h = im.size
    if size == (w, h):
        return im
    if size[0] != w and size[1] != h:
        im = im.resize((size[0], h), Image.LANCZOS)
    return im.resize(size, Image.LANCZOS)


def pillow13_vertical_first(src, dst):
    """Whether Pillow 13 (transformers' processor here) resamples vertically first for src -> dst (w, h)."""
    return dst[1] < src[1] and src[1] - dst[1] > 2 * (src[0] - dst[0])


def llamacpp_tiles(path):
    """Python emulation of llama.cpp's Idefics3 preprocessing: resize to `resized`, resize to `refined`,
    crop the TILE x TILE tiles row by row, the overview = refined resized to TILE x TILE; all Lanczos with
    llama.cpp's pass order (resize_h_first), then (x/255 - 0.5)/0.5.  Returns (tiles [n, 3, TILE, TILE] with
    the overview LAST, in prompt order, layout)."""
    im = Image.open(FIX / path).convert("RGB")
    lay = llamacpp_layout(*im.size)
    resized = resize_h_first(im, tuple(lay["resized"]))
    refined = resize_h_first(resized, tuple(lay["refined"]))
    tiles = [refined.crop((c * TILE, r * TILE, (c + 1) * TILE, (r + 1) * TILE))
             for r in range(lay["rows"]) for c in range(lay["cols"])]
    tiles.append(resize_h_first(refined, (TILE, TILE)))
    steps = [(list(im.size), lay["resized"]), (lay["resized"], lay["refined"]), (lay["refined"], [TILE, TILE])]
    lay["pillow13_pass_order_differs"] = any(a[0] != b[0] and a[1] != b[1] and pillow13_vertical_first(a, b)
                                             for a, b in steps)
    arr = [(np.asarray(t, dtype=np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5) for t in tiles]
    return torch.from_numpy(np.stack(arr).transpose(0, 3, 1, 2).copy()), lay


def expansion_ids(tok, rows, cols):
    """The ids Idefics3Processor puts for one image (`<image>` = IMAGE_ID for each embedding)."""
    nl, nlnl = tok.convert_tokens_to_ids("Ċ"), tok.convert_tokens_to_ids("ĊĊ")
    ids = []
    for r in range(rows):
        for c in range(cols):
            ids += [FAKE_ID, tok.convert_tokens_to_ids(f"<row_{r + 1}_col_{c + 1}>")] + [IMAGE_ID] * IMAGE_SEQ_LEN
        if r < rows - 1:
            ids.append(nl)
    if rows:
        ids.append(nlnl)  # the last row's "\n" + "\n" before the global image: one token here
    return ids + [FAKE_ID, GLOBAL_IMG_ID] + [IMAGE_ID] * IMAGE_SEQ_LEN + [FAKE_ID]


# ============================================================================= transformers references
def load_processor(folder: Path):
    """The folder's processor with its image processor forced to the PIL class (Idefics3ImageProcessorPil)."""
    from transformers import AutoProcessor, Idefics3ImageProcessorPil
    proc = AutoProcessor.from_pretrained(folder)
    fast = proc.image_processor
    proc.image_processor = Idefics3ImageProcessorPil.from_pretrained(folder)
    assert proc.image_seq_len == IMAGE_SEQ_LEN
    return proc, fast


def hf_messages(messages):
    return [{"role": m["role"], "content": [{"type": "image"} if c["type"] == "image" else dict(c)
                                            for c in m["content"]]} for m in messages]


def case_images(messages):
    return [c["path"] for m in messages for c in m["content"] if c["type"] == "image"]


def load_models():
    from transformers import Idefics3ForConditionalGeneration
    m32, info = Idefics3ForConditionalGeneration.from_pretrained(FIX / MODEL, dtype=torch.float32,
                                                                 output_loading_info=True)
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    assert not any(problems.values()), problems
    m64 = Idefics3ForConditionalGeneration.from_pretrained(FIX / MODEL, dtype=torch.float64)
    return m32.eval(), m64.eval()


def make_cases():
    torch.set_num_threads(2)
    fdir = FIX / MODEL
    proc, fast = load_processor(fdir)
    tok = proc.tokenizer
    m32, m64 = load_models()
    eos = m32.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    outdir = FIX / "cases"
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
        rc = proc.image_processor(images=images, return_row_col_info=True)
        fast_px = fast(images=images, return_tensors="pt")["pixel_values"]
        px, pmask = inputs["pixel_values"], inputs["pixel_attention_mask"]
        # tile layout: the processor's rows/cols, checked against the formula and llama.cpp's grid
        layout, expected_ids = [], []
        for k, (p, im) in enumerate(zip(paths, images)):
            lay = idefics3_layout(*im.size)
            assert [lay["rows"], lay["cols"]] == [rc["rows"][0][k], rc["cols"][0][k]], (lay, rc["rows"], rc["cols"])
            cpp = llamacpp_layout(*im.size)
            lay.update({"image": p, "n_tiles": lay["rows"] * lay["cols"] + 1,
                        "image_tokens": IMAGE_SEQ_LEN * (lay["rows"] * lay["cols"] + 1),
                        "prompt_tokens": len(expansion_ids(tok, lay["rows"], lay["cols"])),
                        "llamacpp_same_grid": [cpp["rows"], cpp["cols"], cpp["refined"]] ==
                                              [lay["rows"], lay["cols"], lay["refined"]]})
            layout.append(lay)
        # input_ids = the text ids with each <image> replaced by its expansion
        k = 0
        for t in text_ids:
            if t == IMAGE_ID:
                expected_ids += expansion_ids(tok, layout[k]["rows"], layout[k]["cols"])
                k += 1
            else:
                expected_ids.append(t)
        assert expected_ids == ids, "processor expansion differs from expansion_ids()"
        assert ids.count(IMAGE_ID) == sum(la["image_tokens"] for la in layout)
        assert px.shape[1] == sum(la["n_tiles"] for la in layout) and bool(pmask.all())
        kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
              "pixel_values": px, "pixel_attention_mask": pmask}
        t32, mg32, first = fc.greedy(m32, kw, N_NEW_TOKENS, eos)
        kw64 = dict(kw, pixel_values=px.double())
        t64, mg64, first64 = fc.greedy(m64, kw64, N_NEW_TOKENS, eos)
        with torch.no_grad():
            gen = m32.generate(**inputs, max_new_tokens=N_NEW_TOKENS, min_new_tokens=N_NEW_TOKENS,
                               do_sample=False, num_beams=1)
        assert gen[0, len(ids):].tolist() == t32, (case, gen[0, len(ids):].tolist(), t32)
        assert t32 == t64, f"{case}: f32 greedy {t32} != f64 greedy {t64}"
        assert min(mg32) > MIN_MARGIN and min(mg64) > MIN_MARGIN, (case, min(mg32), min(mg64))
        # the image matters: the same prompt with the images mirrored left-right
        from PIL import ImageOps
        mir = proc(images=[ImageOps.mirror(im.convert("RGB")) for im in images], text=prompt, return_tensors="pt")
        t_mir, _, first_mir = fc.greedy(m32, {k: mir[k] for k in kw}, N_NEW_TOKENS, eos)
        write_f32(outdir / f"{case}.logits.f32", first)
        write_f32(outdir / f"{case}.logits_f64.f32", first64)
        write_f32(outdir / f"{case}.pixels.f32", px)
        (outdir / f"{case}.pixel_mask.u8").write_bytes(np.ascontiguousarray(pmask.numpy().astype(np.uint8)).tobytes())
        top5 = torch.topk(first, 5)
        rec = {
            "case": case, "folder": MODEL, "stored_weight_dtype": "bfloat16",
            "reference": "transformers 5.23 Idefics3ForConditionalGeneration.from_pretrained(tiny-smolvlm, "
                         "dtype=float32), CPU; processor = AutoProcessor.from_pretrained(tiny-smolvlm) with the image "
                         "processor replaced by Idefics3ImageProcessorPil.from_pretrained(tiny-smolvlm)",
            "messages": messages,
            "prompt": prompt,
            "text_input_ids": text_ids,
            "input_ids": ids,
            "image_token_id": IMAGE_ID,
            "num_image_tokens_per_image": [la["image_tokens"] for la in layout],
            "num_prompt_tokens_per_image": [la["prompt_tokens"] for la in layout],
            "tiles": layout,
            "tiles_note": "per image: size [w, h]; resized = after the first resize (longest edge 96, other side "
                          "int() and made even) [w, h]; refined = after resize_for_vision_encoder (multiples of 32); "
                          "rows x cols tiles of 32x32 in row-major order, then the global image (refined resized to "
                          "32x32): n_tiles = rows*cols + 1 pixel_values entries, 16 <image> tokens each; "
                          "prompt_tokens = all ids of the image's expansion (fake/row/global/newline tokens included); "
                          "llamacpp_same_grid: llama.cpp 0c1e57098 computes the same grid; pillow13_vertical_first: the "
                          "resizes (all Lanczos) where Pillow 13 resamples vertically first (python-pillow/Pillow#9549; "
                          "Pillow <= 12 and llama.cpp always run the horizontal pass first)",
            "pixel_values_file": f"{case}.pixels.f32",
            "pixel_values_shape": list(px.shape),
            "pixel_values_dtype": "float32 little-endian, C order; [batch 1, tiles of all images in prompt order "
                                  "(each image: its rows*cols tiles row-major, then its global image), 3, 32, 32]",
            "pixel_attention_mask_file": f"{case}.pixel_mask.u8",
            "pixel_attention_mask_shape": list(pmask.shape),
            "pixel_attention_mask_note": "uint8 (1 = real pixel); all ones here: every tile is a full 32x32 crop",
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
                         "grids": [[la["rows"], la["cols"]] for la in layout]}
        log(f"{case}: {len(ids)} ids, grids {summary[case]['grids']}, tokens {t32}, margin {min(mg32):.4f}")
    dump_json(outdir / "summary.json", summary)
    return summary


# ============================================================================= GGUF
GGUF_DIR = FIX / "gguf"
F16 = GGUF_DIR / "tiny-smolvlm-F16.gguf"
Q8 = GGUF_DIR / "tiny-smolvlm-Q8_0.gguf"
MMPROJ = GGUF_DIR / "mmproj-tiny-smolvlm-F16.gguf"
QUANTS = (("F16", F16), ("Q8_0", Q8))


def make_gguf():
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    conv = LLAMA_CPP / "convert_hf_to_gguf.py"
    env = {"PYTHONDONTWRITEBYTECODE": "1"}  # the converter then uses its own gguf-py (not the venv's gguf)
    fc.run([py, conv, FIX / MODEL, "--outtype", "f16", "--outfile", F16], env=env)
    fc.run([py, conv, FIX / MODEL, "--mmproj", "--outtype", "f16", "--outfile", MMPROJ], env=env)
    fc.run([BIN / "llama-quantize", F16, Q8, "Q8_0", "2"])
    for p in (F16, Q8, MMPROJ):
        p.chmod(0o644)


# ============================================================================= llama.cpp references
def mtmd_prompt_ids(model, tok, parts, layouts, add_bos):
    """Prompt ids as mtmd builds them: BOS if the vocab adds one; each evaluated message (`parts`: the formatted
    system message, then the user's) on its own, each text segment tokenized on its own (parse_special), and per
    image the slices (<fake_token_around_image><row_r_col_c> + 16 embeddings, "\\n" between rows), then "\\n\\n"
    <fake_token_around_image> <global-img> + 16 embeddings + <fake_token_around_image> (embedding positions shown
    as <image> = 49190)."""
    ids, k = ([BOS_ID] if add_bos else []), 0
    for part in parts:
        segs = part.split(MEDIA)
        for i, s in enumerate(segs):
            ids += fc.llama_tokenize(model, s)
            if i < len(segs) - 1:
                ids += expansion_ids(tok, layouts[k]["rows"], layouts[k]["cols"])
                k += 1
    assert k == len(layouts)
    return ids


def make_llamacpp():
    from transformers import AutoTokenizer
    torch.set_num_threads(2)
    cli = BIN / "llama-mtmd-cli"
    m32, _ = load_models()
    tok = AutoTokenizer.from_pretrained(FIX / MODEL)
    add_bos = fc.gguf_kv(F16, ["tokenizer.ggml.add_bos_token"])["tokenizer.ggml.add_bos_token"]
    types = fc.gguf_kv(F16, ["tokenizer.ggml.token_type"])["tokenizer.ggml.token_type"]
    unused = {i for i, t in enumerate(types) if t == 5}

    def piece_bytes(ids):
        return fc.bpe_piece_bytes(tok, ids, unused)

    def mtmd(args):
        cmd = [str(cli)] + [str(a) for a in args]
        log("RUN", " ".join(cmd))
        return fc.subprocess.run(cmd, cwd=FIX, capture_output=True)  # bytes: a piece can be part of a character

    results = {}
    for quant, model in QUANTS:
        for case, messages in CASES.items():
            paths = case_images(messages)
            sys_msg = [m for m in messages if m["role"] == "system"]
            user = [m for m in messages if m["role"] == "user"]
            assert len(user) == 1 and len(messages) == len(user) + len(sys_msg)
            prompt = " ".join(c["text"] for c in user[0]["content"] if c["type"] == "text")
            args = ["-m", model.relative_to(FIX), "--mmproj", MMPROJ.relative_to(FIX)]
            for p in paths:
                args += ["--image", p]
            if sys_msg:
                args += ["-sys", " ".join(c["text"] for c in sys_msg[0]["content"])]
            args += ["-p", prompt, "-n", N_NEW_TOKENS, "--temp", "0", "--ignore-eos", "-c", "2048", "-t", "2",
                     "--seed", "0", "--jinja", "-v"]
            p = fc.run_complete(mtmd, args)
            stderr = p.stderr.decode("utf-8", errors="replace")
            formatted_parts, n_eval = fc.mtmd_log_info(stderr)
            formatted = "".join(formatted_parts)
            eog = fc.eog_ids_from_log(stderr)
            gen = fc.mtmd_stdout_text(p.stdout, len(formatted_parts))
            cpp = [llamacpp_tiles(pth) for pth in paths]
            layouts = [c[1] for c in cpp]
            ids = mtmd_prompt_ids(model, tok, formatted_parts, layouts, add_bos)
            assert n_eval == len(ids), (n_eval, len(ids))
            px = torch.cat([c[0] for c in cpp])[None]
            hf_case = json.load(open(FIX / "cases" / f"{case}.json"))
            hf_px = torch.from_numpy(np.fromfile(FIX / "cases" / f"{case}.pixels.f32", dtype="<f4")
                                     .reshape(hf_case["pixel_values_shape"]))
            same_px = tuple(hf_px.shape) == tuple(px.shape)
            kw = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
                  "pixel_values": px, "pixel_attention_mask": torch.ones(px.shape[:2] + px.shape[3:], dtype=torch.long)}
            toks, mg, _ = fc.greedy(m32, kw, N_NEW_TOKENS, eog)
            text = piece_bytes(toks)
            k = fc.agreeing(piece_bytes, gen, toks)
            rec = {
                "llama_cpp": LLAMA_CPP_COMMIT, "model": model.name, "mmproj": MMPROJ.name, "case": case,
                "cwd": "tests/fixtures/idefics3", "messages": messages, "prompt_given": prompt, "images": paths,
                "command": ["llama-mtmd-cli"] + [str(a) for a in args],
                "formatted_prompt": formatted,
                "formatted_prompt_note": "the GGUF's chat template (SmolVLM's) through llama.cpp's jinja engine, as "
                                         "logged by -v (with -sys: the system message's text, then the user's)",
                "hf_chat_template_prompt": hf_case["prompt"],
                "prompt_token_ids": ids,
                "prompt_token_ids_note": "reconstructed: each evaluated message (with -sys: system, then user) and in it "
                                         "each text segment tokenized on its own with llama-tokenize (no BOS: the "
                                         "GGUF's add_bos_token is false), each image as "
                                         "mtmd lays it out (tiles row by row with <fake_token_around_image><row_r_col_c>, "
                                         "'\\n' between rows, '\\n\\n' <fake_token_around_image><global-img> overview "
                                         "<fake_token_around_image>); the 16 embedding positions per tile written as 49190",
                "n_prompt_tokens_logged": n_eval,
                "hf_input_ids_equal": ids == hf_case["input_ids"],
                "llamacpp_tiles": layouts,
                "eog_ids_masked": eog,
                "stdout": fc.text_of(p.stdout),
                "generated_text": fc.text_of(gen),
                "generated_bytes_hex": gen.hex(),
                "generated_text_note": "stdout without the newline printed after each evaluated message (one before the "
                                       "text, two with -sys) and the two after it; "
                                       "generated_bytes_hex: the exact bytes (a token can hold part of a UTF-8 "
                                       "character: generated_text shows that as U+FFFD); comparisons are on the bytes",
                "retokenized_ids": fc.llama_tokenize(model, gen),
                "retokenized_ids_note": "llama-tokenize of generated_text (no BOS): a re-tokenization, not the "
                                        "sampled ids (llama-mtmd-cli does not print those)",
                "llamacpp_style_pixels_max_abs_diff_vs_hf_processor":
                    float((hf_px - px).abs().max()) if same_px else None,
                "hf_same_prompt_greedy_tokens": toks,
                "hf_same_prompt_text": fc.text_of(text),
                "hf_same_prompt_text_equal": text == gen,
                "hf_same_prompt_tokens_agreeing": k,
                "hf_same_prompt_margin_at_first_difference": mg[k] if k < N_NEW_TOKENS else None,
                "hf_same_prompt_min_margin": min(mg),
                "hf_same_prompt_margins": mg,
                "hf_same_prompt_note": "transformers (tiny-smolvlm, float32) given prompt_token_ids and tiles made the "
                                       "way llama.cpp makes them (llamacpp_tiles() in the script: PIL Lanczos, the "
                                       "overview last as in the prompt), with llama.cpp's EOG ids masked; text = pieces "
                                       "as llama.cpp prints them",
            }
            if text != gen:
                ftoks, devs, complete = fc.follow_llamacpp(m32, kw, piece_bytes, gen, N_NEW_TOKENS, eog)
                rec.update({"hf_same_prompt_follow_llamacpp_tokens": ftoks,
                            "hf_same_prompt_follow_llamacpp_deviations": devs,
                            "hf_same_prompt_follow_llamacpp_complete": complete})
            rec["sampled_ids_inferred"] = toks if text == gen else (
                rec["hf_same_prompt_follow_llamacpp_tokens"] if rec["hf_same_prompt_follow_llamacpp_complete"] else None)
            dump_json(GGUF_DIR / f"llamacpp-{quant}-{case}.json", rec)
            results[f"{quant}/{case}"] = {"text": fc.text_of(gen), "hf_equal": text == gen, "agree": k,
                                          "ids_equal_hf": ids == hf_case["input_ids"]}
            log(f"llama.cpp {quant} {case}: {fc.text_of(gen)!r} (HF same prompt equal: {text == gen}, {k}/{N_NEW_TOKENS}"
                f"{'' if k == N_NEW_TOKENS else f', HF margin there {mg[k]:.3g}'})")
    return results


# ============================================================================= llama.cpp with F32 files
def make_llamacpp_f32():
    """The F16 runs again with everything in float32 (text GGUF and mmproj converted with --outtype f32 into a
    temporary folder, not kept; KV cache f32): shows whether a difference from transformers in the F16 runs is
    f16 rounding (gone here) or a difference in what llama.cpp computes.  Flash attention off: on CPU its kernel
    rounds to f16 inside (with the default -fa auto, one Qwen2.5-VL case still parted from transformers in F32)."""
    import tempfile
    from transformers import AutoTokenizer
    cli = BIN / "llama-mtmd-cli"
    tok = AutoTokenizer.from_pretrained(FIX / MODEL)
    out = {"llama_cpp": LLAMA_CPP_COMMIT, "model": MODEL,
           "note": "the commands of llamacpp-F16-<case>.json with -m/--mmproj replaced by F32 conversions of the same "
                   "folder (convert_hf_to_gguf.py --outtype f32, not kept), -ctk f32 -ctv f32 and -fa off (flash attention "
                   "rounds to f16 inside); "
                   "hf_same_prompt_text_equal compares with transformers on the same prompt ids and pixels (the F16 "
                   "file's hf_same_prompt_greedy_tokens, as llama.cpp prints them)", "cases": {}}
    with tempfile.TemporaryDirectory(prefix="seer-idefics3-f32-") as td:
        t32, m32 = Path(td) / "text-F32.gguf", Path(td) / "mmproj-F32.gguf"
        conv = LLAMA_CPP / "convert_hf_to_gguf.py"
        env = {"PYTHONDONTWRITEBYTECODE": "1"}
        fc.run([sys.executable, conv, FIX / MODEL, "--outtype", "f32", "--outfile", t32], env=env, capture=True)
        fc.run([sys.executable, conv, FIX / MODEL, "--mmproj", "--outtype", "f32", "--outfile", m32], env=env,
               capture=True)
        types = fc.gguf_kv(t32, ["tokenizer.ggml.token_type"])["tokenizer.ggml.token_type"]
        unused = {i for i, t in enumerate(types) if t == 5}
        for case in CASES:
            f16 = json.load(open(GGUF_DIR / f"llamacpp-F16-{case}.json"))
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
            log(f"llama.cpp F32 {case}: {fc.text_of(gen)!r} (HF same prompt equal: {gen == hf})")
    dump_json(GGUF_DIR / "llamacpp-F32-check.json", out)
    return out


# ============================================================================= README
def fmt_devs(devs):
    if not devs:
        return "none"
    return "; ".join(f"new token {st + 1}: rank {rk + 1} ({json.dumps(pc, ensure_ascii=False)}), {gap:.3g} below the "
                     f"top-1" for st, rk, i, pc, gap in devs)


def make_readme():
    import PIL
    import tokenizers
    import transformers
    summary = json.load(open(FIX / "cases" / "summary.json"))
    recs = {c: json.load(open(FIX / "cases" / f"{c}.json")) for c in CASES}
    table, total = fc.file_table(FIX)
    case_rows = []
    for c, v in summary.items():
        r = recs[c]
        grids = ", ".join(f"{a}x{b}" for a, b in v["grids"])
        case_rows.append(f"| {c} | {v['n_input_ids']} | {grids} | {v['image_tokens']} | `{v['greedy_tokens']}` | "
                         f"{v['margin_min']} | {v['f32_eq_f64']} | {json.dumps(r['greedy_text'], ensure_ascii=False)} |")
    lay_rows, seen = [], set()
    for c in CASES:
        for la in recs[c]["tiles"]:
            if la["image"] in seen:
                continue
            seen.add(la["image"])
            lay_rows.append(f"| `{la['image']}` | {la['size'][0]}x{la['size'][1]} | {la['resized'][0]}x{la['resized'][1]} | "
                            f"{la['refined'][0]}x{la['refined'][1]} | {la['rows']} x {la['cols']} | {la['n_tiles']} | "
                            f"{la['image_tokens']} | {la['prompt_tokens']} | {', '.join(la['pillow13_vertical_first']) or '-'} |")
    cpp_rows, cpp = [], {}
    for quant, _ in QUANTS:
        for c in CASES:
            f = GGUF_DIR / f"llamacpp-{quant}-{c}.json"
            if not f.exists():
                continue
            r = cpp[(quant, c)] = json.load(open(f))
            k = r["hf_same_prompt_tokens_agreeing"]
            devs = "-" if k == N_NEW_TOKENS else fmt_devs(r.get("hf_same_prompt_follow_llamacpp_deviations")) + (
                "" if r.get("hf_same_prompt_follow_llamacpp_complete") else "; the rest not reproduced")
            px = r["llamacpp_style_pixels_max_abs_diff_vs_hf_processor"]
            cpp_rows.append(f"| {quant} | {c} | {json.dumps(r['generated_text'], ensure_ascii=False)} | "
                            f"{r['hf_same_prompt_text_equal']} | {k}/{N_NEW_TOKENS} | {devs} | {len(r['prompt_token_ids'])} "
                            f"({len(recs[c]['input_ids'])}) | {px:.3g} |")
    a = cpp.get(("F16", "a_square"))
    e = cpp.get(("F16", "e_system"))
    eog = a["eog_ids_masked"] if a else []
    mmkv = fc.gguf_kv(MMPROJ, ["clip.projector_type", "clip.vision.image_size", "clip.vision.patch_size",
                               "clip.vision.preproc_image_size", "clip.vision.projector.scale_factor",
                               "clip.use_gelu", "clip.vision.block_count"])
    txkv = fc.gguf_kv(F16, ["tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.eos_token_id",
                            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.padding_token_id"])
    n_f16 = sum(cpp[k]["hf_same_prompt_text_equal"] for k in cpp if k[0] == "F16")
    f32_text = ""
    if (GGUF_DIR / "llamacpp-F32-check.json").exists():
        chk = json.load(open(GGUF_DIR / "llamacpp-F32-check.json"))["cases"]
        n_eq = sum(v["hf_same_prompt_text_equal"] for v in chk.values())
        f32_text = (f"`llamacpp-F32-check.json`: the F16 commands again with the text model and the mmproj converted to F32 "
                    f"(`--outtype f32`, in a temporary folder), `-ctk f32 -ctv f32` and `-fa off` (llama.cpp's CPU flash "
                    f"attention, on by default, rounds to f16 inside): llama.cpp prints transformers' "
                    f"greedy text on the same prompt ids and pixels in {n_eq} of {len(chk)} cases. While building these "
                    f"files, the same check (and llama.cpp's image embeddings, dumped with `MTMD_DEBUG_EMBEDDINGS`) showed the "
                    f"Pillow 13 resize order: before `llamacpp_tiles()` used llama.cpp's order, c_tall and d_two_images "
                    f"parted from transformers even in F32.")
    n_q8 = sum(cpp[k]["hf_same_prompt_text_equal"] for k in cpp if k[0] == "Q8_0")
    devs = [d for k in cpp if k[0] == "Q8_0" for d in (cpp[k].get("hf_same_prompt_follow_llamacpp_deviations") or [])]
    q8_devs = "" if not devs else (
        f"; elsewhere it leaves transformers' greedy tokens {len(devs)} times, each time for a token transformers ranks "
        f"{min(d[1] for d in devs) + 1} to {max(d[1] for d in devs) + 1}, {min(d[4] for d in devs):.2g} to "
        f"{max(d[4] for d in devs):.2g} below its top-1, and otherwise follows transformers' greedy choices" +
        ("" if all(cpp[k].get("hf_same_prompt_follow_llamacpp_complete", True) for k in cpp) else
         " (some outputs are not reproduced by following transformers' top 20)"))
    text = f"""# Idefics3 / SmolVLM reference fixtures

Made by `scripts/make_idefics3_fixtures.py` (run it to rebuild everything; its docstring says how; shared
helpers in `scripts/fixture_common.py`). Deterministic: a re-run rewrites the same bytes (fixed seeds, no
timestamps).

Versions: transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}, tokenizers {tokenizers.__version__},
Pillow {PIL.__version__}, llama.cpp {LLAMA_CPP_COMMIT} (vendored in llama-cpp-python 0.3.36: its `convert_hf_to_gguf.py` with
its own `gguf-py`, `llama-quantize`, `llama-mtmd-cli`, `llama-tokenize`). All on CPU.

## Files

| path | bytes |
|---|---|
{table}

* `images/`: drawn by the script, all RGB PNG: `square-64x64.png` (gradient, red disc, dark square),
  `wide-160x40.png` (colour waves, white bar with dark marks, green triangle), `tall-40x150.png` (gradient,
  yellow circle at the top, blue rectangle, red bar); light noise on all.
* `{MODEL}/`: the model exactly as transformers 5 `save_pretrained` writes it (model and processor):
  `config.json` (`Idefics3Config`; `rope_parameters` inside `text_config`, `dtype` bfloat16, and the
  `_pad_token_id` 128002 transformers 5 writes for Idefics3), `model.safetensors` (**bfloat16**, the hub's names:
  `model.text_model.*`, `model.vision_model.*`, `model.connector.modality_projection.proj.weight`, `lm_head.weight`),
  `generation_config.json` (bos 1, eos 49279, pad 2), `processor_config.json` (`Idefics3Processor`,
  `image_seq_len` 16, the image processor nested: `Idefics3ImageProcessor` settings), `chat_template.jinja`,
  `tokenizer.json`, `tokenizer_config.json` (`tokenizer_class` TokenizersBackend).
* `cases/<case>.json` + `.pixels.f32` + `.pixel_mask.u8` + `.logits.f32` + `.logits_f64.f32`, `cases/summary.json`:
  transformers references computed by loading `{MODEL}/` back (float32, and float64 for the check).
* `gguf/`: `tiny-smolvlm-F16.gguf` (text model), `tiny-smolvlm-Q8_0.gguf`, `mmproj-tiny-smolvlm-F16.gguf` (vision
  tower + connector), `llamacpp-<quant>-<case>.json` (llama-mtmd-cli references), `llamacpp-F32-check.json`.

## Model

Real classes: `Idefics3ForConditionalGeneration`, `Idefics3Config`, `Idefics3VisionConfig`, `LlamaConfig` (text),
`Idefics3Processor`, `Idefics3ImageProcessorPil`. Tiny sizes:

* vision (SigLIP-style `Idefics3VisionTransformer`): image_size {TILE}, patch {PATCH} (8x8 = 64 patches per tile, NaViT
  bucketed position ids, which for full tiles are row-major 0..63), hidden 32, 2 layers, 2 heads, intermediate 64,
  `gelu_pytorch_tanh`, layer_norm_eps 1e-6, post-layernorm applied, biases everywhere.
* connector: pixel shuffle with `scale_factor` {SCALE} (8x8 patches -> 4x4 = 16 tokens of 4*32 = 128 features; each
  output token (i, j) concatenates the patches (2i+a, 2j+b) in the order a (row) outer, b (column) inner), then
  `modality_projection.proj` Linear(128 -> 32, no bias). 16 image tokens per tile (`image_seq_len`).
* text (`LlamaModel`, `text_config.architectures` ["VLlama3ForCausalLM"] as on SmolVLM's hub config): vocab 49280,
  hidden 32, intermediate 96, 2 layers, 4 heads, 2 KV heads (GQA), head_dim 8, silu, rms_norm_eps 1e-5, rope_theta
  100000, max_position_embeddings 2048, no biases, **untied** `lm_head` (`tie_word_embeddings` false, as SmolVLM).
  `image_token_id` 49190.
* Weights: random (seed {SEED}), linear/conv weights N(0, (1.6/sqrt(fan_in))^2), token embeddings N(0, 0.5^2), vision
  position embeddings N(0, 0.3^2), lm_head N(0, 1.6^2) (wide logits: clear greedy margins), biases N(0, 0.05^2), norm
  scales U(0.8, 1.2), norm biases N(0, 0.05^2); stored in bfloat16, all references load them back in float32 / float64.
  The images matter: with every image mirrored left-right, the first-step logits move by 20 to 40 and all 16 greedy
  tokens change (`mirrored_images_*` in the case files).
* Note: rounding the model to bfloat16 in memory (`model.to(torch.bfloat16)`) also rounds the text model's rotary
  `inv_freq` buffer, which is not saved; a model loaded from the folder recomputes it in float32. The margins of the
  two differ noticeably (0.025 vs 0.059 on one case while choosing the seed): compare with models loaded from the folder.

## Processor and tiles

`Idefics3ImageProcessorPil` (the PIL class, named explicitly; `AutoProcessor` gives the torchvision class, whose pixels
differ by `pixel_values_max_abs_diff_vs_torchvision_processor`: one u8 level (0.0078) on the square/wide images, 7 levels
on the tall one): `size.longest_edge` {LONGEST_EDGE}, `max_image_size.longest_edge` {TILE}, `do_image_splitting` true, `resample`
1 (LANCZOS), rescale 1/255, mean = std = 0.5, `do_pad` true.

1. resize (Lanczos) so that the longest edge is 96: `w >= h`: width 96, height `int(96 / (w/h))`, +1 if odd (and the
   converse for tall images);
2. `resize_for_vision_encoder` (Lanczos): the longer side up to a multiple of 32, the other `int()` of it over the aspect
   ratio, then up to a multiple of 32;
3. split into rows x cols tiles of 32x32 (row-major) and append the global image = the step-2 image resized (Lanczos)
   to 32x32. `pixel_values` [1, total tiles, 3, 32, 32], `pixel_attention_mask` [1, total tiles, 32, 32] (all ones: no
   padding when every tile is full).

| image | size | step 1 | step 2 | rows x cols | tiles (+ global) | `<image>` tokens | prompt tokens | Pillow 13 vertical-first resizes |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(lay_rows)}

Each `<image>` in the prompt becomes, per row r and column c, `<fake_token_around_image>` `<row_r_col_c>` + 16 `<image>`,
a `\\n` after each row, then `\\n<fake_token_around_image><global-img>` + 16 `<image>` + `<fake_token_around_image>`. The
last row's `\\n` and the global image's `\\n` meet as the text `\\n\\n`, which this vocabulary tokenizes as one token
(`ĊĊ` = 499; `\\n` = `Ċ` = 222). `expansion_ids()` in the script builds exactly the processor's ids.

**Pillow 13 resize order.** Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many pixels
as the width (python-pillow/Pillow#9549); Pillow <= 12 and llama.cpp's port always run the horizontal pass first. The u8
intermediate then differs by a few levels. Here that is the tall image's first resize (40x150 -> 26x96: the height loses 54
pixels, the width 14): the transformers pixels of c_tall / d_two_images are Pillow 13's (vertical first), llama.cpp's are
horizontal first (up to 7 levels apart, `llamacpp_style_pixels_max_abs_diff_vs_hf_processor`). seer's
`resample::PassOrder` has both.

## Tokenizer and chat template

SmolVLM's tokenizer is SmolLM2's 49152-token byte-level BPE (not available offline). The stand-in is the real
**StarCoder2** BPE of llama.cpp's `models/ggml-vocab-starcoder.gguf` (49152 tokens, 48872 merges; same size and
StarCoder-style special-token layout; MIT licence, llama.cpp project), rebuilt as a `tokenizers` pipeline exactly as
bigcode's `tokenizer.json` (BPE, no normalizer, pre-tokenizer `Digits(individual_digits)` + `ByteLevel(add_prefix_space
false)`, ByteLevel decoder / post-processor) and wrapped as transformers 5's tokenizers-backed class:

* ids 0..37 are StarCoder2's special tokens, with 1 and 2 renamed `<|im_start|>` / `<|im_end|>` as in SmolLM2;
* SmolVLM's 128 added tokens at their real ids: `<global-img>` 49152, `<row_r_col_c>` 49153..49188 (r, c in 1..6; plain
  added tokens, `special` false), `<fake_token_around_image>` 49189, `<image>` 49190, `<|reserved_special_token_N|>`
  49191..49278, `<end_of_utterance>` 49279 (special);
* bos `<|im_start|>` (1; not added by the tokenizer: the template writes it), eos `<end_of_utterance>` (49279), pad
  `<|im_end|>` (2), unk `<|endoftext|>` (0);
* checked: all 47 of llama.cpp's test vectors for this vocabulary (`ggml-vocab-starcoder.gguf.inp/.out`, made with
  bigcode/starcoder2's tokenizer) give the same ids, and the pre-tokenizer hash `convert_hf_to_gguf.py` computes is
  its "starcoder" one, so the converter accepts the folder as it is.
* Caveat: SmolVLM's hub `tokenizer_config.json` says `tokenizer_class` GPT2Tokenizer. transformers 5 then rebuilds the
  pipeline from vocab and merges with GPT-2's pre-tokenizer and drops the `Digits` step of `tokenizer.json`: with that
  class 46 of the 47 vectors match (`"ied 4 ½ months"` differs: `½` is a digit to `Digits`). This folder says
  TokenizersBackend, so transformers runs `tokenizer.json` as written; a seer implementation should follow `tokenizer.json`.

Chat template (SmolVLM's, `chat_template.jinja`): `<|im_start|>` once, then per message the capitalised role, `:` if its
first part is an image else `: `, the parts in order (`<image>` for an image), `<end_of_utterance>\\n`; `Assistant:` as
generation prompt. Example (case a): {json.dumps(recs['a_square']['prompt'])}; with a system message (case e):
{json.dumps(recs['e_system']['prompt'])}. Messages in the case files use `{{"type": "image", "path": <relative to this
folder>}}` parts (for transformers the path is dropped).

## Cases (`cases/<case>.json`)

a_square: square image + question; b_wide: the 160x40 image; c_tall: the 40x150 image; d_two_images: wide and tall
images in one user message; e_system: system message + user(square image + question).

Fields: `messages`, `prompt` (chat template with add_generation_prompt), `text_input_ids` (the prompt tokenized, one
`<image>` per image), `input_ids` (after the processor's expansion), `num_image_tokens_per_image` (`<image>` tokens:
16 per tile incl. the global image), `num_prompt_tokens_per_image` (all ids of the expansion), `tiles` (per image:
size, resized, refined, rows, cols, n_tiles, ..., `llamacpp_same_grid`, `pillow13_vertical_first`),
`pixel_values_shape` + `<case>.pixels.f32` (float32 LE, C order, [1, tiles, 3, 32, 32], tiles of all images in prompt
order, each image's global image after its tiles), `<case>.pixel_mask.u8` ([1, tiles, 32, 32], 1 = pixel), `greedy_tokens`
(16 new tokens), `greedy_text` (decoded, skip_special_tokens), `greedy_token_strings`, `greedy_masked_ids` ([49279]:
EOS never chosen, as `generate(min_new_tokens=16)`), `logit_margins` / `logit_margin_min` (top1 - top2 per step, float32),
`logit_margin_min_f64`, `greedy_tokens_f64_equal`, `<case>.logits.f32` (float32 logits at the last prompt position,
49280 values, unmasked), `<case>.logits_f64.f32` (the same from the float64 run, stored as float32: the exact answer;
`logits_f32_max_abs_diff_vs_f64` says how far transformers' float32 run is from it, 2e-5 to 5e-5 for logits near 40),
`logits_first_step_top5`, `mirrored_images_*`.

Greedy: hand-written loop with the KV cache, checked equal to `generate(min_new_tokens=16, max_new_tokens=16,
do_sample=False)`. Every case was also run in float64: greedy tokens equal in all cases, all margins > {MIN_MARGIN}.

| case | n input ids | grids | `<image>` tokens per image | greedy tokens | min margin | f32 == f64 | greedy text |
|---|---|---|---|---|---|---|---|
{chr(10).join(case_rows)}

## GGUF (`gguf/`)

* Text model: `python convert_hf_to_gguf.py {MODEL} --outtype f16 --outfile gguf/tiny-smolvlm-F16.gguf`, run on the folder
  as it is (no vocabulary substitution: the tokenizer is recognised, `tokenizer.ggml.pre` = {txkv['tokenizer.ggml.pre']!r};
  bos {txkv['tokenizer.ggml.bos_token_id']}, eos {txkv['tokenizer.ggml.eos_token_id']}, pad {txkv['tokenizer.ggml.padding_token_id']},
  `add_bos_token` {txkv['tokenizer.ggml.add_bos_token']}; the chat template from `chat_template.jinja`). The converter picks the
  text class from `text_config.architectures`: without it (`Idefics3ForConditionalGeneration` only) it stops with "Model
  Idefics3ForConditionalGeneration is not supported"; SmolVLM's hub config has `VLlama3ForCausalLM` there, and so does
  this folder (passed to `LlamaConfig`, so `save_pretrained` writes it). Llama Q/K rows permuted for llama.cpp's rope as
  usual. Then `llama-quantize ... Q8_0` (rows of 32 and 96: k-quants would need multiples of 256). Note: run the converter
  without `NO_LOCAL_GGUF`, so that it uses its own `gguf-py` (the venv's `gguf` package is older and fails).
* mmproj: `convert_hf_to_gguf.py {MODEL} --mmproj --outtype f16`: projector type {mmkv['clip.projector_type']!r}, image_size
  {mmkv['clip.vision.image_size']}, patch {mmkv['clip.vision.patch_size']}, `preproc_image_size` {mmkv['clip.vision.preproc_image_size']} (read from
  `processor_config.json`'s nested `size.longest_edge`), scale_factor {mmkv['clip.vision.projector.scale_factor']}, {mmkv['clip.vision.block_count']} blocks,
  the connector as `mm.model.fc.weight`; 2-D weights F16, norms / biases / patch and position embeddings F32.

## llama.cpp references (`gguf/llamacpp-<quant>-<case>.json`)

`llama-mtmd-cli -m gguf/<model> --mmproj gguf/mmproj-tiny-smolvlm-F16.gguf --image <img> [--image <img>] [-sys <system
text>] -p <user text> -n 16 --temp 0 --ignore-eos -c 2048 -t 2 --seed 0 --jinja -v`, run in this folder, all five cases,
F16 and Q8_0.

* Prompt (`formatted_prompt`, from the `-v` log): the GGUF's template through llama.cpp's jinja engine, with one user
  message whose text is one `<__media__>` marker per image followed by the text. Its first part is therefore text, so the
  template writes `User: ` (with a space) where transformers, whose first part is the image, writes `User:`:
  {json.dumps(a['formatted_prompt'] if a else None)}.
  With `-sys` the system message is formatted and evaluated first, then the user message as the difference of the two
  renderings, and llama.cpp's `common_chat_format_single` adds a `\\n` because the earlier rendering ends with one:
  {json.dumps(e['formatted_prompt'] if e else None)} (`<end_of_utterance>\\n\\nUser: `).
* `prompt_token_ids`: no BOS (`add_bos_token` false), each text segment tokenized on its own with llama-tokenize, each image
  laid out by mtmd as transformers does (`MTMD_SLICE_TMPL_IDEFICS3` in tools/mtmd/mtmd.cpp: per tile
  `<fake_token_around_image><row_r_col_c>` + embeddings, `\\n` between rows, then the tokens `\\n\\n`,
  `<fake_token_around_image>`, `<global-img>`, the overview's embeddings, `<fake_token_around_image>`); the logged prompt
  token count matches in every run. They differ from transformers' `input_ids` only by the space token after `User:` (and
  the extra `\\n` with a system message).
* Image preprocessing (`mtmd_image_preprocessor_idefics3`, tools/mtmd/mtmd-image.cpp; mmproj keys above; Lanczos): the same
  steps as transformers. Step 1 is the same formula; step 2 is `ceil(step-1 size / 32)` tiles per side, which equals
  transformers' `resize_for_vision_encoder` whenever the longer side after step 1 is already a multiple of 32 (always
  here, since size.longest_edge 96 = 3 x 32; transformers recomputes the shorter side as `int(longer / aspect)` of the
  rounded longer side, so with a longest edge that is not a multiple of the tile the grids can differ); the overview is the
  step-2 image resized to 32x32, placed after the tiles, as in transformers. (Not reached here: when the step-2 image is
  not larger than one tile, transformers sends only the global image, without row/column tokens, while llama.cpp still
  makes a 1x1 grid + overview; and llama.cpp has no equivalent of `do_image_splitting` false.) Resizes are llama.cpp's port of Pillow's
  fixed-point resampling, horizontal pass first (see "Pillow 13 resize order"). Decoding is stb_image (PNG: exact).
  `llamacpp_tiles()` in the script emulates this with single-axis PIL resizes; its pixels equal transformers' exactly for
  the square and wide images, and the vision tower's output in llama.cpp (dumped with `MTMD_DEBUG_EMBEDDINGS`, F32 mmproj)
  matched transformers' on those pixels to ~2e-3 (ggml's table-based gelu) while checking this.
* `--ignore-eos` masks all of llama.cpp's end-of-generation ids, here {eog} (`<|endoftext|>`, `<|im_end|>`, `<fim_pad>` by
  its name, `<end_of_utterance>`): `eog_ids_masked`; the transformers runs on llama.cpp's prompt mask the same ids.
* `generated_text`: stdout without the newline llama-mtmd-cli prints after evaluating each message (one; two with `-sys`)
  and the two after the text; `generated_bytes_hex` holds the exact bytes (a token can be part of a UTF-8 character);
  comparisons are on bytes. `retokenized_ids` is a re-tokenization, not the sampled ids.
* `hf_same_prompt_*`: transformers (`{MODEL}` in float32) on `prompt_token_ids` with `llamacpp_tiles()` pixels, greedy,
  text = pieces as llama.cpp prints them. Where llama.cpp leaves it, `hf_same_prompt_follow_llamacpp_*` walks llama.cpp's
  text with transformers' logits (top-1 where it continues the text, else the best of the top 20; deviations = [step, rank
  (0 = top-1), id, piece, logit gap]); `sampled_ids_inferred` = the tokens whose text is llama.cpp's.

**F16: llama.cpp prints exactly transformers' greedy text on the same prompt ids and pixels in {n_f16} of 5 cases.** Q8_0
(text weights and, in the matrix products, activations quantized to 8 bits) in {n_q8} of 5{q8_devs}. The columns: tokens of transformers' greedy output that llama.cpp printed
too; llama.cpp's prompt length (transformers' own `input_ids` length); max |pixel difference| between llama.cpp's tiles and
transformers' processor.

| quant | case | llama.cpp text | = HF same prompt | HF tokens agreeing | where llama.cpp took another token | prompt ids (HF) | pixels vs HF processor |
|---|---|---|---|---|---|---|---|
{chr(10).join(cpp_rows)}

{f32_text}

So for a seer GGUF path: the transformers cases are the reference for transformers semantics; the llama.cpp files are the
reference for llama.cpp's prompt (`User: `, the extra `\\n` after a system message) and for its horizontal-first resize.
"""
    (FIX / "README.md").write_text(text, encoding="utf-8")
    log(f"README written ({total:,} bytes of fixtures)")


# ============================================================================= main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="images,hf,cases,gguf,llamacpp,llamacpp-f32,readme")
    a = ap.parse_args()
    steps = a.steps.split(",")
    torch.set_num_threads(2)
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
    if "llamacpp-f32" in steps:
        print(json.dumps(make_llamacpp_f32(), indent=1, ensure_ascii=False))
    if "readme" in steps:
        make_readme()


if __name__ == "__main__":
    main()
