"""`llava-jax plan`: compile the train step for a TPU topology and report fit and speed.

A placeholder until the command is built.
"""

from __future__ import annotations

import argparse

from llava_jax.cli import CommandError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="check fit and speed on a TPU topology (not yet available)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise CommandError("llava-jax plan is not available yet")
