"""Hugging Face LLaVA checkpoint -> llava-jax model directory, one tensor at a time.

Peak host memory is the output plus one tensor: each HF tensor is read into its own buffer,
transposed into its slot of the preallocated (stacked) output leaf, and dropped. The mapping
is strict: every source tensor is consumed, every parameter filled, every shape checked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llava_jax.config import LlavaConfig
from llava_jax.conversion.hf_config import ConfigError, from_hf_config
from llava_jax.conversion.mapping import canonical_key, rules
from llava_jax.conversion.original_config import is_original_config
from llava_jax.conversion.original_to_jax import convert_original_to_jax
from llava_jax.conversion.tensor_io import CheckpointReader
from llava_jax.errors import CheckpointError
from llava_jax.model_io import save_model_dir
from llava_jax.models.build import abstract_params

# Files copied next to the parameters so the model can run (tokenizer, processor, template).
ASSET_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)


def read_hf_config(hf_dir: str | os.PathLike) -> LlavaConfig:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{hf_dir}: no config.json; not a Hugging Face model directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    try:
        return from_hf_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def hf_to_params(
    cfg: LlavaConfig,
    keys: list[str],
    shape_of: Callable[[str], tuple[int, ...]],
    read: Callable[[str], np.ndarray],
    dtype: np.dtype | str | None = None,
) -> dict[str, np.ndarray]:
    """Fills every parameter of `LlavaModel(cfg)` from HF tensors, streaming.

    Args:
      cfg: the model config.
      keys: every tensor name in the source, in any supported spelling.
      shape_of: shape of a source tensor without reading it.
      read: reads one source tensor.
      dtype: cast to this dtype (default: keep each tensor's own).

    Returns:
      Flat {"a/b/c": np.ndarray}.
    """
    sources: dict[str, str] = {}
    for key in keys:
        canon = canonical_key(key)
        if canon is None:
            continue
        if canon in sources:
            raise CheckpointError(f"tensors {sources[canon]!r} and {key!r} are the same parameter")
        sources[canon] = key
    expected = abstract_params(cfg)
    params, consumed = {}, set()
    for rule in rules(cfg):
        want = tuple(expected[rule.jax].shape)
        per_layer = want[1:] if rule.num_layers else want
        out = None
        for i, canon in enumerate(rule.hf_keys()):
            if canon not in sources:
                raise CheckpointError(f"missing tensor {canon!r} (for parameter {rule.jax})")
            src = sources[canon]
            hf_shape = tuple(shape_of(src))
            # Compared in HF layout: a tensor of the wrong rank cannot be transposed to ours.
            need = rule.transform.to_hf(np.broadcast_to(False, per_layer)).shape  # no memory
            if hf_shape != need:
                raise CheckpointError(
                    f"tensor {src!r} has shape {hf_shape}; {rule.jax} needs {need}"
                )
            value = rule.transform.to_jax(read(src))
            if out is None:
                out = np.empty(want, dtype or value.dtype)
            if rule.num_layers:
                out[i] = value
            else:
                out[...] = value
            consumed.add(canon)
            del value
        params[rule.jax] = out
    _consume_tied_head(cfg, sources, consumed, read)
    unused = sorted(set(sources) - consumed)
    if unused:
        names = [sources[c] for c in unused]
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        raise CheckpointError(f"tensors not used by the model: {names[:5]}{more}")
    return params


def _consume_tied_head(cfg, sources, consumed, read):
    # Converters of tied checkpoints sometimes store lm_head as a copy of embed_tokens;
    # accept it only if it really is that copy, compared as stored (`--dtype` casts params).
    head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    if cfg.text.tie_word_embeddings and head in sources:
        stored = read(sources[head])
        if not np.array_equal(stored, read(sources[embed])):
            raise CheckpointError(
                f"tie_word_embeddings is true but {sources[head]!r} differs from embed_tokens"
            )
        consumed.add(head)


def convert_hf_to_jax(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | None = None,
    allow_pickle: bool = False,
    vision_dir: str | os.PathLike | None = None,
    conv_mode: str | None = None,
) -> LlavaConfig:
    """Converts an HF LLaVA / LLaVA-NeXT / LLaVA-OneVision directory to a model directory.

    A directory of the original repositories (`LlavaLlamaForCausalLM`, ...) is converted by
    `original_to_jax.convert_original_to_jax`, which alone takes `vision_dir` and `conv_mode`.

    Args:
      hf_dir: directory with config.json and safetensors (or .bin with allow_pickle).
      out_dir: the model directory to write (must not exist or be empty).
      dtype: "float32", "bfloat16" or "float16"; default keeps the checkpoint's dtypes.
      allow_pickle: accept `.bin` / `.pt` weights (loaded with `weights_only=True`).
      vision_dir: original checkpoints: HF directory of the vision tower.
      conv_mode: original checkpoints: the conversation template they were trained with.

    Returns:
      The model config written.
    """
    np_dtype = _np_dtype(dtype)
    path = Path(hf_dir) / "config.json"
    if path.is_file() and is_original_config(_json_or_none(path)):
        return convert_original_to_jax(
            hf_dir, out_dir, vision_dir, conv_mode, np_dtype, allow_pickle=allow_pickle
        )
    for flag, value in (("--vision", vision_dir), ("--conv-mode", conv_mode)):
        if value is not None:
            raise CheckpointError(
                f"{flag} is for checkpoints of the original repositories; {hf_dir} is a "
                "Hugging Face directory"
            )
    cfg = read_hf_config(hf_dir)
    with CheckpointReader(hf_dir, allow_pickle=allow_pickle) as reader:
        params = hf_to_params(cfg, reader.keys(), reader.shape, reader.read, np_dtype)
    assets = [name for name in ASSET_FILES if (Path(hf_dir) / name).is_file()]
    save_model_dir(out_dir, cfg, params, assets_from=hf_dir, asset_files=assets)
    return cfg


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # read_hf_config reports it


def _np_dtype(dtype: str | None):
    if dtype is None:
        return None
    import ml_dtypes

    table = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
    if dtype not in table:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(table)}")
    return np.dtype(table[dtype])
