#!/usr/bin/env python3
"""Reference fixtures for seer's LLaVA-1.5 implementation (tests/fixtures/llava/).

What it builds (all deterministic; re-running rewrites the same files):
  images/                 three small test images drawn here (square PNG, wide JPEG, tall PNG)
  tiny-llava-hub/         a tiny random LLaVA-1.5 in the hub's 2024 layout (float16, 2 shards,
                          language_model.model.* names, preprocessor_config.json, chat_template.json)
  tiny-llava-new/         the same model as transformers 5 `save_pretrained` writes it (bfloat16,
                          model.language_model.* names, processor_config.json, chat_template.jinja)
  cases/<folder>/<case>.json (+ .pixels.f32, .logits.f32)
                          transformers reference per folder: prompt, input_ids, 16 greedy tokens,
                          first-step logits; computed by loading THAT folder back in float32
  gguf/                   the same model converted with llama.cpp's tools (text F16 + Q8_0,
                          legacy LLaVA mmproj F16) and llama-mtmd-cli greedy outputs; text-only
                          llama-completion outputs (llamacpp-text-*); llamacpp-fixes.patch (CLS order and
                          layer count of llama.cpp's LLaVA vision graph) and the greedy outputs of a
                          llama-mtmd-cli built with it (llamacpp-fixed-*)
  README.md               what is there and how it was made

The tokenizer is the real Llama-2 SentencePiece vocabulary from llama.cpp's
models/ggml-vocab-llama-spm.gguf (MIT), with <image>=32000 and <pad>=32001 added as on
llava-hf/llava-1.5-7b-hf.

How to run (needs the benchmark tree of /work/shared/bench/setup.sh: a venv with torch,
torchvision, transformers 5.23, safetensors, gguf, pillow, numpy, sentencepiece; the llama.cpp
sdist source and its tools built in $BENCH_DIR/build/bin):

    ~/.cache/seer-bench/venv/bin/python scripts/make_llava_fixtures.py            # everything
    ~/.cache/seer-bench/venv/bin/python scripts/make_llava_fixtures.py --steps cases   # only some steps

Steps: images, hf (tokenizer + both checkpoint folders), cases (transformers references),
gguf (conversion + quantization), llamacpp (llama-mtmd-cli references), llamacpp-text (text-only
references from llama-completion, built in $BENCH_DIR/build if missing), llamacpp-fixed (copies the
llama.cpp source to $BENCH_DIR/src-fixed/llama.cpp, applies gguf/llamacpp-fixes.patch, builds
llama-mtmd-cli in $BENCH_DIR/build-fixed, runs it), readme (README.md).
Environment: BENCH_DIR (default ~/.cache/seer-bench), SEER_SHARED_BENCH (default
/work/shared/bench: convert_with_vocab.py, legacy_llava_mmproj.py, bench_paths.py), JOBS (build
parallelism, default 2).
Runs on CPU with 2 threads; takes about a minute, plus about 15 minutes on 2 cores the first time
llamacpp-fixed builds its llama-mtmd-cli.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures" / "llava"
BENCH_DIR = Path(os.path.expanduser(os.environ.get("BENCH_DIR") or "~/.cache/seer-bench"))
SHARED_BENCH = Path(os.environ.get("SEER_SHARED_BENCH") or "/work/shared/bench")
BIN = BENCH_DIR / "build" / "bin"


def llama_cpp_dir() -> Path:
    if os.environ.get("LLAMA_CPP_DIR"):
        return Path(os.environ["LLAMA_CPP_DIR"])
    hits = sorted(glob.glob(str(BENCH_DIR / "src" / "llama_cpp_python-*" / "vendor" / "llama.cpp")))
    if not hits:
        sys.exit("llama.cpp source not found under $BENCH_DIR/src (run /work/shared/bench/setup.sh)")
    return Path(hits[-1])


LLAMA_CPP = llama_cpp_dir()
LLAMA_CPP_COMMIT = "0c1e57098"  # the llama.cpp vendored in llama-cpp-python 0.3.36
VOCAB_GGUF = LLAMA_CPP / "models" / "ggml-vocab-llama-spm.gguf"

HUB = "tiny-llava-hub"
NEW = "tiny-llava-new"
N_NEW_TOKENS = 16
MIN_MARGIN = 2e-2  # every greedy step must have a top1-top2 gap above this (f32 and f64)
SEED = 2  # chosen (among 1..6) for the largest smallest greedy margin over all cases and both folders

# ----------------------------------------------------------------------------- model config
IMAGE_TOKEN, IMAGE_ID = "<image>", 32000
PAD_TOKEN, PAD_ID = "<pad>", 32001
EOS_ID = 2
VOCAB_SIZE = 32064  # as llava-hf/llava-1.5-7b-hf: 32000 + <image> + <pad>, padded to a multiple of 64
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
              image_size=56, patch_size=14, num_channels=3, hidden_act="quick_gelu",
              layer_norm_eps=1e-5, projection_dim=32, attention_dropout=0.0)
TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu",
            rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512,
            attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID)
LLAVA = dict(image_token_index=IMAGE_ID, vision_feature_layer=-2,
             vision_feature_select_strategy="default", projector_hidden_act="gelu",
             tie_word_embeddings=False, image_seq_length=16, pad_token_id=PAD_ID)

# llava-hf/llava-1.5-7b-hf's chat template (chat_template.json on the hub; same text in
# transformers' tests/models/llava/test_processing_llava.py).  Images of a message first, one
# "<image>\n" each, then its text parts each followed by a space; system text has no prefix.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

# ----------------------------------------------------------------------------- cases
IMAGES = {"square": "images/square-64x64.png", "wide": "images/wide-120x72.jpg", "tall": "images/tall-40x90.png"}


def txt(t):
    return {"type": "text", "text": t}


def img(key):
    return {"type": "image", "path": IMAGES[key]}


CASES = {
    "a_square": [{"role": "user", "content": [img("square"), txt("What is in this image?")]}],
    "b_wide": [{"role": "user", "content": [img("wide"), txt("Describe the colours you can see.")]}],
    "c_two_images": [{"role": "user", "content": [img("square"), img("tall"),
                                                  txt("How are these two pictures different?")]}],
    "d_multi_turn": [
        {"role": "user", "content": [img("tall"), txt("What shape is at the top?")]},
        {"role": "assistant", "content": [txt("A yellow circle.")]},
        {"role": "user", "content": [txt("And what is below it?")]},
    ],
    "e_system": [
        {"role": "system", "content": [txt("You are a careful assistant that answers briefly.")]},
        {"role": "user", "content": [img("wide"), txt("Is there any text in the picture?")]},
    ],
}
LLAMACPP_CASES = ["a_square", "b_wide", "c_two_images"]


def log(*a):
    print("[fixtures]", *a, flush=True)


def dump_json(path: Path, obj, indent=2, sort_keys=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False, sort_keys=sort_keys)
        f.write("\n")


def run(cmd, env=None, capture=False):
    log("RUN", " ".join(str(c) for c in cmd))
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([str(c) for c in cmd], check=True, env=e, text=True,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)


# ============================================================================= images
def make_images():
    rng = np.random.default_rng(7)
    (FIX / "images").mkdir(parents=True, exist_ok=True)

    # square 64x64 PNG: diagonal colour gradient, a red disc, a dark square, light noise
    h = w = 64
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([x * 4, y * 4, 255 - (x + y) * 2], -1)
    a += rng.normal(0, 6, a.shape)
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse([8, 10, 36, 38], fill=(220, 30, 40))
    d.rectangle([40, 36, 58, 56], fill=(20, 20, 60))
    im.save(FIX / IMAGES["square"], optimize=False)

    # wide 120x72 JPEG: horizontal rainbow-ish stripes, a white bar with dark "text" marks, noise
    h, w = 72, 120
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([127 + 120 * np.sin(x / 9.0), 127 + 120 * np.sin(x / 13.0 + 2), 60 + y * 2.5], -1)
    a += rng.normal(0, 10, a.shape)
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.rectangle([10, 46, 110, 64], fill=(245, 245, 240))
    for i in range(8):
        d.rectangle([16 + i * 12, 50, 22 + i * 12, 60], fill=(10, 10, 10))
    d.polygon([(60, 4), (80, 40), (40, 40)], fill=(30, 160, 60))
    im.save(FIX / IMAGES["wide"], quality=90, subsampling=0, optimize=False)

    # tall 40x90 PNG: vertical gradient, a yellow circle at the top, a blue rectangle below, noise
    h, w = 90, 40
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([40 + y * 2, 200 - y * 1.5, 120 + x * 2], -1)
    a += rng.normal(0, 8, a.shape)
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse([8, 6, 32, 30], fill=(250, 220, 20))
    d.rectangle([6, 44, 34, 80], fill=(30, 60, 200))
    im.save(FIX / IMAGES["tall"], optimize=False)
    log("images written")


# ============================================================================= tokenizer
def build_tokenizer():
    """Llama-2 SPM vocab from llama.cpp's vocab GGUF -> transformers 5 LlamaTokenizer (+ <image>, <pad>)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, LlamaTokenizer

    with tempfile.TemporaryDirectory() as td:
        shutil.copy(VOCAB_GGUF, Path(td) / VOCAB_GGUF.name)
        g = AutoTokenizer.from_pretrained(td, gguf_file=VOCAB_GGUF.name)
    model = json.loads(g.backend_tokenizer.to_str())["model"]
    assert model["type"] == "BPE" and len(model["vocab"]) == 32000, model["type"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = LlamaTokenizer(vocab=model["vocab"], merges=merges, legacy=False, add_bos_token=True,
                         add_eos_token=False, padding_side="left", model_max_length=4096)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False),
                    AddedToken(PAD_TOKEN, special=True, normalized=False)], special_tokens=True)
    tok.pad_token = PAD_TOKEN
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_ID and tok.pad_token_id == PAD_ID
    check_tokenizer_against_llama_cpp(tok)
    return tok


def check_tokenizer_against_llama_cpp(tok):
    """llama.cpp's test vectors for this vocab (from the Llama-2 HF tokenizer / sentencepiece).
    HF's Metaspace pre-tokenizer does not add the dummy prefix to text that already starts with a
    space (sentencepiece does), so those inputs are expected to differ; all others must match."""
    raw = open(str(VOCAB_GGUF) + ".inp", encoding="utf-8").read().split("\n__ggml_vocab_test__\n")
    out = open(str(VOCAB_GGUF) + ".out", encoding="utf-8").read().split("\n")
    n_ok = n_space = 0
    for s, o in zip(raw, out):
        exp = [int(t) for t in o.split()]
        got = tok.encode(s, add_special_tokens=False)
        if got == exp:
            n_ok += 1
        elif s.startswith(" "):
            n_space += 1
        else:
            raise AssertionError(f"tokenizer differs from llama.cpp test vector {s!r}: {got} vs {exp}")
    log(f"tokenizer: {n_ok} llama.cpp test vectors match, {n_space} differ only by the leading-space rule")
    return n_ok, n_space


# ============================================================================= model
def new_random_model():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**TEXT), **LLAVA)
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(SEED)
    norm_types = (torch.nn.LayerNorm,)
    norm_names = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, norm_types) or "RMSNorm" in type(mod).__name__:
            norm_names.add(mname)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            mod = name.rsplit(".", 1)[0]
            leaf = name.rsplit(".", 1)[1]
            if mod in norm_names:
                if leaf == "weight":  # norm scales near 1
                    v = 1.0 + (torch.rand(p.shape, generator=g) * 0.4 - 0.2)
                else:
                    v = torch.randn(p.shape, generator=g) * 0.05
            elif leaf == "bias":
                v = torch.randn(p.shape, generator=g) * 0.05
            elif "embed_tokens" in name:
                v = torch.randn(p.shape, generator=g) * 0.5
            elif "position_embedding" in name or "class_embedding" in name:
                v = torch.randn(p.shape, generator=g) * 0.3
            elif name.endswith("lm_head.weight"):  # wide logits: clear greedy margins
                v = torch.randn(p.shape, generator=g) * 0.8
            else:  # linear / conv weights: gain 1.6 / sqrt(fan_in)  (std 0.1 .. 0.3 here)
                fan_in = int(np.prod(p.shape[1:]))
                v = torch.randn(p.shape, generator=g) * (1.6 / fan_in ** 0.5)
            p.copy_(v.to(p.dtype))
    return model


def hub_name(n: str) -> str:
    """transformers-5 parameter name -> llava-hf 2024 checkpoint name."""
    for a, b in (("model.language_model.", "language_model.model."),
                 ("model.vision_tower.", "vision_tower.vision_model."),
                 ("model.multi_modal_projector.", "multi_modal_projector."),
                 ("lm_head.", "language_model.lm_head.")):
        if n.startswith(a):
            return b + n[len(a):]
    raise KeyError(n)


def hub_config():
    """config.json in the layout of llava-hf/llava-1.5-7b-hf (2024): rope_theta at the top of
    text_config, torch_dtype, no rope_parameters; sizes explicit since they differ from the defaults."""
    text = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float16",
            "hidden_act": "silu", "rope_scaling": None, **{k: v for k, v in TEXT.items()}}
    vision = {"model_type": "clip_vision_model", **VISION}
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "ignore_index": -100,
            "image_seq_length": 16, "image_token_index": IMAGE_ID, "pad_token_id": PAD_ID,
            "projector_hidden_act": "gelu", "text_config": text, "tie_word_embeddings": False,
            "torch_dtype": "float16", "transformers_version": "4.46.0", "vision_config": vision,
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": VOCAB_SIZE}


def added_token(content):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def write_hub_folder(model, tok, out: Path):
    from safetensors.torch import save_file
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    sd = {hub_name(k): v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    names = sorted(sd)
    # 2 shards: the language model's embedding + layers in the first, the rest in the second
    first = [n for n in names if n.startswith("language_model.model.")]
    second = [n for n in names if n not in first]
    files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    weight_map, total = {}, 0
    for fname, keys in files.items():
        save_file({k: sd[k] for k in keys}, str(out / fname), metadata={"format": "pt"})
        for k in keys:
            weight_map[k] = fname
            total += sd[k].numel() * sd[k].element_size()
    dump_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                     "weight_map": dict(sorted(weight_map.items()))})
    dump_json(out / "config.json", hub_config(), sort_keys=True)
    dump_json(out / "generation_config.json", {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                                               "pad_token_id": PAD_ID, "transformers_version": "4.46.0"})
    dump_json(out / "preprocessor_config.json", {
        "crop_size": {"height": 56, "width": 56}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "processor_class": "LlavaProcessor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 56}})
    dump_json(out / "processor_config.json", {
        "image_token": IMAGE_TOKEN, "num_additional_image_tokens": 1, "patch_size": 14,
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"})
    dump_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    # tokenizer: tokenizer.json as transformers 5 writes it (so that its pipeline is exactly what
    # transformers 5 runs), tokenizer_config.json / special_tokens_map.json in the 2024 layout
    with tempfile.TemporaryDirectory() as td:
        tok.save_pretrained(td)
        shutil.copy(Path(td) / "tokenizer.json", out / "tokenizer.json")
    dump_json(out / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(i): added_token(t) for i, t in
                                 [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (IMAGE_ID, IMAGE_TOKEN), (PAD_ID, PAD_TOKEN)]},
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False,
        "model_max_length": 1000000000000000019884624838656, "pad_token": PAD_TOKEN, "padding_side": "left",
        "processor_class": "LlavaProcessor", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False, "unk_token": "<unk>", "use_default_system_prompt": False})
    st = {k: {kk: vv for kk, vv in added_token(v).items() if kk != "special"}
          for k, v in (("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", PAD_TOKEN), ("unk_token", "<unk>"))}
    dump_json(out / "special_tokens_map.json", st)
    fix_modes(out)
    log(f"wrote {out}")


def fix_modes(folder: Path):
    for f in folder.iterdir():  # safetensors writes 0600 files
        os.chmod(f, 0o644)


def write_new_folder(model, tok, out: Path):
    from transformers import CLIPImageProcessorPil, LlavaProcessor
    if out.exists():
        shutil.rmtree(out)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                               image_mean=CLIP_MEAN, image_std=CLIP_STD)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    m16 = model.to(torch.bfloat16)
    m16.save_pretrained(out)
    model.to(torch.float32)
    proc.save_pretrained(out)
    fix_modes(out)
    log(f"wrote {out}: {sorted(os.listdir(out))}")


def make_hf():
    torch.set_num_threads(2)
    tok = build_tokenizer()
    model = new_random_model()
    write_hub_folder(model, tok, FIX / HUB)
    write_new_folder(model, tok, FIX / NEW)


# ============================================================================= transformers references
def load_processor(folder: Path):
    """The folder's processor with its image processor forced to the PIL class (CLIPImageProcessorPil)."""
    from transformers import AutoProcessor, CLIPImageProcessorPil
    proc = AutoProcessor.from_pretrained(folder)
    pil = CLIPImageProcessorPil.from_pretrained(folder)
    fast = proc.image_processor
    proc.image_processor = pil
    assert proc.patch_size == 14 and proc.vision_feature_select_strategy == "default", proc
    assert proc.num_additional_image_tokens == 1
    return proc, fast


def hf_messages(messages):
    return [{"role": m["role"], "content": [{"type": "image"} if c["type"] == "image" else dict(c)
                                            for c in m["content"]]} for m in messages]


def greedy(model, inputs, n, dtype):
    """Greedy decoding with the KV cache, ignoring EOS.  Returns tokens, per-step margins, first logits."""
    kw = dict(attention_mask=inputs["attention_mask"], use_cache=True)
    if inputs.get("inputs_embeds") is not None:
        kw["inputs_embeds"] = inputs["inputs_embeds"].to(dtype)
    else:
        kw["input_ids"] = inputs["input_ids"]
    if inputs.get("pixel_values") is not None:
        kw["pixel_values"] = inputs["pixel_values"].to(dtype)
    toks, margins, first = [], [], None
    with torch.no_grad():
        out = model(**kw)
        past, mask = out.past_key_values, inputs["attention_mask"]
        logits = out.logits[0, -1]
        for step in range(n):
            if step == 0:
                first = logits.detach().clone()
            logits = logits.clone()
            logits[EOS_ID] = -float("inf")  # EOS never chosen (as generate(min_new_tokens) / --ignore-eos)
            top2 = torch.topk(logits, 2)
            margins.append(float(top2.values[0] - top2.values[1]))
            t = int(top2.indices[0])
            toks.append(t)
            if step == n - 1:
                break
            mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype)], dim=1)
            out = model(input_ids=torch.tensor([[t]]), attention_mask=mask, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1]
    return toks, margins, first


def make_cases():
    from transformers import LlavaForConditionalGeneration
    torch.set_num_threads(2)
    summary = {}
    for folder in (HUB, NEW):
        fdir = FIX / folder
        proc, fast = load_processor(fdir)
        m32, info = LlavaForConditionalGeneration.from_pretrained(fdir, dtype=torch.float32, output_loading_info=True)
        problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
        assert not any(problems.values()), problems
        m32.eval()
        m64 = LlavaForConditionalGeneration.from_pretrained(fdir, dtype=torch.float64).eval()
        cfg = json.load(open(fdir / "config.json"))
        stored = cfg.get("dtype") or cfg.get("torch_dtype")
        outdir = FIX / "cases" / folder
        if outdir.exists():
            shutil.rmtree(outdir)
        outdir.mkdir(parents=True)
        for case, messages in CASES.items():
            images = [Image.open(FIX / c["path"]) for m in messages for c in m["content"] if c["type"] == "image"]
            prompt = proc.apply_chat_template(hf_messages(messages), add_generation_prompt=True)
            inputs = proc(images=images, text=prompt, return_tensors="pt")
            ids = inputs["input_ids"][0].tolist()
            text_ids = proc.tokenizer(prompt).input_ids
            assert ids.count(IMAGE_ID) == 16 * len(images)
            fast_px = fast(images=images, return_tensors="pt")["pixel_values"]
            px = inputs["pixel_values"]
            t32, mg32, first = greedy(m32, inputs, N_NEW_TOKENS, torch.float32)
            t64, mg64, first64 = greedy(m64, inputs, N_NEW_TOKENS, torch.float64)
            # cross-check the hand-written loop against generate()
            with torch.no_grad():
                gen = m32.generate(**inputs, max_new_tokens=N_NEW_TOKENS, min_new_tokens=N_NEW_TOKENS,
                                   do_sample=False, num_beams=1)
            assert gen[0, len(ids):].tolist() == t32, (case, gen[0, len(ids):].tolist(), t32)
            assert t32 == t64, f"{folder}/{case}: f32 greedy {t32} != f64 greedy {t64}"
            assert min(mg32) > MIN_MARGIN and min(mg64) > MIN_MARGIN, (case, min(mg32), min(mg64))
            first_np = first.float().numpy().astype("<f4")
            px_np = px.float().numpy().astype("<f4")
            (outdir / f"{case}.logits.f32").write_bytes(np.ascontiguousarray(first_np).tobytes())
            # The float64 run's logits (rounded to f32, far below the 1e-4 tolerance): the exact
            # answer that both transformers' f32 and seer's f32 approximate. With logits near 26,
            # f32 rounding alone moves transformers' own result up to ~8e-5 from it.
            first64_np = first64.numpy().astype("<f4")
            (outdir / f"{case}.logits_f64.f32").write_bytes(np.ascontiguousarray(first64_np).tobytes())
            (outdir / f"{case}.pixels.f32").write_bytes(np.ascontiguousarray(px_np).tobytes())
            top5 = torch.topk(first, 5)
            rec = {
                "folder": f"{folder}", "case": case, "stored_weight_dtype": stored,
                "reference": "transformers 5.23 LlavaForConditionalGeneration.from_pretrained(folder, dtype=float32), "
                             "CPU; processor = AutoProcessor.from_pretrained(folder) with the image processor "
                             "replaced by CLIPImageProcessorPil.from_pretrained(folder)",
                "messages": messages,
                "prompt": prompt,
                "text_input_ids": text_ids,
                "input_ids": ids,
                "num_image_tokens_per_image": 16,
                "image_sizes": [list(im.size) for im in images],
                "pixel_values_file": f"{case}.pixels.f32",
                "pixel_values_shape": list(px_np.shape),
                "pixel_values_dtype": "float32 little-endian, C order",
                "pixel_values_max_abs_diff_vs_torchvision_processor": float((fast_px.float() - px.float()).abs().max()),
                "greedy_tokens": t32,
                "greedy_text": proc.tokenizer.decode(t32, skip_special_tokens=True),
                "greedy_token_strings": proc.tokenizer.convert_ids_to_tokens(t32),
                "greedy_tokens_f64_equal": t32 == t64,
                "logit_margin_min": min(mg32),
                "logit_margins": mg32,
                "logit_margin_min_f64": min(mg64),
                "logits_file": f"{case}.logits.f32",
                "logits_shape": [int(first_np.shape[0])],
                "logits_dtype": "float32 little-endian; logits at the last prompt position (first generated token)",
                "logits_f64_file": f"{case}.logits_f64.f32",
                "logits_f64_note": "the same logits computed in float64, stored rounded to float32",
                "logits_f32_max_abs_diff_vs_f64": float((first.double() - first64).abs().max()),
                "logits_first_step_top5": [[int(i), float(v)] for v, i in zip(top5.values, top5.indices)],
            }
            dump_json(outdir / f"{case}.json", rec)
            summary[f"{folder}/{case}"] = {"greedy_tokens": t32, "margin_min": round(min(mg32), 5),
                                          "margin_min_f64": round(min(mg64), 5), "f32_eq_f64": t32 == t64,
                                          "n_input_ids": len(ids)}
            log(f"{folder}/{case}: {len(ids)} ids, tokens {t32}, margin {min(mg32):.4f}")
    dump_json(FIX / "cases" / "summary.json", summary)
    return summary


# ============================================================================= GGUF
GGUF_DIR = FIX / "gguf"
F16 = GGUF_DIR / "tiny-llava-F16.gguf"
Q8 = GGUF_DIR / "tiny-llava-Q8_0.gguf"
MMPROJ = GGUF_DIR / "mmproj-tiny-llava-F16.gguf"


def build_vocab_gguf(path: Path):
    """tokenizer.* keys as convert_hf_to_gguf.py's sentencepiece path writes them for llava-hf/llava-1.5-7b-hf
    (tokenizer.model + added tokens + vocab_size 32064): the 32000 Llama-2 pieces of ggml-vocab-llama-spm.gguf,
    <image> and <pad> as CONTROL (score -1000), [PAD32002]..[PAD32063] as UNUSED (score -10000), special ids
    and add_bos/add_eos from tokenizer_config.json, the chat template from chat_template.json."""
    sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))
    import gguf
    r = gguf.GGUFReader(str(VOCAB_GGUF))
    tokens = list(r.fields["tokenizer.ggml.tokens"].contents())
    scores = list(r.fields["tokenizer.ggml.scores"].contents())
    types = list(r.fields["tokenizer.ggml.token_type"].contents())
    assert len(tokens) == 32000
    T = gguf.TokenType
    for i in range(32000, VOCAB_SIZE):
        if i == IMAGE_ID:
            tokens.append(IMAGE_TOKEN); scores.append(-1000.0); types.append(int(T.CONTROL))
        elif i == PAD_ID:
            tokens.append(PAD_TOKEN); scores.append(-1000.0); types.append(int(T.CONTROL))
        else:
            tokens.append(f"[PAD{i}]"); scores.append(-10000.0); types.append(int(T.UNUSED))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(PAD_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def extract_for_legacy_mmproj(hub: Path, work: Path):
    """What llava_surgery does for a LLaVA checkpoint: the CLIP vision tower as its own CLIPVisionModel
    folder, and the projector as a torch file `llava.projector` with `model.mm_projector.{0,2}.*` names."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    idx = json.load(open(hub / "model.safetensors.index.json"))["weight_map"]
    tensors = {}
    for fname in sorted(set(idx.values())):
        with safe_open(str(hub / fname), "pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    clip = work / "clip-vision"
    clip.mkdir(parents=True)
    vt = {"vision_model." + k[len("vision_tower.vision_model."):]: v.contiguous() for k, v in tensors.items()
          if k.startswith("vision_tower.vision_model.")}
    save_file(vt, str(clip / "model.safetensors"), metadata={"format": "pt"})
    vcfg = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "torch_dtype": "float16",
            "_name_or_path": "tiny-llava-clip-vision", **VISION}
    dump_json(clip / "config.json", vcfg)
    proj = {"model.mm_projector.0.weight": tensors["multi_modal_projector.linear_1.weight"].clone(),
            "model.mm_projector.0.bias": tensors["multi_modal_projector.linear_1.bias"].clone(),
            "model.mm_projector.2.weight": tensors["multi_modal_projector.linear_2.weight"].clone(),
            "model.mm_projector.2.bias": tensors["multi_modal_projector.linear_2.bias"].clone()}
    torch.save(proj, work / "llava.projector")
    return clip, work / "llava.projector"


def make_gguf():
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = {"LLAMA_CPP_DIR": str(LLAMA_CPP), "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory(prefix="seer-llava-") as td:
        td = Path(td)
        vocab = td / "llava-vocab.gguf"
        build_vocab_gguf(vocab)
        run([py, SHARED_BENCH / "convert_with_vocab.py", FIX / HUB, "--outtype", "f16", "--outfile", F16],
            env={**env, "VOCAB_GGUF": str(vocab)})
        clip, proj = extract_for_legacy_mmproj(FIX / HUB, td)
        out = td / "mmproj"
        run([py, SHARED_BENCH / "legacy_llava_mmproj.py", "-m", clip, "--llava-projector", proj,
             "--output-dir", out, "--clip-model-is-vision"], env=env)
        shutil.move(str(out / "mmproj-model-f16.gguf"), MMPROJ)
    run([BIN / "llama-quantize", F16, Q8, "Q8_0", "2"])


# ============================================================================= llama.cpp references
MEDIA = "<__media__>"  # mtmd_default_marker()
MODES = {
    # the GGUF's own template (llava-hf's jinja) through llama.cpp's jinja engine, as llama-server does
    "jinja": ["--jinja"],
    # the built-in vicuna format that llama.cpp's docs/multimodal/llava.md prescribes for LLaVA-1.5
    "vicuna": ["--chat-template", "vicuna"],
}


def case_prompt_text(messages):
    """The user's text of a single-turn case, as given to llama-mtmd-cli -p."""
    assert len(messages) == 1 and messages[0]["role"] == "user"
    return " ".join(c["text"] for c in messages[0]["content"] if c["type"] == "text")


def llama_tokenize(model, text, bos=False):
    if text == "":
        return []
    cmd = [str(BIN / "llama-tokenize"), "-m", str(model), "--stdin", "--no-escape", "--ids", "--log-disable"]
    if not bos:
        cmd.append("--no-bos")
    p = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, check=True)
    line = [ln for ln in p.stdout.decode("utf-8").splitlines() if ln.startswith("[")]
    return json.loads(line[-1])


def llamacpp_style_pixels(path):
    """HF-side emulation of llama.cpp's LLaVA-1.5 preprocessing (mtmd_image_preprocessor_fixed_size with
    PAD_CEIL): fit inside 56x56 keeping the aspect ratio (ceil), Pillow-style bicubic, paste centred on a
    canvas of (122,116,104), then (x/255 - mean)/std.  An emulation: llama.cpp's resize is its own code."""
    im = Image.open(FIX / path).convert("RGB")
    w, h = im.size
    sz = np.float32(56)
    scale = min(sz / np.float32(w), sz / np.float32(h))
    nw = min(int(np.ceil(np.float32(w) * scale)), 56)
    nh = min(int(np.ceil(np.float32(h) * scale)), 56)
    canvas = Image.new("RGB", (56, 56), (122, 116, 104))
    canvas.paste(im.resize((nw, nh), Image.BICUBIC) if (nw, nh) != (w, h) else im, ((56 - nw) // 2, (56 - nh) // 2))
    a = np.asarray(canvas, dtype=np.float32) / np.float32(255.0)
    a = (a - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def llamacpp_piece_text(tok, ids):
    """What llama-mtmd-cli prints for these ids: the pieces concatenated, '▁' -> ' ', <0xNN> -> byte."""
    out = b""
    for t in tok.convert_ids_to_tokens(ids):
        if t is None:  # rows 32002..32063 ([PADnnnnn], UNUSED in the GGUF): llama.cpp prints nothing
            continue
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            out += bytes([int(t[3:5], 16)])
        else:
            out += t.replace("\u2581", " ").encode("utf-8")
    return out.decode("utf-8", errors="replace")


def llamacpp_image_features(model, px, fixed=False):
    """transformers modules wired the way llama.cpp 0c1e57098 computes a legacy LLaVA-1.5 mmproj
    (tools/mtmd/models/llava.cpp + clip.cpp), to explain its outputs.  Two known upstream defects
    (ggml-org/llama.cpp#25814 and #25817, both closed unfixed) make it differ from transformers:
      * the class embedding is concatenated AFTER the 16 patch embeddings, position ids stay 0..16 (patch i
        gets position i instead of i+1, CLS gets 16) and rows 1..16 are kept (patch 0 dropped, CLS kept);
      * the legacy converter already stores only num_hidden_layers-1 blocks (feature layer -2) and the graph
        runs n_layer-1 of those, i.e. one encoder layer fewer than vision_feature_layer=-2 asks for;
    and the projector uses ggml_gelu (tanh approximation) where transformers uses the exact gelu.
    fixed=True: the graph of llama.cpp with gguf/llamacpp-fixes.patch (CLS first, all stored blocks run),
    i.e. transformers' features except for the tanh gelu."""
    vt = model.model.vision_tower
    vm = getattr(vt, "vision_model", vt)
    emb = vm.embeddings
    n_run = VISION["num_hidden_layers"] - (1 if fixed else 2)
    feats = []
    for i in range(px.shape[0]):
        x = emb.patch_embedding(px[i:i + 1]).flatten(2).transpose(1, 2)
        cls = emb.class_embedding.view(1, 1, -1)
        x = torch.cat([cls, x] if fixed else [x, cls], dim=1)
        x = x + emb.position_embedding.weight[None, : x.shape[1]]
        x = vm.pre_layrnorm(x)
        for layer in vm.encoder.layers[:n_run]:
            out = layer(x, None)
            x = out[0] if isinstance(out, tuple) else out
        x = x[:, 1:]
        pr = model.model.multi_modal_projector
        feats.append(pr.linear_2(torch.nn.functional.gelu(pr.linear_1(x), approximate="tanh"))[0])
    return torch.cat(feats, 0)


def run_complete(runner, args):
    """llama.cpp's log is asynchronous: at exit the last lines (the two newlines after the text, the perf
    lines) are sometimes lost.  Re-run until the output is complete."""
    for attempt in range(8):
        p = runner(args)
        if p.returncode != 0:
            raise RuntimeError(f"llama.cpp tool failed ({p.returncode}):\n{p.stderr[-3000:]}")
        if p.stdout.endswith("\n\n") and "prompt eval time" in p.stderr:
            return p
        log("  incomplete output (asynchronous log), running again")
    raise RuntimeError("llama.cpp output stayed incomplete")


def mtmd_log_info(stderr):
    """(formatted prompt, number of prompt tokens evaluated) from a llama-mtmd-cli -v log."""
    import re
    m = re.search(r"formatted_chat\.prompt: (.*?)\n\d+\.\d+\.\d+\.\d+ [DIWE] ", stderr, re.S)
    formatted = m.group(1) if m else None
    m = re.search(r"prompt eval time = .*?/\s*(\d+) tokens", stderr)
    return formatted, (int(m.group(1)) if m else None)


def mtmd_prompt_ids(model, formatted):
    """Prompt ids as mtmd builds them: BOS + each text segment tokenized on its own (parse_special, no BOS),
    16 embedding positions per image in between (shown here as 32000)."""
    segs = formatted.split(MEDIA)
    ids = [1]
    for i, sgm in enumerate(segs):
        ids += llama_tokenize(model, sgm)
        if i < len(segs) - 1:
            ids += [IMAGE_ID] * 16
    return ids


def make_llamacpp():
    from transformers import AutoTokenizer, LlavaForConditionalGeneration
    torch.set_num_threads(2)
    cli = BIN / "llama-mtmd-cli"
    hf = LlavaForConditionalGeneration.from_pretrained(FIX / HUB, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(FIX / HUB)
    results = {}

    def mtmd(args):
        cmd = [str(cli)] + [str(a) for a in args]
        log("RUN", " ".join(cmd))
        return subprocess.run(cmd, cwd=FIX, capture_output=True, text=True)

    # without a template flag llama-mtmd-cli stops: the hub template is not one it can detect for its
    # built-in (non-jinja) formatter
    base = ["-m", F16.relative_to(FIX), "--mmproj", MMPROJ.relative_to(FIX), "--image", IMAGES["square"],
            "-p", case_prompt_text(CASES["a_square"]), "-n", N_NEW_TOKENS, "--temp", "0", "--ignore-eos",
            "-c", "512", "-t", "2", "--seed", "0"]
    p = mtmd(base)
    err = [ln for ln in p.stderr.splitlines() if "template" in ln]
    dump_json(GGUF_DIR / "llamacpp-no-template-flag.json", {
        "llama_cpp": LLAMA_CPP_COMMIT, "command": ["llama-mtmd-cli"] + [str(a) for a in base],
        "cwd": "tests/fixtures/llava", "returncode": p.returncode, "stderr_template_lines": err,
        "note": "llama-mtmd-cli uses its built-in (non-jinja) formatter by default; it cannot map llava-hf's "
                "jinja template to a built-in one and aborts. Use --jinja or --chat-template vicuna."})
    log(f"llama.cpp without template flag: rc={p.returncode} {err[-1:]}")

    for quant, model in (("F16", F16), ("Q8_0", Q8)):
        for case in LLAMACPP_CASES:
            messages = CASES[case]
            prompt = case_prompt_text(messages)
            images = [c["path"] for c in messages[0]["content"] if c["type"] == "image"]
            rec = {"llama_cpp": LLAMA_CPP_COMMIT, "model": model.name, "mmproj": MMPROJ.name, "case": case,
                   "cwd": "tests/fixtures/llava", "prompt_given": prompt, "images": images, "runs": {}}
            for mode, extra in MODES.items():
                args = ["-m", model.relative_to(FIX), "--mmproj", MMPROJ.relative_to(FIX)]
                for ip in images:
                    args += ["--image", ip]
                args += ["-p", prompt, "-n", N_NEW_TOKENS, "--temp", "0", "--ignore-eos", "-c", "512", "-t", "2",
                         "--seed", "0"] + extra + ["-v"]
                p = run_complete(mtmd, args)
                formatted, n_eval = mtmd_log_info(p.stderr)
                ids = mtmd_prompt_ids(model, formatted)
                out = p.stdout
                gen = out[1:] if out.startswith("\n") else out
                gen = gen[:-2] if gen.endswith("\n\n") else gen
                # HF cross-check: the hub folder (f16 weights, float32 compute) fed llama.cpp's prompt ids and
                # llama.cpp-style pixels
                px = torch.stack([llamacpp_style_pixels(ip) for ip in images])
                inp = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
                       "pixel_values": px}
                hf_toks, hf_mg, _ = greedy(hf, inp, N_NEW_TOKENS, torch.float32)
                hf_text = llamacpp_piece_text(tok, hf_toks)
                with torch.no_grad():
                    embeds = hf.get_input_embeddings()(torch.tensor([ids])).clone()
                    embeds[0, torch.tensor(ids) == IMAGE_ID] = llamacpp_image_features(hf, px)
                em_toks, em_mg, _ = greedy(hf, {"inputs_embeds": embeds, "attention_mask": inp["attention_mask"]},
                                           N_NEW_TOKENS, torch.float32)
                em_text = llamacpp_piece_text(tok, em_toks)
                n_agree = max(k for k in range(N_NEW_TOKENS + 1) if gen.startswith(llamacpp_piece_text(tok, em_toks[:k])))
                rec["runs"][mode] = {
                    "command": ["llama-mtmd-cli"] + [str(a) for a in args],
                    "formatted_prompt": formatted,
                    "prompt_token_ids": ids,
                    "prompt_token_ids_note": "reconstructed with llama-tokenize per text segment (mtmd tokenizes "
                                             "each segment separately, adding SPM's space prefix to each); the 16 "
                                             "positions per image hold image embeddings, written as 32000",
                    "n_prompt_tokens_logged": n_eval,
                    "stdout": out,
                    "generated_text": gen,
                    "generated_text_note": "stdout without the newline llama-mtmd-cli prints before the text and "
                                           "the two after it",
                    "retokenized_ids": llama_tokenize(model, gen),
                    "retokenized_ids_note": "llama-tokenize of generated_text (no BOS): a re-tokenization, not the "
                                            "sampled ids; it can differ where the sampled pieces are not the "
                                            "canonical tokenization (e.g. a leading space piece)",
                    "hf_same_prompt_greedy_tokens": hf_toks,
                    "hf_same_prompt_text": hf_text,
                    "hf_same_prompt_min_margin": min(hf_mg),
                    "hf_same_prompt_text_equal": hf_text == gen,
                    "hf_same_prompt_note": "transformers, tiny-llava-hub in float32, given prompt_token_ids and "
                                           "an emulation of llama.cpp's image preprocessing (pad to square with "
                                           "(122,116,104), bicubic to 56x56); text = pieces as llama.cpp prints them. "
                                           "Expected to differ: see llamacpp_emulation",
                    "llamacpp_emulation_greedy_tokens": em_toks,
                    "llamacpp_emulation_text": em_text,
                    "llamacpp_emulation_min_margin": min(em_mg),
                    "llamacpp_emulation_margins": em_mg,
                    "llamacpp_emulation_tokens_agreeing": n_agree,
                    "llamacpp_emulation_text_equal": em_text == gen,
                    "sampled_ids_inferred": em_toks if em_text == gen else None,
                    "sampled_ids_inferred_note": "llamacpp_emulation_greedy_tokens where their text equals "
                                                 "generated_text (llama-mtmd-cli does not print ids), else null",
                    "llamacpp_emulation_note": "same as hf_same_prompt but with the vision tower wired as llama.cpp "
                                               "0c1e57098 runs a legacy LLaVA-1.5 mmproj (CLS appended after the "
                                               "patches, patch 0 dropped and CLS kept, one encoder layer fewer, tanh "
                                               "gelu in the projector: ggml-org/llama.cpp#25814, #25817); see "
                                               "llamacpp_image_features() in scripts/make_llava_fixtures.py",
                }
                assert n_eval is None or n_eval == len(ids), (n_eval, len(ids))
                results[f"{quant}/{case}/{mode}"] = {"text": gen, "hf_same_prompt_equal": hf_text == gen,
                                                     "llamacpp_emulation_equal": em_text == gen}
                log(f"llama.cpp {quant} {case} {mode}: {gen!r}  (HF same prompt equal: {hf_text == gen}, "
                    f"emulation equal: {em_text == gen})")
            dump_json(GGUF_DIR / f"llamacpp-{quant}-{case}.json", rec)
    return results


# ============================================================================= llama.cpp text-only references
# Two text-only chats (no image) through the unmodified llama.cpp with the GGUF's chat template (--jinja).
# llama-mtmd-cli needs an image for a single-turn run (without one it starts its interactive chat), so these
# use llama-completion (tools/completion, the classic CLI) in single-turn conversation mode.
TEXT_CASES = {
    "user": [{"role": "user", "content": [txt("Tell me a story about a lighthouse.")]}],
    "system": [{"role": "system", "content": [txt("You are a careful assistant that answers briefly.")]},
               {"role": "user", "content": [txt("Tell me a story about a lighthouse.")]}],
}
QUANTS = (("F16", F16), ("Q8_0", Q8))


def gguf_module():
    sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))
    import gguf
    return gguf


def gguf_text_weights_vs_hub(hf, path: Path):
    """max |w_gguf - w_hub| over the text weights: the GGUF's tensors dequantized to float32 (convert_hf_to_gguf's
    Q/K row permutation undone) against the hub folder's (f16 values, loaded in float32)."""
    gguf = gguf_module()
    from gguf.quants import dequantize
    names = {"token_embd": "embed_tokens", "output_norm": "norm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    params = dict(hf.named_parameters())
    max_diff = 0.0
    for t in gguf.GGUFReader(str(path)).tensors:
        a = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        parts = t.name.split(".")
        if parts[0] == "output":
            hname = "lm_head.weight"
        elif parts[0] == "blk":
            hname = f"model.language_model.layers.{parts[1]}.{names[parts[2]]}.weight"
        else:
            hname = f"model.language_model.{names[parts[0]]}.weight"
        if parts[-2] in ("attn_q", "attn_k"):  # undo the converter's rope permutation of the rows
            nh = TEXT["num_attention_heads"] if parts[-2] == "attn_q" else TEXT["num_key_value_heads"]
            a = a.reshape(nh, a.shape[0] // nh // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        p = params.pop(hname)
        assert tuple(p.shape) == tuple(a.shape), (t.name, hname, p.shape, a.shape)
        max_diff = max(max_diff, float((p.detach() - a).abs().max()))
    assert not [k for k in params if k.startswith("model.language_model.")], "text weights missing in the GGUF"
    return max_diff


def completion_cli():
    exe = BIN / "llama-completion"
    if not exe.exists():  # not among setup.sh's targets; cheap once the libraries are built
        run(["cmake", "--build", BENCH_DIR / "build", "--config", "Release", "-j", os.environ.get("JOBS", "2"),
             "--target", "llama-completion"])
    return exe


def completion_log_info(stderr):
    """(formatted prompt, prompt ids, n prompt tokens evaluated) from a llama-completion -v --verbose-prompt log."""
    import re
    m = re.search(r'^\S+ D prompt: "(.*?)"\n\S+ D tokens: ', stderr, re.S | re.M)
    formatted = m.group(1) if m else None
    m = re.search(r"number of tokens in prompt = (\d+)\n", stderr)
    n = int(m.group(1))
    ids = [int(x) for x in re.findall(r"^\S+ I +(\d+) -> '", stderr[m.end():], re.M)[:n]]
    assert len(ids) == n, (n, ids)
    m = re.search(r"prompt eval time = .*?/\s*(\d+) tokens", stderr)
    return formatted, ids, (int(m.group(1)) if m else None)


def agreeing(tok, gen, toks):
    """How many leading tokens of `toks` llama.cpp printed too (text prefix of `gen`)."""
    return max(k for k in range(len(toks) + 1) if gen.startswith(llamacpp_piece_text(tok, toks[:k])))


def follow_llamacpp(tok, model, inputs, gen, top=20):
    """Walk llama.cpp's printed text `gen` with `model`: at each of the 16 steps take the top-1 token if its
    piece continues the text, else the best-ranked of the top `top` whose piece does (an empty piece, e.g. an
    unused [PADnnnnn] row, continues any text).  Returns (tokens, deviations [step, rank (0 = top-1), id, piece,
    top-1 logit - its logit], complete).  Logits from a full forward pass per step (no KV cache); EOS masked."""
    toks, devs = [], []
    with torch.no_grad():
        for step in range(N_NEW_TOKENS):
            rest = gen[len(llamacpp_piece_text(tok, toks)):]
            extra = torch.tensor([toks], dtype=torch.long).reshape(1, len(toks))
            if inputs.get("inputs_embeds") is not None:
                kw = {"inputs_embeds": torch.cat([inputs["inputs_embeds"], model.get_input_embeddings()(extra)], 1)}
            else:
                kw = {"input_ids": torch.cat([inputs["input_ids"], extra], 1)}
                if inputs.get("pixel_values") is not None:
                    kw["pixel_values"] = inputs["pixel_values"]
            n = next(iter(kw.values())).shape[1]
            logits = model(**kw, attention_mask=torch.ones((1, n), dtype=torch.long)).logits[0, -1].clone()
            logits[EOS_ID] = -float("inf")
            vals, idx = torch.topk(logits, top)
            for rank, (v, i) in enumerate(zip(vals.tolist(), idx.tolist())):
                piece = llamacpp_piece_text(tok, [i])
                if rest.startswith(piece):
                    toks.append(i)
                    if rank:
                        devs.append([step, rank, i, piece, vals[0].item() - v])
                    break
            else:
                return toks, devs, False
    return toks, devs, llamacpp_piece_text(tok, toks) == gen


def greedy_record(prefix, tok, model, inputs, gen, note):
    """Greedy tokens of `model` on `inputs` and how far llama.cpp's printed text `gen` follows them; where it
    leaves them, the tokens llama.cpp must have taken instead (follow_llamacpp)."""
    toks, mg, _ = greedy(model, inputs, N_NEW_TOKENS, torch.float32)
    text = llamacpp_piece_text(tok, toks)
    k = agreeing(tok, gen, toks)
    rec = {f"{prefix}_greedy_tokens": toks, f"{prefix}_text": text, f"{prefix}_text_equal": text == gen,
           f"{prefix}_tokens_agreeing": k,
           f"{prefix}_margin_at_first_difference": mg[k] if k < N_NEW_TOKENS else None,
           f"{prefix}_min_margin": min(mg), f"{prefix}_margins": mg, f"{prefix}_note": note}
    if text != gen:
        ftoks, devs, complete = follow_llamacpp(tok, model, inputs, gen)
        rec.update({f"{prefix}_follow_llamacpp_tokens": ftoks, f"{prefix}_follow_llamacpp_deviations": devs,
                    f"{prefix}_follow_llamacpp_complete": complete})
    return rec


def make_llamacpp_text():
    from transformers import LlavaForConditionalGeneration
    torch.set_num_threads(2)
    cli = completion_cli()
    hf = LlavaForConditionalGeneration.from_pretrained(FIX / HUB, dtype=torch.float32).eval()
    proc, _ = load_processor(FIX / HUB)
    tok = proc.tokenizer
    results = {}

    def completion(args):
        cmd = [str(cli)] + [str(a) for a in args]
        log("RUN", " ".join(cmd))
        return subprocess.run(cmd, cwd=FIX, capture_output=True, text=True)

    for quant, model in QUANTS:
        gguf_diff = gguf_text_weights_vs_hub(hf, model)
        for case, messages in TEXT_CASES.items():
            sys_msg = [m for m in messages if m["role"] == "system"]
            user = case_prompt_text([m for m in messages if m["role"] != "system"])
            args = ["-m", model.relative_to(FIX)]
            if sys_msg:
                args += ["-sys", " ".join(c["text"] for c in sys_msg[0]["content"])]
            args += ["-p", user, "-n", N_NEW_TOKENS, "--temp", "0", "--ignore-eos", "-c", "512", "-t", "2",
                     "--seed", "0", "--jinja", "-cnv", "-st", "--no-display-prompt", "--verbose-prompt", "-v"]
            p = run_complete(completion, args)
            formatted, ids, n_eval = completion_log_info(p.stderr)
            assert n_eval == len(ids), (n_eval, ids)
            assert ids == [1] + llama_tokenize(model, formatted), "prompt ids differ from llama-tokenize"
            gen = p.stdout[:-2]
            hf_prompt = proc.apply_chat_template(hf_messages(messages), add_generation_prompt=True)
            hf_ids = tok(hf_prompt).input_ids
            inp = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones((1, len(ids)), dtype=torch.long)}
            rec = {"llama_cpp": LLAMA_CPP_COMMIT, "tool": "llama-completion", "model": model.name, "case": case,
                   "cwd": "tests/fixtures/llava", "messages": messages,
                   "command": ["llama-completion"] + [str(a) for a in args],
                   "formatted_prompt": formatted,
                   "formatted_prompt_note": "the GGUF's chat template (llava-hf's) through llama.cpp's jinja engine "
                                            "(logged by -v); BOS is added by the tokenizer",
                   "prompt_token_ids": ids,
                   "prompt_token_ids_note": "as logged by --verbose-prompt (equal to llama-tokenize of "
                                            "formatted_prompt with BOS)",
                   "n_prompt_tokens_logged": n_eval,
                   "hf_chat_template_prompt": hf_prompt,
                   "hf_chat_template_prompt_equal": hf_prompt == formatted,
                   "hf_chat_template_input_ids": hf_ids,
                   "hf_chat_template_input_ids_equal": hf_ids == ids,
                   "stdout": p.stdout,
                   "generated_text": gen,
                   "generated_text_note": "stdout without the two newlines llama-completion prints after the text",
                   "retokenized_ids": llama_tokenize(model, gen),
                   "retokenized_ids_note": "llama-tokenize of generated_text (no BOS): a re-tokenization, not the "
                                           "sampled ids (llama-completion does not print those)"}
            rec.update(greedy_record("hf_same_prompt", tok, hf, inp, gen,
                                     "transformers, tiny-llava-hub in float32 (f16 weights), given prompt_token_ids; "
                                     "text = pieces as llama.cpp prints them; margins = top1 - top2 per step"))
            rec["gguf_text_weights_max_abs_diff_vs_hub"] = gguf_diff
            rec["gguf_text_weights_max_abs_diff_vs_hub_note"] = (
                "max |w| difference between this GGUF's text weights dequantized to float32 and tiny-llava-hub's: "
                "0 for F16 (the same f16 values), the Q8_0 rounding otherwise")
            rec["sampled_ids_inferred"] = (rec["hf_same_prompt_greedy_tokens"] if rec["hf_same_prompt_text_equal"]
                                           else rec["hf_same_prompt_follow_llamacpp_tokens"]
                                           if rec["hf_same_prompt_follow_llamacpp_complete"] else None)
            rec["sampled_ids_inferred_note"] = ("hf_same_prompt_greedy_tokens where their text equals generated_text, "
                                                "else hf_same_prompt_follow_llamacpp_tokens where complete, else null")
            dump_json(GGUF_DIR / f"llamacpp-text-{quant}-{case}.json", rec)
            results[f"{quant}/{case}"] = {"text": gen, "hf_same_prompt_equal": rec["hf_same_prompt_text_equal"],
                                          "deviations": rec.get("hf_same_prompt_follow_llamacpp_deviations")}
            log(f"llama.cpp text {quant} {case}: {gen!r} (HF same prompt equal: {rec['hf_same_prompt_text_equal']}, "
                f"{rec['hf_same_prompt_tokens_agreeing']}/{N_NEW_TOKENS})")
    return results


# ============================================================================= patched llama.cpp (both defects fixed)
FIXES_PATCH = GGUF_DIR / "llamacpp-fixes.patch"
FIXED_SRC = BENCH_DIR / "src-fixed" / "llama.cpp"
FIXED_BUILD = BENCH_DIR / "build-fixed"
FIXED_MARK = "ggml_concat(ctx0, model.class_embedding, inp, 1)"


def build_fixed_llama_cpp():
    """A copy of the llama.cpp source with gguf/llamacpp-fixes.patch applied, and its llama-mtmd-cli built with
    setup.sh's cmake flags in a build folder of its own."""
    llava_cpp = FIXED_SRC / "tools" / "mtmd" / "models" / "llava.cpp"
    if not FIXED_SRC.exists():
        FIXED_SRC.parent.mkdir(parents=True, exist_ok=True)
        log(f"copy {LLAMA_CPP} -> {FIXED_SRC}")
        shutil.copytree(LLAMA_CPP, FIXED_SRC, symlinks=True)
        run(["patch", "-p1", "-d", FIXED_SRC, "-i", FIXES_PATCH])
    if FIXED_MARK not in llava_cpp.read_text():
        sys.exit(f"{FIXED_SRC} exists without the fixes of {FIXES_PATCH}: delete it to redo")
    if not (FIXED_BUILD / "CMakeCache.txt").exists():
        run(["cmake", "-S", FIXED_SRC, "-B", FIXED_BUILD, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
             "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", f"-DLLAMA_BUILD_COMMIT={LLAMA_CPP_COMMIT}"])
    run(["cmake", "--build", FIXED_BUILD, "--config", "Release", "-j", os.environ.get("JOBS", "2"),
         "--target", "llama-mtmd-cli"])
    return FIXED_BUILD / "bin" / "llama-mtmd-cli"


def make_llamacpp_fixed():
    from transformers import LlavaForConditionalGeneration
    torch.set_num_threads(2)
    cli = build_fixed_llama_cpp()
    hf = LlavaForConditionalGeneration.from_pretrained(FIX / HUB, dtype=torch.float32).eval()
    proc, _ = load_processor(FIX / HUB)
    tok = proc.tokenizer
    results = {}

    def mtmd(args):
        cmd = [str(cli)] + [str(a) for a in args]
        log("RUN", " ".join(cmd))
        return subprocess.run(cmd, cwd=FIX, capture_output=True, text=True)

    for quant, model in QUANTS:
        for case in LLAMACPP_CASES:
            messages = CASES[case]
            prompt = case_prompt_text(messages)
            images = [c["path"] for c in messages[0]["content"] if c["type"] == "image"]
            args = ["-m", model.relative_to(FIX), "--mmproj", MMPROJ.relative_to(FIX)]
            for ip in images:
                args += ["--image", ip]
            args += ["-p", prompt, "-n", N_NEW_TOKENS, "--temp", "0", "--ignore-eos", "-c", "512", "-t", "2",
                     "--seed", "0", "--jinja", "-v"]
            p = run_complete(mtmd, args)
            formatted, n_eval = mtmd_log_info(p.stderr)
            ids = mtmd_prompt_ids(model, formatted)
            assert n_eval == len(ids), (n_eval, len(ids))
            out = p.stdout
            gen = out[1:] if out.startswith("\n") else out
            gen = gen[:-2] if gen.endswith("\n\n") else gen
            px = torch.stack([llamacpp_style_pixels(ip) for ip in images])
            mask = torch.ones((1, len(ids)), dtype=torch.long)
            with torch.no_grad():
                embeds = hf.get_input_embeddings()(torch.tensor([ids])).clone()
                embeds[0, torch.tensor(ids) == IMAGE_ID] = llamacpp_image_features(hf, px, fixed=True)
            unpatched = json.load(open(GGUF_DIR / f"llamacpp-{quant}-{case}.json"))["runs"]["jinja"]["generated_text"]
            rec = {"llama_cpp": f"{LLAMA_CPP_COMMIT} + gguf/llamacpp-fixes.patch (CLS first, all stored vision "
                                "blocks run)",
                   "binary": "$BENCH_DIR/build-fixed/bin/llama-mtmd-cli",
                   "model": model.name, "mmproj": MMPROJ.name, "case": case, "cwd": "tests/fixtures/llava",
                   "prompt_given": prompt, "images": images,
                   "command": ["llama-mtmd-cli"] + [str(a) for a in args],
                   "formatted_prompt": formatted,
                   "prompt_token_ids": ids,
                   "prompt_token_ids_note": "reconstructed with llama-tokenize per text segment (mtmd tokenizes "
                                            "each segment separately, adding SPM's space prefix to each); the 16 "
                                            "positions per image hold image embeddings, written as 32000",
                   "n_prompt_tokens_logged": n_eval,
                   "stdout": out,
                   "generated_text": gen,
                   "generated_text_note": "stdout without the newline llama-mtmd-cli prints before the text and "
                                          "the two after it",
                   "retokenized_ids": llama_tokenize(model, gen),
                   "retokenized_ids_note": "llama-tokenize of generated_text (no BOS): a re-tokenization, not the "
                                           "sampled ids",
                   "unpatched_generated_text": unpatched,
                   "unpatched_generated_text_note": f"the jinja run of llamacpp-{quant}-{case}.json (same command, "
                                                    "unmodified llama.cpp)"}
            rec.update(greedy_record(
                "hf_same_prompt", tok, hf,
                {"input_ids": torch.tensor([ids]), "attention_mask": mask, "pixel_values": px}, gen,
                "transformers (LlavaForConditionalGeneration, its own vision path), tiny-llava-hub in float32, given "
                "prompt_token_ids and an emulation of llama.cpp's image preprocessing (pad to square with "
                "(122,116,104), bicubic to 56x56); text = pieces as llama.cpp prints them; margins = top1 - top2"))
            rec.update(greedy_record(
                "fixed_emulation", tok, hf, {"inputs_embeds": embeds, "attention_mask": mask}, gen,
                "as hf_same_prompt, with the one semantic difference left in the patched llama.cpp: the projector's "
                "gelu is ggml_gelu (tanh approximation) instead of the exact one; see "
                "llamacpp_image_features(fixed=True)"))
            for k in ("hf_same_prompt", "fixed_emulation"):
                if rec[f"{k}_text_equal"] or rec.get(f"{k}_follow_llamacpp_complete"):
                    rec["sampled_ids_inferred"] = rec[f"{k}_greedy_tokens" if rec[f"{k}_text_equal"]
                                                      else f"{k}_follow_llamacpp_tokens"]
                    break
            else:
                rec["sampled_ids_inferred"] = None
            rec["sampled_ids_inferred_note"] = ("greedy tokens whose text equals generated_text, else the "
                                                "follow_llamacpp tokens where complete (hf_same_prompt first, then "
                                                "fixed_emulation), else null")
            dump_json(GGUF_DIR / f"llamacpp-fixed-{quant}-{case}.json", rec)
            results[f"{quant}/{case}"] = {"text": gen, "hf_same_prompt_equal": rec["hf_same_prompt_text_equal"],
                                          "fixed_emulation_equal": rec["fixed_emulation_text_equal"]}
            log(f"fixed llama.cpp {quant} {case}: {gen!r} (HF same prompt equal: {rec['hf_same_prompt_text_equal']} "
                f"{rec['hf_same_prompt_tokens_agreeing']}/{N_NEW_TOKENS}, emulation "
                f"{rec['fixed_emulation_tokens_agreeing']}/{N_NEW_TOKENS})")
    return results


# ============================================================================= README
def file_table():
    rows = []
    for f in sorted(FIX.rglob("*")):
        if f.is_file() and f.name != "README.md" and "cases" not in f.parts:
            rows.append(f"| `{f.relative_to(FIX)}` | {f.stat().st_size:,} |")
    cases = [f for f in (FIX / "cases").rglob("*") if f.is_file()]
    rows.append(f"| `cases/` ({len(cases)} files) | {sum(f.stat().st_size for f in cases):,} |")
    total = sum(f.stat().st_size for f in FIX.rglob("*") if f.is_file() and f.name != "README.md")
    rows.append(f"| total (without this README) | {total:,} |")
    return "\n".join(rows)


def fmt_devs(devs):
    """follow_llamacpp deviations as README text."""
    if not devs:
        return "none"
    def what(i, pc):
        return json.dumps(pc, ensure_ascii=False) if pc else f"[PAD{i}], prints nothing"
    return "; ".join(f"new token {st + 1}: rank {rk + 1} ({what(i, pc)}), {gap:.3g} below the top-1"
                     for st, rk, i, pc, gap in devs)


def deviation_summary(recs):
    """One README paragraph: per quant, whether llama.cpp printed transformers' greedy text, and where not, how
    (from the follow_llamacpp fields)."""
    out = []
    for quant, _ in QUANTS:
        rs = [r for r in recs if r["model"] == f"tiny-llava-{quant}.gguf"]
        if not rs:
            continue
        if all(r["hf_same_prompt_text_equal"] for r in rs):
            every = "both" if len(rs) == 2 else f"all {len(rs)}"
            out.append(f"With {quant} llama.cpp prints exactly transformers' greedy text in {every} cases.")
            continue
        devs = [d for r in rs for d in (r.get("hf_same_prompt_follow_llamacpp_deviations") or [])]
        complete = all(r["hf_same_prompt_text_equal"] or r.get("hf_same_prompt_follow_llamacpp_complete") for r in rs)
        n_eq = sum(r["hf_same_prompt_text_equal"] for r in rs)
        lo, hi = min(d[1] for d in devs) + 1, max(d[1] for d in devs) + 1
        text = (f"With {quant} llama.cpp prints transformers' greedy text in {n_eq} of {len(rs)} cases; elsewhere it "
                f"leaves transformers' greedy tokens {len(devs)} times in all, each time for a token that transformers "
                f"ranks {lo if lo == hi else f'{lo} to {hi}'}, {min(d[4] for d in devs):.2g} "
                f"to {max(d[4] for d in devs):.2g} below its top-1")
        if complete:
            text += ", and otherwise takes transformers' greedy choices"
        else:
            text += "; some outputs are not reproduced by following transformers' top 20 (see the table)"
        if quant != "F16":
            text += (f" ({quant} quantizes the text weights and, in the matrix products, the activations to 8 bits: "
                     "the logits move by tenths)")
        out.append(text + ".")
    return " ".join(out)


def readme_text_section():
    rows, recs = [], {}
    for quant, _ in QUANTS:
        for case in TEXT_CASES:
            f = GGUF_DIR / f"llamacpp-text-{quant}-{case}.json"
            if not f.exists():
                continue
            r = recs[(quant, case)] = json.load(open(f))
            k = r["hf_same_prompt_tokens_agreeing"]
            devs = fmt_devs(r.get("hf_same_prompt_follow_llamacpp_deviations")) if k < N_NEW_TOKENS else "-"
            rows.append(f"| {quant} | {case} | {json.dumps(r['generated_text'], ensure_ascii=False)} | "
                        f"{r['hf_same_prompt_text_equal']} | {k}/{N_NEW_TOKENS} | {devs} |")
    if not recs:
        return ""
    ex = {c: recs.get(("F16", c)) for c in TEXT_CASES}
    diffs = {q: r["gguf_text_weights_max_abs_diff_vs_hub"] for (q, c), r in recs.items()}
    same_ids = all(r["hf_chat_template_input_ids_equal"] for r in recs.values())
    return f"""
## llama.cpp text-only references (`gguf/llamacpp-text-<quant>-<case>.json`)

Text-only chats (no image, no mmproj) through the unmodified llama.cpp {LLAMA_CPP_COMMIT} with the GGUF's chat
template. llama-mtmd-cli cannot do this in one shot (without `--image` it starts its interactive chat), so
these use `llama-completion` (tools/completion, the classic CLI, built from the same tree and flags: the
script runs `cmake --build $BENCH_DIR/build -j 2 --target llama-completion` when it is missing), run in
this folder:

`llama-completion -m gguf/<model> [-sys <system text>] -p <user text> -n 16 --temp 0 --ignore-eos -c 512 -t 2
--seed 0 --jinja -cnv -st --no-display-prompt --verbose-prompt -v`

(`-cnv -st`: one user turn formatted with the template and the generation prompt, then exit;
`--no-display-prompt`: stdout is the generated text followed by two newlines, kept raw in `stdout`.)
Cases (`messages` in each file): `user` = one user message "Tell me a story about a lighthouse.";
`system` = a system message "You are a careful assistant that answers briefly." before the same user
message. Formatted prompts (`formatted_prompt`, from the `-v` log; BOS is added when tokenizing):

* user: {json.dumps(ex['user']['formatted_prompt'] if ex.get('user') else None)}
* system: {json.dumps(ex['system']['formatted_prompt'] if ex.get('system') else None)}

`prompt_token_ids` are the ids llama-completion logs with `--verbose-prompt` (checked equal to
llama-tokenize of the formatted prompt with BOS). The transformers side (`hf_chat_template_prompt`,
`hf_chat_template_input_ids`: tiny-llava-hub's processor `apply_chat_template` + tokenizer) gives the same
prompt and ids in every case: {same_ids}. `hf_same_prompt_*` is transformers (tiny-llava-hub, float32) greedy on
`prompt_token_ids` with EOS masked, printed the way llama.cpp prints pieces; margins are top1 - top2.
`gguf_text_weights_max_abs_diff_vs_hub` compares the GGUF's text weights (dequantized, Q/K permutation undone)
with the hub folder's: {', '.join(f'{q} {v:.3g}' for q, v in diffs.items())}.

Where llama.cpp's text leaves the transformers greedy tokens, `hf_same_prompt_follow_llamacpp_*` walks
llama.cpp's text with transformers' logits: at each step the top-1 if its piece continues the text, else
the best-ranked of the top 20 that does (`deviations`: [step, rank (0 = top-1), id, piece, logit gap to the
top-1]); `complete` when that reproduces the text in 16 tokens; `sampled_ids_inferred` are those tokens (or
the greedy tokens when the texts are equal). Unused rows 32002..32063 (`[PADnnnnn]`, UNUSED in the GGUF,
random lm_head rows here) can win and print nothing in llama.cpp.

{deviation_summary(recs.values())} A seer GGUF path should print nothing for the unused `[PADnnnnn]` rows, as
llama.cpp does.

| quant | case | llama.cpp text | = HF same prompt | HF tokens agreeing | where llama.cpp took another token (its rank in HF's logits) |
|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def readme_fixed_section():
    rows, recs, same_tokens, gelu_shift, n_changed = [], [], [], 0.0, 0
    for quant, _ in QUANTS:
        for case in LLAMACPP_CASES:
            f = GGUF_DIR / f"llamacpp-fixed-{quant}-{case}.json"
            if not f.exists():
                continue
            r = json.load(open(f))
            recs.append(r)
            n = r["hf_same_prompt_tokens_agreeing"]
            devs = "-"
            if n < N_NEW_TOKENS:
                devs = fmt_devs(r.get("hf_same_prompt_follow_llamacpp_deviations"))
                if not r.get("hf_same_prompt_follow_llamacpp_complete"):
                    devs += "; the rest not reproduced"
            rows.append(f"| {quant} | {case} | {json.dumps(r['generated_text'], ensure_ascii=False)} | "
                        f"{r['hf_same_prompt_text_equal']} | {n}/{N_NEW_TOKENS} | {devs} | "
                        f"{r['fixed_emulation_text_equal']} ({r['fixed_emulation_tokens_agreeing']}/{N_NEW_TOKENS}) | "
                        f"{r['generated_text'] != r['unpatched_generated_text']} |")
            gelu_shift = max([gelu_shift] + [abs(a - b) for a, b in zip(r["hf_same_prompt_margins"],
                                                                        r["fixed_emulation_margins"])])
            same_tokens.append(r["hf_same_prompt_greedy_tokens"] == r["fixed_emulation_greedy_tokens"])
            n_changed += r["generated_text"] != r["unpatched_generated_text"]
    if not rows:
        return ""
    assert all(same_tokens), "the tanh gelu changed a greedy token: update the README text"
    summary = deviation_summary(recs)
    return f"""
## Patched llama.cpp references (`gguf/llamacpp-fixed-<quant>-<case>.json`, `gguf/llamacpp-fixes.patch`)

llama.cpp {LLAMA_CPP_COMMIT} with both vision-graph defects fixed, to have llama.cpp evidence with transformers'
semantics. `llamacpp-fixes.patch` (unified diff of `tools/mtmd/models/llava.cpp`, llama.cpp is MIT; apply with
`patch -p1` in the llama.cpp root):

1. CLS first: the operands of `ggml_concat` are swapped, so that the class embedding comes before the patches
   as the `positions` (0..16) and `patches` (1..16) inputs assume (issue #25814; the change of PR #25844);
2. layer count: without `clip.vision.feature_layer` the graph runs all `n_layer` stored blocks instead of
   `n_layer - 1` (the legacy converter already dropped the blocks after `vision_feature_layer` -2; issue
   #25817; the change of PR #25845, which also drops the MiniCPM-V/GLM-Edge `+= 1` that only undid the old
   subtraction).

The script (step `llamacpp-fixed`) copies the llama.cpp source to `$BENCH_DIR/src-fixed/llama.cpp`, applies
the patch and builds only `llama-mtmd-cli` in `$BENCH_DIR/build-fixed` with setup.sh's cmake flags
(`-G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_COMMIT={LLAMA_CPP_COMMIT}`, `-j 2`), then runs the
`jinja` command of the llama.cpp references above with that binary (cases a, b, c; F16 and Q8_0):

`llama-mtmd-cli -m gguf/<model> --mmproj gguf/mmproj-tiny-llava-F16.gguf --image ... -p <text> -n 16 --temp 0
--ignore-eos -c 512 -t 2 --seed 0 --jinja -v`

Fields as in `llamacpp-<quant>-<case>.json` (one run, no `runs` level), plus `unpatched_generated_text` (the
unmodified llama.cpp's jinja output for the same command). `hf_same_prompt_*` is transformers'
`LlavaForConditionalGeneration` itself (its vision tower, `vision_feature_layer` -2, CLS dropped, exact gelu;
tiny-llava-hub in float32) on the same prompt ids and llama.cpp-style pixels. `fixed_emulation_*` is the same
with the one semantic difference the patched llama.cpp still has: the projector's `ggml_gelu` (tanh
approximation). `follow_llamacpp` fields as for the text-only references.

{summary} The tanh gelu moves transformers' margins by at most {gelu_shift:.2g} here and changes no greedy token.
{n_changed} of {len(rows)} patched outputs differ from the unpatched ones (the two defects change the image features).

| quant | case | patched llama.cpp text | = HF same prompt | HF tokens agreeing | where llama.cpp took another token (its rank in HF's logits) | = emulation with tanh gelu (tokens agreeing) | differs from unpatched |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def make_readme():
    import transformers
    summary = json.load(open(FIX / "cases" / "summary.json"))
    case_rows = []
    for key, v in summary.items():
        folder, case = key.split("/")
        rec = json.load(open(FIX / "cases" / folder / f"{case}.json"))
        case_rows.append(f"| {folder} | {case} | {v['n_input_ids']} | `{v['greedy_tokens']}` | {v['margin_min']} "
                         f"| {v['f32_eq_f64']} | {json.dumps(rec['greedy_text'], ensure_ascii=False)} |")
    cpp_rows = []
    for quant in ("F16", "Q8_0"):
        for case in LLAMACPP_CASES:
            f = GGUF_DIR / f"llamacpp-{quant}-{case}.json"
            if not f.exists():
                continue
            rec = json.load(open(f))
            for mode, r in rec["runs"].items():
                k = r["llamacpp_emulation_tokens_agreeing"]
                at = f" (margin there {r['llamacpp_emulation_margins'][k]:.2g})" if k < N_NEW_TOKENS else ""
                cpp_rows.append(f"| {quant} | {case} | {mode} | {json.dumps(r['generated_text'], ensure_ascii=False)} "
                                f"| {r['hf_same_prompt_text_equal']} | {k}/{N_NEW_TOKENS}{at} |")
    first = json.load(open(FIX / "cases" / HUB / "a_square.json"))
    diverge = []
    for case in CASES:
        a, b = summary[f"{HUB}/{case}"]["greedy_tokens"], summary[f"{NEW}/{case}"]["greedy_tokens"]
        if a != b:
            diverge.append(f"{case} (from new token {next(i for i in range(len(a)) if a[i] != b[i]) + 1})")
    diverge = ", ".join(diverge) or "none"
    jinja_a = json.load(open(GGUF_DIR / "llamacpp-F16-a_square.json"))["runs"]
    text = f"""# LLaVA-1.5 reference fixtures

Made by `scripts/make_llava_fixtures.py` (run it to rebuild everything; its docstring says how).
Deterministic: a re-run rewrites the same bytes (fixed seeds, no timestamps).

Versions: transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}, llama.cpp {LLAMA_CPP_COMMIT}
(vendored in llama-cpp-python 0.3.36; its `convert_hf_to_gguf.py`, `gguf-py`, the legacy LLaVA
converter `tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py`, `llama-quantize`,
`llama-mtmd-cli`, `llama-tokenize`).  All on CPU.

## Files

| path | bytes |
|---|---|
{file_table()}

* `images/`: drawn by the script: `square-64x64.png`, `wide-120x72.jpg` (JPEG, quality 90, 4:4:4),
  `tall-40x90.png`; gradients, shapes, noise.
* `{HUB}/`: the model as llava-hf/llava-1.5-7b-hf's repo looked in 2024: `config.json` with
  `rope_theta` at the top of `text_config` and `torch_dtype`, weights in **float16** in 2 shards +
  `model.safetensors.index.json` with names `language_model.model.*`, `language_model.lm_head.weight`,
  `vision_tower.vision_model.*`, `multi_modal_projector.*`; `preprocessor_config.json` (flat
  `CLIPImageProcessor`), `processor_config.json` (patch_size 14, `vision_feature_select_strategy`
  default, `num_additional_image_tokens` 1, as the hub repo has since late 2024), `chat_template.json`,
  `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`, `generation_config.json`.
  Written by hand by the script (no `tokenizer.model`).
* `{NEW}/`: the same model exactly as transformers 5 `save_pretrained` writes it: weights in
  **bfloat16**, one `model.safetensors`, names `model.language_model.*`, `model.vision_tower.*`
  (no `vision_model.`), `model.multi_modal_projector.*`, `lm_head.weight`; `config.json` with
  `rope_parameters` inside `text_config` and `dtype`; `processor_config.json` with the image processor
  nested; `chat_template.jinja`; `tokenizer.json` + `tokenizer_config.json`.
  Both folders hold the same random float32 weights, rounded to their storage dtype.
* `cases/<folder>/<case>.json` + `<case>.pixels.f32` + `<case>.logits.f32`: transformers references,
  computed by loading THAT folder back in float32 (so the storage rounding is included).
* `gguf/`: `tiny-llava-F16.gguf` (text model), `tiny-llava-Q8_0.gguf` (`llama-quantize ... Q8_0`),
  `mmproj-tiny-llava-F16.gguf` (vision tower + projector), `llamacpp-<quant>-<case>.json`
  (llama-mtmd-cli greedy outputs), `llamacpp-no-template-flag.json`, `llamacpp-text-<quant>-<case>.json`
  (text-only chats through llama.cpp), `llamacpp-fixes.patch` (two fixes to llama.cpp's LLaVA vision graph)
  and `llamacpp-fixed-<quant>-<case>.json` (llama-mtmd-cli greedy outputs from llama.cpp with that patch).

## Model

Real classes (`LlavaForConditionalGeneration`, `LlavaConfig`, `CLIPVisionConfig`, `LlamaConfig`), tiny sizes:

* vision (CLIP ViT): image 56, patch 14 (4x4 = 16 patches + CLS), hidden 32, 3 layers, 2 heads,
  intermediate 64, `quick_gelu`, layer_norm_eps 1e-5, pre-LN (`pre_layrnorm`), `post_layernorm` present but unused.
* LLaVA: `vision_feature_layer` -2 (output of encoder layer 2 of 3), `vision_feature_select_strategy`
  default (CLS dropped: 16 image tokens per image), projector linear(32->64) + gelu (exact) + linear(64->64),
  `image_token_index` 32000.
* text (Llama): vocab 32064, hidden 64, intermediate 160, 2 layers, 4 heads, 2 KV heads (GQA), head_dim 16,
  silu, rms_norm_eps 1e-5, rope_theta 10000, max_position_embeddings 512, no biases, untied lm_head.
* Weights: random (seed {SEED}), linear/conv weights N(0, (1.6/sqrt(fan_in))^2) (std 0.1-0.3 here),
  token embeddings N(0, 0.5^2), CLIP class/position embeddings N(0, 0.3^2), lm_head N(0, 0.8^2) (wide
  logits, clear greedy margins), biases N(0, 0.05^2), norm scales U(0.8, 1.2), norm biases N(0, 0.05^2).
  The image changes the output (another image gives other tokens).

## Tokenizer and chat template

The vocabulary is the real Llama-2 SentencePiece vocabulary (32000 pieces with their scores and
merges) from llama.cpp's `models/ggml-vocab-llama-spm.gguf` (MIT licence, llama.cpp project), loaded
through transformers' GGUF tokenizer converter and rebuilt as a transformers 5 `LlamaTokenizer`
(`tokenizer_class` LlamaTokenizer, `legacy` false, BOS added, no EOS) with `<image>` = 32000 and
`<pad>` = 32001 added as special tokens, `pad_token` `<pad>`, as on llava-hf/llava-1.5-7b-hf.
The config's vocab_size is 32064 (rows 32002..32063 are unused, as on the hub).

* `tokenizer.json` is what transformers 5 writes (byte-fallback BPE, no normalizer, Metaspace
  pre-tokenizer with `prepend_scheme` "first"), and is the same file in both folders. transformers 5
  rebuilds a `LlamaTokenizer`'s pipeline from `tokenizer_config.json` (`legacy`, `add_prefix_space`)
  rather than from `tokenizer.json`; here the two agree.
* Checked against llama.cpp's test vectors for this vocabulary (`ggml-vocab-llama-spm.gguf.inp/.out`):
  32 of 47 match; the other 15 all start with a space, where HF's Metaspace does not add the
  SentencePiece dummy prefix (`" Hello"` -> `[15043]`, sentencepiece/llama.cpp: `[29871, 15043]`).
* Text right after a special token gets no `▁` prefix here (`legacy` false, prepend_scheme "first"):
  `"<image>\\nWhat"` -> `[32000, 13, 5618]`. transformers 4.x with the hub's legacy-style tokenizer.json
  gave `[32000, 29871, 13, 5618]`; llama.cpp tokenizes every text chunk with the prefix.
* Chat template: llava-hf's (`chat_template.json` / `chat_template.jinja`): per message, `ROLE: `
  (not for system), then one `<image>\\n` per image part, then each text part followed by a space;
  `ASSISTANT:` as generation prompt. Example (case a): {json.dumps(first['prompt'])}.
  Messages in the case files use content parts `{{"type": "text", "text": ...}}` and
  `{{"type": "image", "path": <relative to this folder>}}` (for transformers the path is dropped: `{{"type": "image"}}`).

## Cases (`cases/<folder>/<case>.json`)

a_square: one square image + question; b_wide: the JPEG + another question; c_two_images: two images
in one user message (square, tall); d_multi_turn: user(image+text), assistant(text), user(text);
e_system: system message + user(image+text).

Fields: `messages`, `prompt` (chat template with add_generation_prompt), `text_input_ids` (the
prompt tokenized, one `<image>` each), `input_ids` (after the processor expands each `<image>` to 16),
`pixel_values_shape` + `<case>.pixels.f32` (float32 little-endian, C order, [n_images, 3, 56, 56]),
`greedy_tokens` (16 new tokens), `greedy_text` (decoded, skip_special_tokens), `greedy_token_strings`,
`logit_margins` / `logit_margin_min` (top1 - top2 at each step, float32), `logit_margin_min_f64`,
`greedy_tokens_f64_equal`, `<case>.logits.f32` (float32 logits at the last prompt position = the
distribution of the first new token, 32064 values), `<case>.logits_f64.f32` (the same logits from the
float64 run, stored as float32: the exact answer; `logits_f32_max_abs_diff_vs_f64` says how far
transformers' own float32 run is from it), `logits_first_step_top5` ([id, logit]).

* Processor: `AutoProcessor.from_pretrained(folder)` with its image processor replaced by
  `CLIPImageProcessorPil.from_pretrained(folder)` (the PIL class, named explicitly): resize shortest
  edge to 56 (PIL bicubic), centre crop 56, rescale 1/255, normalize with CLIP mean/std. The torchvision
  class (`CLIPImageProcessor`, the default when torchvision is installed) differs by at most
  `pixel_values_max_abs_diff_vs_torchvision_processor` (~2e-7).
* Greedy: hand-written loop with the KV cache (checked equal to `generate(min_new_tokens=16,
  max_new_tokens=16, do_sample=False)`); EOS (2) is never chosen (masked, like `min_new_tokens` and
  llama.cpp's `--ignore-eos`); the first-step logits file is unmasked.
* Every case was also run in float64: greedy tokens are equal in all cases, all margins > {MIN_MARGIN}.

| folder | case | n input ids | greedy tokens | min margin | f32 == f64 | greedy text |
|---|---|---|---|---|---|---|
{chr(10).join(case_rows)}

The two folders' weights differ by their f16 / bf16 rounding, so their tokens part in some cases:
{diverge}. Each folder is its own reference.

## GGUF (`gguf/`)

* Text model: `convert_hf_to_gguf.py` run on `{HUB}/` (it maps `LlavaForConditionalGeneration` to its
  Llama text converter and skips the vision tensors) through `/work/shared/bench/convert_with_vocab.py`,
  which takes the `tokenizer.*` keys from a vocab GGUF instead of the folder: that vocab GGUF is built
  by the script from `ggml-vocab-llama-spm.gguf` the way the converter's sentencepiece path treats the
  real llava-hf repo (32000 pieces, `<image>` and `<pad>` CONTROL with score -1000, `[PAD32002]`..
  `[PAD32063]` UNUSED with score -10000, bos 1, eos 2, unk 0, pad 32001, add_bos true, add_eos false, and
  `tokenizer.chat_template` = llava-hf's template). `--outtype f16`, then `llama-quantize ... Q8_0`
  (k-quants need rows that are multiples of 256). Q/K weights are permuted for llama.cpp's rope as usual.
* mmproj: the documented LLaVA-1.5 path: the vision tower saved as its own `CLIPVisionModel` folder
  (config without `vision_feature_layer`) and the projector as `llava.projector`
  (`model.mm_projector.0/2.*`, what `llava_surgery.py` produces), converted with the legacy
  `convert_image_encoder_to_gguf.py --llava-projector ... --clip-model-is-vision` through
  `/work/shared/bench/legacy_llava_mmproj.py` (transformers 5 shim), F16 (1-D tensors f32).
  It stores `clip.vision.block_count` 2 (the last of the 3 layers is dropped), no post-LN, and names
  CLIP's `fc1` `ffn_down` and `fc2` `ffn_up` (llama.cpp detects the swap: "ffn up/down are swapped").

## llama.cpp references (`gguf/llamacpp-<quant>-<case>.json`)

`llama-mtmd-cli -m <model> --mmproj mmproj-tiny-llava-F16.gguf --image ... -p <text> -n 16 --temp 0
--ignore-eos -c 512 -t 2 --seed 0` (+ `-v` to log the formatted prompt), run in this folder, for
cases a, b, c (c with two `--image`), F16 and Q8_0, each in two template modes:

* without a template flag llama-mtmd-cli aborts: its default is the non-jinja formatter, which cannot
  map llava-hf's template to a built-in one ("this custom template is not supported, try using
  --jinja": `llamacpp-no-template-flag.json`);
* `jinja` (`--jinja`): the GGUF's template through llama.cpp's jinja engine (it ignores
  `{{% generation %}}`). The prompt is one user message whose text starts with one `<__media__>`
  marker per image and no image parts, so the template's `<image>\\n` is not produced:
  {json.dumps(jinja_a['jinja']['formatted_prompt'])};
* `vicuna` (`--chat-template vicuna`, what docs/multimodal/llava.md prescribes):
  {json.dumps(jinja_a['vicuna']['formatted_prompt'])}.

mtmd tokenizes each text segment on its own (BOS before the first; each segment gets SPM's space
prefix: `What` -> `▁What`), so the prompt ids differ from transformers' (`prompt_token_ids`,
reconstructed with llama-tokenize; the logged prompt token count matches). Images are preprocessed
llama.cpp's way: fit into 56x56 keeping the aspect ratio, Pillow-style bicubic, pad to square with
(122, 116, 104), no crop.

`generated_text` is stdout without the newline printed before the text and the two after it (`stdout`
is kept raw). llama-mtmd-cli does not print ids: `retokenized_ids` is a re-tokenization (it adds a
`▁` piece at the start), `sampled_ids_inferred` the ids of the emulation below where its text matches.

**The llama.cpp outputs do not match transformers with the same prompt ids and pixels
(`hf_same_prompt_*`)**, because llama.cpp {LLAMA_CPP_COMMIT} runs a legacy LLaVA-1.5 mmproj differently from
transformers (known upstream: issues ggml-org/llama.cpp#25814 and #25817, closed as stale; fixes
proposed in PRs #25844 and #25845, not merged at 0c1e57098; `llamacpp-fixed-*` below applies them):
(1) the CLS embedding is appended after the patch embeddings while the position ids stay 0..16 and
rows 1..16 are kept, so each patch gets its neighbour's position embedding, patch 0 is dropped and
the CLS output is fed as the last image token; (2) the converter already dropped the last encoder layer
and the graph runs `n_layer - 1` of the stored ones, one layer fewer than `vision_feature_layer` -2.
The projector also uses tanh-gelu. `llamacpp_emulation_*` is transformers (float32, f16 weights) with
exactly that wiring (`llamacpp_image_features()` in the script). The last column below counts the
leading tokens of the emulation that llama.cpp printed too, with the emulation's top1-top2 margin at
the first disagreement: F16 follows the emulation until a small margin meets llama.cpp's f16
activations; Q8_0 parts earlier: its ~0.4% weight error (the activations are quantized too) moves logits
of magnitude ~25 by tenths, more than several of the margins.
The text model alone (no image, text-only prompt) matches transformers token for token with F16
(`llamacpp-text-*` below).
A llama.cpp-compatible GGUF path in seer should therefore be compared with the transformers cases
(same semantics) or with `llamacpp-fixed-*` (below) rather than with these texts, which carry the two defects.

| quant | case | mode | llama.cpp text | = HF same prompt | emulation tokens agreeing |
|---|---|---|---|---|---|
{chr(10).join(cpp_rows)}
{readme_text_section()}
{readme_fixed_section()}"""
    (FIX / "README.md").write_text(text, encoding="utf-8")
    log("README written")


# ============================================================================= main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="images,hf,cases,gguf,llamacpp,llamacpp-text,llamacpp-fixed,readme")
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
    if "llamacpp-text" in steps:
        print(json.dumps(make_llamacpp_text(), indent=1, ensure_ascii=False))
    if "llamacpp-fixed" in steps:
        print(json.dumps(make_llamacpp_fixed(), indent=1, ensure_ascii=False))
    if "readme" in steps:
        make_readme()


if __name__ == "__main__":
    main()
