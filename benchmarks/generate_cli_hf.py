"""`llava-jax generate --json --model HF_DIR` against transformers `generate`, same model, same run.

The model of `generate_speed.py` (OneVision-shaped, 51M random parameters, float32), saved as a
Hugging Face directory with the 160-token test tokenizer and its image processor, and the same
model converted once with `convert hf-to-jax`. The CLI runs as a user runs it, in a fresh
process on one 384x384 photo (1,485 image tokens), greedy; it reports its own time to first
token (compile included: a fresh process) and decode rate (from the second token on, so the
decode step's compile is not counted). transformers decodes the same prompt ids and pixels;
the ratio is the CLI's decode rate over transformers', and the tokens must agree. Each round
runs transformers, the CLI on the HF directory, then on the converted one, so that a machine
loaded by others slows all three alike.

    python benchmarks/generate_cli_hf.py [--new-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from generate_speed import build_hf, hf_timed  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import LlavaOnevisionImageProcessorPil  # noqa: E402

from llava_jax.checks.tiny_tokenizer import IMAGE_TOKEN_ID, save_tiny_tokenizer  # noqa: E402
from llava_jax.conversion.hf_to_jax import convert_hf_to_jax  # noqa: E402
from llava_jax.inference.pipeline import Pipeline  # noqa: E402

PROMPT = "<image>\nDescribe the picture in detail."


def build_dirs(work: Path):
    """(HF directory, converted directory, photo path, the torch model)."""
    hf = build_hf(image_token=IMAGE_TOKEN_ID)
    hf.save_pretrained(work / "hf")
    save_tiny_tokenizer(work / "hf")
    LlavaOnevisionImageProcessorPil(
        size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        image_grid_pinpoints=hf.config.image_grid_pinpoints,
    ).save_pretrained(work / "hf")  # fmt: skip
    convert_hf_to_jax(work / "hf", work / "jax")
    rng = np.random.RandomState(0)
    y, x = np.mgrid[0:384, 0:384]
    photo = np.stack([x * 255 // 383, y * 255 // 383, (x + y) % 256], -1)
    photo = (photo + rng.randint(0, 32, photo.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(photo).save(work / "photo.png")
    return work / "hf", work / "jax", work / "photo.png", hf


def cli_generate(model_dir: Path, photo: Path, new_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "llava_jax.cli.main", "generate", "--model", str(model_dir),
           "--image", str(photo), "--prompt", PROMPT, "--raw",
           "--max-new-tokens", str(new_tokens), "--json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    hf_dir, jax_dir, photo, hf = build_dirs(Path(tempfile.mkdtemp()))
    # The prompt as the CLI builds it: the same ids and pixels go to transformers.
    prompt = Pipeline.load(hf_dir, raw=True, echo=lambda _: None).prompt(PROMPT, [photo])
    ids = np.asarray(prompt.input_ids, np.int64)[None]
    pixels = prompt.views.transpose(0, 3, 1, 2)[None]
    rates = {"transformers": [], "llava-jax HF dir": [], "llava-jax converted": []}
    firsts = {k: [] for k in rates}
    same = True
    for _ in range(args.rounds):
        first, rate, tokens = hf_timed(hf, ids, np.ones_like(ids), pixels, [[384, 384]],
                                       args.new_tokens)  # fmt: skip
        rates["transformers"].append(rate)
        firsts["transformers"].append(first)
        for name, path in (("llava-jax HF dir", hf_dir), ("llava-jax converted", jax_dir)):
            start = time.perf_counter()
            out = cli_generate(path, photo, args.new_tokens)
            print(f"{name}: process {time.perf_counter() - start:.1f} s", file=sys.stderr)
            rates[name].append(out["decode_tokens_per_s"])
            firsts[name].append(out["time_to_first_token_s"])
            n = len(out["token_ids"])
            same &= list(tokens[0, :n]) == out["token_ids"]
    print(f"model: {sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M params, "
          f"{int((ids == IMAGE_TOKEN_ID).sum())} image tokens, {args.new_tokens} new tokens, "
          f"float32, {os.cpu_count()} CPU threads, {args.rounds} rounds (median)")  # fmt: skip
    print("impl                  TTFT s  decode tok/s  vs transformers  (each round)")
    base = statistics.median(rates["transformers"])
    for name, values in rates.items():
        rate = statistics.median(values)
        each = " ".join(f"{v:.1f}" for v in values)
        print(f"{name:<20}  {statistics.median(firsts[name]):6.2f}  {rate:12.1f}  "
              f"{rate / base:14.2f}x  ({each})")  # fmt: skip
    print(f"tokens identical to transformers: {same}")


if __name__ == "__main__":
    main()
