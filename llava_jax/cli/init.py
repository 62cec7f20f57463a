"""`llava-jax init`: assemble a stage-1 model from pretrained vision and LLM checkpoints.

A placeholder until the command is built.
"""

from __future__ import annotations

import argparse

from llava_jax.cli import CommandError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "init",
        help="assemble a stage-1 model from pretrained parts (not yet available)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise CommandError("llava-jax init is not available yet")
