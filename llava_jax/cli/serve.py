"""`llava-jax serve`: serve an OpenAI-compatible chat API and page.

A placeholder until the command is built.
"""

from __future__ import annotations

import argparse

from llava_jax.cli import CommandError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible chat API and page (not yet available)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise CommandError("llava-jax serve is not available yet")
