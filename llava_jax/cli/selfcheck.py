"""`llava-jax selfcheck`: convert tiny random transformers models and compare the logits."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from llava_jax.checks.selfcheck import FAMILIES
from llava_jax.cli import CommandError
from llava_jax.paths import local_path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "selfcheck",
        help="check this install against transformers on tiny random models",
        description="For each family, build a tiny random transformers model, convert it, "
        "run both on a random image prompt and compare the logits (PASS: max |diff| <= 1e-4). "
        "Needs torch. Exits 1 if any family fails.",
    )
    parser.add_argument(
        "--family",
        choices=(*FAMILIES, "all"),
        default="all",
        help="which family to check (default: all)",
    )
    parser.add_argument(
        "--workdir",
        type=local_path,
        metavar="DIR",
        help="keep the tiny HF and converted models here, one folder per "
        "family (default: a temporary directory, removed afterwards)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise CommandError(
            "selfcheck compares against transformers' PyTorch models and needs torch: "
            "pip install -e '.[torch]'"
        ) from None
    from llava_jax.checks.selfcheck import check_family, format_table

    families = FAMILIES if args.family == "all" else (args.family,)
    if args.workdir is not None:
        for family in families:
            folder = args.workdir / family
            if folder.exists() and any(folder.iterdir()):
                raise CommandError(f"--workdir {args.workdir}: {family}/ is not empty")
        results = [check_family(f, args.workdir / f) for f in families]
    else:
        tmp = tempfile.mkdtemp(prefix="llava-jax-selfcheck-")
        try:
            results = [check_family(f, Path(tmp) / f) for f in families]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(format_table(results))
    return 0 if all(r.passed for r in results) else 1
