"""Paths a user gives, made absolute once, where they enter (command-line flags, config).

orbax refuses a relative checkpoint path ("Checkpoint path should be absolute"), and a
relative path means something else to a process that changes directory. So every local
path is made absolute against the working directory of the command that received it; a
URL (gs://, memory://) is already absolute and stays as given. Stdlib only: the CLI's
argument types use it before anything heavy is imported.
"""

from __future__ import annotations

import os
from pathlib import Path


def is_url(path: str | os.PathLike) -> bool:
    """gs://bucket/x, memory://x, ...: a location epath resolves, not a local path."""
    return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
    """`path` against the working directory, `..` removed as a shell's `cd` does; a URL or
    "" unchanged."""
    text = os.fspath(path)
    if not text or is_url(text):
        return text
    return os.path.abspath(text)


def local_path(text: str) -> Path:
    """argparse `type=` for a local file or directory flag: an absolute Path ("" is the
    working directory, as `Path("")` is)."""
    return Path(os.path.abspath(text))


def location(text: str):
    """argparse `type=` for a file or directory that may also be remote (a model dir, eval
    data, an output folder): an `etils.epath.Path`, local ones made absolute."""
    from etils import epath  # not at the top: the CLI's parser loads this module

    return epath.Path(absolute(text))
