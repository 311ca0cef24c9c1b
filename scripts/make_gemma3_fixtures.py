#!/usr/bin/env python3
"""Reference fixtures for seer's Gemma 3 implementation (tests/fixtures/gemma3/).

What it builds (all deterministic; re-running rewrites the same files):
  images/             three small PNG test images drawn here: square 96x96, wide 160x40, tall 40x150
  tiny-gemma3/        a tiny random Gemma3ForConditionalGeneration exactly as transformers 5 `save_pretrained`
                      writes it (config.json, model.safetensors in bfloat16 with transformers 5's names
                      language_model.model.* / vision_tower.* / multi_modal_projector.*, generation_config.json,
                      processor_config.json with the Gemma3ImageProcessorPil settings nested, chat_template.jinja =
                      Gemma 3's chat template, tokenizer.json + tokenizer_config.json), plus tokenizer.model (the
                      SentencePiece model the tokenizer was made from, as Gemma's hub repos ship it)
  cases/<case>.json (+ .pixels.f32, .logits.f32, .logits_f64.f32, .image_features.f32, .mask_full.u8,
                      .mask_sliding.u8)
                      transformers references: messages, prompt, input_ids after the processor's expansion,
                      token_type_ids, the prefill attention masks of both layer types, pixels, image features,
                      first-step logits (float32 and float64 runs), 16 greedy tokens, margins; computed by loading
                      tiny-gemma3/ back (float32, and float64 for the check)
  gguf/               the same model converted with llama.cpp's own tools: convert_hf_to_gguf.py (text, F16),
                      convert_hf_to_gguf.py --mmproj (vision tower + projector, F16), llama-quantize Q8_0;
                      llamacpp-<quant>-<case>.json: llama-mtmd-cli --jinja greedy outputs of the single-turn cases,
                      with transformers run on llama.cpp's prompt ids, llama.cpp-style (letterboxed) pixels and
                      llama.cpp's attention scale
  README.md           what is there and how it was made

Model: Gemma3Config / Gemma3ForConditionalGeneration (SigLIP vision tower without head, 64x64 images in 8x8
patches, average-pooled 2x2 to mm_tokens_per_image 16, RMS-normed and projected; Gemma 3 text model with 6
layers = 5 sliding-window (window 12) + 1 global, as Gemma 3's own 5:1 pattern, local rope base 10000, global
rope base 1e6 with linear scaling 8 as gemma-3-4b-it, head_dim 32 with 4 heads on hidden 64, query_pre_attn_scalar
16 = hidden / heads (as gemma-3-27b, not head_dim), q/k norms, four norms per layer), Gemma3Processor with
Gemma3ImageProcessorPil (the PIL class, named explicitly).  All norms randomised (Gemma's zero-centred RMSNorm
weights included: weight 0 would mean scale 1), also the projector's soft-embedding norm.

Tokenizer: a SentencePiece BPE model (1024 pieces, byte fallback, split digits, no dummy prefix, identity
normalisation: Gemma's settings) trained here on a generated corpus, with Gemma's specials <pad> 0, <eos> 1, <bos>
2, <unk> 3 and <mask>, <start_of_turn>, <end_of_turn>, <start_of_image>, <end_of_image>, <image_soft_token> as
control pieces, "\\n" and "\\n\\n" as user-defined pieces; wrapped as transformers' GemmaTokenizer (BPE with the
SentencePiece vocabulary and merges), boi/eoi/image tokens as named extra_special_tokens.  llama.cpp's converter
reads tokenizer.model (llama SentencePiece vocabulary), so the GGUF is converted from the folder as it is.

How to run (the benchmark venv and llama.cpp build of /work/shared/bench/setup.sh: torch, torchvision,
transformers 5.23, safetensors, gguf, pillow, sentencepiece, numpy; llama.cpp's tools in $BENCH_DIR/build/bin):

    ~/.cache/seer-bench/venv/bin/python scripts/make_gemma3_fixtures.py                 # everything
    ~/.cache/seer-bench/venv/bin/python scripts/make_gemma3_fixtures.py --steps cases   # some steps

Steps: images, hf, cases, gguf, llamacpp, llamacpp-f32, readme.  Environment: see scripts/fixture_common.py.
Runs on CPU with 1 thread in about a minute.
"""
import argparse
import io
import json
import math
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture_common as fc  # noqa: E402
from fixture_common import BIN, LLAMA_CPP, LLAMA_CPP_COMMIT, MEDIA, REPO, dump_json, log, write_f32  # noqa: E402

fc.set_log_tag("gemma3")
FIX = REPO / "tests" / "fixtures" / "gemma3"
MODEL = "tiny-gemma3"
N_NEW_TOKENS = 16
MIN_MARGIN = 2e-2
THREADS = 1
SEED = 9  # chosen among seeds 1..12: greedy margins >= 0.1, >= 4 distinct tokens per case, no control token generated

# ----------------------------------------------------------------------------- tokens
VOCAB_SIZE = 1024
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
CONTROL = ["<mask>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
MASK_ID, SOT_ID, EOT_ID, BOI_ID, EOI_ID, IMAGE_ID = 4, 5, 6, 7, 8, 9
USER_DEFINED = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]  # Gemma has newline runs as single tokens too
NL_ID, NLNL_ID = 10, 11

# ----------------------------------------------------------------------------- model config
IMAGE_SIZE = 64
PATCH = 8
MM_TOKENS = 16                      # 8x8 patches average-pooled 2x2 -> 4x4 tokens
POOL = (IMAGE_SIZE // PATCH) // int(math.isqrt(MM_TOKENS))
SLIDING_WINDOW = 12
MEAN = STD = [0.5, 0.5, 0.5]
PAS = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=32, pan_and_scan_max_num_crops=3,
           pan_and_scan_min_ratio_to_activate=1.2)

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_channels=3,
              image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
              attention_dropout=0.0, vision_use_head=False)
TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh",
            rms_norm_eps=1e-6, max_position_embeddings=4096, sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
            attention_bias=False, attention_dropout=0.0, final_logit_softcapping=None, attn_logit_softcapping=None,
            tie_word_embeddings=True, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=[EOS_ID, EOT_ID])
TOP = dict(mm_tokens_per_image=MM_TOKENS, boi_token_index=BOI_ID, eoi_token_index=EOI_ID, image_token_index=IMAGE_ID,
           tie_word_embeddings=True)

# Gemma 3's chat template (google/gemma-3-4b-it): BOS, a system message folded into the first user turn,
# "<start_of_turn>user\n" / "<start_of_turn>model\n", texts trimmed, images as <start_of_image>.
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# ----------------------------------------------------------------------------- cases
IMAGES = {"square": "images/square-96x96.png", "wide": "images/wide-160x40.png", "tall": "images/tall-40x150.png"}


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
    "e_second_turn": [
        {"role": "user", "content": [img("square"), txt("What is in this image?")]},
        {"role": "assistant", "content": [txt("A red disc and a dark square on a colour gradient.")]},
        {"role": "user", "content": [img("tall"), txt("And what is at the top of this one?")]},
    ],
    "f_pan_and_scan": [{"role": "user", "content": [img("wide"), img("tall"), img("square"),
                                                    txt("Describe these pictures in detail.")]}],
    "g_system": [
        {"role": "system", "content": [txt("You are a careful assistant that answers briefly.")]},
        {"role": "user", "content": [img("square"), txt("Is there any text in the picture?")]},
    ],
}
PROCESSOR_KWARGS = {"f_pan_and_scan": PAS}
LLAMACPP_CASES = ["a_square", "b_wide", "c_tall", "d_two_images"]


# ============================================================================= images
def make_images():
    rng = np.random.default_rng(17)
    (FIX / "images").mkdir(parents=True, exist_ok=True)

    # square 96x96: diagonal gradient, a red disc, a dark square, a white stripe, light noise
    h = w = 96
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([x * 2.6, y * 2.6, 255 - (x + y) * 1.3], -1) + rng.normal(0, 6, (h, w, 3))
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse([10, 14, 52, 56], fill=(220, 30, 40))
    d.rectangle([60, 54, 88, 84], fill=(20, 20, 60))
    d.rectangle([0, 76, 44, 81], fill=(250, 250, 250))
    im.save(FIX / IMAGES["square"], optimize=False)

    fc.draw_wide(rng, FIX / IMAGES["wide"])
    fc.draw_tall(rng, FIX / IMAGES["tall"])
    log("images written")


# ============================================================================= tokenizer
CORPUS_WORDS = (
    "the a an this that these those is are was were be in on at of to and or with without what which where how why "
    "who user model image images picture pictures photo colour colours color colors shape shapes red green blue "
    "yellow white black dark light bright grey orange purple circle disc square triangle rectangle bar stripe line "
    "lines wave waves gradient top bottom left right middle centre center describe detail details see can you there "
    "any text two different same careful assistant answers briefly one three four five large small big little tall "
    "wide narrow long short near far above below next I it they we do does not no yes please tell me about more "
    "look like looks shows show here some crops help better original also first second then now").split()


def corpus():
    """A deterministic English-like corpus: the words above in random sentences, some numbers."""
    rng = random.Random(7)
    out = []
    for _ in range(4000):
        n = rng.randint(3, 14)
        s = " ".join(rng.choice(CORPUS_WORDS) for _ in range(n))
        s = s[0].upper() + s[1:] + rng.choice([".", "?", "!", ",", ":", "."])
        if rng.random() < 0.15:
            s += " " + str(rng.randint(0, 2025))
        out.append(s)
    return out


def train_sentencepiece():
    """SentencePiece BPE model with Gemma's trainer settings (bytes of tokenizer.model; deterministic: one
    thread, fixed corpus)."""
    import sentencepiece as spm
    f = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=f, model_type="bpe", vocab_size=VOCAB_SIZE,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        control_symbols=CONTROL, user_defined_symbols=USER_DEFINED, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1, minloglevel=2)
    data = f.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=data)
    assert sp.vocab_size() == VOCAB_SIZE
    for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + CONTROL + USER_DEFINED):
        assert sp.id_to_piece(i) == t, (i, sp.id_to_piece(i), t)
    return data


def build_tokenizer(sp_path: Path):
    """transformers 5's GemmaTokenizer (tokenizers BPE with byte fallback, ' ' -> '▁', BOS added) made from the
    SentencePiece model's vocabulary and merges; Gemma 3's boi/eoi/image tokens as named extra special tokens
    (Gemma3Processor reads tokenizer.boi_token, .eoi_token, .image_token and their ids)."""
    from tokenizers import AddedToken
    from tokenizers.models import BPE
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor
    ext = SentencePieceExtractor(str(sp_path)).extract(BPE)
    tok = GemmaTokenizer(vocab=ext["vocab"], merges=ext["merges"], add_bos_token=True, add_eos_token=False,
                         extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                               "image_token": "<image_soft_token>"})
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<start_of_turn>", "<end_of_turn>")],
                   special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in USER_DEFINED])
    assert len(tok) == VOCAB_SIZE
    for t, i in (("<pad>", PAD_ID), ("<eos>", EOS_ID), ("<bos>", BOS_ID), ("<unk>", UNK_ID), ("<mask>", MASK_ID),
                 ("<start_of_turn>", SOT_ID), ("<end_of_turn>", EOT_ID), ("<start_of_image>", BOI_ID),
                 ("<end_of_image>", EOI_ID), ("<image_soft_token>", IMAGE_ID), ("\n", NL_ID), ("\n\n", NLNL_ID),
                 ("\n\n\n", 12), ("\n\n\n\n", 13)):
        assert tok.convert_tokens_to_ids(t) == i, (t, i)
    assert (tok.boi_token_id, tok.eoi_token_id, tok.image_token_id) == (BOI_ID, EOI_ID, IMAGE_ID)
    return tok


TOKENIZER_CHECKS = [
    "What is in this image?", "Describe the colours you can see.", "  two  spaces and a tab\there",
    "Numbers 1234 and 3.14, wörld ñ 日本 🙂", "line\nbreak\n\n\ndouble", " leading space", "trailing space ",
    "Here is the original image \n\n and here are some crops to help you see better ",
]


def check_tokenizer_vs_sentencepiece(tok, sp_path):
    """The transformers tokenizer gives SentencePiece's ids on plain text (no control tokens: SentencePiece never
    matches control pieces in text)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    for s in TOKENIZER_CHECKS + corpus()[:200]:
        a, b = tok(s, add_special_tokens=False).input_ids, sp.encode(s)
        assert a == b, (s, a, b)
    return len(TOKENIZER_CHECKS) + 200


# ============================================================================= model
EMB_STD = 0.2           # token embeddings (tied lm_head); x sqrt(64) = 8 in the residual stream
POST_NORM_CENTRE = 2.0  # post-attention / post-feedforward norm weights U(1.6, 2.4): scales 2.6 .. 3.4
FINAL_NORM_CENTRE = 6.0  # final norm weights U(5.6, 6.4): scales 6.6 .. 7.4 (wide logits: clear greedy margins)


def new_random_model():
    """Random weights (all parameters set here, in sorted-name order from one generator).  With Gemma's defaults
    (zero norm weights, small embeddings) or with all norm scales near 1, the tied embeddings make the model
    repeat one token: the last input token's embedding, x8, dominates the residual stream and the final hidden
    state points back at it.  So the post-sublayer norms scale their outputs up (~3x) and the final norm ~7x."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
    cfg = Gemma3Config(vision_config=SiglipVisionConfig(**VISION), text_config=Gemma3TextConfig(**TEXT), **TOP)
    torch.manual_seed(SEED)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(SEED)
    gemma_norms = {n for n, m in model.named_modules() if "RMSNorm" in type(m).__name__}
    layer_norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}

    def u(shape, lo, hi):
        return lo + torch.rand(shape, generator=g) * (hi - lo)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            mod, leaf = name.rsplit(".", 1)
            if mod in gemma_norms:  # zero-centred: scale = 1 + weight
                if mod.endswith(("post_attention_layernorm", "post_feedforward_layernorm")):
                    v = u(p.shape, POST_NORM_CENTRE - 0.4, POST_NORM_CENTRE + 0.4)
                elif mod == "model.language_model.norm":
                    v = u(p.shape, FINAL_NORM_CENTRE - 0.4, FINAL_NORM_CENTRE + 0.4)
                else:  # input / pre-feedforward / q / k norms, the projector's mm_soft_emb_norm
                    v = u(p.shape, -0.4, 0.4)
            elif mod in layer_norms:
                v = u(p.shape, 0.8, 1.2) if leaf == "weight" else torch.randn(p.shape, generator=g) * 0.05
            elif leaf == "bias":
                v = torch.randn(p.shape, generator=g) * 0.05
            elif "embed_tokens" in name:
                v = torch.randn(p.shape, generator=g) * EMB_STD
            elif "position_embedding" in name:
                v = torch.randn(p.shape, generator=g) * 0.3
            elif leaf == "mm_input_projection_weight":  # [vision hidden, text hidden], used as x @ W
                v = torch.randn(p.shape, generator=g) * (1.6 / p.shape[0] ** 0.5)
            else:  # linear / conv weights: gain 1.6 / sqrt(fan_in)
                fan_in = int(np.prod(p.shape[1:]))
                v = torch.randn(p.shape, generator=g) * (1.6 / fan_in ** 0.5)
            p.copy_(v.to(p.dtype))
    return model


def image_processor():
    from transformers import Gemma3ImageProcessorPil
    from transformers.image_utils import PILImageResampling
    return Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=PILImageResampling.BILINEAR,
                                   image_mean=MEAN, image_std=STD, do_convert_rgb=True)


def make_hf():
    from transformers import GenerationConfig, Gemma3Processor
    out = FIX / MODEL
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    sp_path = out / "tokenizer.model"
    sp_path.write_bytes(train_sentencepiece())
    tok = build_tokenizer(sp_path)
    n = check_tokenizer_vs_sentencepiece(tok, sp_path)
    log(f"tokenizer: {n} strings give SentencePiece's ids")
    model = new_random_model()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, EOT_ID], pad_token_id=PAD_ID)
    model.to(torch.bfloat16).save_pretrained(out)
    proc = Gemma3Processor(image_processor=image_processor(), tokenizer=tok, image_seq_length=MM_TOKENS,
                           chat_template=CHAT_TEMPLATE)
    proc.save_pretrained(out)
    fc.fix_modes(out)
    log(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")


# ============================================================================= processor details
def pillow13_vertical_first(src, dst):
    """Whether Pillow 13 resamples vertically first for src -> dst (w, h) (python-pillow/Pillow#9549; Pillow <= 12
    and llama.cpp always run the horizontal pass first)."""
    return dst[1] != src[1] and dst[0] != src[0] and dst[1] < src[1] and src[1] - dst[1] > 2 * (src[0] - dst[0])


def pan_and_scan_crops(w, h, kw):
    """Gemma3ImageProcessor.pan_and_scan: crop boxes [x0, y0, x1, y1] (clipped to the image) of one image."""
    if not kw.get("do_pan_and_scan"):
        return []
    mn, mx, ratio = kw["pan_and_scan_min_crop_size"], kw["pan_and_scan_max_num_crops"], \
        kw["pan_and_scan_min_ratio_to_activate"]
    if w >= h:
        if w / h < ratio:
            return []
        nw = int(math.floor(w / h + 0.5))
        nw = min(int(math.floor(w / mn)), nw)
        nw, nh = min(mx, max(2, nw)), 1
    else:
        if h / w < ratio:
            return []
        nh = int(math.floor(h / w + 0.5))
        nh = min(int(math.floor(h / mn)), nh)
        nw, nh = 1, min(mx, max(2, nh))
    cw, ch = int(math.ceil(w / nw)), int(math.ceil(h / nh))
    if min(cw, ch) < mn:
        return []
    return [[x, y, min(x + cw, w), min(y + ch, h)] for y in range(0, ch * nh, ch) for x in range(0, cw * nw, cw)]


FULL_IMAGE = "\n\n<start_of_image>" + "<image_soft_token>" * MM_TOKENS + "<end_of_image>\n\n"


def image_replacement(num_crops):
    """Gemma3Processor.replace_image_token: the text that replaces one image's <start_of_image> in the prompt."""
    if not num_crops:
        return FULL_IMAGE
    return (f"Here is the original image {FULL_IMAGE} and here are some crops to help you see better "
            + " ".join([FULL_IMAGE] * num_crops))


def expand_prompt(prompt, crops_per_image):
    """The prompt text after the processor's expansion (each <start_of_image> in turn replaced, as text; the
    processor tokenizes the result as a whole, so the newlines around an image merge with their neighbours)."""
    parts = prompt.split("<start_of_image>")
    assert len(parts) == len(crops_per_image) + 1
    out = parts[0]
    for n, rest in zip(crops_per_image, parts[1:]):
        out += image_replacement(n) + rest
    return out


def attention_masks(token_type_ids, window):
    """transformers 5.23's prefill masks for Gemma 3 (create_masks_for_vision_model), recomputed: each run of
    consecutive image tokens (token_type_ids 1) is one block; full layers: causal OR same block; sliding layers:
    (kv > q - window) AND (causal OR same block).  [L, L] bool, [q, kv], True = attend."""
    tt = np.asarray(token_type_ids)
    L = len(tt)
    is_img = tt == 1
    start = is_img & ~np.concatenate([[False], is_img[:-1]])
    blk = np.where(is_img, np.cumsum(start) - 1, -1)
    q, k = np.mgrid[0:L, 0:L]
    same = (blk[q] == blk[k]) & (blk[q] >= 0)
    full = (k <= q) | same
    sliding = (k > q - window) & full
    return full, sliding


# ============================================================================= transformers references
def load_processor(folder: Path):
    """The folder's processor with its image processor forced to the PIL class (Gemma3ImageProcessorPil)."""
    from transformers import AutoProcessor, Gemma3ImageProcessorPil
    proc = AutoProcessor.from_pretrained(folder)
    fast = proc.image_processor
    proc.image_processor = Gemma3ImageProcessorPil.from_pretrained(folder)
    assert proc.image_seq_length == MM_TOKENS
    return proc, fast


def hf_messages(messages):
    return [{"role": m["role"], "content": [{"type": "image"} if c["type"] == "image" else dict(c)
                                            for c in m["content"]]} for m in messages]


def case_images(messages):
    return [c["path"] for m in messages for c in m["content"] if c["type"] == "image"]


def load_models(attn="eager"):
    from transformers import Gemma3ForConditionalGeneration
    m32, info = Gemma3ForConditionalGeneration.from_pretrained(FIX / MODEL, dtype=torch.float32,
                                                               attn_implementation=attn, output_loading_info=True)
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    assert not any(problems.values()), problems
    m64 = Gemma3ForConditionalGeneration.from_pretrained(FIX / MODEL, dtype=torch.float64, attn_implementation=attn)
    return m32.eval(), m64.eval()


def load_llamacpp_scale_model():
    """tiny-gemma3 in float32 with query_pre_attn_scalar = head_dim: the attention scale llama.cpp uses for every
    Gemma 3 except the 62-layer 27B (1/sqrt(n_embd_head_k), src/models/gemma3.cpp; the GGUF has no key for it)."""
    from transformers import AutoConfig, Gemma3ForConditionalGeneration
    cfg = AutoConfig.from_pretrained(FIX / MODEL)
    cfg.text_config.query_pre_attn_scalar = cfg.text_config.head_dim
    m = Gemma3ForConditionalGeneration.from_pretrained(FIX / MODEL, config=cfg, dtype=torch.float32,
                                                       attn_implementation="eager")
    return m.eval()


def capture_masks(model, kw):
    """The attention-mask mapping transformers' Gemma3Model hands the language model in the prefill (eager:
    additive float masks [1, 1, L, L]) -> {layer type: [L, L] bool}."""
    lm = model.model.language_model
    got = {}
    orig = lm.forward

    def hook(*a, **k):
        got.update({t: (m[0, 0] == 0).numpy() for t, m in k["attention_mask"].items()})
        return orig(*a, **k)
    lm.forward = hook
    try:
        with torch.no_grad():
            model(**kw, use_cache=True)
    finally:
        lm.forward = orig
    return got


def first_logits(model, kw):
    with torch.no_grad():
        return model(**kw, use_cache=True).logits[0, -1].detach().clone()


def make_cases():
    torch.set_num_threads(THREADS)
    proc, fast = load_processor(FIX / MODEL)
    tok = proc.tokenizer
    m32, m64 = load_models()
    mcpp = load_llamacpp_scale_model()
    eos = [EOS_ID, EOT_ID]
    assert m32.generation_config.eos_token_id == eos
    outdir = FIX / "cases"
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    summary = {}
    for case, messages in CASES.items():
        pkw = PROCESSOR_KWARGS.get(case, {})
        paths = case_images(messages)
        images = [Image.open(FIX / p) for p in paths]
        prompt = proc.apply_chat_template(hf_messages(messages), add_generation_prompt=True)
        # the template writes <bos>: tokenize without adding another (as apply_chat_template(tokenize=True) does)
        inputs = proc(images=images, text=prompt, add_special_tokens=False, return_tensors="pt", **pkw)
        ids = inputs["input_ids"][0].tolist()
        text_ids = tok(prompt, add_special_tokens=False).input_ids
        double_bos = proc(images=images, text=prompt, return_tensors="pt", **pkw)["input_ids"][0, :2].tolist()
        assert ids[0] == BOS_ID and ids[1] != BOS_ID and double_bos == [BOS_ID, BOS_ID]
        tt = inputs["token_type_ids"][0].tolist()
        assert tt == [int(t == IMAGE_ID) for t in ids]
        px = inputs["pixel_values"]
        fast_px = fast(images=images, return_tensors="pt", **pkw)["pixel_values"]
        # per image: pan-and-scan crops, expansion, token counts
        layout = []
        for p, im in zip(paths, images):
            w, h = im.size
            crops = pan_and_scan_crops(w, h, pkw)
            subs = [[0, 0, w, h]] + crops
            layout.append({"image": p, "size": [w, h], "num_crops": len(crops), "crops": crops,
                           "pixel_values_entries": len(subs), "image_tokens": MM_TOKENS * len(subs),
                           "replacement_text": image_replacement(len(crops)),
                           "pillow13_vertical_first": [pillow13_vertical_first((b[2] - b[0], b[3] - b[1]),
                                                                               (IMAGE_SIZE, IMAGE_SIZE)) for b in subs]})
        assert px.shape[0] == sum(la["pixel_values_entries"] for la in layout)
        expanded = expand_prompt(prompt, [la["num_crops"] for la in layout])
        assert tok(expanded, add_special_tokens=False).input_ids == ids, "expansion differs from expand_prompt()"
        # naive: the prompt's ids with each <start_of_image> id replaced by the replacement's own ids
        naive, k = [], 0
        for t in text_ids:
            if t == BOI_ID:
                naive += tok(layout[k]["replacement_text"], add_special_tokens=False).input_ids
                k += 1
            else:
                naive.append(t)
        assert ids.count(IMAGE_ID) == sum(la["image_tokens"] for la in layout)
        kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
              "token_type_ids": inputs["token_type_ids"], "pixel_values": px}
        t32, mg32, first = fc.greedy(m32, kw, N_NEW_TOKENS, eos)
        kw64 = dict(kw, pixel_values=px.double())
        t64, mg64, first64 = fc.greedy(m64, kw64, N_NEW_TOKENS, eos)
        with torch.no_grad():
            gen = m32.generate(**{k: inputs[k] for k in kw}, max_new_tokens=N_NEW_TOKENS,
                               min_new_tokens=N_NEW_TOKENS, do_sample=False, num_beams=1)
        assert gen[0, len(ids):].tolist() == t32, (case, gen[0, len(ids):].tolist(), t32)
        assert t32 == t64, f"{case}: f32 greedy {t32} != f64 greedy {t64}"
        assert min(mg32) > MIN_MARGIN and min(mg64) > MIN_MARGIN, (case, min(mg32), min(mg64))
        # masks: captured from transformers == the formula
        masks = capture_masks(m32, kw)
        full, sliding = attention_masks(tt, SLIDING_WINDOW)
        assert masks["full_attention"].shape == full.shape and (masks["full_attention"] == full).all(), case
        assert masks["sliding_attention"].shape == sliding.shape and (masks["sliding_attention"] == sliding).all(), case
        # image features (the projector's output, what replaces the <image_soft_token> embeddings)
        with torch.no_grad():
            vis = m32.model.get_image_features(px)
            feats = vis.pooler_output
            feats64 = m64.model.get_image_features(px.double()).pooler_output
        # what matters: images mirrored, causal-only mask (no token_type_ids), no sliding window,
        # llama.cpp's attention scale
        mir = proc(images=[ImageOps.mirror(im.convert("RGB")) for im in images], text=prompt,
                   add_special_tokens=False, return_tensors="pt", **pkw)
        first_mir = first_logits(m32, {k: mir[k] for k in kw})
        t_mir, _, _ = fc.greedy(m32, {k: mir[k] for k in kw}, N_NEW_TOKENS, eos)
        first_causal = first_logits(m32, {k: v for k, v in kw.items() if k != "token_type_ids"})
        cfgt = m32.config.text_config
        cfgt.sliding_window = 1 << 20
        try:
            first_nowin = first_logits(m32, kw)
        finally:
            cfgt.sliding_window = SLIDING_WINDOW
        t_cpp, mg_cpp, first_cpp = fc.greedy(mcpp, kw, N_NEW_TOKENS, eos)
        write_f32(outdir / f"{case}.logits.f32", first)
        write_f32(outdir / f"{case}.logits_f64.f32", first64)
        write_f32(outdir / f"{case}.pixels.f32", px)
        write_f32(outdir / f"{case}.image_features.f32", feats)
        write_f32(outdir / f"{case}.image_features_f64.f32", feats64)
        (outdir / f"{case}.mask_full.u8").write_bytes(np.ascontiguousarray(full.astype(np.uint8)).tobytes())
        (outdir / f"{case}.mask_sliding.u8").write_bytes(np.ascontiguousarray(sliding.astype(np.uint8)).tobytes())
        top5 = torch.topk(first, 5)
        L = len(ids)
        rec = {
            "case": case, "folder": MODEL, "stored_weight_dtype": "bfloat16",
            "reference": "transformers 5.23 Gemma3ForConditionalGeneration.from_pretrained(tiny-gemma3, dtype=float32, "
                         "attn_implementation='eager'), CPU; processor = AutoProcessor.from_pretrained(tiny-gemma3) with "
                         "the image processor replaced by Gemma3ImageProcessorPil.from_pretrained(tiny-gemma3)",
            "messages": messages,
            "processor_kwargs": pkw,
            "prompt": prompt,
            "text_input_ids": text_ids,
            "input_ids": ids,
            "input_ids_note": "processor(images, prompt, add_special_tokens=False): the chat template already writes "
                              "<bos>; with the default add_special_tokens=True the tokenizer adds a second one",
            "image_token_id": IMAGE_ID,
            "boi_token_id": BOI_ID,
            "eoi_token_id": EOI_ID,
            "num_image_tokens_per_image": [la["image_tokens"] for la in layout],
            "images": layout,
            "images_note": "per image (in prompt order): size [w, h]; num_crops = pan-and-scan crops (boxes [x0, y0, x1, "
                           "y1], the last one clipped at the image edge); pixel_values_entries = 1 + num_crops (the "
                           "whole image first, then the crops row-major), each resized (bilinear, no aspect ratio kept) "
                           "to 64x64 and 16 <image_soft_token> each; replacement_text = the text that replaces the "
                           "image's <start_of_image> in the prompt; pillow13_vertical_first per entry: the resize in which Pillow 13 runs "
                           "the vertical pass first (python-pillow/Pillow#9549)",
            "expanded_prompt": expanded,
            "expanded_prompt_note": "the prompt with each <start_of_image> replaced by its image's replacement_text; "
                                    "input_ids = this text tokenized as a whole (no BOS added)",
            "input_ids_equal_per_image_concatenation": naive == ids,
            "input_ids_equal_per_image_concatenation_note": "whether tokenizing the prompt and the replacement texts "
                                                            "separately gives the same ids: no when newlines meet "
                                                            "(\\n + \\n\\n is one token \\n\\n\\n)",
            "token_type_ids": tt,
            "token_type_ids_note": "1 = <image_soft_token> (Gemma3Processor's image_token_ids), 0 otherwise; "
                                   "transformers needs them in the prefill for the bidirectional image blocks",
            "attention_mask_files": {"full_attention": f"{case}.mask_full.u8",
                                     "sliding_attention": f"{case}.mask_sliding.u8"},
            "attention_mask_shape": [L, L],
            "attention_mask_note": "uint8 [query, key], 1 = attends; the prefill masks transformers builds "
                                   "(create_masks_for_vision_model, captured and checked equal to the formula): full "
                                   "layers: key <= query OR both in the same image block (a run of consecutive image "
                                   "tokens); sliding layers: key > query - 12 AND (key <= query OR same block), so an "
                                   "image token sees every later token of its own block however far, but earlier "
                                   "tokens only within the window. Decode steps: causal + window, no blocks",
            "sliding_window": SLIDING_WINDOW,
            "layer_types": TEXT["layer_types"],
            "pixel_values_file": f"{case}.pixels.f32",
            "pixel_values_shape": list(px.shape),
            "pixel_values_dtype": "float32 little-endian, C order; [entries of all images in prompt order (each image: "
                                  "the whole image, then its pan-and-scan crops), 3, 64, 64]",
            "pixel_values_max_abs_diff_vs_torchvision_processor": float((fast_px.float() - px.float()).abs().max())
            if fast_px.shape == px.shape else None,
            "image_features_file": f"{case}.image_features.f32",
            "image_features_shape": list(feats.shape),
            "image_features_note": "Gemma3Model.get_image_features(pixel_values).pooler_output: vision tower -> 8x8 "
                                   "patches average-pooled 2x2 -> 4x4 row-major -> mm_soft_emb_norm -> @ "
                                   "mm_input_projection_weight; these replace the <image_soft_token> embeddings "
                                   "(which are NOT scaled by sqrt(hidden) like token embeddings); "
                                   "image_features_f64_file: the same in float64, stored as float32",
            "image_features_f64_file": f"{case}.image_features_f64.f32",
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
            "ablation_first_logits_max_abs_diff": {
                "images_mirrored": float((first_mir - first).abs().max()),
                "no_token_type_ids_causal_only": float((first_causal - first).abs().max()),
                "no_sliding_window": float((first_nowin - first).abs().max()),
                "query_pre_attn_scalar_head_dim": float((first_cpp - first).abs().max()),
            },
            "ablation_note": "max |first-step logits - logits| when the images are mirrored left-right, when "
                             "token_type_ids are left out (plain causal mask: no bidirectional image blocks), when the "
                             "sliding window is made huge, and with query_pre_attn_scalar = head_dim (llama.cpp's "
                             "scale): each of these matters",
            "mirrored_images_greedy_tokens": t_mir,
            "llamacpp_scale_greedy_tokens": t_cpp,
            "llamacpp_scale_logit_margin_min": min(mg_cpp),
        }
        dump_json(outdir / f"{case}.json", rec)
        summary[case] = {"greedy_tokens": t32, "margin_min": round(min(mg32), 5), "margin_min_f64": round(min(mg64), 5),
                         "f32_eq_f64": t32 == t64, "n_input_ids": L,
                         "image_tokens": rec["num_image_tokens_per_image"],
                         "num_crops": [la["num_crops"] for la in layout],
                         "ablations": {k: round(v, 4) for k, v in rec["ablation_first_logits_max_abs_diff"].items()}}
        log(f"{case}: {L} ids, image tokens {rec['num_image_tokens_per_image']}, tokens {t32}, margin "
            f"{min(mg32):.4f}, ablations {summary[case]['ablations']}")
    dump_json(outdir / "summary.json", summary)
    return summary



# ============================================================================= GGUF
GGUF_DIR = FIX / "gguf"
F16 = GGUF_DIR / "tiny-gemma3-F16.gguf"
Q8 = GGUF_DIR / "tiny-gemma3-Q8_0.gguf"
MMPROJ = GGUF_DIR / "mmproj-tiny-gemma3-F16.gguf"
QUANTS = (("F16", F16), ("Q8_0", Q8))
CONVERT_ENV = {"PYTHONDONTWRITEBYTECODE": "1"}  # the converter then uses its own gguf-py (not the venv's gguf)


def hub_layout_copy(dst_root: Path) -> Path:
    """A copy of tiny-gemma3/ whose weights carry the hub's vision names (vision_tower.vision_model.*, as
    google/gemma-3-*-it ship them) instead of transformers 5's (vision_tower.*): llama.cpp's mmproj converter maps
    only the former.  Same folder name, so the GGUF's general.name is the same."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    dst = dst_root / MODEL
    dst.mkdir(parents=True)
    for f in (FIX / MODEL).iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    out = {}
    with safe_open(str(FIX / MODEL / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        for k in f.keys():
            nk = "vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k
            out[nk] = f.get_tensor(k)
    save_file(out, str(dst / "model.safetensors"), metadata=meta)
    return dst


def convert(folder, outfile, outtype, mmproj=False, check=True):
    cmd = [sys.executable, LLAMA_CPP / "convert_hf_to_gguf.py", folder] + (["--mmproj"] if mmproj else []) + \
          ["--outtype", outtype, "--outfile", outfile]
    log("RUN", " ".join(str(c) for c in cmd))
    import os
    import subprocess
    env = dict(os.environ, **CONVERT_ENV)
    p = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return p


def make_gguf():
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    convert(FIX / MODEL, F16, "f16")
    with tempfile.TemporaryDirectory(prefix="seer-gemma3-") as td:
        # the folder as transformers 5 saved it: the mmproj converter stops on the vision tower's names
        p = convert(FIX / MODEL, Path(td) / "direct-mmproj.gguf", "f16", mmproj=True, check=False)
        err = [ln for ln in p.stderr.splitlines() if ln.startswith("ValueError")]
        assert p.returncode != 0 and err, "the mmproj converter now takes transformers 5's names: simplify make_gguf"
        convert(hub_layout_copy(Path(td)), MMPROJ, "f16", mmproj=True)
    fc.run([BIN / "llama-quantize", F16, Q8, "Q8_0", "2"], capture=True)
    for f in (F16, Q8, MMPROJ):
        f.chmod(0o644)
    dump_json(GGUF_DIR / "conversion.json", {
        "llama_cpp": LLAMA_CPP_COMMIT,
        "text": f"convert_hf_to_gguf.py {MODEL} --outtype f16 --outfile gguf/{F16.name}",
        "mmproj": f"convert_hf_to_gguf.py <copy of {MODEL} with vision_tower.* renamed vision_tower.vision_model.*> "
                  f"--mmproj --outtype f16 --outfile gguf/{MMPROJ.name}",
        "mmproj_direct_error": err[-1],
        "mmproj_direct_note": f"convert_hf_to_gguf.py {MODEL} --mmproj fails: transformers 5 saves Gemma 3's vision "
                              "tower as vision_tower.* (SiglipVisionModel without its vision_model level); the "
                              "converter's tensor map knows vision_tower.vision_model.* (the hub checkpoints' names) "
                              "and model.vision_tower.* but not vision_tower.*",
        "q8_0": f"llama-quantize gguf/{F16.name} gguf/{Q8.name} Q8_0 2",
    })


# ============================================================================= llama.cpp references
def gguf_vocab(path):
    kv = fc.gguf_kv(path, ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.add_bos_token",
                           "tokenizer.ggml.bos_token_id"])
    return kv


def spm_piece_bytes(vocab, ids):
    """The bytes llama.cpp prints for these ids of a llama (SentencePiece) vocabulary (common_token_to_piece with
    special=true): normal pieces with '▁' as a space, <0xNN> byte pieces as the byte, control / user-defined
    pieces as their text, unused ones as nothing."""
    toks, types = vocab["tokenizer.ggml.tokens"], vocab["tokenizer.ggml.token_type"]
    out = b""
    for i in ids:
        t, ty = toks[i], types[i]
        if ty == 6:
            out += bytes([int(t[3:5], 16)])
        elif ty == 1:
            out += t.replace("\u2581", " ").encode("utf-8")
        elif ty == 2:
            out += "\u2585".encode("utf-8")
        elif ty in (3, 4):
            out += t.encode("utf-8")
    return out


def resize_h_first(im, size):
    """Bilinear resize as llama.cpp's img_tool::resize_pillow does it: a port of Pillow's fixed-point resampling
    that always runs the horizontal pass first (as Pillow up to 12.x; Pillow 13 runs the vertical pass first when
    the height shrinks by more than twice as many pixels as the width).  Each single-axis PIL resize is one pass."""
    w, h = im.size
    if size == (w, h):
        return im
    if size[0] != w:
        im = im.resize((size[0], h), Image.BILINEAR)
    return im.resize(size, Image.BILINEAR) if size[1] != h else im


def llamacpp_pixels(path):
    """Python emulation of llama.cpp's Gemma 3 preprocessing (mtmd_image_preprocessor_fixed_size with the clip
    defaults for PROJECTOR_TYPE_GEMMA3: RESIZE_ALGO_BILINEAR, PAD_CEIL, black): the image scaled to fit 64x64
    keeping its aspect ratio (scale = min(64/w, 64/h) in float, sides ceil()ed), centred on black (offset
    (64 - side) / 2, integer), then (x/255 - 0.5)/0.5.  Transformers instead stretches the image to 64x64."""
    im = Image.open(FIX / path).convert("RGB")
    w, h = im.size
    sz = np.float32(IMAGE_SIZE)
    scale = min(sz / np.float32(w), sz / np.float32(h))
    nw = min(int(math.ceil(np.float32(w) * scale)), IMAGE_SIZE)
    nh = min(int(math.ceil(np.float32(h) * scale)), IMAGE_SIZE)
    if (w, h) == (IMAGE_SIZE, IMAGE_SIZE):
        canvas, box = im, [0, 0, w, h]
    else:
        r = resize_h_first(im, (nw, nh))
        canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))
        ox, oy = (IMAGE_SIZE - nw) // 2, (IMAGE_SIZE - nh) // 2
        canvas.paste(r, (ox, oy))
        box = [ox, oy, ox + nw, oy + nh]
    a = (np.asarray(canvas, dtype=np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(a.transpose(2, 0, 1).copy())[None], {"image": path, "size": [w, h], "placed": box}


def mtmd_prompt_ids(model, parts, n_images, add_bos):
    """Prompt ids as mtmd builds them: BOS (the vocabulary adds one; llama.cpp's chat code drops the template's
    <bos> text); each text segment tokenized on its own (parse_special), each image as <start_of_image> + 16
    embeddings (written as <image_soft_token>) + <end_of_image>, without transformers' "\\n\\n" around it."""
    ids, k = ([BOS_ID] if add_bos else []), 0
    for part in parts:
        segs = part.split(MEDIA)
        for i, s in enumerate(segs):
            ids += fc.llama_tokenize(model, s)
            if i < len(segs) - 1:
                ids += [BOI_ID] + [IMAGE_ID] * MM_TOKENS + [EOI_ID]
                k += 1
    assert k == n_images
    return ids


def make_llamacpp():
    torch.set_num_threads(THREADS)
    cli = BIN / "llama-mtmd-cli"
    m32, _ = load_models()
    mcpp = load_llamacpp_scale_model()
    vocab = gguf_vocab(F16)
    add_bos = vocab["tokenizer.ggml.add_bos_token"]

    def piece_bytes(ids):
        return spm_piece_bytes(vocab, ids)

    def mtmd(args):
        cmd = [str(cli)] + [str(a) for a in args]
        log("RUN", " ".join(cmd))
        return fc.subprocess.run(cmd, cwd=FIX, capture_output=True)  # bytes: a piece can be part of a character

    for f in GGUF_DIR.glob("llamacpp-*.json"):
        f.unlink()
    results = {}
    for quant, model in QUANTS:
        for case in LLAMACPP_CASES:
            messages = CASES[case]
            paths = case_images(messages)
            user = [m for m in messages if m["role"] == "user"]
            assert len(user) == 1 and len(messages) == 1
            prompt = " ".join(c["text"] for c in user[0]["content"] if c["type"] == "text")
            args = ["-m", model.relative_to(FIX), "--mmproj", MMPROJ.relative_to(FIX)]
            for p in paths:
                args += ["--image", p]
            args += ["-p", prompt, "-n", N_NEW_TOKENS, "--temp", "0", "--ignore-eos", "-c", "2048", "-t", THREADS,
                     "--seed", "0", "--jinja", "-v"]
            p = fc.run_complete(mtmd, args)
            stderr = p.stderr.decode("utf-8", errors="replace")
            parts, n_eval = fc.mtmd_log_info(stderr)
            formatted = "".join(parts)
            eog = fc.eog_ids_from_log(stderr)
            gen = fc.mtmd_stdout_text(p.stdout, len(parts))
            ids = mtmd_prompt_ids(model, parts, len(paths), add_bos)
            assert n_eval == len(ids), (n_eval, len(ids))
            cpp = [llamacpp_pixels(pth) for pth in paths]
            px = torch.cat([c[0] for c in cpp])
            hf_case = json.load(open(FIX / "cases" / f"{case}.json"))
            hf_px = torch.from_numpy(np.fromfile(FIX / "cases" / f"{case}.pixels.f32", dtype="<f4")
                                     .reshape(hf_case["pixel_values_shape"]))
            idt = torch.tensor([ids])
            kw = {"input_ids": idt, "attention_mask": torch.ones_like(idt),
                  "token_type_ids": (idt == IMAGE_ID).long(), "pixel_values": px}
            toks, mg, _ = fc.greedy(m32, kw, N_NEW_TOKENS, eog)
            text = piece_bytes(toks)
            k = fc.agreeing(piece_bytes, gen, toks)
            ctoks, cmg, _ = fc.greedy(mcpp, kw, N_NEW_TOKENS, eog)
            ctext = piece_bytes(ctoks)
            ck = fc.agreeing(piece_bytes, gen, ctoks)
            rec = {
                "llama_cpp": LLAMA_CPP_COMMIT, "model": model.name, "mmproj": MMPROJ.name, "case": case,
                "cwd": "tests/fixtures/gemma3", "messages": messages, "prompt_given": prompt, "images": paths,
                "command": ["llama-mtmd-cli"] + [str(a) for a in args],
                "formatted_prompt": formatted,
                "formatted_prompt_note": "the GGUF's chat template (Gemma 3's) through llama.cpp's jinja engine, as "
                                         "logged by -v: one user message whose text is one <__media__> marker per "
                                         "image, then the text; the template's <bos> is not in it (the tokenizer "
                                         "adds BOS)",
                "hf_chat_template_prompt": hf_case["prompt"],
                "prompt_token_ids": ids,
                "prompt_token_ids_note": "reconstructed: BOS, each text segment tokenized on its own with "
                                         "llama-tokenize, each image as <start_of_image> + 16 embedding positions "
                                         "(written as <image_soft_token> = 9) + <end_of_image> (no \\n\\n around it, "
                                         "unlike transformers); the logged prompt token count matches",
                "n_prompt_tokens_logged": n_eval,
                "hf_input_ids_equal": ids == hf_case["input_ids"],
                "llamacpp_images": [c[1] for c in cpp],
                "llamacpp_images_note": "llama.cpp keeps the aspect ratio: the image is resized (bilinear) into the "
                                        "box `placed` [x0, y0, x1, y1] of a black 64x64 canvas; transformers stretches "
                                        "it to 64x64",
                "llamacpp_style_pixels_max_abs_diff_vs_hf_processor":
                    float((hf_px - px).abs().max()) if hf_px.shape == px.shape else None,
                "eog_ids_masked": eog,
                "stdout": fc.text_of(p.stdout),
                "generated_text": fc.text_of(gen),
                "generated_bytes_hex": gen.hex(),
                "generated_text_note": "stdout without the newline printed after evaluating the message and the two "
                                       "after the text; generated_bytes_hex: the exact bytes (a byte-fallback token "
                                       "can hold part of a UTF-8 character: generated_text shows that as U+FFFD); "
                                       "comparisons are on the bytes",
                "retokenized_ids": fc.llama_tokenize(model, gen),
                "retokenized_ids_note": "llama-tokenize of generated_text (no BOS): a re-tokenization, not the "
                                        "sampled ids (llama-mtmd-cli does not print those)",
                "hf_same_prompt_greedy_tokens": ctoks,
                "hf_same_prompt_text": fc.text_of(ctext),
                "hf_same_prompt_text_equal": ctext == gen,
                "hf_same_prompt_tokens_agreeing": ck,
                "hf_same_prompt_min_margin": min(cmg),
                "hf_same_prompt_margins": cmg,
                "hf_same_prompt_note": "transformers (tiny-gemma3, float32) given prompt_token_ids, token_type_ids = "
                                       "the embedding positions and llama.cpp-style pixels (llamacpp_pixels() in the "
                                       "script: aspect ratio kept, centred on black), with llama.cpp's EOG ids masked, "
                                       "and with query_pre_attn_scalar = head_dim (32) instead of the config's 16: the "
                                       "attention scale llama.cpp hard-codes for Gemma 3 (1/sqrt(key_length); only a "
                                       "62-layer model gets 1/sqrt(n_embd/n_head)); the GGUF has no key for it. So this "
                                       "is what this GGUF means to llama.cpp; text = pieces as llama.cpp prints them",
                "hf_config_scale_greedy_tokens": toks,
                "hf_config_scale_text": fc.text_of(text),
                "hf_config_scale_text_equal": text == gen,
                "hf_config_scale_tokens_agreeing": k,
                "hf_config_scale_min_margin": min(mg),
                "hf_config_scale_margins": mg,
                "hf_config_scale_note": "the same transformers run with the folder's own config (query_pre_attn_scalar "
                                        "16): what the HF model computes on llama.cpp's prompt and pixels",
            }
            if ctext != gen:
                ftoks, devs, complete = fc.follow_llamacpp(mcpp, kw, piece_bytes, gen, N_NEW_TOKENS, eog)
                rec.update({"hf_same_prompt_follow_llamacpp_tokens": ftoks,
                            "hf_same_prompt_follow_llamacpp_deviations": devs,
                            "hf_same_prompt_follow_llamacpp_complete": complete})
            rec["sampled_ids_inferred"] = ctoks if ctext == gen else (
                rec["hf_same_prompt_follow_llamacpp_tokens"] if rec["hf_same_prompt_follow_llamacpp_complete"]
                else None)
            dump_json(GGUF_DIR / f"llamacpp-{quant}-{case}.json", rec)
            results[f"{quant}/{case}"] = {"text": fc.text_of(gen), "hf_same_prompt_equal": ctext == gen,
                                          "hf_same_prompt_agree": ck, "hf_config_scale_equal": text == gen,
                                          "hf_config_scale_agree": k}
            log(f"llama.cpp {quant} {case}: {fc.text_of(gen)!r} (HF same prompt, llama.cpp's attention scale: "
                f"{ctext == gen} {ck}/16; config's scale: {text == gen} {k}/16)")
    return results


# ============================================================================= llama.cpp with F32 files
def make_llamacpp_f32():
    """The F16 runs again with everything in float32 (text GGUF and mmproj converted with --outtype f32 into a
    temporary folder, not kept; KV cache f32, flash attention off: its CPU kernel rounds to f16 inside): shows
    whether a difference from transformers in the F16 runs is f16 rounding (gone here) or a difference in what
    llama.cpp computes."""
    cli = BIN / "llama-mtmd-cli"
    vocab = gguf_vocab(F16)
    out = {"llama_cpp": LLAMA_CPP_COMMIT, "model": MODEL,
           "note": "the commands of llamacpp-F16-<case>.json with -m/--mmproj replaced by F32 conversions of the same "
                   "folder (convert_hf_to_gguf.py --outtype f32, not kept), -ctk f32 -ctv f32 and -fa off; compared "
                   "with the transformers runs on the same prompt ids and pixels of the F16 file: "
                   "hf_same_prompt (query_pre_attn_scalar = head_dim, llama.cpp's scale) and hf_config_scale (the "
                   "config's 16)",
           "cases": {}}
    with tempfile.TemporaryDirectory(prefix="seer-gemma3-f32-") as td:
        t32, m32 = Path(td) / "text-F32.gguf", Path(td) / "mmproj-F32.gguf"
        convert(FIX / MODEL, t32, "f32")
        convert(hub_layout_copy(Path(td) / "hub"), m32, "f32", mmproj=True)
        for case in LLAMACPP_CASES:
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
            rec = {"generated_text": fc.text_of(gen), "f16_generated_text_equal": fc.text_of(gen) == f16["generated_text"]}
            for key in ("hf_same_prompt", "hf_config_scale"):
                toks = f16[f"{key}_greedy_tokens"]
                rec[f"{key}_text_equal"] = spm_piece_bytes(vocab, toks) == gen
                rec[f"{key}_tokens_agreeing"] = fc.agreeing(lambda t: spm_piece_bytes(vocab, t), gen, toks)
            out["cases"][case] = rec
            log(f"llama.cpp F32 {case}: {fc.text_of(gen)!r} (HF same prompt equal: {rec['hf_same_prompt_text_equal']}, "
                f"with the config's scale: {rec['hf_config_scale_text_equal']})")
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
    import sentencepiece
    import tokenizers
    import transformers
    summary = json.load(open(FIX / "cases" / "summary.json"))
    recs = {c: json.load(open(FIX / "cases" / f"{c}.json")) for c in CASES}
    table, total = fc.file_table(FIX)
    case_rows = []
    for c, v in summary.items():
        r = recs[c]
        crops = ", ".join(str(n) for n in v["num_crops"])
        case_rows.append(f"| {c} | {v['n_input_ids']} | {v['image_tokens']} | {crops} | `{v['greedy_tokens']}` | "
                         f"{v['margin_min']} | {v['f32_eq_f64']} | {json.dumps(r['greedy_text'], ensure_ascii=False)} |")
    abl_rows = []
    for c, v in summary.items():
        a = v["ablations"]
        abl_rows.append(f"| {c} | {a['images_mirrored']} | {a['no_token_type_ids_causal_only']} | "
                        f"{a['no_sliding_window']} | {a['query_pre_attn_scalar_head_dim']} |")
    img_rows, seen = [], set()
    for c in CASES:
        for la in recs[c]["images"]:
            key = (la["image"], la["num_crops"])
            if key in seen:
                continue
            seen.add(key)
            img_rows.append(f"| `{la['image']}` | {la['size'][0]}x{la['size'][1]} | {c if la['num_crops'] else '-'} | "
                            f"{la['num_crops']} | {la['crops'] or '-'} | {la['image_tokens']} | "
                            f"{la['pillow13_vertical_first']} |")
    cpp_rows, cpp = [], {}
    for quant, _ in QUANTS:
        for c in LLAMACPP_CASES:
            f = GGUF_DIR / f"llamacpp-{quant}-{c}.json"
            if not f.exists():
                continue
            r = cpp[(quant, c)] = json.load(open(f))
            k = r["hf_same_prompt_tokens_agreeing"]
            devs = "-" if k == N_NEW_TOKENS else fmt_devs(r.get("hf_same_prompt_follow_llamacpp_deviations")) + (
                "" if r.get("hf_same_prompt_follow_llamacpp_complete") else "; the rest not reproduced")
            px = r["llamacpp_style_pixels_max_abs_diff_vs_hf_processor"]
            cpp_rows.append(f"| {quant} | {c} | {json.dumps(r['generated_text'], ensure_ascii=False)} | "
                            f"{r['hf_same_prompt_text_equal']} ({k}/16) | {devs} | "
                            f"{r['hf_config_scale_text_equal']} ({r['hf_config_scale_tokens_agreeing']}/16) | "
                            f"{len(r['prompt_token_ids'])} ({len(recs[c]['input_ids'])}) | {px:.3g} |")
    n_f16 = sum(cpp[k]["hf_same_prompt_text_equal"] for k in cpp if k[0] == "F16")
    n_f16_cfg = sum(cpp[k]["hf_config_scale_text_equal"] for k in cpp if k[0] == "F16")
    n_q8 = sum(cpp[k]["hf_same_prompt_text_equal"] for k in cpp if k[0] == "Q8_0")
    a = cpp.get(("F16", "a_square"))
    conv = json.load(open(GGUF_DIR / "conversion.json")) if (GGUF_DIR / "conversion.json").exists() else {}
    f32_text = ""
    if (GGUF_DIR / "llamacpp-F32-check.json").exists():
        chk = json.load(open(GGUF_DIR / "llamacpp-F32-check.json"))["cases"]
        f32_text = (f"`llamacpp-F32-check.json`: the F16 commands again with the text model and the mmproj converted to F32, "
                    f"`-ctk f32 -ctv f32 -fa off`: llama.cpp prints the greedy text of transformers with llama.cpp's "
                    f"attention scale in {sum(v['hf_same_prompt_text_equal'] for v in chk.values())} of {len(chk)} "
                    f"cases, that of transformers with the config's scale in "
                    f"{sum(v['hf_config_scale_text_equal'] for v in chk.values())} of {len(chk)}.")
    txkv = fc.gguf_kv(F16, ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
                            "tokenizer.ggml.add_space_prefix", "gemma3.attention.sliding_window",
                            "gemma3.rope.freq_base", "gemma3.rope.freq_base_swa", "gemma3.rope.scaling.type",
                            "gemma3.rope.scaling.factor", "gemma3.attention.key_length"])
    mmkv = fc.gguf_kv(MMPROJ, ["clip.projector_type", "clip.vision.image_size", "clip.vision.patch_size",
                               "clip.vision.projector.scale_factor", "clip.vision.block_count"])
    types = fc.gguf_kv(F16, ["tokenizer.ggml.token_type"])["tokenizer.ggml.token_type"]
    r_a, r_d, r_e, r_f = recs["a_square"], recs["d_two_images"], recs["e_second_turn"], recs["f_pan_and_scan"]
    px_tv = sorted({r["pixel_values_max_abs_diff_vs_torchvision_processor"] for r in recs.values()})
    d64 = [r["logits_f32_max_abs_diff_vs_f64"] for r in recs.values()]
    all_mg = min(min(r["logit_margin_min"], r["logit_margin_min_f64"]) for r in recs.values())
    n_splice = sum(r["input_ids_equal_per_image_concatenation"] for r in recs.values())
    all_f64 = all(r["greedy_tokens_f64_equal"] for r in recs.values())
    text = f"""# Gemma 3 reference fixtures

Made by `scripts/make_gemma3_fixtures.py` (run it to rebuild everything; its docstring says how; shared helpers in
`scripts/fixture_common.py`). Deterministic: a re-run rewrites the same bytes (fixed seeds, one thread, no timestamps).

Versions: transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}, tokenizers {tokenizers.__version__},
sentencepiece {sentencepiece.__version__}, Pillow {PIL.__version__}, llama.cpp {LLAMA_CPP_COMMIT} (vendored in llama-cpp-python 0.3.36: its
`convert_hf_to_gguf.py` with its own `gguf-py`, `llama-quantize`, `llama-mtmd-cli`, `llama-tokenize`). All on CPU.

## Files

| path | bytes |
|---|---|
{table}

* `images/`: drawn by the script, RGB PNG: `square-96x96.png` (gradient, red disc, dark square, white stripe),
  `wide-160x40.png` (colour waves, white bar with dark marks, green triangle), `tall-40x150.png` (gradient, yellow
  circle at the top, blue rectangle, red bar); light noise on all.
* `{MODEL}/`: the model as transformers 5 `save_pretrained` writes it (model and processor): `config.json`
  (`Gemma3Config`, `rope_parameters` per layer type inside `text_config`, `layer_types`, `_sliding_window_pattern`,
  `dtype` bfloat16), `model.safetensors` (**bfloat16**, transformers 5's names: `language_model.model.*`,
  `vision_tower.*` (no `vision_model.` level), `multi_modal_projector.mm_input_projection_weight`,
  `multi_modal_projector.mm_soft_emb_norm.weight`; no `lm_head`: tied to the embeddings), `generation_config.json`
  (bos 2, eos [1, 6], pad 0), `processor_config.json` (`Gemma3Processor`, `image_seq_length` 16, the image processor
  nested as `Gemma3ImageProcessor` settings), `chat_template.jinja`, `tokenizer.json`, `tokenizer_config.json`
  (`GemmaTokenizer`; `boi_token`, `eoi_token`, `image_token` top-level keys), and `tokenizer.model` (the
  SentencePiece model, not written by save_pretrained; copied in as Gemma's hub repos ship it and llama.cpp's converter
  reads it). Hub checkpoints (google/gemma-3-*-it) name the vision tower `vision_tower.vision_model.*` and ship
  `preprocessor_config.json`; transformers loads both (checked: a copy with the hub's vision names loads to the
  same weights).
* `cases/<case>.json` + `.pixels.f32`, `.logits.f32`, `.logits_f64.f32`, `.image_features.f32`,
  `.image_features_f64.f32`, `.mask_full.u8`, `.mask_sliding.u8`; `cases/summary.json`: transformers references computed
  by loading `{MODEL}/` back (float32 and float64, `attn_implementation="eager"`).
* `gguf/`: `tiny-gemma3-F16.gguf` (text), `tiny-gemma3-Q8_0.gguf`, `mmproj-tiny-gemma3-F16.gguf` (vision tower +
  projector), `conversion.json` (commands, the converter's error on the folder as saved), `llamacpp-<quant>-<case>.json`
  (llama-mtmd-cli references), `llamacpp-F32-check.json`.

## Model

Real classes: `Gemma3ForConditionalGeneration`, `Gemma3Config`, `Gemma3TextConfig`, `SiglipVisionConfig`,
`Gemma3Processor`, `Gemma3ImageProcessorPil`, `GemmaTokenizer`. Tiny sizes:

* vision (SigLIP, `vision_use_head` false): image_size {IMAGE_SIZE}, patch {PATCH} (8x8 = 64 patches, learned position
  embeddings), hidden 32, 2 layers, 2 heads, intermediate 64, `gelu_pytorch_tanh`, layer_norm_eps 1e-6, post-layernorm.
* projector (`Gemma3MultiModalProjector`): the 8x8 patch grid (row-major) average-pooled with kernel = stride =
  {POOL} (`patches_per_image / sqrt(mm_tokens_per_image)` = 8 / 4) to 4x4 = `mm_tokens_per_image` {MM_TOKENS} tokens (row-major),
  then `mm_soft_emb_norm` (Gemma RMSNorm over the vision width: `x * rsqrt(mean(x^2) + 1e-6) * (1 + w)`, eps from
  `vision_config.layer_norm_eps`), then `x @ mm_input_projection_weight` — a plain parameter of shape [vision 32, text
  64], used as is (not an `nn.Linear` [out, in]). The result replaces the `<image_soft_token>` embeddings; it is **not**
  multiplied by sqrt(hidden) (only token embeddings are). 16 image tokens per image (or per pan-and-scan crop).
* text (`Gemma3TextModel`): vocab {VOCAB_SIZE}, hidden 64, 6 layers with `layer_types` 5 x `sliding_attention` + 1 x
  `full_attention` (Gemma 3's own 5:1 pattern; llama.cpp has no per-layer key for Gemma 3 and assumes this pattern,
  so a 2-layer model with one of each would not convert faithfully), `sliding_window` {SLIDING_WINDOW} (every prompt here
  is longer), 4 heads, 2 KV heads (GQA), **head_dim 32** (so q_proj is 64 -> 128 and o_proj 128 -> 64, as in real Gemma 3
  where heads x head_dim != hidden), **query_pre_attn_scalar 16** (attention scale 1/4, not 1/sqrt(head_dim): the
  27B's rule hidden/heads), intermediate 128, `gelu_pytorch_tanh` GeGLU, rms_norm_eps 1e-6, q_norm / k_norm (over
  head_dim, before rope), four norms per layer (input, post-attention, pre-feedforward, post-feedforward; the
  post-norms are applied to the sublayer output before the residual add), final norm; embeddings scaled by
  sqrt(hidden) = 8 exactly (`embed_scale`, cast to the weight dtype: exact here, 55.5 instead of 55.43 for bf16
  3072-wide models); tied `lm_head`; no softcapping. RoPE per layer type (`rope_parameters`): sliding layers theta
  10000 default; full layers theta 1e6 with **linear scaling factor 8** (positions / 8), as gemma-3-4b-it.
  `image_token_id` {IMAGE_ID}, `boi_token_id` {BOI_ID}, `eoi_token_id` {EOI_ID}.
* Weights: random (seed {SEED}); linear / conv weights N(0, (1.6/sqrt(fan_in))^2), token embeddings N(0, {EMB_STD}^2),
  vision position embeddings N(0, 0.3^2), projector weight N(0, (1.6/sqrt(32))^2), biases N(0, 0.05^2), SigLIP LayerNorm
  scales U(0.8, 1.2). **All Gemma RMSNorm weights are randomised** (zero-centred: the scale is 1 + w): input /
  pre-feedforward / q / k norms and the projector's `mm_soft_emb_norm` w ~ U(-0.4, 0.4), post-attention /
  post-feedforward norms w ~ U(1.6, 2.4), final norm w ~ U(5.6, 6.4). With transformers' init (w = 0, and
  `mm_input_projection_weight` zero, i.e. the image has no effect) or with all scales near 1, the tied embeddings make
  greedy decoding repeat one token for ever (the last input token's embedding, x8, dominates the residual stream and
  the final state points back at it: an earlier draft produced `\\n` 16 times in every case); the larger post-norm and
  final-norm scales give varied tokens and wide margins. Stored in bfloat16; the references load them back in float32
  / float64.

## Processor

`Gemma3ImageProcessorPil` (the PIL class, named explicitly; `AutoProcessor` gives the torchvision class, whose pixels
differ by up to {max(px_tv):.3g} here, `pixel_values_max_abs_diff_vs_torchvision_processor`): resize to 64x64 **without keeping the
aspect ratio** (bilinear, PIL), rescale 1/255, normalise with mean = std = 0.5; `pixel_values` [entries, 3, 64, 64]
(no batch dimension). Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
pixels as the width (python-pillow/Pillow#9549): here the tall image's 40x150 -> 64x64 resize (`pillow13_vertical_first`
in the case files); Pillow <= 12 and llama.cpp run the horizontal pass first.

**Pan-and-scan** (`f_pan_and_scan`, processor kwargs `{json.dumps(PAS)}`; off by default, `do_pan_and_scan` null
in the config): an image whose aspect ratio is at least 1.2 gets `n = clamp(min(floor(ratio + 0.5), floor(long side /
min_crop_size)), 2, max_num_crops)` crops along its long side, each `ceil(side / n)` long (the last one clipped at the
edge: 52 px wide for the wide image), skipped if a crop would be shorter than `min_crop_size`; the whole image comes
first in `pixel_values`, then its crops; each is resized to 64x64 on its own. The prompt text for such an image is
`"Here is the original image " + S + " and here are some crops to help you see better " + " ".join([S] * n)`, S being
the single-image text below.

| image | size | pan-and-scan case | crops | crop boxes [x0, y0, x1, y1] | image tokens | Pillow 13 vertical first (per entry) |
|---|---|---|---|---|---|---|
{chr(10).join(img_rows)}

**Prompt expansion.** The processor replaces each `<start_of_image>` of the prompt **as text** by S =
`"\\n\\n<start_of_image>" + 16 x "<image_soft_token>" + "<end_of_image>\\n\\n"` and tokenizes the result as a whole
(`expanded_prompt` in the case files). The newlines then merge with their neighbours: `user\\n` + `\\n\\n` is `user` +
`\\n\\n\\n` (one token, id 12), two adjacent images give `<end_of_image>` `\\n\\n\\n\\n` (id 13) `<start_of_image>`. So
`input_ids` is not the prompt's ids with each `<start_of_image>` id swapped for S's ids
(`input_ids_equal_per_image_concatenation` true in {n_splice} of {len(recs)} cases). Example (a_square): {json.dumps(r_a['input_ids'][:8])} ... = `<bos>`
`<start_of_turn>` `user` `\\n\\n\\n` `<start_of_image>` `<image_soft_token>`...

**BOS.** The chat template writes `<bos>` and the tokenizer adds one too (`add_bos_token`): the cases call the processor
with `add_special_tokens=False` (as `apply_chat_template(tokenize=True)` does); the default call gives two BOS.

## Tokenizer and chat template

Gemma 3's tokenizer (262k pieces) would make the files ~35 MB, so the stand-in is a small **SentencePiece BPE model
trained here** (`train_sentencepiece()`: {VOCAB_SIZE} pieces on a generated 4000-sentence corpus, Gemma's trainer settings:
byte fallback, split digits, no dummy prefix, identity normalisation, whitespace-only pieces allowed). Ids: `<pad>` 0,
`<eos>` 1, `<bos>` 2, `<unk>` 3, then control pieces `<mask>` 4, `<start_of_turn>` 5, `<end_of_turn>` 6,
`<start_of_image>` 7, `<end_of_image>` 8, `<image_soft_token>` 9, user-defined pieces `\\n` 10, `\\n\\n` 11, `\\n\\n\\n` 12,
`\\n\\n\\n\\n` 13, the 256 byte pieces `<0x00>`..`<0xFF>` 14..269, then merges. transformers' side is `GemmaTokenizer`
(tokenizers BPE with byte fallback, `' '` -> `'▁'`, BOS added) built from that model's vocabulary and merges; the
control pieces are special added tokens, the newline pieces plain added tokens; `boi_token`, `eoi_token`,
`image_token` are named `extra_special_tokens` (`Gemma3Processor` reads `tokenizer.boi_token`, `.eoi_token`,
`.image_token` and their ids). Checked: on {len(TOKENIZER_CHECKS) + 200} plain strings (spaces, tabs, digits, accents, CJK, emoji,
newline runs) it gives SentencePiece's own ids.

Chat template: Gemma 3's (google/gemma-3-4b-it): `{{{{ bos_token }}}}`, a system message folded into the first user
turn (its text + `\\n\\n`), `<start_of_turn>user\\n` / `<start_of_turn>model\\n` (assistant is called `model`), text parts
trimmed, images as `<start_of_image>`, `<end_of_turn>\\n` after each turn, `<start_of_turn>model\\n` as generation
prompt. Case a: {json.dumps(r_a['prompt'])}; case e: {json.dumps(r_e['prompt'])}. Messages in the case files use
`{{"type": "image", "path": <relative to this folder>}}` parts (for transformers the path is dropped).

## Attention masks (transformers 5.23)

`Gemma3ForConditionalGeneration` needs `token_type_ids` (1 = `<image_soft_token>`, from the processor) in the prefill:
`create_masks_for_vision_model` makes each run of consecutive image tokens one **bidirectional block** (the 16 soft
tokens of one image or one crop; `<start_of_image>` / `<end_of_image>` and the `\\n\\n` around are ordinary causal text,
and two images are two blocks even when adjacent).

* full-attention layers: key <= query **or** query and key in the same block;
* sliding layers: key > query - {SLIDING_WINDOW} **and** (key <= query or same block). The window bounds only the past:
  an image token attends to all later tokens of its own block (here the block is 16 long, longer than the window,
  so the first soft token of an image sees 15 tokens ahead and 11 behind).
* decode steps: `prepare_inputs_for_generation` drops `token_type_ids` after the first step: causal + window only;
  the sliding layers' cache keeps the last window - 1 tokens.

`<case>.mask_full.u8` and `<case>.mask_sliding.u8` hold the prefill masks as transformers builds them (captured from
the model and checked equal to the rule above). Each part matters (`ablation_first_logits_max_abs_diff`: max change of
the first-step logits):

| case | images mirrored | no token_type_ids (plain causal) | no sliding window | query_pre_attn_scalar = head_dim |
|---|---|---|---|---|
{chr(10).join(abl_rows)}

## Cases (`cases/<case>.json`)

a_square, b_wide, c_tall: one image + question; d_two_images: wide and tall in one user message; e_second_turn: user
(square + question), model answer, user (tall + question); f_pan_and_scan: wide, tall and square images with
pan-and-scan on (`processor_kwargs`); g_system: system message + user (square + question).

Fields: `messages`, `processor_kwargs` (pass to the processor call), `prompt` (chat template with
add_generation_prompt), `text_input_ids` (the prompt tokenized, one `<start_of_image>` per image), `expanded_prompt`,
`input_ids` (after the processor's expansion), `token_type_ids`, `num_image_tokens_per_image` (16 per entry: whole
image + crops), `images` (per image: size, crops, replacement text, ...), `attention_mask_files` / `_shape`,
`pixel_values_file` + `_shape` (float32 LE, C order), `image_features_file` + `_shape` (the projector's output [entries,
16, 64]; `image_features_f64_file` the float64 run), `greedy_tokens` (16 new tokens), `greedy_text` (decoded,
skip_special_tokens), `greedy_token_strings`, `greedy_masked_ids` ([1, 6]: `<eos>` and `<end_of_turn>` never chosen, as
`generate(min_new_tokens=16)` with the generation config's eos list), `logit_margins` / `logit_margin_min` (top1 - top2
per step, float32), `logit_margin_min_f64`, `greedy_tokens_f64_equal`, `logits_file` (float32 logits at the last
prompt position, {VOCAB_SIZE} values), `logits_f64_file` (the same from the float64 run, stored as float32: the exact answer;
`logits_f32_max_abs_diff_vs_f64` {min(d64):.1e} to {max(d64):.1e}), `logits_first_step_top5`, `ablation_*`, `mirrored_images_greedy_tokens`,
`llamacpp_scale_greedy_tokens` (greedy with query_pre_attn_scalar = head_dim).

Greedy: hand-written loop with the KV cache (prefill with `token_type_ids`, decode steps without), checked equal to
`generate(min_new_tokens=16, max_new_tokens=16, do_sample=False)`. **Every case was also run in float64: greedy
tokens equal in all cases: {all_f64}; smallest margin (float32 or float64) {all_mg:.3f}.**

| case | n input ids | image tokens per image | crops | greedy tokens | min margin | f32 == f64 | greedy text |
|---|---|---|---|---|---|---|---|
{chr(10).join(case_rows)}

## GGUF (`gguf/`)

* Text model: `convert_hf_to_gguf.py {MODEL} --outtype f16`, on the folder as it is: llama.cpp's Gemma 3 converter reads
  `tokenizer.model` (`tokenizer.ggml.model` {txkv['tokenizer.ggml.model']!r}, `add_bos_token` {txkv['tokenizer.ggml.add_bos_token']}, `add_space_prefix`
  {txkv['tokenizer.ggml.add_space_prefix']}); the control pieces are CONTROL, the newline pieces NORMAL (token types
  {types[:14]} for ids 0..13), `<end_of_turn>` becomes an EOG token by its name. Written: `sliding_window`
  {txkv['gemma3.attention.sliding_window']}, `rope.freq_base` {txkv['gemma3.rope.freq_base']} with `rope.scaling` {txkv['gemma3.rope.scaling.type']!r} x{txkv['gemma3.rope.scaling.factor']}, `rope.freq_base_swa`
  {txkv['gemma3.rope.freq_base_swa']}, `key_length` {txkv['gemma3.attention.key_length']}; norm weights + 1 (llama.cpp's RMS norm multiplies by w
  directly). **Not written: which layers slide** (llama.cpp assumes every 6th layer is global) **and
  `query_pre_attn_scalar`** (llama.cpp uses 1/sqrt(key_length) for every Gemma 3 but the 62-layer 27B). Then
  `llama-quantize ... Q8_0` (all rows are multiples of 32).
* mmproj: **`convert_hf_to_gguf.py {MODEL} --mmproj` fails on the folder as transformers 5 saved it**: 
  `{conv.get('mmproj_direct_error', '')}` (transformers 5 drops the `vision_model.` level of the vision tower's names;
  the converter knows `vision_tower.vision_model.*`, the hub checkpoints' names). The file here was converted from a
  temporary copy with the hub's names (`hub_layout_copy()` in the script; nothing else changed): projector type
  {mmkv['clip.projector_type']!r}, image_size {mmkv['clip.vision.image_size']}, patch {mmkv['clip.vision.patch_size']}, `projector.scale_factor` {mmkv['clip.vision.projector.scale_factor']} (the pooling kernel: the converter
  computes it from `image_seq_length` in `processor_config.json`; llama.cpp's default is 4), {mmkv['clip.vision.block_count']} blocks,
  `mm.soft_emb_norm.weight` + 1, `mm.input_projection.weight` F16.

## llama.cpp references (`gguf/llamacpp-<quant>-<case>.json`)

`llama-mtmd-cli -m gguf/<model> --mmproj gguf/mmproj-tiny-gemma3-F16.gguf --image <img> [--image <img>] -p <user text>
-n 16 --temp 0 --ignore-eos -c 2048 -t 1 --seed 0 --jinja -v`, run in this folder, on the single-turn cases
{', '.join(LLAMACPP_CASES)}, F16 and Q8_0 (e_second_turn needs a multi-turn conversation, f_pan_and_scan pan-and-scan,
which llama.cpp does not do, g_system a -sys message that llama-mtmd-cli evaluates on its own).

* Prompt: the GGUF's template through llama.cpp's jinja engine with one user message `<__media__>` x images + text:
  {json.dumps(a['formatted_prompt'] if a else None)} (no `<bos>` text: llama.cpp's chat code drops it and the tokenizer adds BOS).
  Each image is `<start_of_image>` + 16 embeddings + `<end_of_image>` **without the `\\n\\n` before and after** that
  transformers' processor adds, so `prompt_token_ids` (reconstructed; the logged prompt token count matches) differs
  from transformers' `input_ids` (here one token shorter per image: `user\\n\\n\\n` -> `user\\n`, no `\\n\\n` after).
* Image preprocessing differs: llama.cpp's Gemma 3 path (`mtmd_image_preprocessor_fixed_size`, clip defaults
  `RESIZE_ALGO_BILINEAR` and `PAD_CEIL`) **keeps the aspect ratio and pads with black** (the wide image becomes 64x16 at
  y = 24, the tall one 18x64 at x = 23: `llamacpp_images`), where transformers stretches the image to 64x64; the square
  image gives the same pixels. `llamacpp_pixels()` emulates it (Pillow single-axis bilinear resizes, horizontal first).
* Attention: mtmd decodes an image's embeddings with causal attention off (`mtmd_decode_use_non_causal` true for
  Gemma 3): the same bidirectional block as transformers; llama.cpp's sliding-window mask also bounds only the past
  (`p1 - p0 >= n_swa`).
* `hf_same_prompt_*`: transformers (`{MODEL}`, float32) on `prompt_token_ids` with llama.cpp-style pixels,
  `token_type_ids` on the embedding positions and `query_pre_attn_scalar` = head_dim = 32, the scale llama.cpp applies
  (the GGUF carries no such key): what this GGUF means to llama.cpp. `hf_config_scale_*`: the same with the folder's
  own config (16). `--ignore-eos` masks llama.cpp's EOG ids [1, 6]. `generated_text`: stdout without
  the newline after the prompt and the two after the text (`generated_bytes_hex`: exact bytes; byte-fallback tokens
  can print half a UTF-8 character). Where llama.cpp leaves transformers, `hf_same_prompt_follow_llamacpp_*` walks
  llama.cpp's text with transformers' logits (deviations = [step, rank (0 = top-1), id, piece, logit gap]).

**F16: llama.cpp prints exactly the greedy text of transformers with llama.cpp's attention scale, on the same prompt
ids and pixels, in {n_f16} of {len(LLAMACPP_CASES)} cases; with the config's query_pre_attn_scalar (16) in {n_f16_cfg} of {len(LLAMACPP_CASES)}.** Q8_0:
{n_q8} of {len(LLAMACPP_CASES)}. Columns: llama.cpp's text; equal to transformers with llama.cpp's scale (tokens agreeing); where llama.cpp
took another token; equal to transformers with the config's scale; llama.cpp's prompt length (transformers' own);
max |pixel difference| between llama.cpp's image and transformers' processor.

| quant | case | llama.cpp text | = HF (llama.cpp scale) | where llama.cpp took another token | = HF (config scale) | prompt ids (HF) | pixels vs HF processor |
|---|---|---|---|---|---|---|---|
{chr(10).join(cpp_rows)}

{f32_text}

So for a seer GGUF path: `hf_same_prompt_greedy_tokens` is what llama.cpp computes from this GGUF (its prompt
without `\\n\\n`, its letterboxed pixels, attention scale 1/sqrt(head_dim)), checked token for token against
llama-mtmd-cli in F16 and F32; the transformers cases are the reference for the HF folder.

## Surprises

1. transformers 5.23 saves Gemma 3's vision tower as `vision_tower.*`; llama.cpp's mmproj converter only maps
   `vision_tower.vision_model.*` (hub names): the folder as saved cannot be converted without renaming.
2. llama.cpp ignores `query_pre_attn_scalar` (no GGUF key; 1/sqrt(head_dim) unless the model has 62 layers) and
   which layers slide (assumes a global layer every 6th): a model like this one converts without error but computes
   something else. The 6-layer 5:1 layout here avoids the second; the first is kept on purpose and recorded.
3. llama.cpp letterboxes Gemma 3 images (aspect ratio kept, black padding) where transformers stretches them, and does
   not add the `\\n\\n` around each image: its prompt and pixels differ from transformers' for every non-square image.
4. Bidirectional image blocks in sliding layers: the window limits only the past, so an image token sees its whole
   block ahead.
5. The processor expands images as text: `\\n` + `\\n\\n` tokenizes as `\\n\\n\\n`; ids cannot be spliced per image.
6. Zero-centred norms: transformers' init leaves every Gemma norm at scale 1 and the projector weight at zero (images
   ignored); with tied embeddings a random model then repeats one token (see Model).
7. Two BOS if the chat template's output is tokenized with `add_special_tokens=True`.
8. Pillow 13 resizes the tall image vertically first: transformers' pixels for it are Pillow 13's.
"""
    (FIX / "README.md").write_text(text, encoding="utf-8")
    log(f"README written ({total:,} bytes of fixtures)")


# ============================================================================= main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="images,hf,cases,gguf,llamacpp,llamacpp-f32,readme")
    a = ap.parse_args()
    steps = a.steps.split(",")
    torch.set_num_threads(THREADS)
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
