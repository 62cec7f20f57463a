"""AnyRes preprocessing speed: llava-jax vs transformers' PIL-backend processor, same run.

A 1920x1080 RGB image through LLaVA-OneVision's `anyres_max_9` preprocessing (the released
preprocessor config: 384px views, SigLIP mean/std, 36 pinpoints) -> 16 views (base + 3x5
crops). Both sides take the same decoded PIL image and return float32 pixel values; the
script asserts they are bit-identical before timing. Target (issue 3): >= 2x faster.
A LLaVA-NeXT row (`anyres`, 336px, CLIP mean/std) is reported alongside.

    python benchmarks/preprocess_anyres.py --repeats 30
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import transformers
from PIL import Image
from transformers import LlavaNextImageProcessorPil, LlavaOnevisionImageProcessorPil

from llava_jax.media.image_processing import preprocess_image
from llava_jax.media.processor_config import ImageProcessorConfig

ONEVISION = {"size": {"height": 384, "width": 384}, "image_mean": [0.5] * 3,
             "image_std": [0.5] * 3, "resample": 3}  # fmt: skip
NEXT = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}


def photo_like(h: int, w: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields plus sensor-like noise, so resizes do real work."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = np.stack([np.sin(7 * x) + np.cos(3 * y), np.sin(5 * y + 1), np.cos(4 * (x - y))], -1)
    return Image.fromarray(
        ((rgb + 2) * 60 + rng.normal(0, 6, (h, w, 3))).clip(0, 255).astype(np.uint8)
    )


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: imports, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def compare(name: str, family: str, hf_cls, config: dict, image: Image.Image, repeats: int):
    hf = hf_cls(**config)
    cfg = ImageProcessorConfig.from_hf(config, family)
    ref = np.asarray(hf(images=image)["pixel_values"][0]).transpose(0, 2, 3, 1)
    ours = preprocess_image(image, cfg).views
    assert ours.shape == ref.shape and np.array_equal(ours, ref), "pixels differ"
    # Interleave the two so that machine noise hits both alike.
    t_hf, t_ours = [], []
    for _ in range(repeats):
        t_hf += timed(lambda: hf(images=image), 1)
        t_ours += timed(lambda: preprocess_image(image, cfg), 1)
    hf_ms, ours_ms = 1e3 * statistics.median(t_hf), 1e3 * statistics.median(t_ours)
    print(
        f"| {name} | {image.width}x{image.height} | {len(ours)} x {ours.shape[1]}px | "
        f"{hf_ms:.1f} | {ours_ms:.1f} | {hf_ms / ours_ms:.2f}x | identical |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    args = parser.parse_args()
    image = photo_like(args.height, args.width)
    print(
        f"{platform.processor() or platform.machine()}, transformers {transformers.__version__}, "
        f"Pillow {Image.__version__}, numpy {np.__version__}; median of {args.repeats}"
    )
    print("| Mode | Image | Views | transformers PIL (ms) | llava-jax (ms) | Speed-up | Pixels |")
    print("|---|---|---|---:|---:|---:|---|")
    compare("OneVision anyres_max_9", "llava_onevision", LlavaOnevisionImageProcessorPil,
            ONEVISION, image, args.repeats)  # fmt: skip
    compare("NeXT anyres", "llava_next", LlavaNextImageProcessorPil, NEXT, image, args.repeats)


if __name__ == "__main__":
    main()
