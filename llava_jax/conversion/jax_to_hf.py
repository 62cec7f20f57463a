"""llava-jax model directory -> Hugging Face directory that transformers loads.

Uses the same table as `hf_to_jax`, read backwards, and writes sharded safetensors with the
spelling transformers' own `save_pretrained` uses.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from llava_jax.config import LlavaConfig
from llava_jax.conversion.hf_config import to_hf_config
from llava_jax.conversion.mapping import hf_output_key, rules
from llava_jax.conversion.tensor_io import CheckpointWriter
from llava_jax.errors import CheckpointError
from llava_jax.model_io import ASSETS_DIR, load_config, load_params


def params_to_hf(cfg: LlavaConfig, params: Mapping[str, np.ndarray]):
    """Yields (HF key, array) for every parameter, one tensor at a time."""
    for rule in rules(cfg):
        value = params[rule.jax]
        for i, canon in enumerate(rule.hf_keys()):
            layer = value[i] if rule.num_layers else value
            layer = rule.transform.to_hf(np.asarray(layer))
            yield hf_output_key(canon), np.ascontiguousarray(layer)


def convert_jax_to_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Writes `out_dir` with config.json, sharded safetensors and the tokenizer/processor files.

    Args:
      ckpt_dir: a llava-jax model directory (from `convert hf-to-jax` or training).
      out_dir: the HF directory to write (must not exist or be empty).
      max_shard_size: largest safetensors shard, e.g. "5GB" or "500MiB".
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # as save_model_dir
        raise CheckpointError(f"{out}: exists and is not empty; refusing to overwrite")
    cfg = load_config(ckpt_dir)
    hf_config = to_hf_config(cfg)  # fails early for a model HF cannot represent
    params = load_params(ckpt_dir, cfg)
    out.mkdir(parents=True, exist_ok=True)
    dtypes = {str(np.asarray(a).dtype) for a in params.values()}
    if len(dtypes) == 1:
        hf_config["dtype"] = dtypes.pop()
    with CheckpointWriter(out, max_shard_size=max_shard_size) as writer:
        for key, array in params_to_hf(cfg, params):
            writer.add(key, array)
    assets = Path(ckpt_dir) / ASSETS_DIR
    if assets.is_dir():
        for f in assets.iterdir():
            shutil.copy2(f, out / f.name)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return out
