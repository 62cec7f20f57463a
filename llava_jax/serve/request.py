"""Parsing and validating an OpenAI chat completions request.

`parse_chat_request(body, cfg)` checks every field the server reads and turns the messages'
content parts into template messages with `<image>` placeholders, where the image parts were,
plus the list of image sources in order. `load_images` then reads each source (a base64 data
URL; a remote URL or a local file only where the config allows) into a PIL image. Every
problem raises `APIError` with a one-line message naming the field.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image

from llava_jax.data.image_processing import ImageError, load_image
from llava_jax.serve.config import ServeConfig
from llava_jax.serve.errors import APIError, invalid

PLACEHOLDERS = ("<image>", "<video>")
ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4  # as OpenAI


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """A validated chat request.

    Attributes:
      messages: `[{"role", "content": str}]`, `<image>` where each image part was.
      images: the image URLs (data, http(s) or file), in placeholder order.
      max_tokens: None: as many as the server default and the context allow.
      temperature, top_p, top_k, repetition_penalty, seed: sampling (seed None: random).
      stop: strings that end the answer (not included in it).
      stream: answer with server-sent events.
      include_usage: with `stream`, send a last chunk with the token counts.
    """

    model: str
    messages: tuple[dict[str, str], ...]
    images: tuple[str, ...]
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _number(body, name, default, lo, hi, integer=False, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise invalid(f"{name} must be {kind}, got {value!r}", name)
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise invalid(f"{name} must be {low} and <= {hi}, got {value!r}", name)
    return value


def _content(i: int, role: str, content: Any, images: list[str]) -> str:
    """One message's content as template text; image parts become `<image>` placeholders."""
    where = f"messages[{i}].content"
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list) and content:
        parts = content
    elif content is None and role == "assistant":
        parts = []
    else:
        raise invalid(f"{where} must be a string or a non-empty list of content parts", where)
    pieces = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"{where}[{j}].text must be a string", where)
            for tag in PLACEHOLDERS:
                if tag in text:
                    raise invalid(f"{where}[{j}]: text may not contain {tag}; send images as "
                                  "image_url content parts", where)  # fmt: skip
            pieces.append(text)
        elif kind == "image_url":
            if role != "user":
                raise invalid(f"{where}[{j}]: only user messages may hold images", where)
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise invalid(f"{where}[{j}].image_url.url must be a non-empty string", where)
            images.append(url)
            pieces.append("<image>")
        else:
            raise invalid(
                f"{where}[{j}]: content part type {kind!r} is not supported (text, image_url)",
                where,
            )
    return "\n".join(pieces)


def parse_chat_request(body: Any, cfg: ServeConfig) -> ChatRequest:
    """Validates a decoded JSON body; raises `APIError` (400, or 404 for an unknown model)."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required: a string naming the model (see /v1/models)", "model")
    if model != cfg.model_name:
        raise APIError(404, f"The model {model!r} does not exist; this server serves "
                       f"{cfg.model_name!r}", "model_not_found", "model")  # fmt: skip
    if body.get("n", 1) != 1:
        raise invalid("n must be 1", "n")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid("messages must be a non-empty list", "messages")
    messages, images = [], []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                          "messages")  # fmt: skip
        messages.append({"role": role, "content": _content(i, role, m.get("content"), images)})
    if len(images) > cfg.max_images:
        raise invalid(f"{len(images)} images in the request; at most {cfg.max_images} are "
                      "accepted", "messages", "too_many_images")  # fmt: skip
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 1, 2**31, integer=True)
    stop = body.get("stop")
    stop = (stop,) if isinstance(stop, str) else stop
    if stop is None:
        stop = ()
    if (not isinstance(stop, list | tuple) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stop)):  # fmt: skip
        raise invalid(f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS}",
                      "stop")  # fmt: skip
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise invalid("stream_options.include_usage must be true or false", "stream_options")
    return ChatRequest(
        model=model,
        messages=tuple(messages),
        images=tuple(images),
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", cfg.default_temperature, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1, lo_open=True)),
        top_k=_number(body, "top_k", 0, 0, 2**20, integer=True),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0, 100, lo_open=True)),
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
        stop=tuple(stop),
        stream=stream,
        include_usage=include_usage,
    )


# -- images -----------------------------------------------------------------------------------


def _data_url(url: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise invalid("an image data URL must look like data:image/<format>;base64,<data>",
                      "image_url", "invalid_image_url")  # fmt: skip
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("an image data URL holds invalid base64", "image_url",
                      "invalid_image_url") from None  # fmt: skip


def _fetch(url: str, cfg: ServeConfig) -> bytes:
    if not cfg.allow_remote_images:
        raise invalid("remote image URLs are refused by this server (start it with "
                      "--allow-remote-images); send the image as a base64 data URL",
                      "image_url", "remote_images_disabled")  # fmt: skip
    try:
        with urllib.request.urlopen(url, timeout=cfg.fetch_timeout_s) as response:  # noqa: S310
            data = response.read(cfg.max_body_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise invalid(f"cannot fetch image {url}: {e}", "image_url", "image_fetch_failed") from None
    if len(data) > cfg.max_body_bytes:
        raise APIError(413, f"image {url} is over {cfg.max_body_bytes} bytes", "image_too_large",
                       "image_url")  # fmt: skip
    return data


def _local(url: str, cfg: ServeConfig) -> bytes:
    if cfg.local_image_dir is None:
        raise invalid("local image files are refused by this server (start it with "
                      "--local-image-dir DIR); send the image as a base64 data URL",
                      "image_url", "local_images_disabled")  # fmt: skip
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url
    root = Path(cfg.local_image_dir).resolve()
    target = (root / path).resolve()  # an absolute path stays itself; `..` is resolved away
    if not target.is_relative_to(root):
        raise invalid(f"{path}: outside the directory images may be read from",
                      "image_url", "local_image_refused")  # fmt: skip
    try:
        if target.stat().st_size > cfg.max_body_bytes:
            raise APIError(413, f"{path}: over {cfg.max_body_bytes} bytes", "image_too_large",
                           "image_url")  # fmt: skip
        return target.read_bytes()
    except OSError as e:
        raise invalid(f"{path}: cannot read the file ({e.strerror})", "image_url",
                      "image_not_found") from None  # fmt: skip


def load_images(urls: tuple[str, ...], cfg: ServeConfig) -> list[Image.Image]:
    """Reads and decodes every image (blocking: run off the event loop)."""
    images = []
    for k, url in enumerate(urls):
        scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
        if scheme == "data":
            data = _data_url(url)
        elif scheme in ("http", "https"):
            data = _fetch(url, cfg)
        elif scheme in ("file", ""):
            data = _local(url, cfg)
        else:
            raise invalid(f"image URL scheme {scheme!r} is not supported (data, http, https)",
                          "image_url", "invalid_image_url")  # fmt: skip
        try:
            images.append(load_image(data, max_pixels=cfg.max_image_pixels))
        except ImageError as e:
            oversized = "decompression bomb" in str(e)
            code = "image_too_large" if oversized else "invalid_image"
            message = str(e).replace("<bytes>", f"image {k + 1}", 1)
            raise invalid(message, "image_url", code) from None
    return images
