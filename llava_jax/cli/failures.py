"""A failed write reaches the user as one line.

When orbax fails to write (a full disk, a size limit), the error reaches the command as an
exception, and two echoes of it reach the terminal first: orbax logs it with its traceback
from the writing thread (`_SignalingThread.run() raised an exception`,
orbax/checkpoint/_src/futures/future.py), and tensorstore's callbacks for the writes still
in flight each print `RuntimeError: Event loop is closed`, orbax having closed the loop the
failed write ran on. Both say nothing the exception does not; `hide_echoes` drops them
(`--verbose` keeps them). `os_errors` turns tensorstore's `[os_error_code='28']` into the
OSError it stands for, so the line reads `DIR: No space left on device` (as does an
OSError that names no file, from the safetensors writer).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")


def _not_an_echo(record: logging.LogRecord) -> bool:
    return record.exc_info is None or "_SignalingThread.run() raised" not in str(record.msg)


def _hiding_loop_closed(hook):
    def unraisable(args) -> None:
        value = args.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            hook(args)

    unraisable.hides_echoes = True
    return unraisable


def hide_echoes() -> None:
    """Drops the two echoes of a failed orbax write, for the rest of the process (the
    in-flight writes' callbacks may run after the command has returned)."""
    logging.getLogger("absl").addFilter(_not_an_echo)  # once: addFilter skips a duplicate
    if not getattr(sys.unraisablehook, "hides_echoes", False):
        sys.unraisablehook = _hiding_loop_closed(sys.unraisablehook)


@contextlib.contextmanager
def os_errors(out: Path) -> Iterator[None]:
    """While writing `out`: an orbax/tensorstore write error with an OS error code becomes
    that OSError, and an OSError that names no file names `out` (the original chained, for
    `--verbose`)."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(out)) from e
    except ValueError as e:
        code = _OS_ERROR_CODE.search(str(e))
        if code is None:
            raise
        errno = int(code[1])
        raise OSError(errno, os.strerror(errno), str(out)) from e
