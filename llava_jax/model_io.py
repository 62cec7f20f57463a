"""A llava-jax model directory: config, orbax parameters, and the files needed to run it.

    DIR/llava_config.json    LlavaConfig.to_dict()
    DIR/params/              orbax checkpoint of the parameter tree (nested dict of arrays)
    DIR/assets/              tokenizer, image-processor, chat-template and generation files

A directory is written under a temporary name and renamed into place when complete, so an
interrupted conversion never leaves something that looks like a model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from llava_jax import paths
from llava_jax.config import LlavaConfig
from llava_jax.errors import CheckpointError
from llava_jax.models.build import abstract_params, default_sharding
from llava_jax.param_paths import flat_to_nested, nested_to_flat

CONFIG_FILE = "llava_config.json"
PARAMS_DIR = "params"
ASSETS_DIR = "assets"


def save_model_dir(
    out_dir: str | os.PathLike,
    cfg: LlavaConfig,
    params: Mapping[str, Any],
    assets_from: str | os.PathLike | None = None,
    asset_files: list[str] | None = None,
) -> Path:
    """Writes a model directory atomically.

    Args:
      out_dir: the directory to create; it must not exist yet, or be empty.
      cfg: the model config.
      params: flat {"a/b/c": array} or nested dict of numpy or jax arrays.
      assets_from: a directory to copy `asset_files` from (an HF checkpoint or model dir).
      asset_files: file names relative to `assets_from`.
    """
    if paths.is_url(out_dir):
        return _save_remote_model_dir(epath.Path(out_dir), cfg, params, assets_from, asset_files)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not empty; refusing to overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private
        nested = params if not any("/" in k for k in params) else flat_to_nested(params)
        with ocp.Checkpointer(_param_writer()) as ckptr:
            ckptr.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(nested))
        assets = tmp / ASSETS_DIR
        assets.mkdir()
        for name in asset_files or []:
            shutil.copy2(Path(assets_from) / name, assets / name)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        _remove_tree(tmp)
        raise
    return out


def _remove_tree(path: Path, tries: int = 50, settle: int = 5) -> None:
    """Removes a failed write's folder. After a write error, TensorStore's threads may still
    be finishing other files in it: one `rmtree` can meet a folder that is not empty yet, and
    a file written after it re-creates the folder. So the folder must stay absent for
    `settle` checks 0.1 s apart."""
    absent = 0
    for _ in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        absent = absent + 1 if not path.exists() else 0
        if absent >= settle:
            return
        time.sleep(0.1)
    shutil.rmtree(path, ignore_errors=not path.exists())  # still there: say why


def _save_remote_model_dir(
    out: epath.Path,
    cfg: LlavaConfig,
    params: Mapping[str, Any],
    assets_from: str | os.PathLike | None,
    asset_files: list[str] | None,
) -> epath.Path:
    """`save_model_dir` to a bucket (gs://), which has no atomic rename: orbax commits
    `params/` itself, then the assets, and `llava_config.json` last, so a directory without
    it (an interrupted write) is never taken for a model."""
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; refusing to overwrite")
    nested = params if not any("/" in k for k in params) else flat_to_nested(params)
    with ocp.Checkpointer(_param_writer()) as ckptr:
        ckptr.save(out / PARAMS_DIR, args=ocp.args.PyTreeSave(nested))
    assets = out / ASSETS_DIR
    assets.mkdir(parents=True, exist_ok=True)
    for name in asset_files or []:
        (assets / name).write_bytes((Path(assets_from) / name).read_bytes())
    (out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return out


def _param_writer() -> ocp.PyTreeCheckpointHandler:
    # Two orbax defaults would each double the converter's peak memory: numpy leaves are
    # deep-copied before writing (for async saves; this save is synchronous and nothing
    # mutates the arrays), and zstd compression holds every encoded chunk until the commit
    # (and gains little on trained weights). Measured in docs/conversion.md.
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    return ocp.PyTreeCheckpointHandler(
        type_handler_registry=registry, use_compression=False, save_concurrent_gb=1
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def local_assets(model_dir: str | os.PathLike) -> Path:
    """A remote (gs://) model dir's `assets/` (tokenizer, processor), copied to a local
    temporary directory: transformers reads tokenizers from local directories only."""
    remote = epath.Path(model_dir) / ASSETS_DIR
    if not remote.is_dir():
        raise CheckpointError(f"{model_dir}: no {ASSETS_DIR}/ (tokenizer and processor files)")
    local = Path(tempfile.mkdtemp(prefix="llava-jax-assets-"))
    for f in remote.iterdir():
        if f.is_file():
            (local / f.name).write_bytes(f.read_bytes())
    return local


def is_model_dir(path: str | os.PathLike) -> bool:
    return (epath.Path(path) / CONFIG_FILE).is_file()  # local or gs://


def load_config(model_dir: str | os.PathLike) -> LlavaConfig:
    path = epath.Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no {CONFIG_FILE}; not a llava-jax model directory")
    try:
        return LlavaConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: malformed config: {e}") from None


def load_params(
    model_dir: str | os.PathLike,
    cfg: LlavaConfig | None = None,
    shardings: Mapping[str, jax.sharding.Sharding] | None = None,
    dtype: Any = None,
    expected: Mapping[str, jax.ShapeDtypeStruct] | None = None,
) -> dict[str, jax.Array]:
    """Restores the flat parameter dict, each array straight into its sharding.

    Args:
      model_dir: a directory written by `save_model_dir`.
      cfg: the config to check shapes against (default: the directory's own).
      shardings: flat {path: Sharding}; default: every array on the first local device.
      dtype: cast every parameter to this dtype while restoring (default: as stored).
      expected: flat {path: ShapeDtypeStruct} of `cfg`'s model when the caller has them
        (`TrainSetup.plain_params`); default: built from `cfg`.
    """
    cfg = cfg or load_config(model_dir)
    params_dir = epath.Path(paths.absolute(model_dir)) / PARAMS_DIR  # orbax: absolute only
    if not params_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no {PARAMS_DIR}/ (incomplete checkpoint?)")
    expected = expected if expected is not None else abstract_params(cfg)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            stored = nested_to_flat(ckptr.metadata(params_dir).item_metadata.tree)
        except Exception as e:  # orbax raises several types for unreadable metadata
            raise CheckpointError(f"{params_dir}: unreadable orbax checkpoint ({e})") from None
        missing = sorted(set(expected) - set(stored))
        unexpected = sorted(set(stored) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{params_dir}: parameters do not fit the config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        device = default_sharding()
        target = {}
        for path, want in expected.items():
            got = tuple(stored[path].shape)
            if got != tuple(want.shape):
                raise CheckpointError(
                    f"{params_dir}: {path} has shape {got}, the config expects {want.shape}"
                )
            sharding = shardings[path] if shardings else device
            target[path] = jax.ShapeDtypeStruct(got, dtype or stored[path].dtype, sharding=sharding)
        try:
            restored = ckptr.restore(params_dir, flat_to_nested(target))
        except Exception as e:  # tensorstore raises a bare Exception for a truncated data file
            reason = (str(e).splitlines() or [type(e).__name__])[0].split(" See full")[0]
            raise CheckpointError(f"{params_dir}: unreadable orbax checkpoint ({reason})") from e
    params = nested_to_flat(restored)
    check_finite(params, params_dir)
    return params


def check_finite(params: Mapping[str, Any], where: str | os.PathLike) -> None:
    """Refuses floating-point parameters holding NaN or infinity, naming the first.

    Damaged bytes in a weights file (same size, so nothing else notices) otherwise load
    silently, and the model answers with empty or garbage text. One fused reduction per
    tensor on its own devices: a read of the weights. One program per group of tensors of up
    to `_CHECK_GROUP_BYTES`, not one over the whole dict: on CPU a program held about 0.6x its
    inputs more at peak (`benchmarks/convert_memory.py`, BENCHMARKS.md), and one program per
    tensor compiles once per shape (twice the time for a tiny model).
    """
    floating = {k: v for k, v in params.items() if jnp.issubdtype(v.dtype, jnp.floating)}
    counts = {}
    for group in _groups(floating, _CHECK_GROUP_BYTES):
        counts |= jax.device_get(_count_nonfinite(group))
    bad = sorted(k for k, n in counts.items() if n)
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{where}: {bad[0]} holds {int(counts[bad[0]]):,} NaN or infinite values{more}; "
            "the weights are damaged"
        )


_CHECK_GROUP_BYTES = 256 << 20


def _groups(arrays: Mapping[str, Any], limit: int):
    """`arrays` in order, as dicts of at most `limit` bytes (an array over it alone)."""
    group, size = {}, 0
    for k, v in arrays.items():
        if group and size + v.nbytes > limit:
            yield group
            group, size = {}, 0
        group[k] = v
        size += v.nbytes
    if group:
        yield group


@jax.jit
def _count_nonfinite(params: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: jnp.sum(~jnp.isfinite(v), dtype=jnp.int32) for k, v in params.items()}


# An adapter dir (`llava-jax export` of a LoRA run without --merge): the run's trained
# parameters (adapters, the projector) and its `train.lora` settings, applied at load time
# to the base model it was trained from (`generate` / `serve --adapter`).
ADAPTER_CONFIG_FILE = "lora_config.json"


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (epath.Path(path) / ADAPTER_CONFIG_FILE).is_file()


def save_adapter_dir(out_dir: str | os.PathLike, spec, params: Mapping[str, Any]) -> Path:
    """Writes `params` (flat) and `spec` (a `lora.LoraSpec`) as an adapter dir."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not empty; refusing to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    with ocp.Checkpointer(_param_writer()) as ckptr:
        ckptr.save(out / PARAMS_DIR, args=ocp.args.PyTreeSave(flat_to_nested(dict(params))))
    settings = dataclasses.asdict(spec)
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")  # last
    return out


def load_adapter_dir(adapter_dir: str | os.PathLike):
    """(`lora.LoraSpec`, flat {path: array}) of an adapter dir."""
    from llava_jax.models.lora import LoraSpec

    path = epath.Path(adapter_dir) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{adapter_dir}: no {ADAPTER_CONFIG_FILE}; not an adapter dir (`llava-jax export` "
            "of a LoRA run without --merge writes one)"
        )
    try:
        settings = json.loads(path.read_text())
        spec = LoraSpec(**{**settings, "modules": tuple(settings["modules"])})
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: malformed adapter settings: {e}") from None
    params_dir = epath.Path(paths.absolute(adapter_dir)) / PARAMS_DIR
    with ocp.StandardCheckpointer() as ckptr:
        try:
            tree = ckptr.metadata(params_dir).item_metadata.tree
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=default_sharding()),
                tree,
            )
            params = nested_to_flat(ckptr.restore(params_dir, target))
        except Exception as e:  # orbax raises several types for unreadable checkpoints
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{params_dir}: unreadable orbax checkpoint ({reason})") from None
    check_finite(params, params_dir)
    return spec, params
