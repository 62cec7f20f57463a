"""Ctrl-C stops a command even when it lands inside a garbage-collector callback (JAX's
`_xla_gc_callback` runs at every collection), where Python ignores the KeyboardInterrupt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONFIG = Path(__file__).parent.parent / "configs" / "shapes_tiny.py"

# The real `llava-jax train` of the tiny run, with SIGINT sent from inside a gc callback as
# soon as the dataset is being written: deterministic, where a Ctrl-C typed at the terminal
# lands in a callback only some of the time.
SCRIPT = """
import gc, os, signal, sys
from llava_jax import shapes
from llava_jax.cli.main import main

# As at a terminal, even when the tests run as a shell's background job (SIGINT ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
writing = False
def interrupt_inside(phase, info):
    global writing
    if writing:
        writing = False
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100_000):  # the handler runs here, inside the callback
            pass
gc.callbacks.append(interrupt_inside)

draw_scene = shapes.draw_scene
def draw_and_interrupt(*args, **kwargs):
    global writing
    if not hasattr(draw_and_interrupt, "done"):
        draw_and_interrupt.done = writing = True
        gc.collect()
    return draw_scene(*args, **kwargs)
shapes.draw_scene = draw_and_interrupt
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_inside_a_gc_callback_stops_the_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, "train", "--config", str(CONFIG), "--workdir",
         str(tmp_path / "run"), "--config.shapes.num_stage1=100000"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "llava-jax: interrupted", proc.stderr[-2000:]
    assert "Exception ignored" not in proc.stderr
