"""Loading a recipe (`configs/*.py`), applying command-line overrides, and what follows from it.

    load_config("configs/llava15_7b_finetune.py:13b", ["--config.optimizer.lr=1e-5"])

A recipe is a Python file whose `get_config(arg=None)` returns the locked ConfigDict of
`train/defaults.py::base_config()` with the recipe's values. Overrides are parsed with the
type of the field they replace, so `--config.train.batch_size=1e3` is an error, not 1000.0.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections

from llava_jax import paths
from llava_jax.config import LEGACY_RUN_KEYS, LlavaConfig, RunSettings, TextConfig, VisionConfig
from llava_jax.data.sources import TFDS_PREFIX

# Trainable-parameter patterns of the papers' stages (haotian-liu/LLaVA
# `scripts/v1_5/*.sh`; LLaVA-VL/LLaVA-NeXT `llava/train/train.py`, `mm_tunable_parts`).
CONNECTOR = ("multi_modal_projector/.*",)
CONNECTOR_AND_LLM = ("multi_modal_projector/.*", "language_model/.*")
# OneVision `mm_tunable_parts=mm_vision_tower,mm_mlp_adapter,mm_language_model`: everything,
# image_newline included (it counts as part of the language model there).
EVERYTHING = ("vision_tower/.*", "multi_modal_projector/.*", "language_model/.*", "image_newline")

# ConfigDicts whose keys are free (not fixed by base_config), and what checks a new key.
_OPEN_DICTS = ("model.overrides", "model.overrides.vision", "model.overrides.text",
               "data.tfds_fields")  # fmt: skip
_NESTED = {"vision": VisionConfig, "text": TextConfig}
# Fields that hold a local path or a URL; relative paths are made absolute on loading.
PATH_FIELDS = ("init_from", "projector_from", "data.train", "data.image_root")


class ConfigLoadError(ValueError):
    """A recipe that cannot be loaded or an override that does not apply; one line."""


def load_module(path: str | os.PathLike) -> ModuleType:
    """Imports a recipe file by path (recipes are files, not a package)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigLoadError(f"{path}: no such recipe file")
    spec = importlib.util.spec_from_file_location(f"_recipe_{uuid.uuid4().hex}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_spec(spec: str) -> tuple[str, str | None]:
    """`"a/b.py:13b"` -> `("a/b.py", "13b")`; `"a/b.py"` -> `("a/b.py", None)`."""
    path, sep, arg = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return path, arg
    return spec, None


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads a recipe and applies overrides.

    Args:
      spec: `path/to/recipe.py` or `path/to/recipe.py:ARG` (ARG goes to `get_config(ARG)`).
      overrides: `--config.a.b=VALUE`, `config.a.b=VALUE` or `a.b=VALUE`, applied in order.

    Returns:
      The locked config.
    """
    path, arg = split_spec(spec)
    module = load_module(path)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigLoadError(f"{path}: has no get_config() function")
    config = get_config(arg) if arg is not None else get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigLoadError(f"{path}: get_config() returned {type(config).__name__}")
    config.lock()
    for override in overrides:
        apply_override(config, override)
    check_config(config)
    _absolute_paths(config)
    return config


def _absolute_paths(config: ml_collections.ConfigDict) -> None:
    """Makes the PATH_FIELDS absolute against the working directory, in place."""
    for name in PATH_FIELDS:
        *parents, leaf = name.split(".")
        node = config
        for part in parents:
            node = node[part]
        value = node[leaf]
        if isinstance(value, str) and not value.startswith(TFDS_PREFIX):  # a dataset name
            node[leaf] = paths.absolute(value)


# Ranges of the numeric fields: (field, rule, test). Checked when the config loads, so that a
# wrong value is refused before the dataset is built or the model loads.
_RANGES = (
    ("train.batch_size", ">= 1", lambda v: v >= 1),
    ("train.num_epochs", "> 0", lambda v: v > 0),
    ("train.num_steps", ">= 0 (0: from num_epochs)", lambda v: v >= 0),
    ("train.loss_chunk", ">= 0 (0: all positions)", lambda v: v >= 0),
    ("train.attention_chunk", ">= 0 (0: whole rows)", lambda v: v >= 0),
    ("train.log_every", ">= 1", lambda v: v >= 1),
    ("train.checkpoint_every", ">= 1", lambda v: v >= 1),
    ("train.keep_last", ">= 1", lambda v: v >= 1),
    ("train.keep_every", ">= 0 (0: none)", lambda v: v >= 0),
    ("train.max_nonfinite", ">= 1", lambda v: v >= 1),
    ("optimizer.lr", ">= 0", lambda v: v >= 0),
    ("optimizer.vision_lr", ">= 0", lambda v: v >= 0),
    ("optimizer.warmup_ratio", "in [0, 1]", lambda v: 0 <= v <= 1),
    ("optimizer.weight_decay", ">= 0", lambda v: v >= 0),
    ("optimizer.grad_clip", ">= 0 (0: off)", lambda v: v >= 0),
    ("optimizer.grad_accum", ">= 1", lambda v: v >= 1),
    ("data.max_len", ">= 1", lambda v: v >= 1),
    ("data.max_views", ">= 1", lambda v: v >= 1),
    ("data.max_image_tokens", ">= 0 (0: derived)", lambda v: v >= 0),
    ("data.video_frames", ">= 1", lambda v: v >= 1),
    ("data.num_workers", ">= 0", lambda v: v >= 0),
    ("data.max_skip_fraction", "in [0, 1]", lambda v: 0 <= v <= 1),
)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses a numeric field out of its range (NaN included), naming field and value."""
    for name, rule, ok in _RANGES:
        group, field = name.split(".")
        value = config[group][field]
        if name == "train.num_epochs" and config.train.num_steps > 0:
            continue  # num_steps decides the run's length
        if not ok(value):
            raise ConfigLoadError(f"config.{name}={value} must be {rule}")
    run_settings(config)  # the remat policies' names


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Sets one `[--][config.]a.b=VALUE` in place, VALUE parsed as the field's type."""
    name, sep, text = override.partition("=")
    name = name.removeprefix("--").removeprefix("config.")
    if not sep or not name:
        raise ConfigLoadError(f"override {override!r}: expected --config.FIELD=VALUE")
    *parents, leaf = name.split(".")
    node = config
    for i, part in enumerate(parents):
        child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(child, ml_collections.ConfigDict):
            if ".".join(parents[: i + 1]) in ("model.overrides.vision", "model.overrides.text"):
                with node.unlocked():
                    node[part] = ml_collections.ConfigDict()
                child = node[part]
            else:
                raise ConfigLoadError(f"override {override!r}: no config field {name!r}")
        node = child
    where = ".".join(parents)
    if leaf in node:
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigLoadError(f"override {override!r}: {name!r} is a group, not a field")
        value = parse_value(text, current, name)
    elif where in _OPEN_DICTS:
        value = _parse_new(text, where, leaf, name)
    else:
        raise ConfigLoadError(f"override {override!r}: no config field {name!r}")
    with node.unlocked():
        node[leaf] = value


def parse_value(text: str, current: Any, name: str) -> Any:
    """Parses `text` as the type of `current` (bool, int, float, str, tuple, None)."""
    try:
        if isinstance(current, bool):
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return lowered in ("true", "1")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return _unquote(text)
        if isinstance(current, (tuple, list)):
            return _parse_tuple(text, current)
        if current is None:
            return _literal_or_str(text)
    except (ValueError, SyntaxError) as e:
        kind = type(current).__name__
        raise ConfigLoadError(f"--config.{name}={text!r}: not a valid {kind} ({e})") from None
    raise ConfigLoadError(f"--config.{name}: cannot override a {type(current).__name__}")


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _literal_or_str(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_tuple(text: str, current: Sequence[Any]) -> tuple:
    """`(a, b)` as a Python literal, or `a,b` without quotes when the items are strings."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, (tuple, list)):
        items = tuple(value)
    elif isinstance(value, str):
        items = (value,)
    elif text.strip() in ("", "()"):
        items = ()
    else:
        items = tuple(_unquote(s.strip()) for s in text.strip("()[] ").split(",") if s.strip())
        if value is not None and not isinstance(value, str):  # e.g. a lone number
            items = (value,)
    kinds = {type(v) for v in current}
    if kinds:
        want = kinds.pop() if len(kinds) == 1 else None
        for v in items:
            if (
                want is not None
                and not isinstance(v, want)
                and not (want is float and isinstance(v, int))
            ):
                raise ValueError(f"item {v!r} is not a {want.__name__}")
    return items


def _parse_new(text: str, where: str, leaf: str, name: str) -> Any:
    """A key a recipe did not set, in a dict of LlavaConfig / tfds field overrides."""
    if where == "data.tfds_fields":
        return _unquote(text)
    cls = _NESTED.get(where.rpartition(".")[2], LlavaConfig)
    if cls is LlavaConfig and leaf in LEGACY_RUN_KEYS:
        raise ConfigLoadError(
            f"--config.{name}: {leaf} is a run setting, not architecture: set "
            f"--config.train.{leaf} instead"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if leaf not in fields or leaf == "run" or leaf in _NESTED and cls is LlavaConfig:
        raise ConfigLoadError(f"--config.{name}: {cls.__name__} has no field {leaf!r}")
    default = fields[leaf].default
    if isinstance(default, (bool, int, float, str, tuple)) and not isinstance(default, type):
        # Enum fields are str subclasses; None defaults (pad ids, pinpoints) take a literal.
        return parse_value(text, default, name)
    return _literal_or_str(text)


# -- what the config implies ------------------------------------------------------------------


def apply_model_overrides(cfg: LlavaConfig, overrides: Any) -> LlavaConfig:
    """`cfg` with the `config.model.overrides` fields (nested `vision` / `text` groups) set."""
    d = cfg.to_dict()
    moved = sorted(set(_plain(overrides)) & set(LEGACY_RUN_KEYS))
    if moved:
        raise ConfigLoadError(
            f"config.model.overrides.{moved[0]} is a run setting, not architecture: set "
            f"config.train.{moved[0]} instead"
        )
    unknown = sorted(set(_plain(overrides)) - set(d))
    if unknown:
        raise ConfigLoadError(f"config.model.overrides: {unknown} are not LlavaConfig fields")
    for key, value in _plain(overrides).items():
        if key in _NESTED:
            if not isinstance(value, dict):
                raise ConfigLoadError(f"config.model.overrides.{key} must be a group of fields")
            d[key].update(value)
        else:
            d[key] = value
    try:
        return LlavaConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise ConfigLoadError(f"config.model.overrides: {e}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def model_config(config: ml_collections.ConfigDict) -> LlavaConfig:
    """The LlavaConfig a training config describes.

    `config.model.preset` (a name of `config.PRESETS`) plus `config.model.overrides`; with an
    empty preset, the config of `config.init_from` (a llava-jax model dir or an HF dir) plus
    the overrides; run settings from `config.train` (`run_settings`).
    """
    preset = config.model.preset
    if preset:
        try:
            base = LlavaConfig.preset(preset)
        except ValueError as e:
            raise ConfigLoadError(f"config.model.preset: {e}") from None
    elif config.init_from:
        base = _init_from_config(config.init_from)
    else:
        raise ConfigLoadError(
            "config.model.preset is empty and config.init_from is not set: no model to build"
        )
    return apply_model_overrides(base, config.model.overrides).replace(run=run_settings(config))


def run_settings(config: ml_collections.ConfigDict) -> RunSettings:
    """The `config.RunSettings` of `config.train` (dtype, remat, scan, attention chunk)."""
    t = config.train
    try:
        return RunSettings(
            dtype=t.dtype,
            param_dtype=t.param_dtype,
            scan_layers=bool(t.scan_layers),
            remat_policy=t.remat_policy,
            vision_remat_policy=t.vision_remat_policy,
            attention_chunk=int(t.attention_chunk),
        )
    except ValueError as e:
        raise ConfigLoadError(f"config.train: {e}") from None


def _init_from_config(path: str) -> LlavaConfig:
    from llava_jax.conversion import source
    from llava_jax.errors import CheckpointError

    try:
        return source.load_config(path)
    except CheckpointError as e:
        raise ConfigLoadError(f"config.init_from={path!r}: {e}") from None


def total_steps(config: ml_collections.ConfigDict, num_records: int) -> int:
    """Optimizer steps of the run: `train.num_steps` if > 0, else epochs over the records.

    As the HF Trainer counts them (no dropped last batch): ceil(num_epochs *
    ceil(num_records / batch_size)), at least 1. Packed runs must give `num_steps`.
    """
    if config.train.num_steps > 0:
        return int(config.train.num_steps)
    if config.data.packing:
        raise ConfigLoadError(
            "config.data.packing=True needs config.train.num_steps: a packed row holds "
            "several records, so an epoch's step count is unknown before packing (about "
            "num_epochs x records x mean tokens per record / (batch_size x max_len))"
        )
    if num_records <= 0:
        raise ConfigLoadError(f"total_steps: the training data has {num_records} records")
    if config.train.batch_size <= 0 or config.train.num_epochs <= 0:
        raise ConfigLoadError(
            f"config.train.batch_size={config.train.batch_size} and config.train.num_epochs="
            f"{config.train.num_epochs} must be positive"
        )
    per_epoch = math.ceil(num_records / config.train.batch_size)
    return max(1, math.ceil(config.train.num_epochs * per_epoch))
