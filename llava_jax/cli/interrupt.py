"""Ctrl-C that always stops a command.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. Inside a
garbage-collector callback the exception cannot propagate: Python prints "Exception ignored
in: <function _xla_gc_callback ...>" and goes on. JAX registers that callback
(`jax/_src/lib/__init__.py`) and it runs at every collection, so a Ctrl-C during an
allocation-heavy loop (the tiny run writing its dataset) was lost about one time in four.
The handler here raises the interrupt again once the callback has returned.
"""

from __future__ import annotations

import _thread
import contextlib
import gc
import signal
import threading
from collections.abc import Iterator
from types import FrameType

RETRY_S = 0.01  # how soon a deferred interrupt is raised again


def _swallowing(frame: FrameType | None) -> bool:
    """Whether `frame` runs inside code whose exceptions Python ignores: a gc callback or a
    finalizer (`__del__`)."""
    callbacks = {getattr(c, "__code__", None) for c in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if _swallowing(frame):
        retry = threading.Timer(RETRY_S, _thread.interrupt_main, (signum,))
        retry.daemon = True  # never outlives the command
        retry.start()
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """Within the block, Ctrl-C raises KeyboardInterrupt in the command's own code. A handler
    someone else installed (or a call off the main thread) is left alone."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
