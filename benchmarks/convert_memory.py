"""Peak resident memory of `llava-jax convert hf-to-jax` on a synthetic ~1B-parameter checkpoint.

Writes an HF LLaVA-1.5-style directory (CLIP ViT-L/14-336 tower, a 1B LLaMA-shaped decoder)
of random float32 tensors in 2 GB shards, then runs the real converter under
`/usr/bin/time -v` and reports its maximum resident set size against the output size.
Target (issue 2): peak < 1.5 x the checkpoint size.

    python benchmarks/convert_memory.py --workdir /tmp/convmem
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.conversion.hf_config import to_hf_config
from llava_jax.conversion.jax_to_hf import params_to_hf
from llava_jax.conversion.tensor_io import CheckpointWriter
from llava_jax.models.build import abstract_params


def synthetic_config() -> LlavaConfig:
    text = TextConfig(
        vocab_size=32064,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=128,
    )
    return LlavaConfig(vision=VisionConfig.clip_vit_l14(336), text=text)


def write_checkpoint(cfg: LlavaConfig, hf_dir: Path) -> int:
    """Streams random tensors through the same table the converter reads; returns bytes."""
    rng = np.random.default_rng(0)
    shapes = abstract_params(cfg)

    class Lazy(dict):  # one parameter materialised at a time
        def __getitem__(self, path):
            return rng.standard_normal(shapes[path].shape, dtype=np.float32)

    total = 0
    with CheckpointWriter(hf_dir, max_shard_size="2GB") as writer:
        for key, array in params_to_hf(cfg, Lazy()):
            writer.add(key, array)
            total += array.nbytes
    (hf_dir / "config.json").write_text(json.dumps(to_hf_config(cfg), indent=2))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/llava_jax_convmem")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    hf_dir = work / "hf"
    cfg = synthetic_config()
    n_params = sum(math.prod(p.shape) for p in abstract_params(cfg).values())
    size = write_checkpoint(cfg, hf_dir)
    print(f"parameters        {n_params / 1e9:.3f} B")
    print(f"checkpoint size   {size / 2**30:.2f} GiB (float32)")
    runs = [
        ["hf-to-jax", "--hf", str(hf_dir), "--out", str(work / "jax")],
        [
            "jax-to-hf",
            "--ckpt",
            str(work / "jax"),
            "--out",
            str(work / "hf2"),
            "--max-shard-size",
            "1GB",
        ],
    ]
    for args in runs:
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "llava_jax.cli.main", "convert", *args]
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.time() - start
        if proc.returncode:
            sys.exit(f"conversion failed:\n{proc.stderr}")
        peak = 1024 * int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1])
        print(
            f"{args[0]:<17} peak RSS {peak / 2**30:.2f} GiB = {peak / size:.2f} x checkpoint, "
            f"{seconds:.0f} s: llava-jax convert {' '.join(args)}"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
