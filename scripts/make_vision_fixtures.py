#!/usr/bin/env python3
"""Make the reference fixtures for seer-vision's preprocessing tests.

Run with the bench venv (torch, transformers 5.23, pillow, numpy):

    /root/.cache/seer-bench/venv/bin/python scripts/make_vision_fixtures.py

Writes into tests/fixtures/vision/:
  img_<name>.png          deterministic test images (the inputs)
  hf336_<name>.png        CLIPImageProcessorPil, llava-1.5 settings, the uint8 image
                          after resize + center crop (rescale/normalize are checked
                          here to be a pure function of it, so the u8 is enough)
  hf56_<name>.f32         CLIPImageProcessorPil at shortest_edge 56 / crop 56,
                          final pixel_values, CHW float32 little-endian
  llama336_<name>.png     llama.cpp mtmd LLaVA-1.5 (PROJECTOR_TYPE_MLP) preprocessing
                          at image_size 336, the uint8 letterboxed image
  llama56_<name>.f32      the same at image_size 56, normalized, CHW float32 LE
  resample_<filter>_<name>.png   bare PIL resizes with each convolution filter
  hf_croppad_<a|b>.f32    CLIPImageProcessorPil, no resize, crop bigger than the image
  img_rgba.png, hf_rgba_over_white.png   CLIPImageProcessorPil's RGBA -> RGB (onto white)
  img_landscape.jpg, pil_decoded_landscape.png   a JPEG and PIL's decoding of it
  jpeg_<case>.jpg, jpeg_<case>.rgb   JPEGs of many kinds (subsampling, progressive,
                          grey, CMYK, RGB, restart markers, odd sizes, corrupt data)
                          and PIL's `Image.open(f).convert("RGB")` of each, raw
                          RGB8 bytes; llava_wide-120x72.rgb is that of the LLaVA
                          fixture tests/fixtures/llava/images/wide-120x72.jpg
  clip336_preprocessor_config.json   as written by save_pretrained
  manifest.json           what each file is, with shapes and settings

The llama.cpp references come from a plain Python port of what
tools/mtmd/mtmd-image.cpp does (img_tool::resize with PAD_CEIL and its
resize_pillow), written from reading that code. When the llama.cpp source
tree and its built libggml are present (LLAMA_CPP_SRC, LLAMA_CPP_LIB), the
port is also checked bit for bit against mtmd-image.cpp itself, compiled
into a small harness.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw
from transformers import CLIPImageProcessorPil

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "vision")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# (name, width, height)
IMAGES = [
    ("landscape", 640, 480),
    ("tall", 97, 211),
    ("wide", 500, 60),
    ("square", 336, 336),
    ("tiny", 20, 15),
]


def make_image(width, height, seed):
    """Gradient + mild noise + hard-edged black/white shapes.

    The hard edges make bicubic overshoot past 0 and 255, so clamping is
    exercised; the noise keeps every pixel's rounding independent.
    """
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 255.0 * x / max(width - 1, 1)
    g = 255.0 * y / max(height - 1, 1)
    b = 127.5 + 127.5 * np.sin(x / 7.0 + y / 11.0)
    img = np.stack([r, g, b], axis=-1) + rng.randint(-12, 13, size=(height, width, 3))
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(pil)
    draw.rectangle([width // 5, height // 5, width // 2, height // 2], fill=(255, 255, 255))
    draw.ellipse([width // 2, height // 3, width - 2, height - 2], fill=(0, 0, 0))
    draw.line([0, height - 1, width - 1, 0], fill=(255, 0, 0), width=max(1, width // 60))
    draw.rectangle([1, 1, max(2, width // 8), max(2, height // 8)], fill=(0, 255, 0))
    return pil


def clip_processor(size):
    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def hf_pixels(processor, img, **overrides):
    out = processor(images=img, return_tensors="np", **overrides)["pixel_values"]
    return out[0]


def check_normalize_is_pure(u8_chw, f32_chw):
    """Rescale+normalize as transformers does it; must equal its output bit for bit."""
    rescaled = (u8_chw.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(CLIP_STD, dtype=np.float32)[:, None, None]
    again = (rescaled - mean) / std
    assert again.dtype == np.float32
    assert np.array_equal(again, f32_chw), "normalize is not a pure function of the u8 crop"


# ---------------------------------------------------------------------------
# llama.cpp (tools/mtmd) LLaVA-1.5 preprocessing, ported by reading the C++.
# ---------------------------------------------------------------------------

LLAMA_PAD_COLOR = (122, 116, 104)  # hparams.image_pad_color for PROJECTOR_TYPE_MLP
PRECISION_BITS = 22  # 32 - 8 - 2, as in resize_pillow


def llama_bicubic(x):
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def llama_weight_matrix(in_size, out_size):
    """Dense (out_size, in_size) matrix of the fixed-point weights resize_pillow uses."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    matrix = np.zeros((out_size, in_size), dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero like a C cast
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [llama_bicubic((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for v in w:
            ww += v
        if ww != 0.0:
            w = [v / ww for v in w]
        for x, v in enumerate(w):
            matrix[xx, xmin + x] = int(v * (1 << PRECISION_BITS) + (-0.5 if v < 0 else 0.5))
    return matrix


def llama_pass(src, matrix, axis):
    """One separable pass over `axis` of an HWC uint8 array, fixed point, clamped."""
    moved = np.moveaxis(src.astype(np.int64), axis, 0)
    acc = np.tensordot(matrix, moved, axes=([1], [0])) + (1 << (PRECISION_BITS - 1))
    out = np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def llama_resize_pillow(src, width, height):
    in_h, in_w = src.shape[:2]
    out = src
    if width != in_w:
        out = llama_pass(out, llama_weight_matrix(in_w, width), axis=1)
    if height != in_h:
        out = llama_pass(out, llama_weight_matrix(in_h, height), axis=0)
    return out


def pillow_runs_vertical_first(in_size, out_size):
    """Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the
    height shrinks by more than twice as many pixels as the width; earlier Pillow
    and llama.cpp always run the horizontal pass first. Found by probing Pillow 13."""
    (in_w, in_h), (out_w, out_h) = in_size, out_size
    return out_h < in_h and in_h - out_h > 2 * (in_w - out_w)


def llama_letterbox(src, size):
    """img_tool::resize(img, dst, {size, size}, BICUBIC, PAD_CEIL, pad colour)."""
    in_h, in_w = src.shape[:2]
    if (in_w, in_h) == (size, size):
        return src.copy(), (in_w, in_h)
    f32 = np.float32
    scale = min(f32(size) / f32(in_w), f32(size) / f32(in_h))
    new_w = min(int(np.ceil(f32(in_w) * scale)), size)
    new_h = min(int(np.ceil(f32(in_h) * scale)), size)
    resized = llama_resize_pillow(src, new_w, new_h)
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:, :] = LLAMA_PAD_COLOR
    off_x = (size - new_w) // 2
    off_y = (size - new_h) // 2
    canvas[off_y:off_y + new_h, off_x:off_x + new_w] = resized
    return canvas, (new_w, new_h)


def llama_normalize(u8_hwc):
    """clip_image_f32::from_u8 then normalize, in float32, returned as CHW."""
    f = u8_hwc.astype(np.float32) / np.float32(255.0)
    mean = np.array(CLIP_MEAN, dtype=np.float32)
    std = np.array(CLIP_STD, dtype=np.float32)
    f = (f - mean) / std
    return np.ascontiguousarray(np.moveaxis(f, -1, 0))


# The port above is checked against llama.cpp's own code when its source tree
# and built libggml-base are around: a small harness compiles mtmd-image.cpp,
# stands in for clip.cpp's hparams (the values it sets for PROJECTOR_TYPE_MLP
# without pinpoints), and prints the preprocessed f32 image.

LLAMA_CPP_SRC = os.environ.get(
    "LLAMA_CPP_SRC", "/root/.cache/seer-bench/src/llama_cpp_python-0.3.36/vendor/llama.cpp")
LLAMA_CPP_LIB = os.environ.get("LLAMA_CPP_LIB", "/root/.cache/seer-bench/build/bin")

HARNESS_CPP = r"""
#include "mtmd-image.h"
#include <cstdio>
#include <cstdlib>
struct clip_logger_state g_logger_state = {clip_log_callback_default, NULL};
static clip_hparams g_hparams;
const clip_hparams * clip_get_hparams(const clip_ctx *) { return &g_hparams; }
int main(int argc, char ** argv) {
    if (argc != 4) return 1;
    int nx = atoi(argv[1]), ny = atoi(argv[2]);
    g_hparams.image_size = atoi(argv[3]);
    const float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
    const float stdv[3] = {0.26862954f, 0.26130258f, 0.27577711f};
    for (int i = 0; i < 3; i++) { g_hparams.image_mean[i] = mean[i]; g_hparams.image_std[i] = stdv[i]; }
    g_hparams.image_pad_color = {122, 116, 104};
    std::vector<uint8_t> rgb((size_t) nx * ny * 3);
    if (fread(rgb.data(), 1, rgb.size(), stdin) != rgb.size()) return 2;
    clip_image_u8 img;
    img.set_size({nx, ny}, false);
    img.cpy_buf(rgb);
    mtmd_image_preproc_out out = mtmd_image_preprocessor_fixed_size(nullptr).preprocess(img);
    const std::vector<float> & buf = out.entries.at(0).get_ro_buf();
    fwrite(buf.data(), sizeof(float), buf.size(), stdout);
    return 0;
}
"""


def build_llamacpp_harness(workdir):
    """Compile the harness; None (with a note) if llama.cpp or g++ is missing."""
    mtmd = os.path.join(LLAMA_CPP_SRC, "tools", "mtmd")
    if not os.path.exists(os.path.join(mtmd, "mtmd-image.cpp")) or not shutil.which("g++"):
        print(f"note: no llama.cpp source at {LLAMA_CPP_SRC} (or no g++): port not checked against it")
        return None
    src = os.path.join(workdir, "harness.cpp")
    exe = os.path.join(workdir, "harness")
    with open(src, "w") as f:
        f.write(HARNESS_CPP)
    cmd = ["g++", "-std=c++17", "-O2", f"-I{mtmd}", f"-I{LLAMA_CPP_SRC}/ggml/include", f"-I{LLAMA_CPP_SRC}/include",
           src, os.path.join(mtmd, "mtmd-image.cpp"), f"-L{LLAMA_CPP_LIB}", "-lggml-base", "-lggml",
           f"-Wl,-rpath,{LLAMA_CPP_LIB}", "-o", exe]
    subprocess.run(cmd, check=True)
    return exe


def check_against_llamacpp(harness, src, size, expected_chw):
    """llama.cpp's own preprocessing (HWC f32) must equal the port bit for bit."""
    h, w = src.shape[:2]
    out = subprocess.run([harness, str(w), str(h), str(size)], input=src.tobytes(),
                         capture_output=True, check=True).stdout
    theirs = np.moveaxis(np.frombuffer(out, dtype="<f4").reshape(size, size, 3), -1, 0)
    assert np.array_equal(theirs, expected_chw), f"port differs from llama.cpp at size {size}"


# ---------------------------------------------------------------------------


def save_png(array_hwc, name):
    Image.fromarray(array_hwc, "RGB").save(os.path.join(OUT, name), optimize=True)


def save_f32(array, name):
    np.ascontiguousarray(array, dtype="<f4").tofile(os.path.join(OUT, name))


def copy_saved_config():
    tmp = tempfile.mkdtemp()
    try:
        clip_processor(336).save_pretrained(tmp)
        shutil.copy(os.path.join(tmp, "preprocessor_config.json"),
                    os.path.join(OUT, "clip336_preprocessor_config.json"))
    finally:
        shutil.rmtree(tmp)


# (case, width, height, mode, save options): every kind of JPEG that seer's
# libjpeg-turbo decoding must read exactly as PIL does.
JPEG_CASES = [
    ("420_q75", 121, 73, "RGB", {"quality": 75}),
    ("420_q95_opt", 121, 73, "RGB", {"quality": 95, "optimize": True}),
    ("444_q95", 121, 73, "RGB", {"quality": 95, "subsampling": "4:4:4"}),
    ("422_q75", 121, 73, "RGB", {"quality": 75, "subsampling": "4:2:2"}),
    ("progressive_420_q75", 121, 73, "RGB", {"quality": 75, "progressive": True}),
    ("progressive_444_q90", 67, 45, "RGB", {"quality": 90, "progressive": True, "subsampling": "4:4:4"}),
    ("progressive_grey_q80", 67, 45, "L", {"quality": 80, "progressive": True}),
    ("grey_q75", 121, 73, "L", {"quality": 75}),
    ("restarts_420_q85", 67, 45, "RGB", {"quality": 85, "restart_marker_blocks": 3}),
    ("rgb_keep_q90", 67, 45, "RGB", {"quality": 90, "keep_rgb": True}),
    ("cmyk_q90", 67, 45, "CMYK", {"quality": 90}),
    ("420_q75_17x9", 17, 9, "RGB", {"quality": 75}),
    ("420_q75_1x1", 1, 1, "RGB", {"quality": 75}),
]


def corrupt(data):
    """Overwrite a run of entropy-coded bytes in the middle of the scan: libjpeg
    warns and resynchronises, PIL ignores the warnings and returns an image."""
    data = bytearray(data)
    middle = len(data) // 2
    data[middle:middle + 24] = bytes([0x55]) * 24
    return bytes(data)


def make_jpeg_fixtures(manifest):
    """JPEGs and PIL's decoding of each, as raw RGB8 (row-major, no header)."""
    def write_pil_decoding(jpeg_path, name):
        rgb = np.array(Image.open(jpeg_path).convert("RGB"))
        rgb.tofile(os.path.join(OUT, name))
        return rgb.shape[1], rgb.shape[0]

    for seed, (case, width, height, mode, options) in enumerate(JPEG_CASES, start=100):
        # Cropped from at least 64x64, as make_image needs room for its shapes.
        img = make_image(max(width, 64), max(height, 64), seed).crop((0, 0, width, height)).convert(mode)
        path = os.path.join(OUT, f"jpeg_{case}.jpg")
        img.save(path, "JPEG", **options)
        assert write_pil_decoding(path, f"jpeg_{case}.rgb") == (width, height)
        manifest["jpeg"].append({"jpeg": f"jpeg_{case}.jpg", "rgb": f"jpeg_{case}.rgb",
                                 "width": width, "height": height, "mode": mode,
                                 "options": options})

    with open(os.path.join(OUT, "jpeg_420_q75.jpg"), "rb") as f:
        broken = corrupt(f.read())
    with open(os.path.join(OUT, "jpeg_corrupt_420_q75.jpg"), "wb") as f:
        f.write(broken)
    write_pil_decoding(os.path.join(OUT, "jpeg_corrupt_420_q75.jpg"), "jpeg_corrupt_420_q75.rgb")
    manifest["jpeg"].append({"jpeg": "jpeg_corrupt_420_q75.jpg", "rgb": "jpeg_corrupt_420_q75.rgb",
                             "width": 121, "height": 73, "mode": "RGB", "options": {"corrupted": True}})

    llava = os.path.join(os.path.dirname(OUT), "llava", "images", "wide-120x72.jpg")
    width, height = write_pil_decoding(llava, "llava_wide-120x72.rgb")
    manifest["jpeg"].append({"jpeg": "../llava/images/wide-120x72.jpg", "rgb": "llava_wide-120x72.rgb",
                             "width": width, "height": height, "mode": "RGB", "options": {}})


RESAMPLE_FILTERS = {1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
RESAMPLE_JOBS = [("tall", 41, 53), ("tiny", 53, 41), ("landscape", 123, 77)]


def main():
    os.makedirs(OUT, exist_ok=True)
    manifest = {
        "clip_mean": CLIP_MEAN,
        "clip_std": CLIP_STD,
        "llama_pad_color": list(LLAMA_PAD_COLOR),
        "images": [],
        "resample": [],
        "croppad": [],
        "jpeg": [],
    }
    p336, p56 = clip_processor(336), clip_processor(56)
    workdir = tempfile.mkdtemp()
    harness = build_llamacpp_harness(workdir)

    for seed, (name, width, height) in enumerate(IMAGES):
        img = make_image(width, height, seed)
        img.save(os.path.join(OUT, f"img_{name}.png"), optimize=True)
        img = Image.open(os.path.join(OUT, f"img_{name}.png"))
        src = np.array(img.convert("RGB"))

        crop_u8 = hf_pixels(p336, img, do_rescale=False, do_normalize=False)
        assert crop_u8.dtype == np.uint8 and crop_u8.shape == (3, 336, 336), crop_u8.shape
        check_normalize_is_pure(crop_u8, hf_pixels(p336, img))
        save_png(np.moveaxis(crop_u8, 0, -1), f"hf336_{name}.png")

        hf56 = hf_pixels(p56, img)
        assert hf56.dtype == np.float32 and hf56.shape == (3, 56, 56)
        save_f32(hf56, f"hf56_{name}.f32")

        box336, inner336 = llama_letterbox(src, 336)
        save_png(box336, f"llama336_{name}.png")
        box56, inner56 = llama_letterbox(src, 56)
        save_f32(llama_normalize(box56), f"llama56_{name}.f32")
        if harness:
            check_against_llamacpp(harness, src, 336, llama_normalize(box336))
            check_against_llamacpp(harness, src, 56, llama_normalize(box56))

        # llama.cpp says its resize_pillow is Pillow's algorithm: hold it to that
        # where Pillow 13 also runs the horizontal pass first (see pillow_runs_vertical_first).
        for inner in (inner336, inner56):
            if inner != (width, height) and not pillow_runs_vertical_first((width, height), inner):
                pil = np.array(img.resize(inner, Image.Resampling.BICUBIC))
                assert np.array_equal(pil, llama_resize_pillow(src, *inner)), (name, inner)

        manifest["images"].append({
            "name": name, "width": width, "height": height,
            "llama336_inner": list(inner336), "llama56_inner": list(inner56),
        })

    for name, out_w, out_h in RESAMPLE_JOBS:
        img = Image.open(os.path.join(OUT, f"img_{name}.png"))
        for code, filt in RESAMPLE_FILTERS.items():
            file = f"resample_{filt}_{name}.png"
            save_png(np.array(img.resize((out_w, out_h), resample=code)), file)
            manifest["resample"].append({"file": file, "input": f"img_{name}.png", "filter": code,
                                         "width": out_w, "height": out_h})

    # Center crop larger than the image: transformers pads with zeros.
    tiny = Image.open(os.path.join(OUT, "img_tiny.png"))
    for tag, crop in [("a", {"height": 30, "width": 30}), ("b", {"height": 10, "width": 31})]:
        proc = CLIPImageProcessorPil(do_resize=False, crop_size=crop, image_mean=CLIP_MEAN, image_std=CLIP_STD)
        out = hf_pixels(proc, tiny)
        assert out.shape == (3, crop["height"], crop["width"]), out.shape
        save_f32(out, f"hf_croppad_{tag}.f32")
        manifest["croppad"].append({"file": f"hf_croppad_{tag}.f32", "input": "img_tiny.png", **crop})

    # RGBA input: CLIPImageProcessorPil's convert_to_rgb composites onto white
    # (it does not just drop alpha). Every (value, alpha) pair appears.
    x, y = np.meshgrid(np.arange(256), np.arange(256))
    rgba = np.stack([x, 255 - x, (x * 7 + y * 3) % 256, y], axis=-1).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(os.path.join(OUT, "img_rgba.png"), optimize=True)
    proc = CLIPImageProcessorPil(do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False)
    flat = hf_pixels(proc, Image.open(os.path.join(OUT, "img_rgba.png")))
    assert flat.dtype == np.uint8 and flat.shape == (3, 256, 256)
    save_png(np.moveaxis(flat, 0, -1), "hf_rgba_over_white.png")

    # How far is another decoder from PIL's libjpeg-turbo on the same JPEG?
    Image.open(os.path.join(OUT, "img_landscape.png")).save(os.path.join(OUT, "img_landscape.jpg"), quality=90)
    save_png(np.array(Image.open(os.path.join(OUT, "img_landscape.jpg")).convert("RGB")), "pil_decoded_landscape.png")

    make_jpeg_fixtures(manifest)

    copy_saved_config()
    shutil.rmtree(workdir)
    if harness:
        print("llama.cpp's mtmd-image.cpp agrees with the Python port on every image")
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files, {total / 1e6:.2f} MB, into {os.path.normpath(OUT)}")


if __name__ == "__main__":
    sys.exit(main())
