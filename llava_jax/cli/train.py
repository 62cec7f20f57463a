"""`llava-jax train`: train with a recipe config.

A placeholder until the command is built.
"""

from __future__ import annotations

import argparse

from llava_jax.cli import CommandError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train with a recipe config (not yet available)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise CommandError("llava-jax train is not available yet")
