"""Ctrl-C stops a command even when it lands inside a garbage-collector callback (JAX's
`_xla_gc_callback` runs at every collection), where Python ignores the KeyboardInterrupt;
in `chat` it stops the answer, and the conversation goes on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hf_tiny

from llava_jax.checks.tiny_tokenizer import build_tiny_tokenizer

CONFIG = Path(__file__).parent.parent / "configs" / "shapes_tiny.py"

# The real `llava-jax train` of the tiny run, with SIGINT sent from inside a gc callback as
# soon as the dataset is being written: deterministic, where a Ctrl-C typed at the terminal
# lands in a callback only some of the time.
SCRIPT = """
import gc, os, signal, sys
from llava_jax.train import shapes
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


# `llava-jax chat` with SIGINT sent while the first answer streams (at its second token).
CHAT = """
import os, signal, sys
from llava_jax.cli import chat
from llava_jax.cli.main import main

signal.signal(signal.SIGINT, signal.default_int_handler)
Streamer = chat.Streamer
class InterruptingStreamer(Streamer):
    def __call__(self, row, token):
        super().__call__(row, token)
        if len(self.ids) == 2 and not hasattr(chat, "interrupted"):
            chat.interrupted = True
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100_000):  # the handler runs here
                pass
chat.Streamer = InterruptingStreamer
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_stops_a_chat_answer_not_the_chat(tmp_path):
    hf_tiny.llava().save_pretrained(tmp_path)
    build_tiny_tokenizer().save_pretrained(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", CHAT, "chat", "--model", str(tmp_path), "--template", "vicuna_v1",
         "--max-new-tokens", "8"],
        input="Hello\nAnd now?\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(stopped; the answer is not kept" in proc.stderr
    assert proc.stdout.count("assistant> ") == 2  # the second message is answered
