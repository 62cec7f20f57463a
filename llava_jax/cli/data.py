"""`llava-jax data`: build training data (ArrayRecord shards).

A placeholder until the command is built.
"""

from __future__ import annotations

import argparse

from llava_jax.cli import CommandError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "data", help="build training data (ArrayRecord shards) (not yet available)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise CommandError("llava-jax data is not available yet")
