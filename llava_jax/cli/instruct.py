"""`llava-jax instruct`: generate LLaVA-Instruct-style data.

A placeholder until the command is built.
"""

from __future__ import annotations

import argparse

from llava_jax.cli import CommandError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "instruct", help="generate LLaVA-Instruct-style data (not yet available)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise CommandError("llava-jax instruct is not available yet")
