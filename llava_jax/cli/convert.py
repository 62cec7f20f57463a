"""`llava-jax convert hf-to-jax | jax-to-hf`: checkpoints between Hugging Face and llava-jax.

Both directions refuse a non-empty `--out` before doing any work, and write under a
temporary name that is renamed into place when complete: an interrupted run leaves nothing
that looks like a checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from llava_jax.cli import CommandError
from llava_jax.cli.failures import os_errors
from llava_jax.paths import local_path

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert checkpoints between Hugging Face and llava-jax",
        description="Convert LLaVA / LLaVA-NeXT / LLaVA-OneVision checkpoints.",
    )
    directions = parser.add_subparsers(title="directions", metavar="DIRECTION", required=True)

    to_jax = directions.add_parser(
        "hf-to-jax",
        help="Hugging Face directory -> llava-jax model directory",
        description="Convert a Hugging Face LLaVA directory (config.json + safetensors), or a "
        "checkpoint of the original repositories (LlavaLlamaForCausalLM, "
        "LlavaMistralForCausalLM, LlavaQwenForCausalLM), to a llava-jax model directory "
        "(config, orbax parameters, tokenizer files).",
    )
    to_jax.add_argument(
        "--hf", required=True, type=local_path, metavar="DIR", help="Hugging Face model directory"
    )
    to_jax.add_argument(
        "--out",
        required=True,
        type=local_path,
        metavar="DIR",
        help="llava-jax model directory to create (must not exist, or be empty)",
    )
    to_jax.add_argument(
        "--dtype",
        choices=DTYPES,
        help="cast the parameters (default: keep the checkpoint's dtypes)",
    )
    to_jax.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read pickled .bin/.pt weights; they can run code, so only for files you trust",
    )
    to_jax.add_argument(
        "--vision",
        type=local_path,
        metavar="DIR",
        help="original-repository checkpoints: Hugging Face directory of the vision tower "
        "(mm_vision_tower); its weights are used when the checkpoint has none (LLaVA-1.5)",
    )
    to_jax.add_argument(
        "--conv-mode",
        metavar="NAME",
        help="original-repository checkpoints: the conversation template they were trained "
        "with (the original's --conv-mode, e.g. vicuna_v1); needed without a chat template",
    )
    to_jax.set_defaults(run=run_hf_to_jax)

    to_hf = directions.add_parser(
        "jax-to-hf",
        help="llava-jax model directory -> Hugging Face directory",
        description="Convert a llava-jax model directory to a Hugging Face directory that "
        "transformers' from_pretrained loads.",
    )
    to_hf.add_argument(
        "--ckpt", required=True, type=local_path, metavar="DIR", help="llava-jax model directory"
    )
    to_hf.add_argument(
        "--out",
        required=True,
        type=local_path,
        metavar="DIR",
        help="Hugging Face directory to create (must not exist, or be empty)",
    )
    to_hf.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="largest safetensors shard, e.g. 5GB or 500MiB (default: 5GB)",
    )
    to_hf.set_defaults(run=run_jax_to_hf)


def run_hf_to_jax(args: argparse.Namespace) -> int:
    from llava_jax.conversion.hf_to_jax import convert_hf_to_jax

    _require_dir(args.hf, "--hf")
    if _format(args.hf) == "llava-jax":
        raise CommandError(
            f"--hf {args.hf}: is a llava-jax model directory; to export it use "
            "`convert jax-to-hf --ckpt`"
        )
    _require_empty(args.out)

    start = time.perf_counter()
    if args.vision is not None:
        _require_dir(args.vision, "--vision")
    with os_errors(args.out):
        cfg = convert_hf_to_jax(
            args.hf,
            args.out,
            dtype=args.dtype,
            allow_pickle=args.allow_pickle,
            vision_dir=args.vision,
            conv_mode=args.conv_mode,
        )
    _report(cfg.family, args.out, args.out, time.perf_counter() - start)
    return 0


def run_jax_to_hf(args: argparse.Namespace) -> int:
    from llava_jax.conversion.jax_to_hf import convert_jax_to_hf
    from llava_jax.conversion.tensor_io import parse_size
    from llava_jax.model_io import load_config

    _require_dir(args.ckpt, "--ckpt")
    if _format(args.ckpt) == "hf":
        raise CommandError(
            f"--ckpt {args.ckpt}: is a Hugging Face directory, not a llava-jax one; to import "
            "it use `convert hf-to-jax --hf`"
        )
    _require_empty(args.out)
    cfg = load_config(args.ckpt)  # a one-line error for a wrong directory, before any work
    max_shard_size = parse_size(args.max_shard_size)
    start = time.perf_counter()
    with os_errors(args.out):
        _write_atomically(args.out, lambda tmp: convert_jax_to_hf(args.ckpt, tmp, max_shard_size))
    _report(cfg.family, args.ckpt, args.out, time.perf_counter() - start)
    if cfg.convention == "original":
        print(
            "note: this model was converted from an original-repository checkpoint; "
            "transformers runs the export with its own AnyRes rounding and prompt "
            "tokenization, not the original's (docs/conversion.md)",
            file=sys.stderr,
        )
    return 0


def _format(path: Path) -> str | None:
    """ "llava-jax" or "hf" (`conversion/source.py`); None for neither, which the converter
    then refuses naming the file it misses."""
    from llava_jax.conversion import source
    from llava_jax.errors import CheckpointError

    try:
        return source.format_of(path)
    except CheckpointError:
        return None


def _require_dir(path: Path, flag: str) -> None:
    if not path.exists():
        raise CommandError(f"{flag} {path}: no such directory")
    if not path.is_dir():
        raise CommandError(f"{flag} {path}: not a directory")


def _require_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CommandError(f"--out {out}: exists and is not empty; refusing to overwrite")


def _write_atomically(out: Path, write: Callable[[Path], object]) -> None:
    """Calls `write(tmp)` on a fresh sibling directory, then renames it to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not tempfile.mkdtemp: its mode 0700 would outlive the rename
    try:
        write(tmp)
        if out.exists():
            out.rmdir()  # empty, checked before; rmdir fails rather than delete anything
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _report(family: str, model_dir: Path, out: Path, seconds: float) -> None:
    """One summary line; parameter count and dtypes as stored in the llava-jax directory."""
    num_params, dtypes = _stored_params(model_dir)
    dtype = dtypes[0] if len(dtypes) == 1 else "mixed " + "/".join(dtypes)
    print(f"{family}: {num_params:,} parameters, {dtype} -> {out.absolute()} ({seconds:.1f} s)")


def _stored_params(model_dir: Path) -> tuple[int, list[str]]:
    """(parameter count, sorted dtype names) from the orbax metadata, without reading arrays."""
    import orbax.checkpoint as ocp

    from llava_jax.model_io import PARAMS_DIR
    from llava_jax.param_paths import nested_to_flat

    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.metadata(model_dir.absolute() / PARAMS_DIR).item_metadata.tree
    leaves = nested_to_flat(tree).values()
    return sum(math.prod(m.shape) for m in leaves), sorted({str(m.dtype) for m in leaves})
