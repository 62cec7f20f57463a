"""Shared by the serving tests: a tiny model directory and a live server on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import openai
import uvicorn
from PIL import Image

from llava_jax.media.image_processing import load_image

TEMPLATE = "mistral_instruct"  # short prompts: the tiny model's context is 256 tokens


def build_model_dir(root: Path) -> Path:
    """A tiny random LLaVA-1.5 converted to a llava-jax model dir, with tokenizer and
    image processor config, as `convert hf-to-jax` leaves it."""
    import hf_tiny

    from llava_jax.conversion.hf_to_jax import convert_hf_to_jax

    hf = hf_tiny.save_llava_dir(root / "hf")
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

    def __init__(self, app, cfg=None):
        from llava_jax.serve import ServeConfig
        from llava_jax.serve.http import uvicorn_config

        self.app = app
        self.server = uvicorn.Server(uvicorn_config(app, cfg or ServeConfig(), "127.0.0.1", 0))
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


# -- shared by test_serve.py and test_serve_errors.py -----------------------------------------

MODEL = "tiny-llava"
NEW = 8  # answer length in every test: one cache bucket, so one compile per batch size
# 33 to 41 prompt tokens each, all in one length bucket (as are the image questions below).
QUESTIONS = ["What is in the picture?", "Describe the image.", "What colour is it?",
             "Where was this taken?", "How many things are there?", "Describe it.",
             "What is it?", "How many?"]  # fmt: skip

JSON = {"Content-Type": "application/json"}
APPS = {}  # url -> the app behind it, filled by the `serve` fixture (tests/conftest.py)


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def server_of(url: str):
    """The server state behind a live URL (its scheduler, for its counters)."""
    return APPS[url].state.server


def reference(pipeline, question: str, seed: int = 0, max_tokens: int = NEW):
    """(answer, finish_reason, prompt tokens) of the pipeline itself, greedy, for an image
    then a question."""
    image = load_image(png_bytes(seed))
    prompt = pipeline.prompt([{"role": "user", "content": f"<image>\n{question}"}], [image])
    sampling = pipeline.stop_config(max_new_tokens=max_tokens)
    out = pipeline.generator.generate([prompt], sampling)[0]
    ids = out.token_ids
    if ids and ids[-1] in sampling.stop_token_ids:
        ids = ids[:-1]
    return pipeline.decode(ids), out.finish_reason, len(prompt.input_ids)


def user(question: str, seed: int = 0) -> dict:
    return {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(seed))}},
        {"type": "text", "text": question},
    ]}  # fmt: skip


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                         timeout=120, **kw)  # fmt: skip


def post(url: str, body, headers=None, raw: bytes | None = None):
    """(status, decoded JSON) of a POST to /v1/chat/completions."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        url + "/v1/chat/completions", data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def tiny_image_message(data: bytes, kind="png"):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(data, kind)}},
        {"type": "text", "text": "hi"}]}]  # fmt: skip
