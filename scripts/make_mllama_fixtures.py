#!/usr/bin/env python3
"""Reference fixtures for seer's Llama 3.2 Vision (Mllama) implementation (tests/fixtures/mllama/).

What it builds (all deterministic; re-running rewrites the same files):
  images/              five small PNG test images drawn here: square-96x96, very-wide-300x40, very-tall-40x300,
                       wide-120x60, small-50x40 (chosen so that the processor picks 4, 4, 4, 2 and 1 tiles and five
                       different aspect-ratio ids)
  tiny-mllama/         a tiny random MllamaForConditionalGeneration exactly as transformers 5 `save_pretrained` writes
                       it (config.json, model.safetensors in bfloat16 with the hub's names language_model.model.* /
                       language_model.lm_head / vision_model.* / multi_modal_projector.*, generation_config.json,
                       processor_config.json with the MllamaImageProcessorPil settings nested, chat_template.jinja =
                       Llama 3.2 Vision Instruct's chat template, tokenizer.json + tokenizer_config.json)
  cases/<case>.json (+ .pixels.f32, .cross_attention_mask.u8, .logits.f32, .logits_f64.f32, .image_features.f32,
                     .image_features_f64.f32; a_square also .vision_output.f32)
                       transformers references: messages, prompt, input_ids (one <|image|> id per image, no
                       expansion), pixel_values, aspect_ratio_ids, aspect_ratio_mask, num_tiles, the processor's
                       cross_attention_mask, the cross-attention states (projector output), first-step logits
                       (float32 and float64 runs), 16 greedy tokens (EOS ids masked), margins, ablations; computed by
                       loading tiny-mllama/ back (float32, and float64 for the check)
  README.md            what is there and how it was made

Model: MllamaConfig / MllamaForConditionalGeneration.  Vision: tiles of 56x56 in 14x14 patches (16 patches + CLS = 17
per tile, padded to 24 inside the encoder), max_num_tiles 4, supported_aspect_ratios as the config derives them,
hidden 32, 2 heads, 4 local layers + 2 gated global layers, intermediate_layers_indices [0, 2], vision_output_dim
32 * (1 + 2) = 96.  Text: Llama-3-style, vocab 1024 (+8 embedding rows, as the real 128256 + 8), hidden 64, 4 heads,
2 KV heads, 5 layers with cross-attention layers [1, 3], rope_theta 500000 with llama3 rope scaling (factor 8,
low 1, high 4, original 8192) as Llama 3.2 Vision, untied lm_head.  All gates (vision positional / tile gates,
global-layer gates, cross-attention gates) randomised to non-zero values: transformers' init leaves them at zero
and the image then has no effect.

Tokenizer: a byte-level BPE (768 tokens: 256 bytes + 512 merges) trained here with the `tokenizers` library on a
generated corpus, with Llama 3's pre-tokenizer regex, ByteLevel decoder, ignore_merges, BOS added by the
post-processor; then Llama 3.2's 256 special tokens (<|begin_of_text|> 768 ... <|eot_id|> 777, reserved tokens)
and <|image|> = 1024 = vocab_size, as the real 128000 + 256 + 1 layout; wrapped in PreTrainedTokenizerFast.

How to run (the benchmark venv of /work/shared/bench/setup.sh: torch, torchvision, transformers 5.23, tokenizers,
safetensors, pillow, numpy):

    ~/.cache/seer-bench/venv/bin/python scripts/make_mllama_fixtures.py                 # everything
    ~/.cache/seer-bench/venv/bin/python scripts/make_mllama_fixtures.py --steps cases   # some steps

Steps: images, hf, cases, readme.  `--seed-search 1,2,...` prints, per seed, the smallest greedy margin and the
checks SEED was chosen by (writes nothing).  Runs on CPU with 1 torch thread in about 10 seconds.
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageOps  # noqa: E402

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture_common as fc  # noqa: E402
from fixture_common import REPO, dump_json, log, write_f32  # noqa: E402

fc.set_log_tag("mllama")
FIX = REPO / "tests" / "fixtures" / "mllama"
MODEL = "tiny-mllama"
N_NEW_TOKENS = 16
MIN_MARGIN = 2e-2
THREADS = 1
SEED = 19  # chosen among seeds 1..30 (--seed-search): the largest smallest greedy margin (0.16); 12+ distinct tokens per case
LM_HEAD_STD = 1.6
PROJECTOR_GAIN = 0.3  # projector weights N(0, (0.3/sqrt(96))^2): with 1.6 the cross-attention output swamps the text
SPECIAL_LM_HEAD_SCALE = 0.1  # lm_head rows of the 256 special tokens (untrained in the real model too)

# ----------------------------------------------------------------------------- tokens
N_BASE = 768                       # byte-level BPE: 256 bytes + 512 merges (Llama 3: 128000)
NAMED_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
SPECIALS = NAMED_SPECIALS + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(NAMED_SPECIALS))]
BOS_ID, EOT_TEXT_ID, PAD_ID = N_BASE + 0, N_BASE + 1, N_BASE + 4
SH_ID, EH_ID, EOM_ID, EOT_ID, PYTHON_ID = N_BASE + 6, N_BASE + 7, N_BASE + 8, N_BASE + 9, N_BASE + 10
VOCAB_SIZE = N_BASE + 256          # 1024: the text config's vocab_size and lm_head rows (real: 128256)
IMAGE_TOKEN, IMAGE_ID = "<|image|>", VOCAB_SIZE  # 1024 (real: 128256), only in the embedding's 8 extra rows
EOS_IDS = [EOT_TEXT_ID, EOM_ID, EOT_ID]          # as the real generation_config: [128001, 128008, 128009]
# Llama 3's pre-tokenizer regex (tokenizer.json of meta-llama/Llama-3.2-11B-Vision-Instruct)
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")

# ----------------------------------------------------------------------------- model config
TILE = 56
PATCH = 14
MAX_TILES = 4
PATCHES_PER_TILE = (TILE // PATCH) ** 2 + 1  # 17 (16 patches + CLS)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # Llama 3.2 Vision's preprocessor_config.json
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
VISION = dict(hidden_size=32, attention_heads=2, intermediate_size=64, num_hidden_layers=4, num_global_layers=2,
              intermediate_layers_indices=[0, 2], vision_output_dim=32 * 3, image_size=TILE, patch_size=PATCH,
              max_num_tiles=MAX_TILES, num_channels=3, hidden_act="gelu", norm_eps=1e-5)
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, cross_attention_layers=[1, 3], hidden_act="silu", rms_norm_eps=1e-5,
            rope_parameters=ROPE, max_position_embeddings=131072, tie_word_embeddings=False,
            bos_token_id=BOS_ID, eos_token_id=EOS_IDS, pad_token_id=PAD_ID)
TOP = dict(image_token_index=IMAGE_ID)

# meta-llama/Llama-3.2-11B-Vision-Instruct's chat template (tokenizer_config.json / chat_template.json), verbatim
CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- Find out if there are any images #}
{% set image_ns = namespace(has_images=false) %}      
{%- for message in messages %}
    {%- for content in message['content'] %}
        {%- if content['type'] == 'image' %}
            {%- set image_ns.has_images = true %}
        {%- endif %}
    {%- endfor %}
{%- endfor %}

{#- Error out if there are images and system message #}
{%- if image_ns.has_images and not system_message == "" %}
    {{- raise_exception("Prompting with images is incompatible with system messages.") }}
{%- endif %}

{#- System message if there are no images #}
{%- if not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\n" }}
    {%- endif %}
    {{- "Cutting Knowledge Date: December 2023\n" }}
    {{- "Today Date: " + date_string + "\n\n" }}
    {%- if tools is not none and not tools_in_user_message %}
        {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
        {{- "Do not use variables.\n\n" }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "\n\n" }}
        {%- endfor %}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# ----------------------------------------------------------------------------- cases
IMAGES = {"square": "images/square-96x96.png", "very_wide": "images/very-wide-300x40.png",
          "very_tall": "images/very-tall-40x300.png", "wide": "images/wide-120x60.png",
          "small": "images/small-50x40.png"}


def txt(t):
    return {"type": "text", "text": t}


def img(key):
    return {"type": "image", "path": IMAGES[key]}


CASES = {
    "a_square": [{"role": "user", "content": [img("square"), txt("What is in this image?")]}],
    "b_very_wide": [{"role": "user", "content": [img("very_wide"), txt("Describe the colours you can see.")]}],
    "c_very_tall": [{"role": "user", "content": [img("very_tall"), txt("What shape is at the top?")]}],
    "d_two_images": [{"role": "user", "content": [img("wide"), img("small"),
                                                  txt("How are these two pictures different?")]}],
    "e_second_turn": [
        {"role": "user", "content": [img("square"), txt("What is in this image?")]},
        {"role": "assistant", "content": [txt("A red disc and a dark square on a colour gradient.")]},
        {"role": "user", "content": [img("small"), txt("And what is in this one?")]},
    ],
    "f_interleaved": [{"role": "user", "content": [txt("Look at this picture: "), img("wide"),
                                                   txt(" and then at this one: "), img("very_tall"),
                                                   txt(" Which one is taller?")]}],
}
VISION_OUTPUT_CASE = "a_square"


# ============================================================================= images
def make_images():
    rng = np.random.default_rng(23)
    if (FIX / "images").exists():
        shutil.rmtree(FIX / "images")
    (FIX / "images").mkdir(parents=True)

    # square 96x96 (fits its 2x2 canvas of 112x112: not resized, only padded): diagonal gradient, a red disc,
    # a dark square, a white stripe, light noise
    h = w = 96
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([x * 2.6, y * 2.6, 255 - (x + y) * 1.3], -1) + rng.normal(0, 6, (h, w, 3))
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse([10, 14, 52, 56], fill=(220, 30, 40))
    d.rectangle([60, 54, 88, 84], fill=(20, 20, 60))
    d.rectangle([0, 76, 44, 81], fill=(250, 250, 250))
    im.save(FIX / IMAGES["square"], optimize=False)

    fc.draw_very_wide(rng, FIX / IMAGES["very_wide"])
    fc.draw_very_tall(rng, FIX / IMAGES["very_tall"])

    # wide 120x60: horizontal stripes of colour, a white circle, a black diagonal line
    h, w = 60, 120
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([200 - x, 60 + (y // 10) * 30, 90 + x * 1.2], -1) + rng.normal(0, 8, (h, w, 3))
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse([70, 10, 108, 48], fill=(250, 250, 250))
    d.line([(4, 56), (60, 4)], fill=(0, 0, 0), width=4)
    im.save(FIX / IMAGES["wide"], optimize=False)

    # small 50x40 (smaller than a tile: upscaled to 56x44): orange background, a blue square, a green bar
    h, w = 40, 50
    a = np.zeros((h, w, 3), np.float32) + np.array([240, 150, 40], np.float32) + rng.normal(0, 12, (h, w, 3))
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.rectangle([6, 6, 24, 24], fill=(30, 60, 220))
    d.rectangle([30, 28, 46, 34], fill=(20, 180, 60))
    im.save(FIX / IMAGES["small"], optimize=False)
    log("images written")


# ============================================================================= tokenizer
CORPUS_WORDS = (
    "the a an this that these those is are was were be in on at of to and or with without what which where how why "
    "who user assistant image images picture pictures photo colour colours color colors shape shapes red green blue "
    "yellow white black dark light bright grey orange purple circle disc square triangle rectangle bar stripe line "
    "lines wave waves gradient top bottom left right middle centre center describe detail details see can you there "
    "any text two different same careful answers briefly one three four five large small big little tall taller "
    "wide narrow long short near far above below next I it they we do does not no yes please tell me about more "
    "look like looks shows show here some help better original also first second then now tile tiles").split()


def corpus():
    """A deterministic English-like corpus: the words above in random sentences, some numbers, paragraphs separated by
    newlines and blank lines (so that "\\n\\n" becomes one token, as in Llama 3)."""
    rng = random.Random(7)
    out = []
    for _ in range(1500):
        para = []
        for _ in range(rng.randint(1, 4)):
            n = rng.randint(3, 14)
            s = " ".join(rng.choice(CORPUS_WORDS) for _ in range(n))
            s = s[0].upper() + s[1:] + rng.choice([".", "?", "!", ",", ":", "."])
            if rng.random() < 0.15:
                s += " " + str(rng.randint(0, 2025))
            para.append(s)
        out.append(rng.choice([" ", "\n", "\n\n"]).join(para) + rng.choice(["\n\n", "\n", ""]))
    return out


def build_tokenizer():
    """Byte-level BPE trained on corpus() with Llama 3's pre-tokenizer (regex split + ByteLevel without its own regex),
    ByteLevel decoder, ignore_merges, BOS added by a TemplateProcessing post-processor (as Llama 3's tokenizer.json);
    Llama 3.2's 256 special tokens after the 768 BPE tokens, <|image|> after those; PreTrainedTokenizerFast."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tk.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=N_BASE, min_frequency=0, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus(), trainer=trainer)
    assert tk.get_vocab_size() == N_BASE, tk.get_vocab_size()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS + [IMAGE_TOKEN]])
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", BOS_ID)])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|finetune_right_pad_id|>", model_max_length=131072,
                                  clean_up_tokenization_spaces=True)
    assert len(tok) == VOCAB_SIZE + 1
    for t, i in (("<|begin_of_text|>", BOS_ID), ("<|end_of_text|>", EOT_TEXT_ID), ("<|finetune_right_pad_id|>", PAD_ID),
                 ("<|start_header_id|>", SH_ID), ("<|end_header_id|>", EH_ID), ("<|eom_id|>", EOM_ID),
                 ("<|eot_id|>", EOT_ID), ("<|python_tag|>", PYTHON_ID), ("<|reserved_special_token_2|>", N_BASE + 11),
                 ("<|reserved_special_token_246|>", N_BASE + 255), (IMAGE_TOKEN, IMAGE_ID)):
        assert tok.convert_tokens_to_ids(t) == i, (t, i)
    assert tok("hi").input_ids[0] == BOS_ID and tok("hi", add_special_tokens=False).input_ids[0] != BOS_ID
    nn = tok("\n\n", add_special_tokens=False).input_ids
    assert len(nn) == 1, nn
    return tok


# ============================================================================= model
GATES = {  # name suffix -> (lo, hi) of the uniform draw (the value itself, before tanh)
    "gated_positional_embedding.gate": (0.5, 0.9),
    "pre_tile_positional_embedding.gate": (0.5, 0.9),
    "post_tile_positional_embedding.gate": (0.5, 0.9),
    "gate_attn": (0.5, 1.0),
    "gate_ffn": (0.5, 1.0),
    "cross_attn_attn_gate": (0.6, 1.0),
    "cross_attn_mlp_gate": (0.6, 1.0),
}


def new_random_model(seed=SEED):
    """Random weights (every parameter set here, in sorted-name order from one generator).  transformers' init leaves
    all gates at zero (cross-attention gates, the gated positional / tile embeddings' gates) or near zero (global
    layers' gate_attn / gate_ffn N(0, 0.02)): the image would have no effect; here they are U(0.5, 1)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaTextConfig, MllamaVisionConfig
    cfg = MllamaConfig(vision_config=MllamaVisionConfig(**VISION), text_config=MllamaTextConfig(**TEXT), **TOP)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    norm_names = {n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.LayerNorm) or "RMSNorm" in type(m).__name__}

    def u(shape, lo, hi):
        return lo + torch.rand(shape, generator=g) * (hi - lo)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            mod, leaf = name.rsplit(".", 1)
            gate = next((r for k, r in GATES.items() if name.endswith(k)), None)
            if gate is not None:
                v = u(p.shape, *gate)
            elif mod in norm_names:
                v = u(p.shape, 0.8, 1.2) if leaf == "weight" else torch.randn(p.shape, generator=g) * 0.05
            elif leaf == "bias":
                v = torch.randn(p.shape, generator=g) * 0.05
            elif "embed_tokens" in name:
                v = torch.randn(p.shape, generator=g) * 0.5
            elif name.endswith("class_embedding") or name.endswith("gated_positional_embedding.embedding"):
                v = torch.randn(p.shape, generator=g) * 0.3
            elif "tile_positional_embedding.embedding" in name or "tile_embedding" in name:
                v = torch.randn(p.shape, generator=g) * 0.3
            elif name == "model.multi_modal_projector.weight":  # cross-attention states of std ~1
                v = torch.randn(p.shape, generator=g) * (PROJECTOR_GAIN / p.shape[1] ** 0.5)
            elif name == "lm_head.weight":  # wide logits: clear greedy margins; special-token rows small
                v = torch.randn(p.shape, generator=g) * LM_HEAD_STD
                v[N_BASE:] *= SPECIAL_LM_HEAD_SCALE
            else:  # linear / conv weights: gain 1.6 / sqrt(fan_in)
                fan_in = int(np.prod(p.shape[1:]))
                v = torch.randn(p.shape, generator=g) * (1.6 / fan_in ** 0.5)
            p.copy_(v.to(p.dtype))
    return model


def image_processor():
    from transformers import MllamaImageProcessorPil
    from transformers.image_utils import PILImageResampling
    return MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, max_image_tiles=MAX_TILES,
                                   resample=PILImageResampling.BILINEAR, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                                   do_convert_rgb=True, do_resize=True, do_rescale=True, do_normalize=True,
                                   do_pad=True)


def make_processor(tok):
    from transformers import MllamaProcessor
    return MllamaProcessor(image_processor=image_processor(), tokenizer=tok, chat_template=CHAT_TEMPLATE)


def make_hf():
    from transformers import GenerationConfig
    out = FIX / MODEL
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok = build_tokenizer()
    model = new_random_model()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_IDS, pad_token_id=PAD_ID)
    model.to(torch.bfloat16).save_pretrained(out)
    make_processor(tok).save_pretrained(out)
    fc.fix_modes(out)
    log(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")


# ============================================================================= processor details
def aspect_ratios(max_tiles=MAX_TILES):
    """get_all_supported_aspect_ratios: (a, b) for a in 1.., b in 1.., a*b <= max; used as (tiles down, across)."""
    return [(a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles]


def tile_layout(w, h):
    """MllamaImageProcessorPil's arithmetic for one w x h image (get_optimal_tiled_canvas, get_image_size_fit_to_canvas,
    pad, split_to_tiles)."""
    ars = aspect_ratios()
    scales = [min(a * TILE / h, b * TILE / w) for a, b in ars]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    cands = [ar for ar, s in zip(ars, scales) if s == chosen]
    rows, cols = min(cands, key=lambda ar: ar[0] * ar[1])  # first of the smallest area (np.argmin)
    ch, cw = rows * TILE, cols * TILE
    tw, th = min(max(w, TILE), cw), min(max(h, TILE), ch)
    sh, sw = th / h, tw / w
    if sw < sh:
        nw, nh = tw, min(math.floor(h * sw) or 1, th)
    else:
        nh, nw = th, min(math.floor(w * sh) or 1, tw)
    return {"size_wh": [w, h], "scales": dict(zip([f"{a}x{b}" for a, b in ars], [round(s, 6) for s in scales])),
            "chosen_scale": round(chosen, 6), "upscaling": bool(up), "grid_rows_cols": [rows, cols],
            "canvas_hw": [ch, cw], "resized_wh": [nw, nh], "pad_right_bottom": [cw - nw, ch - nh],
            "num_tiles": rows * cols, "aspect_ratio_id": ars.index((rows, cols)) + 1}


def pillow_pass(src, dst):
    """Which separable pass order this venv's Pillow used for one bilinear resize (found by comparing with the two
    single-axis orders): 'h-first', 'v-first', 'either' (same bytes), 'single-axis' or 'none' (no resize)."""
    w, h = dst
    if src.size == (w, h):
        return "none"
    if src.size[0] == w or src.size[1] == h:
        return "single-axis"
    direct = np.asarray(src.resize((w, h), Image.BILINEAR))
    hf = np.asarray(src.resize((w, src.size[1]), Image.BILINEAR).resize((w, h), Image.BILINEAR))
    vf = np.asarray(src.resize((src.size[0], h), Image.BILINEAR).resize((w, h), Image.BILINEAR))
    eh, ev = np.array_equal(direct, hf), np.array_equal(direct, vf)
    return "either" if eh and ev else "h-first" if eh else "v-first" if ev else "neither"


def cross_attention_ranges(ids):
    """get_cross_attention_token_mask: per image [start, end) of the tokens that see it."""
    locs = [i for i, t in enumerate(ids) if t == IMAGE_ID]
    if len(locs) == 1:
        return [[locs[0], len(ids)]]
    masks = [[a, b] for a, b in zip(locs[:-1], locs[1:])] + [[locs[-1], len(ids)]]
    last = masks[-1][1]
    for m in masks[::-1]:
        if m[0] == m[1] - 1:  # consecutive images: see everything the next one sees
            m[1] = last
        last = m[1]
    return masks


# ============================================================================= transformers references
def load_processor(folder: Path):
    """The folder's processor with its image processor forced to the PIL class (MllamaImageProcessorPil)."""
    from transformers import AutoProcessor, MllamaImageProcessorPil
    proc = AutoProcessor.from_pretrained(folder)
    fast = proc.image_processor
    proc.image_processor = MllamaImageProcessorPil.from_pretrained(folder)
    assert proc.image_token_id == IMAGE_ID and proc.image_processor.max_image_tiles == MAX_TILES
    return proc, fast


def hf_messages(messages):
    return [{"role": m["role"], "content": [{"type": "image"} if c["type"] == "image" else dict(c)
                                            for c in m["content"]]} for m in messages]


def case_images(messages):
    return [c["path"] for m in messages for c in m["content"] if c["type"] == "image"]


def load_models(folder=None, attn="eager"):
    from transformers import MllamaForConditionalGeneration
    folder = folder or FIX / MODEL
    m32, info = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn,
                                                               output_loading_info=True)
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    assert not any(problems.values()), problems
    m64 = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float64, attn_implementation=attn)
    return m32.eval(), m64.eval()


MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
              "cross_attention_mask")


def greedy(model, kw, n, masked_ids):
    """Greedy decoding with the KV cache, as generate() does for Mllama: the prefill gets the pixels, later steps
    only the cached cross-attention keys/values, and each new token the last row of the cross-attention mask
    (_update_model_kwargs_for_generation repeats it).  masked_ids never chosen.  Returns (tokens, margins, first
    logits)."""
    toks, margins, first = [], [], None
    mask, cam = kw["attention_mask"], kw["cross_attention_mask"]
    with torch.no_grad():
        out = model(**kw, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1]
        for step in range(n):
            if step == 0:
                first = logits.detach().clone()
            logits = logits.clone()
            logits[[i for i in masked_ids if i < logits.shape[0]]] = -float("inf")
            top2 = torch.topk(logits, 2)
            margins.append(float(top2.values[0] - top2.values[1]))
            t = int(top2.indices[0])
            toks.append(t)
            if step == n - 1:
                break
            mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype)], dim=1)
            out = model(input_ids=torch.tensor([[t]]), attention_mask=mask, cross_attention_mask=cam[:, -1:],
                        past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1]
    return toks, margins, first


def first_logits(model, kw):
    with torch.no_grad():
        return model(**kw, use_cache=True).logits[0, -1].detach().clone()


def cross_attention_states(model, kw):
    """What MllamaModel.forward computes from the pixels: vision model -> multi_modal_projector, [n_images, 4, 17, hidden]
    (and the vision model's own output [n_images, 4, 17, vision_output_dim]).  Checks on the way that the intermediate
    features are the OUTPUTS of the local layers intermediate_layers_indices, interleaved channel by channel."""
    vm = model.model.vision_model
    outs = []
    hooks = [l.register_forward_hook(lambda mod, a, o: outs.append(o.detach().clone())) for l in vm.transformer.layers]
    try:
        with torch.no_grad():
            vis = vm(pixel_values=kw["pixel_values"], aspect_ratio_ids=kw["aspect_ratio_ids"],
                     aspect_ratio_mask=kw["aspect_ratio_mask"]).last_hidden_state
            states = model.model.multi_modal_projector(vis)
    finally:
        for h in hooks:
            h.remove()
    n, hid, idx = vis.shape[1], VISION["hidden_size"], VISION["intermediate_layers_indices"]
    inter = vis[0, ..., hid:].reshape(n, MAX_TILES, PATCHES_PER_TILE, hid, len(idx))
    for k, i in enumerate(idx):
        o = outs[i].reshape(n, MAX_TILES, -1, hid)[:, :, :PATCHES_PER_TILE]
        assert torch.equal(inter[..., k], o), f"intermediate feature {k} is not the output of local layer {i}"
    return vis[0], states[0]


class zero_masked_rows:
    """Meta's reference (llama-models CrossAttention) multiplies the cross-attention output by
    full_text_row_masked_out_mask; transformers does not (only the MLP part): with this, tokens that see no image get
    no cross-attention output at all."""

    def __init__(self, model, cam):
        self.layers = [l.cross_attn for l in model.model.language_model.layers if hasattr(l, "cross_attn")]
        self.row = (cam.flatten(2).any(-1)).to(torch.float32)  # [1, L]
        self.handles = []

    def __enter__(self):
        def hook(mod, args, out):
            o = out[0]
            r = self.row[:, -o.shape[1]:, None].to(o.dtype)
            return (o * r,) + tuple(out[1:])
        self.handles = [l.register_forward_hook(hook) for l in self.layers]

    def __exit__(self, *a):
        for h in self.handles:
            h.remove()


class vision_pad_keys_masked:
    """An alternative vision attention mask: every padding position (the 7 positions padding each tile's 17 to 24, and
    all positions of padding tiles) masked as a key for every query, where transformers (and Meta) mask only the
    padding-query x padding-key pairs."""

    def __enter__(self):
        import transformers.models.mllama.modeling_mllama as mm
        self.mm, self.orig = mm, mm._prepare_aspect_ratio_attention_mask

        def proper(aspect_ratio_mask, num_patches, target_length, dtype):
            b, t = aspect_ratio_mask.shape
            valid = aspect_ratio_mask.view(b, t, 1).to(dtype).repeat(1, 1, target_length)
            valid[:, :, num_patches:] = 0
            valid = valid.reshape(b, 1, 1, t * target_length)
            return (1 - valid) * torch.finfo(dtype).min * torch.ones(1, 1, t * target_length, 1, dtype=dtype)
        mm._prepare_aspect_ratio_attention_mask = proper

    def __exit__(self, *a):
        self.mm._prepare_aspect_ratio_attention_mask = self.orig


class intermediate_as_layer_inputs:
    """transformers 4.x / Meta's reference (llama_models ImageTransformer: `if idx in return_intermediate:
    out.append(x)` before block idx): intermediate_layers_indices pick the INPUT of local layer i (index 0 = the
    embeddings after layernorm_pre); transformers 5.23 collects MllamaVisionEncoder's hidden_states after each layer,
    so index i is the OUTPUT of layer i."""

    def __enter__(self):
        import transformers.models.mllama.modeling_mllama as mm
        from transformers.modeling_outputs import BaseModelOutput
        self.cls, self.orig = mm.MllamaVisionEncoder, mm.MllamaVisionEncoder.forward

        def forward(enc, hidden_states, attention_mask=None):
            states = ()
            for layer in enc.layers:
                states = states + (hidden_states,)
                hidden_states = layer(hidden_states=hidden_states, attention_mask=attention_mask)
            return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=states + (hidden_states,))
        self.cls.forward = forward

    def __exit__(self, *a):
        self.cls.forward = self.orig


class gates_zero:
    """The given gates (name suffixes) set to 0 for the duration."""

    def __init__(self, model, suffixes):
        self.params = [p for n, p in model.named_parameters() if n.endswith(tuple(suffixes))]

    def __enter__(self):
        self.saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p in self.params:
                p.zero_()

    def __exit__(self, *a):
        with torch.no_grad():
            for p, s in zip(self.params, self.saved):
                p.copy_(s)


CROSS_GATES = ("cross_attn_attn_gate", "cross_attn_mlp_gate")
VISION_GATES = ("gated_positional_embedding.gate", "pre_tile_positional_embedding.gate",
                "post_tile_positional_embedding.gate", "gate_attn", "gate_ffn")


def run_case(proc, m32, m64, messages, gen_check=True, extras=True):
    """Everything about one case (no files written)."""
    tok = proc.tokenizer
    paths = case_images(messages)
    images = [Image.open(FIX / p) for p in paths]
    prompt = proc.apply_chat_template(hf_messages(messages), add_generation_prompt=True)
    # the template writes <|begin_of_text|>: tokenize without adding another (as apply_chat_template(tokenize=True))
    inputs = proc(images=images, text=prompt, add_special_tokens=False, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    text_ids = tok(prompt, add_special_tokens=False).input_ids
    assert ids == text_ids and ids[0] == BOS_ID and ids[1] != BOS_ID and ids.count(IMAGE_ID) == len(images)
    double_bos = proc(images=images, text=prompt, return_tensors="pt")["input_ids"][0, :2].tolist()
    layouts = [tile_layout(*im.size) for im in images]
    for la, p, im in zip(layouts, paths, images):
        la["image"] = p
        la["pillow_pass_order"] = pillow_pass(im.convert("RGB"), tuple(la["resized_wh"]))
    px, ar_ids, ar_mask, cam = (inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
                                                      "cross_attention_mask"))
    n = len(images)
    assert list(px.shape) == [1, n, MAX_TILES, 3, TILE, TILE], px.shape
    assert ar_ids[0].tolist() == [la["aspect_ratio_id"] for la in layouts], (ar_ids, layouts)
    assert ar_mask[0].tolist() == [[1] * la["num_tiles"] + [0] * (MAX_TILES - la["num_tiles"]) for la in layouts]
    for i, la in enumerate(layouts):  # tiles beyond num_tiles are zeros (after normalisation)
        assert bool((px[0, i, la["num_tiles"]:] == 0).all())
    ranges = cross_attention_ranges(ids)
    want = np.zeros((len(ids), n, MAX_TILES), np.int64)
    for i, ((s, e), la) in enumerate(zip(ranges, layouts)):
        want[s:e, i, :la["num_tiles"]] = 1
    assert list(cam.shape) == [1, len(ids), n, MAX_TILES] and (cam[0].numpy() == want).all(), "cross mask differs"
    kw = {k: inputs[k] for k in MODEL_KEYS}
    kw64 = dict(kw, pixel_values=px.double())
    t32, mg32, first = greedy(m32, kw, N_NEW_TOKENS, EOS_IDS)
    t64, mg64, first64 = greedy(m64, kw64, N_NEW_TOKENS, EOS_IDS)
    if gen_check:
        with torch.no_grad():
            gen = m32.generate(**kw, max_new_tokens=N_NEW_TOKENS, min_new_tokens=N_NEW_TOKENS, do_sample=False,
                               num_beams=1)
        assert gen[0, len(ids):].tolist() == t32, (gen[0, len(ids):].tolist(), t32)
    vis, states = cross_attention_states(m32, kw)
    _, states64 = cross_attention_states(m64, kw64)
    mir = proc(images=[ImageOps.mirror(im.convert("RGB")) for im in images], text=prompt, add_special_tokens=False,
               return_tensors="pt")
    t_mir, _, first_mir = greedy(m32, {k: mir[k] for k in MODEL_KEYS}, N_NEW_TOKENS, EOS_IDS)
    r = dict(images=images, paths=paths, prompt=prompt, inputs=inputs, ids=ids, layouts=layouts, ranges=ranges,
             kw=kw, t32=t32, mg32=mg32, first=first, t64=t64, mg64=mg64, first64=first64, vis=vis, states=states,
             states64=states64, t_mir=t_mir, first_mir=first_mir, double_bos=double_bos)
    if extras:
        abl, abl_tok = {}, {}
        with zero_masked_rows(m32, cam):
            abl_tok["meta_zero_masked_rows"], _, abl["meta_zero_masked_rows"] = greedy(m32, kw, N_NEW_TOKENS, EOS_IDS)
        with vision_pad_keys_masked():
            abl["vision_pad_keys_masked"] = first_logits(m32, kw)
        with intermediate_as_layer_inputs():
            abl_tok["intermediate_as_layer_inputs"], _, abl["intermediate_as_layer_inputs"] = greedy(
                m32, kw, N_NEW_TOKENS, EOS_IDS)
        with gates_zero(m32, CROSS_GATES):
            abl["cross_attention_gates_zero"] = first_logits(m32, kw)
        with gates_zero(m32, VISION_GATES):
            abl["vision_gates_zero"] = first_logits(m32, kw)
        if any(la["num_tiles"] < MAX_TILES for la in layouts):  # padding tiles filled with normalised black
            black = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(3, 1, 1)
            px2 = px.clone()
            for i, la in enumerate(layouts):
                px2[0, i, la["num_tiles"]:] = black
            abl["padding_tiles_black_not_zero"] = first_logits(m32, dict(kw, pixel_values=px2))
        with torch.no_grad():  # the prompt without pixels at all: cross-attention layers skipped
            abl["text_only_no_pixels"] = m32(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"]
                                             ).logits[0, -1].clone()
        r["ablations"] = {k: float((v - first).abs().max()) for k, v in abl.items()}
        r["ablation_tokens"] = abl_tok
    return r


def make_cases():
    torch.set_num_threads(THREADS)
    proc, fast = load_processor(FIX / MODEL)
    tok = proc.tokenizer
    m32, m64 = load_models()
    assert m32.generation_config.eos_token_id == EOS_IDS
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
        assert r["t_mir"] != t32, f"{case}: mirroring the images does not change the greedy tokens"
        assert all(t < N_BASE for t in t32), f"{case}: a special token was generated: {t32}"
        assert r["double_bos"] == [BOS_ID, BOS_ID]
        ids, layouts, inputs = r["ids"], r["layouts"], r["inputs"]
        px, cam = inputs["pixel_values"], inputs["cross_attention_mask"]
        fast_px = fast(images=r["images"], return_tensors="pt")["pixel_values"]
        write_f32(outdir / f"{case}.logits.f32", first)
        write_f32(outdir / f"{case}.logits_f64.f32", first64)
        write_f32(outdir / f"{case}.pixels.f32", px)
        write_f32(outdir / f"{case}.image_features.f32", r["states"])
        write_f32(outdir / f"{case}.image_features_f64.f32", r["states64"])
        (outdir / f"{case}.cross_attention_mask.u8").write_bytes(
            np.ascontiguousarray(cam[0].numpy().astype(np.uint8)).tobytes())
        if case == VISION_OUTPUT_CASE:
            write_f32(outdir / f"{case}.vision_output.f32", r["vis"])
        top5 = torch.topk(first, 5)
        L = len(ids)
        row_any = cam[0].flatten(1).any(-1).tolist()
        rec = {
            "case": case, "folder": MODEL, "stored_weight_dtype": "bfloat16",
            "reference": "transformers 5.23 MllamaForConditionalGeneration.from_pretrained(tiny-mllama, dtype=float32, "
                         "attn_implementation='eager'), CPU; processor = AutoProcessor.from_pretrained(tiny-mllama) with "
                         "the image processor replaced by MllamaImageProcessorPil.from_pretrained(tiny-mllama)",
            "messages": messages,
            "prompt": r["prompt"],
            "text_input_ids": ids,
            "input_ids": ids,
            "input_ids_note": "processor(images, prompt, add_special_tokens=False): the chat template already writes "
                              "<|begin_of_text|>; with the default add_special_tokens=True the tokenizer adds a second "
                              "one. No expansion: each image is one <|image|> id (1024) in the text, its features enter "
                              "only through the cross-attention layers",
            "image_token_id": IMAGE_ID,
            "bos_token_id": BOS_ID,
            "num_images": len(layouts),
            "num_tiles": [la["num_tiles"] for la in layouts],
            "aspect_ratio_ids": inputs["aspect_ratio_ids"][0].tolist(),
            "aspect_ratio_mask": inputs["aspect_ratio_mask"][0].tolist(),
            "aspect_ratio_note": "aspect_ratio_ids per image = 1 + index of (tiles down, tiles across) in "
                                 "[(1,1),(1,2),(1,3),(1,4),(2,1),(2,2),(3,1),(4,1)] (0 = batch padding); "
                                 "aspect_ratio_mask [n_images, 4]: 1 for the image's tiles. Model inputs with a leading "
                                 "batch dimension of 1",
            "tiles": layouts,
            "tiles_note": "per image: size_wh; scales: min(canvas_h/h, canvas_w/w) per arrangement (rows x cols); "
                          "chosen_scale = the smallest scale >= 1 if any (upscaling), else the largest; of the "
                          "arrangements with that scale the smallest area (first); the image is resized (PIL bilinear, "
                          "aspect ratio kept) to resized_wh, each side clipped to [56, canvas side] first (so an image "
                          "smaller than its canvas is not enlarged to fill it), then padded with zeros (black, before "
                          "normalisation) on the right and bottom to the canvas and cut into rows x cols tiles row-major",
            "pixel_values_file": f"{case}.pixels.f32",
            "pixel_values_shape": list(px.shape),
            "pixel_values_dtype": "float32 little-endian, C order; [batch 1, n_images, max_num_tiles 4, 3, 56, 56]; "
                                  "tiles beyond an image's num_tiles are all zeros (not normalised black)",
            "pixel_values_max_abs_diff_vs_torchvision_processor": float((fast_px.float() - px.float()).abs().max())
            if fast_px.shape == px.shape else None,
            "cross_attention_ranges": r["ranges"],
            "cross_attention_mask_file": f"{case}.cross_attention_mask.u8",
            "cross_attention_mask_shape": [L, len(layouts), MAX_TILES],
            "cross_attention_mask_note": "uint8 [token, image, tile] as MllamaProcessor builds it (batch dimension "
                                         "dropped; the model input is int64 [1, L, n_images, 4]): 1 = the token attends "
                                         "to the tile's 17 vision tokens. Image i is seen by the tokens in "
                                         "cross_attention_ranges[i] = [its <|image|> token, the next <|image|> token) "
                                         "(the last image: to the end); consecutive <|image|> tokens are a group and all "
                                         "see everything after them; tokens before the first image see nothing. Decode "
                                         "steps use the last row again",
            "tokens_seeing_no_image": [i for i, a in enumerate(row_any) if not a],
            "image_features_file": f"{case}.image_features.f32",
            "image_features_shape": list(r["states"].shape),
            "image_features_note": "the cross-attention states: MllamaVisionModel(pixel_values, aspect_ratio_ids, "
                                   "aspect_ratio_mask) -> multi_modal_projector (Linear 96 -> 64 with bias); [n_images, "
                                   "4 tiles, 17 (CLS first, then 16 patches row-major), 64], padding tiles included (the "
                                   "model computes them; the cross-attention mask hides them, except from tokens that see "
                                   "no image); the cross-attention layers use them reshaped to [n_images*4*17, 64] as "
                                   "keys/values; image_features_f64_file: the float64 run",
            "image_features_f64_file": f"{case}.image_features_f64.f32",
            "greedy_tokens": t32,
            "greedy_text": tok.decode(t32, skip_special_tokens=True),
            "greedy_token_strings": tok.convert_ids_to_tokens(t32),
            "greedy_masked_ids": EOS_IDS,
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
            "mirrored_images_greedy_tokens": r["t_mir"],
            "mirrored_images_first_logits_max_abs_diff": float((r["first_mir"] - first).abs().max()),
            "mirrored_images_note": "the same prompt with every image mirrored left-right: the image changes the output",
            "ablation_first_logits_max_abs_diff": r["ablations"],
            "ablation_meta_zero_masked_rows_greedy_tokens": r["ablation_tokens"]["meta_zero_masked_rows"],
            "ablation_intermediate_as_layer_inputs_greedy_tokens": r["ablation_tokens"]["intermediate_as_layer_inputs"],
            "ablation_note": "max |first-step logits - logits| when: meta_zero_masked_rows: the cross-attention output "
                             "of tokens that see no image is zeroed (Meta's reference does this, transformers does not: "
                             "their mask row is all zeros, so such tokens attend, nothing masked, to all n_images*4*17 vision tokens, padding tiles included, and only the MLP half of the layer is zeroed for them); "
                             "intermediate_as_layer_inputs: the intermediate features taken from the INPUT of local layer i "
                             "(Meta's reference and transformers 4.x) instead of its output (transformers 5.23); "
                             "vision_pad_keys_masked: padding positions masked as keys for every query in the vision "
                             "encoders (transformers masks only padding-query x padding-key pairs); "
                             "cross_attention_gates_zero / vision_gates_zero: transformers' initial gate values; "
                             "padding_tiles_black_not_zero: padding tiles filled with normalised black instead of 0; "
                             "text_only_no_pixels: no pixels (cross-attention layers skipped)",
        }
        if case == VISION_OUTPUT_CASE:
            rec["vision_output_file"] = f"{case}.vision_output.f32"
            rec["vision_output_shape"] = list(r["vis"].shape)
            rec["vision_output_note"] = ("MllamaVisionModel's last_hidden_state (batch dimension dropped): [n_images, 4, "
                                         "17, 96] = concat(global encoder output (channels 0..31), intermediate features "
                                         "(channels 32..95, interleaved: 32 + 2*c + k = channel c of the OUTPUT of local "
                                         "layer intermediate_layers_indices[k] = [0, 2][k], as transformers 5.23 "
                                         "computes it; Meta's reference takes layer INPUTS)) along the last dimension, "
                                         "before multi_modal_projector")
        dump_json(outdir / f"{case}.json", rec)
        summary[case] = {"greedy_tokens": t32, "margin_min": round(min(mg32), 5), "margin_min_f64": round(min(mg64), 5),
                         "f32_eq_f64": t32 == t64, "n_input_ids": L, "num_tiles": rec["num_tiles"],
                         "aspect_ratio_ids": rec["aspect_ratio_ids"],
                         "grids": [la["grid_rows_cols"] for la in layouts],
                         "cross_attention_ranges": r["ranges"],
                         "mirrored_differs": r["t_mir"] != t32,
                         "ablations": {k: round(v, 4) for k, v in r["ablations"].items()}}
        log(f"{case}: {L} ids, tiles {rec['num_tiles']}, ar ids {rec['aspect_ratio_ids']}, tokens {t32}, margin "
            f"{min(mg32):.4f}, mirrored {r['t_mir']}, ablations {summary[case]['ablations']}")
    dump_json(outdir / "summary.json", summary)
    return summary


def seed_search(seeds):
    """Per seed (model kept in memory; bf16 rounding applied as saving would): the smallest greedy margin (f32 and
    f64) over all cases, whether f32 == f64 everywhere, whether mirroring changes every case's tokens, whether a
    special token is generated, and the fewest distinct tokens in a case."""
    import tempfile
    torch.set_num_threads(THREADS)
    proc = make_processor(build_tokenizer())
    res = {}
    for s in seeds:
        with tempfile.TemporaryDirectory() as td:
            m = new_random_model(s)
            m.to(torch.bfloat16).save_pretrained(td)
            m32, m64 = load_models(Path(td))
        worst, eq, mir, special, distinct = float("inf"), True, True, False, 99
        for case, messages in CASES.items():
            r = run_case(proc, m32, m64, messages, gen_check=False, extras=False)
            worst = min(worst, min(r["mg32"]), min(r["mg64"]))
            eq &= r["t32"] == r["t64"]
            mir &= r["t_mir"] != r["t32"]
            special |= any(t >= N_BASE for t in r["t32"])
            distinct = min(distinct, len(set(r["t32"])))
        res[s] = dict(min_margin=round(worst, 4), f32_eq_f64=eq, mirrored_differs=mir, special=special,
                      min_distinct=distinct)
        log(f"seed {s}: {res[s]}")
    return res


# ============================================================================= README
def make_readme():
    import PIL
    import tokenizers
    import transformers
    from safetensors import safe_open
    summary = json.load(open(FIX / "cases" / "summary.json"))
    recs = {c: json.load(open(FIX / "cases" / f"{c}.json")) for c in CASES}
    cfg = json.load(open(FIX / MODEL / "config.json"))
    pcfg = json.load(open(FIX / MODEL / "processor_config.json"))
    tcfg = json.load(open(FIX / MODEL / "tokenizer_config.json"))
    table, total = fc.file_table(FIX)
    with safe_open(str(FIX / MODEL / "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    groups = []
    for k in keys:
        g = k if k == "language_model.lm_head.weight" else \
            "language_model.model.*" if k.startswith("language_model.model.") else k.split(".")[0] + ".*"
        if g not in groups:
            groups.append(g)
    names = ", ".join(f"`{g}`" for g in groups)
    tile_rows, seen = [], set()
    for c in CASES:
        for la in recs[c]["tiles"]:
            if la["image"] in seen:
                continue
            seen.add(la["image"])
            sc = ", ".join(f"{k} {v:g}" for k, v in la["scales"].items())
            tile_rows.append(
                f"| `{la['image']}` | {la['size_wh'][0]}x{la['size_wh'][1]} | {sc} | {la['chosen_scale']:g} "
                f"({'up' if la['upscaling'] else 'down'}) | {la['grid_rows_cols'][0]} x {la['grid_rows_cols'][1]} | "
                f"{la['canvas_hw'][1]}x{la['canvas_hw'][0]} | {la['resized_wh'][0]}x{la['resized_wh'][1]} | "
                f"{la['pad_right_bottom'][0]} / {la['pad_right_bottom'][1]} | {la['num_tiles']} | "
                f"**{la['aspect_ratio_id']}** | {la['pillow_pass_order']} |")
    case_rows, abl_rows = [], []
    for c, v in summary.items():
        r = recs[c]
        case_rows.append(
            f"| {c} | {v['n_input_ids']} | {v['num_tiles']} | {v['aspect_ratio_ids']} | {r['aspect_ratio_mask']} | "
            f"{v['cross_attention_ranges']} | `{r['pixel_values_shape']}` | `{v['greedy_tokens']}` | {v['margin_min']} | "
            f"{v['f32_eq_f64']} | {v['mirrored_differs']} |")
        ab = r["ablation_first_logits_max_abs_diff"]
        abl_rows.append(
            f"| {c} | {r['mirrored_images_first_logits_max_abs_diff']:.2f} | {ab['meta_zero_masked_rows']:.2f} | "
            f"{ab['vision_pad_keys_masked']:.2f} | {ab['intermediate_as_layer_inputs']:.2f} | "
            f"{ab['padding_tiles_black_not_zero']:.2f} | " if "padding_tiles_black_not_zero" in ab else
            f"| {c} | {r['mirrored_images_first_logits_max_abs_diff']:.2f} | {ab['meta_zero_masked_rows']:.2f} | "
            f"{ab['vision_pad_keys_masked']:.2f} | {ab['intermediate_as_layer_inputs']:.2f} | (4 tiles) | ")
        abl_rows[-1] += (f"{ab['vision_gates_zero']:.2f} | {ab['cross_attention_gates_zero']:.2f} | "
                         f"{ab['text_only_no_pixels']:.2f} |")
    a, d, e, f_ = recs["a_square"], recs["d_two_images"], recs["e_second_turn"], recs["f_interleaved"]
    top = max(abs(r["logits_first_step_top5"][0][1]) for r in recs.values())
    d64 = [r["logits_f32_max_abs_diff_vs_f64"] for r in recs.values()]
    pxd = max(r["pixel_values_max_abs_diff_vs_torchvision_processor"] or 0 for r in recs.values())
    all_f64 = all(r["greedy_tokens_f64_equal"] for r in recs.values())
    all_mg = min(min(r["logit_margin_min"], r["logit_margin_min_f64"]) for r in recs.values())
    all_mir = all(v["mirrored_differs"] for v in summary.values())
    meta_changes = sum(r["ablation_meta_zero_masked_rows_greedy_tokens"] != r["greedy_tokens"] for r in recs.values())
    tc, vc = cfg["text_config"], cfg["vision_config"]

    def mask_str(r):
        n_img = r["num_images"]
        rows = []
        raw = np.frombuffer((FIX / "cases" / r["cross_attention_mask_file"]).read_bytes(), np.uint8)
        m = raw.reshape(r["cross_attention_mask_shape"])
        for i in range(n_img):
            rows.append("".join(str(int(m[t, i].sum())) for t in range(m.shape[0])))
        return rows
    text = f"""# Llama 3.2 Vision (Mllama) reference fixtures

Made by `scripts/make_mllama_fixtures.py` (run it to rebuild; its docstring says how).
Deterministic: a re-run rewrites the same bytes (fixed seeds, one thread, no timestamps).

Versions: transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}, tokenizers {tokenizers.__version__},
Pillow {PIL.__version__}, numpy {np.__version__}.  All on CPU, 1 torch thread.

## Files

| path | bytes |
|---|---|
{table}

* `images/`: drawn by the script (gradients, shapes, noise): `square-96x96.png`, `very-wide-300x40.png`,
  `very-tall-40x300.png`, `wide-120x60.png`, `small-50x40.png`. Image paths in the case files are relative to
  this folder.
* `{MODEL}/`: the model exactly as transformers 5 `save_pretrained` writes it: `config.json` (`model_type` mllama,
  `rope_parameters` inside `text_config`, `dtype` bfloat16), `model.safetensors` (**bfloat16**; transformers 5 writes
  Mllama's weights back under the hub checkpoints' names (its conversion mapping reversed): {names};
  i.e. the same names as meta-llama/Llama-3.2-11B-Vision-Instruct, unlike LLaVA's folders), `generation_config.json`
  (bos {BOS_ID}, eos {EOS_IDS}, pad {PAD_ID}), `processor_config.json` (the image processor nested; its `image_processor_type` is
  written as `{pcfg['image_processor']['image_processor_type']}`: transformers strips the `Pil` suffix when saving), `chat_template.jinja`,
  `tokenizer.json`, `tokenizer_config.json` (`tokenizer_class` written as `{tcfg['tokenizer_class']}`; the hub repo says
  `PreTrainedTokenizerFast`).
* `cases/<case>.json` + `<case>.pixels.f32` + `<case>.cross_attention_mask.u8` + `<case>.logits.f32` +
  `<case>.logits_f64.f32` + `<case>.image_features.f32` + `<case>.image_features_f64.f32`
  (+ `{VISION_OUTPUT_CASE}.vision_output.f32`), and `cases/summary.json`.

No GGUF here: llama.cpp has no Llama 3.2 Vision support at the vendored commit.

## Model

Real classes (`MllamaForConditionalGeneration`, `MllamaConfig`, `MllamaVisionConfig`, `MllamaTextConfig`), tiny sizes:

* vision: tiles of {vc['image_size']}x{vc['image_size']}, patch {vc['patch_size']} (4x4 = 16 patches + CLS = **17 tokens per tile**, padded to 24
  inside the encoders: a multiple of 8, as the real 1601 -> 1608), hidden {vc['hidden_size']}, {vc['attention_heads']} heads, intermediate {vc['intermediate_size']}, gelu (erf),
  **{vc['num_hidden_layers']} local layers** (`transformer`) + **{vc['num_global_layers']} gated global layers** (`global_transformer`),
  `intermediate_layers_indices` {vc['intermediate_layers_indices']} (outputs of local layers 0 and 2, 0-based: the real [3, 7, 15, 23, 30] of 32),
  `vision_output_dim` {vc['vision_output_dim']} = 32 x (1 + 2), `max_num_tiles` {vc['max_num_tiles']}, `supported_aspect_ratios` {json.dumps(vc['supported_aspect_ratios'])}
  (the config's default for 4 tiles, written out).
* projector: `multi_modal_projector` Linear({vc['vision_output_dim']} -> {tc['hidden_size']}) with bias.
* text: Llama 3 style, vocab {tc['vocab_size']} (**`embed_tokens` has {tc['vocab_size']} + 8 rows**, as the real 128256 + 8:
  `<|image|>` = {IMAGE_ID} is embedded but `lm_head` has {tc['vocab_size']} rows, so it can never be generated), hidden {tc['hidden_size']},
  {tc['num_attention_heads']} heads, {tc['num_key_value_heads']} KV heads (GQA), head_dim 16, intermediate {tc['intermediate_size']}, silu, rms_norm_eps 1e-5,
  **{tc['num_hidden_layers']} layers, `cross_attention_layers` {tc['cross_attention_layers']}** (layer 0 must stay a self-attention layer:
  transformers takes the cache length, i.e. the new tokens' positions and mask width, from layer 0; with a
  cross-attention layer 0 the first decode step fails), rope: `{json.dumps(tc['rope_parameters'])}`
  (Llama 3.2 Vision's; with head_dim 16 the 8 frequencies fall in all three llama3 bands: 4 kept, 1 smoothed, 3
  divided by 8), max_position_embeddings {tc['max_position_embeddings']}, untied `lm_head`.
* A cross-attention layer replaces the self-attention of its layer: `x += tanh(cross_attn_attn_gate) *
  CrossAttn(norm(x))`, then `x += tanh(cross_attn_mlp_gate) * row_mask * MLP(norm(x))`; CrossAttn has RMS-norms over
  head_dim on q and k (`q_norm`, `k_norm`, not on v), no rope, keys/values from the cross-attention states
  (computed once in the prefill and cached per cross layer).
* Weights: random (seed {SEED}, chosen among 1..30 for the largest smallest greedy margin), linear/conv weights N(0,
  (1.6/sqrt(fan_in))^2), projector N(0, ({PROJECTOR_GAIN}/sqrt(96))^2) (with 1.6 the cross-attention output was ~5x every
  other sublayer and the outputs repeated one token), token embeddings N(0, 0.5^2), class / positional / tile
  embeddings N(0, 0.3^2), `lm_head` N(0, {LM_HEAD_STD}^2) with the 256 special-token rows x {SPECIAL_LM_HEAD_SCALE} (no special token is ever
  generated), biases N(0, 0.05^2), norm scales U(0.8, 1.2).
* **Gates**: transformers' `_init_weights` sets `cross_attn_attn_gate`, `cross_attn_mlp_gate`,
  `gated_positional_embedding.gate`, `pre_/post_tile_positional_embedding.gate` to 0 and the global layers'
  `gate_attn` / `gate_ffn` to N(0, 0.02): the cross-attention layers are then identities and the image has no effect
  (`cross_attention_gates_zero` below gives exactly the text-only logits). Here: cross-attention gates U(0.6, 1),
  vision positional / tile gates U(0.5, 0.9), global-layer gates U(0.5, 1) (values before tanh).
* Saved in bfloat16; the references load them back (float32 / float64), so the rounding is included.

## Tokenizer and chat template

Llama 3's tokenizer (128k tokens) would make the folder ~30 MB, so the stand-in is a **byte-level BPE trained here**
(`build_tokenizer()`: `tokenizers` BpeTrainer, 768 tokens = the 256 byte symbols + 512 merges, on a generated
1500-paragraph corpus with newlines so that `\\n\\n` is one token as in Llama 3) with Llama 3's `tokenizer.json`
pipeline: no normalizer, pre-tokenizer `Split(Llama 3 regex, isolated)` + `ByteLevel(add_prefix_space=false,
use_regex=false)`, BPE with `ignore_merges`, ByteLevel decoder, post-processor ByteLevel + `TemplateProcessing`
adding `<|begin_of_text|>`. Then Llama 3.2's 256 special tokens in Meta's order at {N_BASE}..{N_BASE + 255}
(`<|begin_of_text|>` {BOS_ID}, `<|end_of_text|>` {EOT_TEXT_ID}, `<|reserved_special_token_0|>`, `_1|>`, `<|finetune_right_pad_id|>` {PAD_ID},
`<|step_id|>`, `<|start_header_id|>` {SH_ID}, `<|end_header_id|>` {EH_ID}, `<|eom_id|>` {EOM_ID}, `<|eot_id|>` {EOT_ID}, `<|python_tag|>` {PYTHON_ID},
`<|reserved_special_token_2|>` .. `_246|>`) and `<|image|>` = {IMAGE_ID}: the real layout (128000 + 256 specials, `<|image|>`
128256) with 768 for 128000. `PreTrainedTokenizerFast` with bos `<|begin_of_text|>`, eos `<|eot_id|>`, pad
`<|finetune_right_pad_id|>`. `MllamaProcessor` finds the image token by the name `<|image|>` (the tokenizer has no
`image_token` attribute).

Chat template: meta-llama/Llama-3.2-11B-Vision-Instruct's, verbatim: `<|begin_of_text|>`, per message
`<|start_header_id|>ROLE<|end_header_id|>\\n\\n`, the content parts in order (image -> `<|image|>`, text as is, not
trimmed), `<|eot_id|>`; `<|start_header_id|>assistant<|end_header_id|>\\n\\n` as generation prompt. With any image
in the conversation there is no system block (without images it writes a system block with "Cutting Knowledge Date:
December 2023" and **today's date** via `strftime_now`, so text-only prompts change daily: no such case here) and a
system message raises "Prompting with images is incompatible with system messages.".
Example (a_square): {json.dumps(a['prompt'])}; f_interleaved: {json.dumps(f_['prompt'])}.

**BOS.** The template writes `<|begin_of_text|>` and the tokenizer adds one too: the cases call the processor with
`add_special_tokens=False` (as `apply_chat_template(tokenize=True)` does); the default call gives two
(`MllamaProcessor` only prepends BOS itself when the text has none).

**No expansion.** Each image stays one `<|image|>` id ({IMAGE_ID}) in `input_ids` (one position); its features enter only
through the cross-attention layers.

## Processor

`AutoProcessor.from_pretrained({MODEL})` (`MllamaProcessor`) with its image processor replaced by
**`MllamaImageProcessorPil.from_pretrained({MODEL})`** (the PIL class, named explicitly; with torchvision installed
the default is the torchvision class, whose pixels differ from these by up to {pxd:.3g} here). Settings as
Llama 3.2 Vision (tile 560 there, 56 here): `size` 56x56, `max_image_tiles` 4, resample bilinear, rescale 1/255,
CLIP mean/std, `do_pad`, `do_convert_rgb`. Per image (`tiles` in each case file, checked against the processor by
the script):

1. Arrangements: `(a, b)` for a = 1..4, b = 1..4 with a*b <= 4, in that order: (1,1) (1,2) (1,3) (1,4) (2,1) (2,2)
   (3,1) (4,1); used as **(tiles down, tiles across)**; `aspect_ratio_id` = 1 + the index (0 = batch padding):
   (1,4) very wide = 4, (4,1) very tall = 8, (2,2) = 6.
2. Canvas (`get_optimal_tiled_canvas`): per arrangement `scale = min(a*56 / h, b*56 / w)`; if any scale >= 1, the
   **smallest** of those (the least upscaling), else the largest; of the arrangements with exactly that scale, the
   smallest area (the first on a tie).
3. Size (`get_image_size_fit_to_canvas`): each side first clipped to [56, canvas side] (`target`), then the
   smaller of `target_w / w`, `target_h / h` applies: that side becomes its target, the other `floor(side * scale)`
   (at least 1, at most its target). **An image smaller than its canvas is not enlarged to fill it** (the 96x96
   square stays 96x96 in its 112x112 canvas); one smaller than a tile is enlarged to reach 56 on its limiting side
   (50x40 -> 56x44).
4. Resize (PIL bilinear, skipped when the size is unchanged), pad with zeros (black, before rescale/normalise, so
   `-mean/std` after) **on the right and at the bottom** to the canvas, rescale, normalise, cut into `a x b` tiles of
   56x56, row-major.
5. `pixel_values` `[1, n_images, 4, 3, 56, 56]`: an image's tiles first, **then all-zero tiles** (zeros after
   normalisation, not normalised black) up to 4; `aspect_ratio_ids` `[1, n_images]`; `aspect_ratio_mask`
   `[1, n_images, 4]` (1 for the image's tiles; tile 0 always 1).

| image | size | scale per arrangement (rows x cols) | chosen | grid | canvas (w x h) | resized (w x h) | pad right / bottom | tiles | aspect id | Pillow pass order |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(tile_rows)}

The last column: which separable pass order this Pillow ({PIL.__version__}) used for the resize ("none": no resize;
"either": both orders give the same bytes); Pillow 13 resamples vertically first in some shrinking cases
(python-pillow/Pillow#9549).

## Cross-attention mask

`MllamaProcessor` builds `cross_attention_mask` `[1, L, n_images, 4]` (int64) from the token ids
(`get_cross_attention_token_mask`): image i is seen by the tokens from **its own `<|image|>` token up to (not
including) the next `<|image|>` token**, the last image to the end; a run of consecutive `<|image|>` tokens is a
group and each of them sees everything from its own position to the end (d_two_images: both images, all later
text); only the image's real tiles are 1. Tokens before the first `<|image|>` see no image (`tokens_seeing_no_image`).
`<case>.cross_attention_mask.u8` stores it as uint8 `[L, n_images, 4]`; `cross_attention_ranges` the [start, end)
per image. Tiles seen per token (one string per image, one digit per token):

* a_square: {mask_str(a)}
* d_two_images: {mask_str(d)}
* e_second_turn: {mask_str(e)} (from the second `<|image|>` on, only the second image is seen)
* f_interleaved: {mask_str(f_)} (text between images sees only the previous image)

In the model (`_prepare_cross_attention_mask`) each tile's 1/0 is repeated for its 17 vision tokens -> `[1, 1, L,
n_images*4*17]` additive mask (0 / finfo.min); rows with no 1 become **all zeros** and their
`full_text_row_masked_out_mask` is 0. transformers multiplies only the cross layer's **MLP** output by that row mask:
**a token that sees no image still attends, unmasked, to all n_images*4*17 vision tokens, padding tiles included, and
adds the gated attention output** (Meta's reference `llama_models` also zeroes the attention output: ablation
`meta_zero_masked_rows`, which changes the first-step logits by up to {max(r['ablation_first_logits_max_abs_diff']['meta_zero_masked_rows'] for r in recs.values()):.1f} and the greedy tokens in
{meta_changes} of {len(recs)} cases). So an implementation matching transformers must compute the padding tiles' states
too. Decode steps: `generate` appends a copy of the **last row** for every new token (the script's greedy loop does
the same and is checked equal to `generate`): generated tokens see what the last prompt token sees (f_interleaved:
only the second image).

## Vision encoder (what `image_features` come from)

Per image (batch x images folded): patch conv (no bias) -> + `tanh(g_pre) * pre_tile_embedding[aspect_id]` (one
hidden-size vector per tile slot) -> CLS prepended per tile -> + `(1 - tanh(g)) * position_embedding` (17 x hidden)
+ `tanh(g) * tile_position_embedding[aspect_id]` (4 x 17 x hidden) -> `layernorm_pre` -> each tile zero-padded from 17
to 24 positions -> **the local encoder runs over all 4 tiles of the image as one sequence of 96 positions** (not tile
by tile) -> `layernorm_post` -> + `tanh(g_post) * post_tile_embedding[aspect_id]` -> global encoder (same sequence;
residuals scaled by `tanh(gate_attn)`, `tanh(gate_ffn)`) -> drop the 7 padding positions per tile -> concat(global
output (channels 0..31), intermediate features (channels 32..95)) = 96 channels (`{VISION_OUTPUT_CASE}.vision_output.f32`, `[n_images, 4,
17, 96]`) -> projector -> cross-attention states `[n_images, 4, 17, 64]` (`<case>.image_features.f32`), used as
`[n_images*4*17, 64]` keys/values.

**Intermediate features.** `torch.stack(features, dim=-1)` then flattened: the 64 channels are **interleaved**,
channel 32 + 2*c + k = channel c of feature k (k = 0, 1 for indices {vc['intermediate_layers_indices']}), not two blocks of 32 (Meta's code does
the same). **In transformers {transformers.__version__} index i is the OUTPUT of local layer i** (`MllamaVisionEncoder`
collects `hidden_states` after each layer; the script checks the features against hooks on the layers). **Meta's
reference** (`llama_models` `ImageTransformer`: `if idx in return_intermediate: out.append(x)` before block idx) and
earlier transformers (the 2024 code collected `encoder_states` before each layer, the embeddings first) **take the
INPUT of layer i**,
i.e. the output of layer i - 1 (index 0: the embeddings after `layernorm_pre`). The real checkpoint's
[3, 7, 15, 23, 30] therefore means different layers in transformers {transformers.__version__} than in Meta's code. These fixtures follow
transformers {transformers.__version__}; `ablation_intermediate_as_layer_inputs_greedy_tokens` (and the ablation column below) give the
other reading: it changes the first-step logits by up to {max(r['ablation_first_logits_max_abs_diff']['intermediate_as_layer_inputs'] for r in recs.values()):.1f}.

**Attention mask of both encoders** (`_prepare_aspect_ratio_attention_mask`, the same as Meta's): a position is
"padding" if it is one of the 7 pad positions of a tile or in a padding tile; the mask is the outer product of
that flag with itself, so **only padding-query x padding-key pairs are masked: every real position attends to the
padding positions** (their values are not zero after the first layer) and to the padding tiles. Masking the padding
keys instead changes the logits by up to {max(r['ablation_first_logits_max_abs_diff']['vision_pad_keys_masked'] for r in recs.values()):.1f} (`vision_pad_keys_masked`). (The code also has a trap
for other sizes: with 0 padding positions, `attention_mask[:, :, -0:] = 0` masks every position.)

## Cases (`cases/<case>.json`)

a_square: one 96x96 image + question; b_very_wide: 300x40; c_very_tall: 40x300; d_two_images: two images in a row
(120x60 -> 2 tiles, 50x40 -> 1 tile) + question; e_second_turn: user (square + question), assistant answer, user
(small image + question); f_interleaved: text, image, text, image, text in one user message.

Fields: `messages` (content parts `{{"type": "text", "text": ...}}` and `{{"type": "image", "path": ...}}`, for
transformers `{{"type": "image"}}`), `prompt`, `input_ids` (= `text_input_ids`: no expansion), `image_token_id`,
`num_images`, `num_tiles`, `aspect_ratio_ids`, `aspect_ratio_mask`, `tiles` (the layout above), `pixel_values_file` +
`_shape` (float32 LE, C order, `[1, n_images, 4, 3, 56, 56]`), `cross_attention_mask_file` + `_shape` (uint8 `[L,
n_images, 4]`), `cross_attention_ranges`, `tokens_seeing_no_image`, `image_features_file` + `_shape` (cross-attention
states `[n_images, 4, 17, 64]`, float32 run; `image_features_f64_file`: float64 run), `greedy_tokens` (16 new tokens),
`greedy_text` (decoded, skip_special_tokens; the tiny BPE makes it gibberish), `greedy_token_strings`,
`greedy_masked_ids` ({EOS_IDS}: never chosen, as `generate(min_new_tokens=16)` with the generation config's eos list),
`logit_margins` / `logit_margin_min` (top1 - top2 per step, float32), `logit_margin_min_f64`,
`greedy_tokens_f64_equal`, `logits_file` (float32 logits at the last prompt position, {VOCAB_SIZE} values),
`logits_f64_file` (the float64 run's logits stored as float32: the exact answer), `logits_first_step_top5`,
`mirrored_images_*`, `ablation_*`; `{VISION_OUTPUT_CASE}` also `vision_output_file` + `_shape`.

* Greedy: hand-written loop with the KV cache (prefill with pixels and the full cross-attention mask; each step the
  new token with the mask's last row, cross-attention keys/values from the cache), checked equal to `generate(
  min_new_tokens=16, max_new_tokens=16, do_sample=False)`.
* **Every case was also run in float64: greedy tokens equal in all cases: {all_f64}; smallest margin (float32 or
  float64) {all_mg:.3f}.** First-step logits reach ~{top:.0f}; transformers' float32 run is {min(d64):.1e} to {max(d64):.1e} from the float64
  logits (`logits_f32_max_abs_diff_vs_f64`): compare an f32 implementation with `<case>.logits_f64.f32`.
* **The image matters: mirroring every image changes the greedy tokens in every case: {all_mir}.**

| case | n ids | tiles | aspect ids | aspect_ratio_mask | cross-attention ranges | pixel_values shape | greedy tokens | min margin | f32 == f64 | mirrored differs |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(case_rows)}

Ablations: max |first-step logits - reference| when the images are mirrored; the cross-attention output of tokens
that see no image is zeroed (Meta's behaviour); padding positions are masked as keys in the vision encoders; the
intermediate features are the inputs of local layers [0, 2] (Meta / transformers 4.x) instead of their outputs; padding
tiles hold normalised black instead of zeros (cases with padding tiles); the vision gates are 0; the cross-attention
gates are 0 (transformers' init); no pixels at all (the cross-attention layers are skipped). Gates at 0 give exactly
the text-only logits.

| case | mirrored | meta_zero_masked_rows | vision_pad_keys_masked | intermediate_as_layer_inputs | padding_tiles_black_not_zero | vision_gates_zero | cross_attention_gates_zero | text_only_no_pixels |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(abl_rows)}

## Surprises

1. Tiling picks the canvas needing the **least upscaling**, else the least downscaling, and **does not enlarge** an
   image to fill it: a 96x96 image gets a 2x2 canvas and 16 px of black on the right and bottom; padding is at the
   right/bottom, not centred; missing tiles are zeros after normalisation, not black.
2. Arrangements are `(down, across)` in `(1,1),(1,2),(1,3),(1,4),(2,1),(2,2),(3,1),(4,1)` order (the processor's
   docstrings call them (width, height)); the id is 1-based.
3. The cross-attention mask starts at the image's own `<|image|>` token, ends at the next `<|image|>` unless the
   images are adjacent; text before the first image sees no image, yet in transformers it still attends to every
   vision token (padding tiles included) through the gated attention output: only the MLP half is masked (Meta's
   reference masks both). Decode steps reuse the last prompt token's row.
4. transformers {transformers.__version__} takes the intermediate vision features from the OUTPUT of local layers
   `intermediate_layers_indices`, Meta's reference (and transformers 4.x) from their INPUT: an off-by-one between the
   two for the real checkpoint; the features are interleaved channel by channel.
5. The vision encoders mask only padding x padding: real patches attend to the 7 zero-padded positions of each tile
   and to padding tiles; both encoders see all tiles of an image as one sequence.
6. transformers' init leaves every gate closed (the image is ignored: the notes' pitfall); opened here.
7. `embed_tokens` has vocab + 8 rows; `<|image|>` = vocab_size has an embedding but no `lm_head` row.
8. Two `<|begin_of_text|>` if the chat template's output is tokenized with `add_special_tokens=True`.
9. `save_pretrained` writes Mllama's weights under the hub names (`language_model.model.*`, `language_model.lm_head`,
   `vision_model.*`, `multi_modal_projector.*`), `tokenizer_class` `TokenizersBackend`, `image_processor_type`
   `MllamaImageProcessor` (no `Pil`).
10. The chat template drops the system block when any image is present and raises on a system message with images;
    text-only prompts contain today's date.
"""
    (FIX / "README.md").write_text(text, encoding="utf-8")
    log(f"README written ({total:,} bytes of fixtures)")


# ============================================================================= main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="images,hf,cases,readme")
    ap.add_argument("--seed-search", default="", help="comma-separated seeds (nothing written)")
    a = ap.parse_args()
    torch.set_num_threads(THREADS)
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
