"""`llava-jax data build`: pack LLaVA JSON / YAML data and its media into ArrayRecord shards.

Training then streams the shards (`data.train: DIR`) instead of millions of small files.
Records whose media are missing, outside the image root or not an accepted format are
skipped and counted in the manifest, never fatal. See docs/data.md.
"""

from __future__ import annotations

import argparse

from etils import epath

from llava_jax.cli import CommandError
from llava_jax.paths import absolute, location


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="build training data (ArrayRecord shards)",
        description="Training data tools.",
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    build = actions.add_parser(
        "build",
        help="pack a JSON / JSONL / YAML dataset and its images into ArrayRecord shards",
        description="Read a LLaVA JSON / JSONL file or a OneVision YAML mixture, embed each "
        "record's image and video files, and write ArrayRecord shards plus manifest.json "
        "(counts of skipped records by reason) and skipped.jsonl.",
    )
    build.add_argument(
        "--input",
        required=True,
        type=absolute,
        metavar="JSON_OR_YAML",
        help="LLaVA .json/.jsonl or .yaml",
    )
    build.add_argument(
        "--image-root",
        type=location,
        metavar="DIR",
        help="folder the records' media paths are in (local or gs://)",
    )
    build.add_argument(
        "--out",
        required=True,
        type=location,
        metavar="DIR",
        help="directory to create, local or gs:// (must not exist, or be empty)",
    )
    build.add_argument(
        "--num-shards",
        type=int,
        metavar="N",
        help="shard files to write (default: one per 50,000 records, at least --workers)",
    )
    build.add_argument(
        "--workers", type=int, default=1, metavar="N", help="shards written at once (default 1)"
    )
    build.add_argument(
        "--seed", type=int, default=0, help="seed of random:N sampling in a YAML mixture"
    )
    build.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out when it holds an earlier build (nothing else is ever replaced)",
    )
    build.set_defaults(run=run_build)


def run_build(args: argparse.Namespace) -> int:
    from llava_jax.data.build import build_shards

    source = epath.Path(args.input)  # local or gs://
    if not source.is_file():
        raise CommandError(f"--input {source}: no such file")
    if args.image_root is not None and not args.image_root.is_dir():
        raise CommandError(f"--image-root {args.image_root}: no such directory")
    for flag, value in (("--num-shards", args.num_shards), ("--workers", args.workers)):
        if value is not None and value < 1:
            raise CommandError(f"{flag} {value}: must be at least 1")
    summary = build_shards(
        str(source),
        None if args.image_root is None else str(args.image_root),
        args.out,
        num_shards=args.num_shards,
        workers=args.workers,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    print(summary.line())
    return 0
