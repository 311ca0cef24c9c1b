"""Helpers shared by the reference-fixture scripts for the tiled / dynamic-resolution families
(make_idefics3_fixtures.py, make_qwen2vl_fixtures.py).

make_llava_fixtures.py keeps its own copies of the helpers it uses (its outputs stay byte-identical);
the functions here follow the same conventions (JSON layout, llama.cpp invocation and log parsing),
generalised where the LLaVA versions hard-code LLaVA's tokenizer or EOS id.

Environment: BENCH_DIR (default ~/.cache/seer-bench), LLAMA_CPP_DIR (default: the llama.cpp vendored in
$BENCH_DIR/src/llama_cpp_python-*), SEER_SHARED_BENCH (default /work/shared/bench).
"""
import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(os.path.expanduser(os.environ.get("BENCH_DIR") or "~/.cache/seer-bench"))
SHARED_BENCH = Path(os.environ.get("SEER_SHARED_BENCH") or "/work/shared/bench")
BIN = BENCH_DIR / "build" / "bin"
LLAMA_CPP_COMMIT = "0c1e57098"  # the llama.cpp vendored in llama-cpp-python 0.3.36
MEDIA = "<__media__>"  # mtmd_default_marker()


def llama_cpp_dir() -> Path:
    if os.environ.get("LLAMA_CPP_DIR"):
        return Path(os.environ["LLAMA_CPP_DIR"])
    hits = sorted(glob.glob(str(BENCH_DIR / "src" / "llama_cpp_python-*" / "vendor" / "llama.cpp")))
    if not hits:
        sys.exit("llama.cpp source not found under $BENCH_DIR/src (run /work/shared/bench/setup.sh)")
    return Path(hits[-1])


LLAMA_CPP = llama_cpp_dir()
_TAG = ["fixtures"]


def set_log_tag(tag):
    _TAG[0] = tag


def log(*a):
    print(f"[{_TAG[0]}]", *a, flush=True)


def dump_json(path: Path, obj, indent=2, sort_keys=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False, sort_keys=sort_keys)
        f.write("\n")


def write_f32(path: Path, t):
    """float32 little-endian, C order."""
    a = t.detach().to(torch.float64).numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    path.write_bytes(np.ascontiguousarray(a.astype("<f4")).tobytes())


def run(cmd, env=None, capture=False, cwd=None):
    log("RUN", " ".join(str(c) for c in cmd))
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([str(c) for c in cmd], check=True, env=e, text=True, cwd=cwd,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)


def fix_modes(folder: Path):
    """safetensors writes 0600 files; make everything 0644."""
    for f in folder.rglob("*"):
        if f.is_file():
            os.chmod(f, 0o644)


def gguf_module():
    p = str(LLAMA_CPP / "gguf-py")
    if p not in sys.path:
        sys.path.insert(0, p)
    import gguf
    return gguf


def gguf_kv(path: Path, keys):
    """Selected metadata values of a GGUF file (arrays as lists)."""
    gguf = gguf_module()
    r = gguf.GGUFReader(str(path))
    out = {}
    for k in keys:
        f = r.fields.get(k)
        out[k] = None if f is None else f.contents()
    return out


def file_table(fix: Path):
    """README table of the files under `fix` (cases/ summarised)."""
    rows = []
    for f in sorted(fix.rglob("*")):
        if f.is_file() and f.name != "README.md" and "cases" not in f.relative_to(fix).parts:
            rows.append(f"| `{f.relative_to(fix)}` | {f.stat().st_size:,} |")
    cases = [f for f in (fix / "cases").rglob("*") if f.is_file()]
    rows.append(f"| `cases/` ({len(cases)} files) | {sum(f.stat().st_size for f in cases):,} |")
    total = sum(f.stat().st_size for f in fix.rglob("*") if f.is_file() and f.name != "README.md")
    rows.append(f"| total (without this README) | {total:,} |")
    return "\n".join(rows), total


# ----------------------------------------------------------------------------- transformers
def greedy(model, first_kwargs, n, masked_ids, step_mask=True):
    """Greedy decoding with the KV cache; `masked_ids` (EOS and the like) are never chosen (as
    generate(min_new_tokens) / llama.cpp's --ignore-eos).  first_kwargs: the prefill inputs (input_ids or
    inputs_embeds, attention_mask, pixel inputs).  step_mask=False: the decode steps get no attention_mask
    (Qwen2-VL's M-RoPE then takes the positions from the cache length and its rope_deltas; with a mask it would
    build positions for the whole sequence).  Returns (tokens, top1-top2 margins, first-step logits unmasked)."""
    toks, margins, first = [], [], None
    mask = first_kwargs["attention_mask"]
    with torch.no_grad():
        out = model(**first_kwargs, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1]
        for step in range(n):
            if step == 0:
                first = logits.detach().clone()
            logits = logits.clone()
            for i in masked_ids:
                if i < logits.shape[0]:
                    logits[i] = -float("inf")
            top2 = torch.topk(logits, 2)
            margins.append(float(top2.values[0] - top2.values[1]))
            t = int(top2.indices[0])
            toks.append(t)
            if step == n - 1:
                break
            mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype)], dim=1)
            out = model(input_ids=torch.tensor([[t]]), attention_mask=mask if step_mask else None,
                        past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1]
    return toks, margins, first


def bytes_decoder():
    """GPT-2 byte-level BPE: unicode stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DEC = bytes_decoder()


def bpe_piece_bytes(tok, ids, unused=()):
    """The bytes llama.cpp prints for these ids of a byte-level BPE vocabulary (common_token_to_piece with
    special=true): added tokens as their text, others byte-decoded; ids in `unused` (UNUSED in the GGUF:
    [PADnnnnn] rows) print nothing."""
    added = {i: t.content for i, t in tok.added_tokens_decoder.items()}
    out = b""
    for i in ids:
        if i in unused:
            continue
        if i in added:
            out += added[i].encode("utf-8")
            continue
        t = tok.convert_ids_to_tokens(i)
        if t is None:
            continue
        out += bytes(_BYTE_DEC[c] for c in t)
    return out


def text_of(b: bytes):
    """bytes -> str for the JSON files (invalid UTF-8, e.g. a token holding part of a character, as U+FFFD)."""
    return b.decode("utf-8", errors="replace")


def agreeing(piece_text, gen, toks):
    """How many leading tokens of `toks` llama.cpp printed too (prefix of `gen`; bytes or text, as
    piece_text returns)."""
    return max(k for k in range(len(toks) + 1) if gen.startswith(piece_text(toks[:k])))


def follow_llamacpp(model, first_kwargs, piece_text, gen, n, masked_ids, top=20, step_mask=True):
    """Walk llama.cpp's printed text `gen` with `model`: at each step the top-1 token if its piece continues
    the text, else the best-ranked of the top `top` whose piece does.  Returns (tokens, deviations [step,
    rank (0 = top-1), id, piece, top-1 logit - its logit], complete).  Uses the KV cache of the prefill."""
    toks, devs = [], []
    mask = first_kwargs["attention_mask"]
    with torch.no_grad():
        out = model(**first_kwargs, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1]
        for step in range(n):
            rest = gen[len(piece_text(toks)):]
            logits = logits.clone()
            for i in masked_ids:
                if i < logits.shape[0]:
                    logits[i] = -float("inf")
            vals, idx = torch.topk(logits, top)
            chosen = None
            for rank, (v, i) in enumerate(zip(vals.tolist(), idx.tolist())):
                piece = piece_text([i])
                if rest.startswith(piece):
                    chosen = i
                    if rank:
                        devs.append([step, rank, i, text_of(piece) if isinstance(piece, bytes) else piece,
                                     vals[0].item() - v])
                    break
            if chosen is None:
                return toks, devs, False
            toks.append(chosen)
            if step == n - 1:
                break
            mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype)], dim=1)
            out = model(input_ids=torch.tensor([[chosen]]), attention_mask=mask if step_mask else None,
                        past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1]
    return toks, devs, piece_text(toks) == gen


# ----------------------------------------------------------------------------- llama.cpp
def llama_tokenize(model, text, bos=False):
    """Token ids of `text` (str or bytes) by llama-tokenize (parse_special, as mtmd tokenizes its text
    segments)."""
    if len(text) == 0:
        return []
    cmd = [str(BIN / "llama-tokenize"), "-m", str(model), "--stdin", "--no-escape", "--ids", "--log-disable"]
    if not bos:
        cmd.append("--no-bos")
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    p = subprocess.run(cmd, input=data, capture_output=True, check=True)
    line = [ln for ln in p.stdout.decode("utf-8").splitlines() if ln.startswith("[")]
    return json.loads(line[-1])


def run_complete(runner, args, tries=8):
    """llama.cpp's log is asynchronous: at exit the last lines (the newlines after the text, the perf lines)
    are sometimes lost.  Re-run until the output is complete."""
    for attempt in range(tries):
        p = runner(args)
        if p.returncode != 0:
            raise RuntimeError(f"llama.cpp tool failed ({p.returncode}):\n{p.stderr[-3000:]!r}")
        out = p.stdout if isinstance(p.stdout, str) else p.stdout.decode("utf-8", errors="replace")
        err = p.stderr if isinstance(p.stderr, str) else p.stderr.decode("utf-8", errors="replace")
        if out.endswith("\n\n") and "prompt eval time" in err:
            return p
        log("  incomplete output (asynchronous log), running again")
    raise RuntimeError("llama.cpp output stayed incomplete")


def mtmd_log_info(stderr):
    """(formatted prompts of the evaluated messages (system first when -sys), number of prompt tokens
    evaluated) from a llama-mtmd-cli -v log (str)."""
    formatted = re.findall(r"formatted_chat\.prompt: (.*?)\n\d+\.\d+\.\d+\.\d+ [DIWE] ", stderr, re.S)
    m = re.search(r"prompt eval time = .*?/\s*(\d+) tokens", stderr)
    return formatted, (int(m.group(1)) if m else None)


def eog_ids_from_log(stderr):
    """The end-of-generation ids llama.cpp lists at load ("printing all EOG tokens"); --ignore-eos masks
    all of them."""
    return sorted({int(x) for x in re.findall(r"load:\s+- (\d+) \('", stderr)})


def mtmd_stdout_text(out, n_messages=1):
    """llama-mtmd-cli prints a newline after evaluating each message (so one before the generated text, two
    with -sys) and two after the text (str or bytes)."""
    nl = "\n" if isinstance(out, str) else b"\n"
    assert out.startswith(nl * n_messages), out[:8]
    gen = out[n_messages:]
    return gen[:-2] if gen.endswith(nl + nl) else gen


def draw_wide(rng, path: Path):
    """A 160x40 test image: horizontal colour waves, a white bar with dark marks, a green
    triangle, noise from `rng`."""
    from PIL import Image, ImageDraw
    h, w = 40, 160
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([127 + 120 * np.sin(x / 9.0), 127 + 120 * np.sin(x / 13.0 + 2), 60 + y * 4], -1)
    a += rng.normal(0, 10, (h, w, 3))
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.rectangle([8, 26, 150, 36], fill=(245, 245, 240))
    for i in range(11):
        d.rectangle([14 + i * 12, 28, 19 + i * 12, 34], fill=(10, 10, 10))
    d.polygon([(80, 2), (96, 22), (64, 22)], fill=(30, 160, 60))
    im.save(path, optimize=False)


def draw_tall(rng, path: Path):
    """A 40x150 test image: vertical gradient, a yellow circle at the top, a blue rectangle, a red
    bar, noise from `rng`."""
    from PIL import Image, ImageDraw
    h, w = 150, 40
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([40 + y * 1.2, 200 - y, 120 + x * 2], -1) + rng.normal(0, 8, (h, w, 3))
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse([8, 6, 32, 30], fill=(250, 220, 20))
    d.rectangle([6, 50, 34, 96], fill=(30, 60, 200))
    d.rectangle([4, 120, 36, 130], fill=(200, 30, 30))
    im.save(path, optimize=False)


def draw_very_wide(rng, path: Path):
    """A 300x40 test image: horizontal colour waves, a white bar with dark "text" marks, a green
    triangle, a red disc near the right end, noise from `rng`."""
    from PIL import Image, ImageDraw
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
    im.save(path, optimize=False)


def draw_very_tall(rng, path: Path):
    """A 40x300 test image: vertical gradient, a yellow circle at the top, a blue rectangle, a red
    bar, a dark square at the bottom, noise from `rng`."""
    from PIL import Image, ImageDraw
    h, w = 300, 40
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([30 + y * 0.7, 220 - y * 0.6, 100 + x * 3], -1) + rng.normal(0, 8, (h, w, 3))
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse([6, 6, 34, 34], fill=(250, 220, 20))
    d.rectangle([6, 70, 34, 150], fill=(30, 60, 200))
    d.rectangle([2, 190, 38, 202], fill=(200, 30, 30))
    d.rectangle([10, 250, 30, 290], fill=(20, 20, 60))
    im.save(path, optimize=False)
