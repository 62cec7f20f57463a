"""A model from either format: a llava-jax model directory (local or gs://) or a local
Hugging Face directory, converted in memory.

Every command that takes a model (`generate`, `chat`, `serve`, `eval`, `train`'s `init_from`,
`export`, `convert`) asks these questions of it here, so the formats are told apart, and
refused, in one place and in the same words.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
from etils import epath

from llava_jax import model_io, paths
from llava_jax.config import LlavaConfig
from llava_jax.errors import CheckpointError
from llava_jax.models import build
from llava_jax.models.llava import LlavaModel


class Format(enum.StrEnum):
    LLAVA_JAX = "llava-jax"  # llava_config.json + params/ + assets/ (model_io.py)
    HF = "hf"  # config.json + safetensors (or .bin with --allow-pickle), as transformers saves


def format_of(path: str | os.PathLike) -> Format:
    """The format of the model at `path`; a one-line `CheckpointError` for anything else."""
    if model_io.is_model_dir(path):
        return Format.LLAVA_JAX
    if (epath.Path(path) / model_io.PARAMS_DIR).is_dir():
        raise CheckpointError(
            f"{path}: has {model_io.PARAMS_DIR}/ but no {model_io.CONFIG_FILE}: an unfinished "
            "llava-jax model directory (write it again)"
        )
    if paths.is_url(path):
        raise CheckpointError(
            f"{path}: not a llava-jax model directory (a remote path must be one; an HF "
            "checkpoint must be local)"
        )
    local = Path(path)
    if not local.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    if (local / "config.json").is_file():
        return Format.HF
    raise CheckpointError(
        f"{path}: neither a llava-jax model directory ({model_io.CONFIG_FILE}) nor a Hugging "
        "Face checkpoint (config.json)"
    )


def load_config(path: str | os.PathLike) -> LlavaConfig:
    """The model's architecture, from `llava_config.json` or the HF `config.json`."""
    if format_of(path) == Format.LLAVA_JAX:
        return model_io.load_config(path)
    from llava_jax.conversion.hf_to_jax import read_hf_config

    return read_hf_config(Path(path))


def load_params(
    path: str | os.PathLike,
    cfg: LlavaConfig,
    shardings: Mapping[str, jax.sharding.Sharding] | None = None,
    dtype: Any = None,
    expected: Mapping[str, jax.ShapeDtypeStruct] | None = None,
) -> dict[str, jax.Array]:
    """Flat {path: array} of `cfg`'s parameters, each placed in `shardings[path]` (default:
    the first local device) and cast to `dtype` (default: as stored). A llava-jax dir is
    restored straight into the shardings; an HF dir is read tensor by tensor and converted.
    `expected`: `cfg`'s abstract parameters when the caller has them (no second build)."""
    if format_of(path) == Format.LLAVA_JAX:
        return model_io.load_params(path, cfg, shardings=shardings, dtype=dtype, expected=expected)
    from llava_jax.conversion.hf_to_jax import hf_to_params
    from llava_jax.conversion.tensor_io import CheckpointReader

    with CheckpointReader(Path(path)) as reader:
        host = hf_to_params(cfg, reader.keys(), reader.shape, reader.read, dtype)
    device = build.default_sharding()
    # (CheckpointReader already refused non-finite tensors, naming the file and tensor.)
    return {k: jax.device_put(v, shardings[k] if shardings else device) for k, v in host.items()}


def load_model(path: str | os.PathLike, **overrides: Any) -> LlavaModel:
    """A ready `LlavaModel`; `overrides` set config fields or run settings (`dtype`,
    `scan_layers`, ...). The parameters keep the dtype they were stored in unless
    `param_dtype` is given."""
    cfg = load_config(path).with_fields(**overrides)
    params = load_params(path, cfg, dtype=overrides.get("param_dtype"))
    return build.model_from_params(cfg, params)


def assets(path: str | os.PathLike) -> Path:
    """The local directory of the model's tokenizer, processor and chat-template files: a
    llava-jax dir's `assets/` (copied here first when remote: transformers reads local
    directories only), or the HF directory itself."""
    if format_of(path) == Format.HF:
        return Path(path)
    if paths.is_url(path):
        return model_io.local_assets(path)
    return Path(path) / model_io.ASSETS_DIR
