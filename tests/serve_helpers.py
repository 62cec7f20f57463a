"""Shared by the serving tests: a tiny model directory and a live server on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import numpy as np
import uvicorn
from PIL import Image

TEMPLATE = "mistral_instruct"  # short prompts: the tiny model's context is 256 tokens


def build_model_dir(root: Path) -> Path:
    """A tiny random LLaVA-1.5 converted to a llava-jax model dir, with tokenizer and
    image processor config, as `convert hf-to-jax` leaves it."""
    import hf_tiny
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from llava_jax.convert.hf_to_jax import convert_hf_to_jax
    from llava_jax.tiny_tokenizer import save_tiny_tokenizer

    hf = root / "hf"
    hf_tiny.llava().save_pretrained(hf)
    save_tiny_tokenizer(hf)
    crop = {"height": hf_tiny.CROP, "width": hf_tiny.CROP}
    LlavaImageProcessorPil(size={"shortest_edge": hf_tiny.CROP}, crop_size=crop).save_pretrained(hf)
    convert_hf_to_jax(hf, root / "tiny-llava")
    return root / "tiny-llava"


def png_bytes(seed: int = 0, size=(60, 90)) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 255, (*size, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


class LiveServer:
    """Runs an ASGI app with uvicorn in a thread on a free port of 127.0.0.1."""

    def __init__(self, app):
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
