"""A random-weight Llama-3.2-11B-Vision-Instruct checkpoint for `seer bench`, made the
`../shared/bench` way: the real architecture, tensor names and shapes of the hub repo
(meta-llama/Llama-3.2-11B-Vision-Instruct), bf16 safetensors in 2 GiB shards written one at a
time (N(0, 0.02) weights, norms 1, biases 0, seeded), the hub's config.json and
preprocessor_config.json, and the real Llama 3 tokenizer (llama.cpp's
models/ggml-vocab-llama-bpe.gguf, 128 256 tokens) plus `<|image|>` = 128256.

llama.cpp cannot run this model at all (no Mllama support in tools/mtmd), so there is no
peer here: the benchmark is seer's memory and speed with `--isq q4k` / `--isq q8_0`.

    ~/.cache/seer-bench/venv/bin/python bench/make_mllama_11b.py [OUT_DIR]

OUT_DIR defaults to $BENCH_DIR/models/hf/llama-3.2-11b-vision-instruct-random (21.3 GB on
disk; about 6 minutes on 2 cores). The gates (cross-attention and vision) get random values
too, so the image matters as it would in the real model.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch

BENCH = Path(os.environ.get("BENCH_DIR", Path.home() / ".cache/seer-bench"))
# ../shared/bench next to the checkout (or $SHARED_BENCH)
sys.path.insert(0, os.environ.get("SHARED_BENCH", str(Path(__file__).resolve().parents[2] / "shared/bench")))
import make_models as mm  # noqa: E402  (param_specs, write_random_safetensors, log, gguf)

REPO = Path(__file__).resolve().parents[1]

TEXT = {
    "model_type": "mllama_text_model",
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
    "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
    "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "pad_token_id": 128004,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "initializer_range": 0.02, "dropout": 0,
}
VISION = {
    "model_type": "mllama_vision_model",
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_global_layers": 8,
    "attention_heads": 16, "image_size": 560, "patch_size": 14, "num_channels": 3, "max_num_tiles": 4,
    "intermediate_layers_indices": [3, 7, 15, 23, 30], "vision_output_dim": 7680, "norm_eps": 1e-5,
    "hidden_act": "gelu", "initializer_range": 0.02, "torch_dtype": "bfloat16",
    "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
}
CONFIG = {
    "architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
    "image_token_index": 128256, "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0",
    "text_config": TEXT, "vision_config": VISION,
}
PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "MllamaImageProcessor", "max_image_tiles": 4, "resample": 2,
    "rescale_factor": 0.00392156862745098, "size": {"height": 560, "width": 560},
    "processor_class": "MllamaProcessor",
}


def hub_name(name: str) -> str:
    """transformers-5 module names -> the hub checkpoint's names."""
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_model.", "vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(new):
            return old + name[len(new):]
    raise ValueError(f"unexpected parameter {name}")


def llama3_tokenizer(out: Path):
    """tokenizer.json for the Llama 3 vocabulary in llama.cpp's test GGUF, as the hub ships it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    r = mm.gguf.GGUFReader(str(mm.LLAMA / "models/ggml-vocab-llama-bpe.gguf"))

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    tokens, merges = strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
    assert len(tokens) == 128256 and tokens[128000] == "<|begin_of_text|>"
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in merges],
                               ignore_merges=True))
    split = Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(split, "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(tokens[128000:] + ["<|image|>"])
    assert tok.token_to_id("<|image|>") == 128256
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", 128000)])
    tok.save(str(out / "tokenizer.json"))
    mm.write_json(out / "tokenizer_config.json", {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>",
        "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"})


def main():
    from transformers import MllamaConfig, MllamaForConditionalGeneration
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else BENCH / "models/hf/llama-3.2-11b-vision-instruct-random"
    with torch.device("meta"):
        m = MllamaForConditionalGeneration(MllamaConfig(**json.loads(json.dumps(CONFIG))))
    specs = mm.param_specs(m, rename=hub_name)
    n = mm.write_random_safetensors(specs, out, torch.bfloat16, seed=11)
    mm.write_json(out / "config.json", CONFIG)
    mm.write_json(out / "preprocessor_config.json", PREPROCESSOR)
    # the hub's Llama 3.2 Vision template (the same file as the tiny fixture's)
    shutil.copy(REPO / "tests/fixtures/mllama/tiny-mllama/chat_template.jinja", out / "chat_template.jinja")
    llama3_tokenizer(out)
    mm.log(f"done: {n / 1e9:.2f}B parameters in {out}")


if __name__ == "__main__":
    main()
