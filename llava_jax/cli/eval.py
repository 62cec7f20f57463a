"""`llava-jax eval`: evaluate on a benchmark.

A placeholder until the command is built.
"""

from __future__ import annotations

import argparse

from llava_jax.cli import CommandError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate on a benchmark (not yet available)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise CommandError("llava-jax eval is not available yet")
